#!/usr/bin/env bash
# The benchmark in one command, on a clean clone too: set everything up, then run bench/run.py.
#   bash bench/run.sh                      # every section; the table on stdout, JSON in bench/results/latest.json
#   bash bench/run.sh --with-llamacpp      # first install the llama.cpp peer (section 4; compiled once)
#   bash bench/run.sh --quick --only 3,7   # options after it go to bench/run.py (--help lists them)
set -euo pipefail
cd "$(dirname "$0")/.."
with_peer=0
if [ "${1:-}" = "--with-llamacpp" ]; then
  with_peer=1
  shift
fi
echo "==> setting up (scripts/setup.sh: .venv, pinned dependencies, embedded models; quick when already done)"
# setup.sh has no set-up-only mode; its test mode with pytest's --collect-only sets up and runs no test.
# A test that fails to import must not stop the benchmark: set-up errors still show on stderr, and bench/run.py
# fails at once without its environment.
bash scripts/setup.sh test --collect-only -qq >/dev/null || echo "(set-up: pytest's collection step failed; going on)" >&2
if [ "$with_peer" = 1 ]; then
  bash bench/setup_peer.sh
fi
exec .venv/bin/python bench/run.py "$@"
