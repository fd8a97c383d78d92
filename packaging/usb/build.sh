#!/usr/bin/env bash
# Builds the USB-key bundle: the binary, start scripts, a short guide, an example
# configuration, the example rules and the SBOM (CycloneDX), with SHA-256 checksums. The data directory is created
# beside the binary on first start, so the key carries program and data together.
#
#   packaging/usb/build.sh [BINARY] [OUT_DIR]
#   (defaults: target/release/rollcall and target/usb/rollcall-<version>)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release/rollcall}
[ -x "$bin" ] || { echo "no binary at $bin: run 'cargo build --release' first" >&2; exit 2; }
version=$("$bin" --version | awk '{print $2}')
out=${2:-target/usb/rollcall-$version}
rm -rf "$out"
mkdir -p "$out/rules"
cp "$bin" "$out/rollcall"
cp packaging/usb/start.sh packaging/usb/README.txt "$out/"
cp packaging/usb/rollcall.toml.example "$out/"
cp -R rules/. "$out/rules/"
chmod +x "$out/rollcall" "$out/start.sh"
# The software bill of materials (CycloneDX) of what is built into the binary.
python3 packaging/sbom.py "$out/sbom.cdx.json"
(cd "$out" && find . -type f ! -name SHA256SUMS -print0 | sort -z | xargs -0 sha256sum > SHA256SUMS)
echo "$out"
