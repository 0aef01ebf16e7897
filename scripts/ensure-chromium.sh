#!/usr/bin/env bash
# Makes sure Debian's Chromium is installed: the dashboard's test drives it headless through
# playwright-core (which downloads no browser of its own). As root it installs the package;
# otherwise it says how and goes on (the dashboard test is then skipped).
set -euo pipefail
if command -v chromium >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-chromium: Chromium is not installed (the dashboard test will be skipped); run: sudo apt-get install -y chromium" >&2
  exit 0
fi
echo "ensure-chromium: installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq chromium >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium >/dev/null
}
chromium --version | head -1
