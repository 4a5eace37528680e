#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install mm_moslora with its test extra.
# Re-running is cheap: it reinstalls only when pyproject.toml changed. Source it or run it.
#   MM_TORCH_SPEC  torch packages to install when torch is missing (default: the versions this project is tested on)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MM_VENV:-$root/.venv}"
torch_spec="${MM_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.mm_moslora_installed"
want="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] installing $torch_spec"
    "$py" -m pip install -q $torch_spec
  fi
  echo "[setup] installing mm_moslora and its dependencies"
  "$py" -m pip install -q -e "$root[test]"
  # lmms-eval's own dependencies are heavy (video, wandb, ...); its model API needs only these two.
  "$py" -m pip install -q --no-deps "lmms-eval==0.7.3"
  "$py" -m pip install -q loguru pytz
  echo "$want" > "$stamp"
fi
