#!/usr/bin/env bash
# The Prompt flow chat-UI test drives a headless Chromium. Install Debian's package when we can
# (root + apt-get); otherwise say what to do: that test fails with the same instruction.
set -eu
command -v chromium >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the Prompt flow UI test..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "note: chromium not found; install it (e.g. 'sudo apt-get install chromium') for the Prompt flow UI test" >&2
fi
