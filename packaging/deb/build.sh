#!/usr/bin/env bash
# Builds the Debian package with dpkg-deb: the binary, the systemd unit, an example
# configuration (a conffile) and the data directory /var/lib/rollcall, owned by the
# rollcall system user that the maintainer scripts create.
#
#   packaging/deb/build.sh [BINARY] [OUT_DIR]
#   (defaults: target/release/rollcall and target/deb; DEB_COMPRESSION=gzip for speed)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release/rollcall}
out=${2:-target/deb}
[ -x "$bin" ] || { echo "no binary at $bin: run 'cargo build --release' first" >&2; exit 2; }
command -v dpkg-deb >/dev/null || { echo "dpkg-deb is needed (Debian's dpkg package)" >&2; exit 2; }
version=$("$bin" --version | awk '{print $2}')
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/rollcall_${version}_${arch}"
install -D -m 0755 "$bin" "$root/usr/bin/rollcall"
install -D -m 0644 packaging/systemd/rollcall.service "$root/lib/systemd/system/rollcall.service"
install -D -m 0640 packaging/usb/rollcall.toml.example "$root/etc/rollcall/rollcall.toml"
install -d -m 0750 "$root/var/lib/rollcall"
for d in README.md docs/ARCHITECTURE.md docs/BENCHMARKS.md docs/RETENTION.md packaging/systemd/INSTALL.md; do
  install -D -m 0644 "$d" "$root/usr/share/doc/rollcall/$(basename "$d")"
done
python3 packaging/sbom.py "$root/usr/share/doc/rollcall/sbom.cdx.json"
chmod 0644 "$root/usr/share/doc/rollcall/sbom.cdx.json"
install -d "$root/DEBIAN"
size=$(du -sk "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: rollcall
Version: $version
Architecture: $arch
Maintainer: rollcall maintainers <rollcall@localhost>
Installed-Size: $size
Depends: libc6, adduser
Section: admin
Priority: optional
Description: bulk user management appliance
 One self-contained binary with an embedded database: spreadsheet templates,
 validation, all-or-nothing imports, a job queue and a hash-chained audit log.
CONTROL
echo /etc/rollcall/rollcall.toml > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd rollcall >/dev/null; then
    adduser --system --group --home /var/lib/rollcall --no-create-home rollcall >/dev/null
  fi
  chown rollcall:rollcall /var/lib/rollcall
  chgrp rollcall /etc/rollcall/rollcall.toml
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
  fi
fi
POSTINST
cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl stop rollcall.service >/dev/null 2>&1 || true
fi
PRERM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm"
mkdir -p "$out"
dpkg-deb --build --root-owner-group -Z"${DEB_COMPRESSION:-xz}" "$root" "$out/rollcall_${version}_${arch}.deb" >/dev/null
(cd "$out" && sha256sum "rollcall_${version}_${arch}.deb" > "rollcall_${version}_${arch}.deb.sha256")
echo "$out/rollcall_${version}_${arch}.deb"
