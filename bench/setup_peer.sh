#!/usr/bin/env bash
# One-time set-up of the benchmark's llama.cpp peer (section 4 of bench/run.py): llama-cpp-python, pinned in
# bench/requirements-peer.txt, installed into .venv. Benchmark only: the service never imports it.
# From PyPI pip compiles llama.cpp (needs a C++ compiler and cmake; about 15-25 minutes on 2 cores, once:
# pip caches the wheel it built).
#   bash bench/setup_peer.sh
#   LLAMA_WHEELS=/path/to/folder bash bench/setup_peer.sh   # use a wheel built before (pip wheel ... -w folder)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "no .venv here: run \`bash bench/run.sh --with-llamacpp\` (sets everything up) or \`bash scripts/setup.sh test\`" >&2
  exit 1
fi
args=(--progress-bar off -r bench/requirements-peer.txt)
if [ -n "${LLAMA_WHEELS:-}" ]; then
  args=(--find-links "$LLAMA_WHEELS" "${args[@]}")
fi
echo "==> installing the llama.cpp peer into .venv (bench/requirements-peer.txt; compiles llama.cpp the first time)"
PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip install "${args[@]}"
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
