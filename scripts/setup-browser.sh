#!/usr/bin/env bash
# Installs headless Chromium and its WebDriver from Debian's packages (chromium, chromium-driver) for
# the browser test, tests/test_mlflow_browser.py. Safe to run again: when /usr/bin/chromium and
# /usr/bin/chromedriver are already there it does nothing. Uses sudo only when not run as root.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-browser: no apt-get here; install Chromium and chromedriver yourself, at /usr/bin/chromium" \
         "and /usr/bin/chromedriver (the browser test needs them)" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "setup-browser: installing chromium and chromium-driver with apt-get (a minute or two, once)"
apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600)
$sudo "${apt[@]}" update
# fonts-dejavu-core: a minimal Debian has no fonts, and the screenshots would show empty boxes.
$sudo "${apt[@]}" install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core
/usr/bin/chromium --version 2>/dev/null  # its launcher warns about /dev/shm on some hosts
/usr/bin/chromedriver --version
