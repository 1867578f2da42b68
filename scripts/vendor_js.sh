#!/usr/bin/env bash
# Re-vendor the viewer's JavaScript libraries from npm, exactly as pinned in js/package-lock.json.
#
# The copies in transcoders/viewer/static/vendor/ are committed, so a fresh clone (and a pip
# install) needs no npm; run this only after changing the pin in js/package.json (then run
# `npm install` in js/ first to update the lock file). Install scripts are never run
# (js/.npmrc sets ignore-scripts); only the prebuilt bundle and its licence are copied.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vendor="$root/transcoders/viewer/static/vendor"
cd "$root/js"
npm ci --ignore-scripts --no-audit --no-fund
mkdir -p "$vendor"
cp node_modules/d3/dist/d3.min.js "$vendor/d3.min.js"
cp node_modules/d3/LICENSE "$vendor/d3.LICENSE"
version="$(node -p 'require("./node_modules/d3/package.json").version')"
echo "vendored d3 $version into $vendor"
