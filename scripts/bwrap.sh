#!/usr/bin/env bash
# Makes sure bubblewrap (`bwrap`) is installed: every evaluation runs its model and evaluator
# processes under it, and there is no fallback without it. Installs the Debian package
# `bubblewrap` with apt-get when missing (the package lists are refreshed only if the first
# try fails), then checks that this kernel lets it build a sandbox. Prints bwrap's path.
set -euo pipefail

if ! command -v bwrap >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y -qq bubblewrap >/dev/null 2>&1; then
        $sudo apt-get update -qq >/dev/null
        $sudo apt-get install -y -qq bubblewrap >/dev/null
    fi
fi

# The same namespaces the worker asks for; a container whose seccomp profile forbids them
# fails here, with bwrap's own message, rather than at the first evaluation.
if [ "$(id -u)" -eq 0 ]; then
    bwrap --unshare-pid --unshare-net --unshare-ipc --unshare-uts --die-with-parent \
        --ro-bind / / --proc /proc --dev /dev true
else
    bwrap --unshare-all --unshare-user --die-with-parent \
        --ro-bind / / --proc /proc --dev /dev true
fi
command -v bwrap
