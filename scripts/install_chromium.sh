#!/usr/bin/env bash
# Install the system Chromium that the browser test of `patchmosaic report` drives
# (tests/test_report.py, through Playwright with executable_path; Playwright's own
# browser download, `playwright install`, is never used).
#
# - Chromium already there ($PATCHMOSAIC_CHROMIUM, else /usr/bin/chromium): nothing to do.
# - Root or passwordless sudo, and apt-get: lists the packages apt-get would install (~25,
#   ~400 MB), then apt-get install chromium (apt-get update only if the install fails without it).
# - Otherwise: a message, exit 0; the browser test is then skipped.
set -euo pipefail

CHROMIUM="${PATCHMOSAIC_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "install_chromium: using $CHROMIUM"
    exit 0
fi

give_up() {
    echo "install_chromium: $1, so Chromium was not installed and the browser test of" \
         "tests/test_report.py will be skipped. To run it, install Chromium (Debian:" \
         "sudo apt-get install chromium) or set PATCHMOSAIC_CHROMIUM to a Chromium/Chrome binary." >&2
    exit 0
}

command -v apt-get >/dev/null 2>&1 || give_up "no apt-get on this system"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    give_up "this is not root and sudo needs a password"
fi

export DEBIAN_FRONTEND=noninteractive
# Say what will be installed, and why, before installing it.
plan=$(apt-get -s install --no-install-recommends chromium 2>/dev/null | awk '/^Inst /{print $2}' || true)
if [ -n "$plan" ]; then
    echo "install_chromium: installing Debian's chromium for the browser test of tests/test_report.py" \
         "(Playwright drives the system browser); apt-get will install $(echo "$plan" | wc -l) packages" \
         "(about 400 MB on disk):" $plan
else
    echo "install_chromium: installing Debian's chromium and its dependencies (about 400 MB) with apt-get" \
         "for the browser test of tests/test_report.py"
fi
apt_install() {
    ${SUDO[@]+"${SUDO[@]}"} apt-get install -y --no-install-recommends chromium
}
if ! apt_install; then
    echo "install_chromium: retrying after apt-get update" >&2
    ${SUDO[@]+"${SUDO[@]}"} apt-get update || give_up "apt-get update failed"
    apt_install || give_up "apt-get install chromium failed"
fi
if [ -x "$CHROMIUM" ]; then
    echo "install_chromium: installed $CHROMIUM"
else
    give_up "apt-get installed chromium but $CHROMIUM does not exist"
fi
