#!/usr/bin/env bash
# Build a Debian package of driftwarden's agent or collector: a private virtual environment in
# /opt/driftwarden (never the distribution's site-packages), the hardened systemd unit, an
# example configuration as a conffile and the shipped policies.
#
#   packaging/debian/build-deb.sh agent|collector [OUTDIR]
#
# Needs Debian's python3 and python3-venv (the venv must point at /usr/bin/python3 on the
# target) and dpkg-deb; for the agent, gcc, libssl-dev and python3-dev too, which build its C
# measurement (agent/_native.c, linked against libssl3's libcrypto). Reaches PyPI for the
# dependencies.
set -euo pipefail
component=${1:?usage: build-deb.sh agent|collector [OUTDIR]}
outdir=$(realpath "${2:-dist}")
repo=$(cd "$(dirname "$0")/../.." && pwd)
case "$component" in
  agent) extra=agent; unit=driftwarden-agent.service; depends="python3 (>= 3.11), python3-venv, libssl3" ;;
  collector) extra=collector; unit=driftwarden-collector.service; depends="python3 (>= 3.11), python3-venv" ;;
  *) echo "error: component must be agent or collector, not '$component'" >&2; exit 2 ;;
esac
version=$(/usr/bin/python3 -c "import tomllib,sys; print(tomllib.load(open(sys.argv[1],'rb'))['project']['version'])" "$repo/pyproject.toml")
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
venv=$stage/opt/driftwarden

/usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --no-cache-dir --upgrade pip
"$venv/bin/pip" install -q --no-cache-dir "$repo[$extra]"
if [ "$component" = agent ] && ! "$venv/bin/python" -c 'import agent._native' 2>/dev/null; then
  echo "error: agent._native was not built (gcc, libssl-dev and python3-dev are needed)" >&2
  exit 1
fi
# The venv was made under the staging directory: point it at its installed home.
grep -rlI --null "$stage" "$venv/bin" | xargs -0 -r sed -i "s|$stage||g"
find "$venv" -name '__pycache__' -prune -exec rm -rf {} +

install -D -m 0644 "$repo/systemd/$unit" "$stage/lib/systemd/system/$unit"
if [ "$component" = agent ]; then
  # Not enabled by default: copy it into /etc/systemd/system/driftwarden-agent.service.d/
  # to let the agent use fanotify (docs/agent.md).
  install -D -m 0644 "$repo/systemd/driftwarden-agent-fanotify.conf" \
    "$stage/usr/share/driftwarden/systemd/driftwarden-agent-fanotify.conf"
fi
install -d -m 0755 "$stage/etc/driftwarden" "$stage/usr/share/driftwarden/policies"
install -m 0644 "$repo"/policies/*.toml "$stage/usr/share/driftwarden/policies/"
conffiles=()
if [ -f "$repo/packaging/$component.toml.example" ]; then
  install -m 0640 "$repo/packaging/$component.toml.example" "$stage/etc/driftwarden/$component.toml"
  conffiles+=("/etc/driftwarden/$component.toml")
fi
if [ "$component" = agent ]; then
  install -m 0644 "$repo/policies/debian-server.toml" "$stage/etc/driftwarden/policy.toml"
  conffiles+=("/etc/driftwarden/policy.toml")
fi

install -d "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: driftwarden-$component
Version: $version
Architecture: $arch
Maintainer: driftwarden maintainers <maintainers@driftwarden.invalid>
Installed-Size: $size
Depends: $depends
Section: admin
Priority: optional
Description: driftwarden $component: drift detection for immutable infrastructure
 driftwarden proves a running server is still exactly the image it was built from,
 reports every mutation and SSH login, and replaces drifted hosts instead of repairing them.
CONTROL
printf '%s\n' "${conffiles[@]}" > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<POSTINST
#!/bin/sh
set -e
if [ "\$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable $unit >/dev/null
fi
POSTINST
cat > "$stage/DEBIAN/prerm" <<PRERM
#!/bin/sh
set -e
if [ "\$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl disable --now $unit >/dev/null || true
fi
PRERM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm"

mkdir -p "$outdir"
deb="$outdir/driftwarden-${component}_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
echo "$deb"
