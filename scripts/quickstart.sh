#!/usr/bin/env bash
# Set up driftwarden in a private virtual environment and run its main job on this machine:
# make a pipeline key, bake a signed baseline of this machine's /etc and /usr (the measured
# roots of policies/minimal.toml can be widened to the whole machine), then check it.
set -euo pipefail
cd "$(dirname "$0")/.."
state=${DRIFTWARDEN_HOME:-$PWD/.quickstart}
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[agent,collector]'
mkdir -p "$state"
agent=.venv/bin/driftwarden-agent
[ -f "$state/pipeline.key" ] || "$agent" keygen --out "$state/pipeline.key"
"$agent" bake --root / --policy policies/minimal.toml --out "$state/baseline.dwm" \
  --key "$state/pipeline.key" --build-id "quickstart-$(hostname)"
"$agent" check --root / --baseline "$state/baseline.dwm" --pubkey "$state/pipeline.key.pub"
