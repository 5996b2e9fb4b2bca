#!/usr/bin/env bash
# Installs what tests/test_browser.py drives: Debian's chromium and chromium-driver (as root, with apt-get).
# Does nothing when both are already there; never fails the caller (the browser test then skips with a reason).
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[segx] installing chromium and chromium-driver for the browser test (apt-get) ..." >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
        echo "[segx] could not install chromium/chromium-driver; the browser test will be skipped" >&2
else
    echo "[segx] chromium/chromedriver missing and not root with apt-get: the browser test will be skipped" >&2
fi
exit 0
