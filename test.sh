#!/usr/bin/env bash
# Run every test, unit and integration, as root: installs what they need first
# (./install.sh --no-start, the same path as a real install). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./install.sh --no-start
set +e
if [ $# -eq 0 ]; then set -- tests; fi
/opt/faasd/venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
