#!/usr/bin/env bash
# Install what tests/test_results_page.py's browser test needs when it is missing: headless Chromium and
# its WebDriver from Debian (packages chromium, chromium-driver). selenium itself is a pip package
# (the test extra). Idempotent: does nothing when both commands are already on PATH.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if (have chromium || have chromium-browser || have google-chrome) && have chromedriver; then
    echo "install-browser: chromium and chromedriver already installed"
    exit 0
fi
if ! have apt-get; then
    echo "install-browser: no apt-get here; install Chromium and chromedriver by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then SUDO="sudo"; else echo "install-browser: need root (or sudo) for apt-get" >&2; exit 1; fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver
chromium --version || true
chromedriver --version
