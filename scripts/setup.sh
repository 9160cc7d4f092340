#!/usr/bin/env bash
# Create .venv and install the bundle with the pinned versions of constraints.txt (idempotent).
#   bash scripts/setup.sh            # bundle + LiteMedSAM default + test tools
#   EXTRAS=lite,label bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${EXTRAS:-lite,label,fl,tracking,export,dev}"
python="${PYTHON:-python3}"
stamp=.venv/.installed
want="$(cat constraints.txt setup.cfg | sha256sum | cut -c1-16) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date ($extras)" >&2
  exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "setup: installing the bundle with extras [$extras] (torch is large: a few minutes on first run)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --progress-bar off -c constraints.txt -e ".[${extras}]"
echo "$want" > "$stamp"
echo "setup: done" >&2
