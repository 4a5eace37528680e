#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install mm_moslora with its test and eval extras,
# and Chromium for the chat page's tests.
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
  echo "[setup] installing mm_moslora and its dependencies (with the test, serve and eval extras)"
  # The eval extra is lmms-eval as users install it, with all its dependencies: the tests run the real
  # `lmms_eval` command on an offline task (tests/test_lmms_eval_cli.py).
  "$py" -m pip install -q -e "$root[test,eval]"
  echo "$want" > "$stamp"
fi
# The chat page's tests drive Debian's Chromium (tests/test_serve_page.py); without it they fail, never skip.
if [ -z "${MM_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing chromium (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "[setup] warning: apt-get could not install chromium: the chat page tests will fail" >&2
  else
    echo "[setup] warning: chromium is missing and this script cannot install it (needs apt-get as root):" \
         "install Debian's chromium package or set MM_CHROMIUM=/path/to/chromium; the chat page tests will fail" >&2
  fi
fi
