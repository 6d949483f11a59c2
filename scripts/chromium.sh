#!/usr/bin/env bash
# Makes sure headless Chromium and its chromedriver are there for the dashboard's browser
# tests: installs Debian's chromium and chromium-driver when missing, as root with apt-get.
# Otherwise it says what is missing and exits 1: the browser tests then fail (they never skip).
set -euo pipefail
DRIVER="${HATRACK_CHROMEDRIVER:-/usr/bin/chromedriver}"
have() { [ -x "$DRIVER" ] && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; }
have && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >&2
  have && exit 0
  echo "apt-get installed chromium and chromium-driver, but $DRIVER or chromium is still missing" >&2
else
  echo "chromium and chromium-driver are not installed and this user cannot apt-get install them:" \
       "the dashboard's browser tests will fail (install them, or set HATRACK_CHROMEDRIVER)" >&2
fi
exit 1
