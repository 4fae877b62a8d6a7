#!/usr/bin/env bash
# Headless Chromium for tests/test_report_browser.py (does every image of report.html load in
# a browser?): prints the path of a Chromium binary, installing Debian/Ubuntu's `chromium`
# package with apt-get first where none is found (root only; about 100 MB, once).
#
#   tests/chromium.sh          # path on stdout; exit 1 with the reason on stderr
#
# The test runs it as root only; not as root, or without apt-get, it skips with the reason.
set -euo pipefail

find_chromium() {
    local name
    for name in chromium chromium-browser google-chrome-stable google-chrome chrome; do
        command -v "$name" 2>/dev/null && return 0
    done
    return 1
}

find_chromium && exit 0
command -v apt-get >/dev/null || { echo "chromium.sh: no Chromium and no apt-get to install it" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "chromium.sh: installing Chromium needs root" >&2; exit 1; }
echo "chromium.sh: installing chromium (apt-get)" >&2
apt-get -o DPkg::Lock::Timeout=300 update -qq
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium >/dev/null
find_chromium || { echo "chromium.sh: apt-get installed no chromium binary" >&2; exit 1; }
