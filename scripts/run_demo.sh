#!/usr/bin/env bash
# Set up the environment if needed, then run the end-to-end demo on the built-in synthetic data.
# Extra arguments go to scripts/demo.py (e.g. --adapter lora).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" scripts/demo.py "$@"
