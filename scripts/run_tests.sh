#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite. Extra arguments go to pytest.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh" || exit 1
cd "$root"
# One pytest-xdist worker per core (MM_TEST_WORKERS=N to choose, 0 for one process); whole modules per worker, the
# longest first (tests/conftest.py). Each test runs one torch thread (tiny models): a worker per core fills the machine.
"$root/.venv/bin/python" -m pytest -n "${MM_TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
