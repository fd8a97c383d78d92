#!/usr/bin/env bash
# The test command: installs what the tests need beyond cargo on a Debian machine when it is
# missing (dpkg-deb, ldd, sha256sum, python3 for the packaging tests and the SBOM; openssl
# and Python's aiosmtpd for the real SMTP server of the mail tests; chromium and
# chromedriver for the browser test), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
missing=()
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v ldd >/dev/null || missing+=(libc-bin)
command -v sha256sum >/dev/null || missing+=(coreutils)
command -v python3 >/dev/null || missing+=(python3)
command -v openssl >/dev/null || missing+=(openssl)
# The Debian package's maintainer scripts (installed for real in tests/packaging.rs).
command -v adduser >/dev/null || missing+=(adduser)
command -v unshare >/dev/null || missing+=(util-linux)
# The browser of tests/browser.rs: Debian's chromium driven by its chromedriver.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
# The SMTP server of tests/mail.rs: aiosmtpd for the python3 on PATH (Debian's package when
# that is Debian's python3, else from PyPI).
if ! python3 -c "import aiosmtpd" 2>/dev/null; then
  if [ "$(command -v python3)" = /usr/bin/python3 ]; then
    $sudo apt-get update && $sudo apt-get install -y --no-install-recommends python3-aiosmtpd
  else
    python3 -m pip install --quiet --disable-pip-version-check aiosmtpd
  fi
fi
cargo test --locked "$@"
