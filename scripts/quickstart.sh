#!/usr/bin/env bash
# The quick start: driftwarden's main job on this machine, in one command.
#
#   scripts/quickstart.sh          set up what is missing, then run: a collector on SQLite on
#                                  127.0.0.1, a signed baseline of this machine's /etc and
#                                  programs (policies/quickstart.toml), and the agent for this
#                                  machine reporting to the collector; shows the fleet
#   scripts/quickstart.sh stop     stop the agent and the collector
#
# Everything it makes stays in .venv/ and .quickstart/ (keys, tokens, baseline, database, logs);
# running it again reuses all of it. Run it as root: the agent reads every file it guards.
# Environment (all optional): DRIFTWARDEN_HOME (state, default ./.quickstart), DRIFTWARDEN_VENV
# (./.venv), DRIFTWARDEN_LISTEN (127.0.0.1:8080), DRIFTWARDEN_ROOT (the machine root to bake and
# guard, /), DRIFTWARDEN_POLICY (policies/quickstart.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

home=${DRIFTWARDEN_HOME:-$PWD/.quickstart}
venv=${DRIFTWARDEN_VENV:-$PWD/.venv}
listen=${DRIFTWARDEN_LISTEN:-127.0.0.1:8080}
root=${DRIFTWARDEN_ROOT:-/}
policy=${DRIFTWARDEN_POLICY:-$PWD/policies/quickstart.toml}
url=http://$listen
db=sqlite:///$home/collector.db
dw=$venv/bin/driftwarden
agent=$venv/bin/driftwarden-agent
wait_s=120

say() { printf '==> %s\n' "$*"; }

# The pid in FILE, if that process is still ours (its command line names CONFIG).
running() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2" || return 1
  echo "$pid"
}

stop_one() {
  local pid
  if pid=$(running "$home/$1.pid" "$2"); then
    say "stopping the $1 (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 300); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$home/$1.pid"
}

if [ "${1:-start}" = stop ]; then
  stop_one agent "$home/agent.toml"
  stop_one collector "$home/collector.toml"
  exit 0
elif [ "${1:-start}" != start ]; then
  echo "usage: $0 [start|stop]" >&2
  exit 2
fi

# --- a private virtual environment with driftwarden -------------------------------------------
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
  else
    echo "error: python3 cannot make virtual environments: apt-get install python3-venv" >&2
    exit 2
  fi
fi
[ -x "$venv/bin/python" ] || { say "making $venv"; python3 -m venv "$venv"; }
stamp=$venv/.driftwarden-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x "$dw" ] || [ ! -x "$agent" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing driftwarden into $venv"
  "$venv/bin/python" -m pip install -q -e '.[agent,collector]'
  echo "$want" >"$stamp"
fi

# --- keys, tokens and the baseline (each made once) -------------------------------------------
mkdir -p "$home"
chmod 700 "$home"
if [ ! -f "$home/pipeline.key" ]; then
  say "making the image pipeline's signing key"
  "$agent" keygen --out "$home/pipeline.key"
fi
if [ ! -s "$home/admin.token" ]; then
  say "creating an admin token"
  "$dw" token create --role admin --name quickstart --db "$db" | tail -n 1 >"$home/admin.token"
fi
if [ ! -s "$home/enroll.token" ]; then
  say "creating an enrollment token"
  "$dw" enroll-token create --note quickstart --db "$db" | tail -n 1 >"$home/enroll.token"
fi
chmod 600 "$home/admin.token" "$home/enroll.token"
if [ ! -f "$home/baseline.dwm" ]; then
  say "baking a signed baseline of $root per $policy"
  "$agent" bake --root "$root" --policy "$policy" --out "$home/baseline.dwm.tmp" \
    --key "$home/pipeline.key" --build-id "quickstart-$(hostname)"
  mv "$home/baseline.dwm.tmp" "$home/baseline.dwm"
fi

cat >"$home/collector.toml" <<EOF
[server]
listen = "$listen"

[database]
url = "$db"

[images]
pipeline_public_keys = ["$home/pipeline.key.pub"]
EOF

if [ "$root" = / ]; then
  logins='[logins]'
else  # another root's logins are not this machine's journal or utmp
  logins=$(printf '[logins]\nauth_logs = ["%s"]\njournal = false\nutmp = false' \
    "${root%/}/var/log/auth.log")
fi
cat >"$home/agent.toml" <<EOF
[agent]
root = "$root"
state_dir = "$home/agent"
baseline = "$home/baseline.dwm"
pipeline_public_key = "$home/pipeline.key.pub"

[collector]
url = "$url"
enroll_token_file = "$home/enroll.token"

$logins
EOF

export DRIFTWARDEN_URL=$url
DRIFTWARDEN_TOKEN=$(cat "$home/admin.token")
export DRIFTWARDEN_TOKEN

# Poll COMMAND until it succeeds, for at most $wait_s seconds.
await() {
  local what=$1
  shift
  for _ in $(seq 1 $((wait_s * 2))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "error: $what did not happen in ${wait_s}s; see $home/*.log" >&2
  exit 1
}

ready() {
  "$venv/bin/python" -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=2)' "$url"
}

# --- the collector and the agent (each started once) ------------------------------------------
if ! running "$home/collector.pid" "$home/collector.toml" >/dev/null; then
  say "starting the collector on $url (SQLite: $home/collector.db)"
  nohup "$dw" serve --config "$home/collector.toml" </dev/null >>"$home/collector.log" 2>&1 &
  echo $! >"$home/collector.pid"
fi
await "the collector's start" ready
"$dw" images register "$home/baseline.dwm" >/dev/null

started=
if ! running "$home/agent.pid" "$home/agent.toml" >/dev/null; then
  say "starting the agent for this machine"
  nohup "$agent" --log-level info run --config "$home/agent.toml" </dev/null >>"$home/agent.log" 2>&1 &
  echo $! >"$home/agent.pid"
  started=$!
fi

# Has this host reported? When the agent was started just now: has that agent run reported its
# boot measurement (or why there is none)?
reported() {
  local host_id
  host_id=$(cat "$home/agent/host-key.owner" 2>/dev/null) || return 1
  "$dw" events "$host_id" --json --limit 1000 | "$venv/bin/python" -c 'import json, sys
pid = int(sys.argv[1] or 0)
reports = [e for e in json.load(sys.stdin)["events"] if e["type"] == "report"]
starts = [e["seq"] for e in reports if e["kind"] == "agent_start" and e["body"]["pid"] == pid]
after = [e for e in reports if starts and e["seq"] > max(starts) and e["kind"] != "heartbeat"]
sys.exit(0 if not pid and reports or after else 1)' "$started"
}
say "waiting for the agent's report"
await "the agent's report" reported

echo
"$dw" fleet
echo
"$dw" hosts
cat <<EOF

The collector runs on $url — its web page is $url/ (paste the admin token from
$home/admin.token). To ask it yourself:

  export DRIFTWARDEN_URL=$url DRIFTWARDEN_TOKEN=\$(cat $home/admin.token)
  $dw host ID        # or: hosts, events ID, fleet, images

Logs: $home/collector.log, $home/agent.log. Stop both with: scripts/quickstart.sh stop
EOF
