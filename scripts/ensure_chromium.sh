#!/usr/bin/env bash
# Headless Chromium for the book's PDF and the browser test: installs Debian's `chromium` when it is missing
# and this runs as root with apt-get; otherwise warns (the book is then built without its PDF and the
# browser test is skipped). Sourced by main.sh and test.sh.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium (the book's PDF and browser test) ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium not found and cannot be installed here: no book PDF, no browser test" >&2
  fi
fi
