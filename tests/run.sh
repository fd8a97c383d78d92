#!/usr/bin/env bash
# The test command: installs what the tests need beyond cargo on a Debian machine when it is
# missing (dpkg-deb, ldd, sha256sum, python3 for the packaging tests and the SBOM), then
# runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v ldd >/dev/null || missing+=(libc-bin)
command -v sha256sum >/dev/null || missing+=(coreutils)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
cargo test --locked "$@"
