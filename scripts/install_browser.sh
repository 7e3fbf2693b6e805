#!/usr/bin/env bash
# Install Debian's chromium for tests/test_ui.py (driven by Playwright through
# `executable_path`: Playwright's own browser download cannot be reached from our machines).
# Idempotent: does nothing when a chromium is already there. Needs root or sudo to install;
# without either it only says so (and fails when CI is set, where the browser tests must run).
#
#   bash scripts/install_browser.sh      # prints what it found or installed
set -euo pipefail

find_chromium() { command -v chromium || command -v chromium-browser || true; }

found=$(find_chromium)
if [ -n "$found" ]; then
  echo "install_browser: $("$found" --version 2>/dev/null || echo chromium) already at $found"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "install_browser: chromium is missing and installing it needs root or sudo:" >&2
  echo "  apt-get install -y chromium" >&2
  # Without it tests/test_ui.py skips, except on CI, where it must run.
  [ -n "${CI:-}" ] && exit 1
  exit 0
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -q && \
       "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium fonts-liberation; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "install_browser: apt-get failed (log above)" >&2
  exit 1
fi
found=$(find_chromium)
echo "install_browser: installed $("$found" --version 2>/dev/null) at $found"
