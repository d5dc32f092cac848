#!/usr/bin/env bash
# Makes sure Debian's Chromium is at /usr/bin/chromium, for the browser tests (Playwright drives
# it through its executable path; `playwright install` downloads builds, which we never do).
# Installs it with apt-get when missing; needs root (or passwordless sudo).
set -euo pipefail

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

if [ -x "$CHROMIUM" ]; then
    echo "$CHROMIUM"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "chromium.sh: $CHROMIUM is missing and installing it needs root" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium.sh: $CHROMIUM is missing and there is no apt-get to install it" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q >&2
# fonts-dejavu-core: readable text in the screenshots on a bare image.
"${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >&2

if [ ! -x "$CHROMIUM" ]; then
    echo "chromium.sh: apt-get ran but $CHROMIUM is still missing" >&2
    exit 1
fi
echo "$CHROMIUM"
