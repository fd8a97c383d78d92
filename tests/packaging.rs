//! The USB-key bundle: built by packaging/usb/build.sh, started from a fresh copy in a
//! temporary folder, it serves and keeps its data beside the binary.

mod common;

use std::process::{Command, Stdio};

use common::BIN;

#[test]
fn the_usb_bundle_starts_from_a_fresh_copy_and_keeps_its_data_beside_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let built = dir.path().join("bundle");
    let o = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/usb/build.sh"
        ))
        .arg(BIN)
        .arg(&built)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "rollcall",
        "start.sh",
        "README.txt",
        "rollcall.toml.example",
        "SHA256SUMS",
        "rules/README.md",
        "sbom.cdx.json",
    ] {
        assert!(built.join(f).exists(), "{f} missing");
    }
    // The SBOM names what is built in, and no other platform's crate.
    let sbom: serde_json::Value =
        serde_json::from_slice(&std::fs::read(built.join("sbom.cdx.json")).unwrap()).unwrap();
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    let names: Vec<&str> = sbom["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for built_in in ["rusqlite", "calamine", "rust_xlsxwriter", "warp", "zip"] {
        assert!(
            names.contains(&built_in),
            "{built_in} missing from the SBOM"
        );
    }
    assert!(
        !names.contains(&"windows-sys"),
        "another platform's crate in the SBOM"
    );
    let sums = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&built)
        .output()
        .unwrap();
    assert!(
        sums.status.success(),
        "{}",
        String::from_utf8_lossy(&sums.stdout)
    );
    // "Copy the key" to another place and start it there.
    let key = dir.path().join("media").join("KEY");
    std::fs::create_dir_all(&key).unwrap();
    let cp = Command::new("cp")
        .arg("-R")
        .arg(format!("{}/.", built.display()))
        .arg(&key)
        .status()
        .unwrap();
    assert!(cp.success());
    let mut server = Command::new(key.join("start.sh"))
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("ROLLCALL_DATA_DIR")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let mut server = common::KillOnDrop(server);
    let mut out = std::io::BufReader::new(stdout);
    let (addr, first_start, line) = common::listen_addr(&mut out);
    // The key's first start makes the operator account and says so on the console.
    assert!(first_start.contains("one-time password"), "{first_start}");
    assert!(
        line.contains(&key.join("rollcall-data").display().to_string()),
        "{line}"
    );
    let hc = Command::new(key.join("rollcall"))
        .args(["healthcheck", "--addr", &addr])
        .output()
        .unwrap();
    assert!(
        hc.status.success(),
        "{}",
        String::from_utf8_lossy(&hc.stderr)
    );
    // The whole product: the web UI is served from inside the binary.
    let page = common::web::raw(&addr, "GET", "/", &[], None);
    assert_eq!(page.status, 200);
    assert!(
        page.text().contains("<title>rollcall</title>"),
        "{}",
        page.text()
    );
    assert!(
        common::web::raw(&addr, "GET", "/app.js", &[], None)
            .text()
            .contains("/api/v1")
    );
    unsafe {
        libc::kill(server.0.id() as i32, libc::SIGTERM);
    }
    assert!(server.0.wait().unwrap().success());
    assert!(key.join("rollcall-data").join("rollcall.db").exists());

    // A key that is read-only (a write-protected stick, a CD): the start stops with one
    // sentence saying where to point the data directory. The medium is a read-only bind
    // mount in a mount namespace of its own.
    let ro = dir.path().join("media").join("RO-KEY");
    std::fs::create_dir_all(&ro).unwrap();
    for f in ["rollcall", "start.sh"] {
        std::fs::copy(key.join(f), ro.join(f)).unwrap();
    }
    let script = r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || { echo "no read-only mount here" >&2; exit 99; }
touch "$1/probe" 2>/dev/null && { echo "the mount is writable" >&2; exit 98; }
"$1/start.sh" --listen 127.0.0.1:0; echo "exit=$?"
ROLLCALL_DATA_DIR="$2" timeout 5 "$1/rollcall" tenant create Elsewhere; echo "exit=$?""#;
    let elsewhere = dir.path().join("writable-data");
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", script, "sh"])
        .arg(&ro)
        .arg(&elsewhere)
        .env_remove("ROLLCALL_DATA_DIR")
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !out.contains("no read-only mount here"),
        "this test makes a read-only bind mount (unshare -m, as root): {out}"
    );
    assert!(
        out.contains("Cannot use the data directory")
            && out.contains("rollcall-data")
            && out.contains("the medium is read-only")
            && out.contains("--data-dir DIR or ROLLCALL_DATA_DIR"),
        "{out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"exit=3"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    // Pointed at a writable place, the same read-only key works.
    assert!(out.contains("Created tenant Elsewhere"), "{out}");
    assert!(elsewhere.join("rollcall.db").exists());
    // A tenant created with the bundled binary lands in the same place.
    let o = Command::new(key.join("rollcall"))
        .args(["tenant", "create", "Acme"])
        .env_remove("ROLLCALL_DATA_DIR")
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = Command::new(key.join("rollcall"))
        .args(["tenant", "list"])
        .env_remove("ROLLCALL_DATA_DIR")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("Acme"));
}

#[test]
fn the_debian_package_holds_the_binary_unit_configuration_and_data_directory() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        panic!("dpkg-deb is missing: .ci/run installs Debian's dpkg");
    }
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/deb/build.sh"
        ))
        .arg(BIN)
        .arg(dir.path())
        // The test binary is a large debug build: compress it quickly.
        .env("DEB_COMPRESSION", "gzip")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deb = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let info = Command::new("dpkg-deb")
        .args(["--info", &deb])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("Package: rollcall") && info.contains("Depends: libc6, adduser"),
        "{info}"
    );
    let list = Command::new("dpkg-deb")
        .args(["--contents", &deb])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for path in [
        "./usr/bin/rollcall",
        "./lib/systemd/system/rollcall.service",
        "./etc/rollcall/rollcall.toml",
        "./var/lib/rollcall/",
        "./usr/share/doc/rollcall/RETENTION.md",
        "./usr/share/doc/rollcall/sbom.cdx.json",
    ] {
        assert!(list.contains(path), "{path} missing from:\n{list}");
    }
    let conf = Command::new("dpkg-deb")
        .args(["--ctrl-tarfile", &deb])
        .output()
        .unwrap();
    assert!(!conf.stdout.is_empty());
    // Installed into a scratch root, the binary runs.
    let root = dir.path().join("root");
    assert!(
        Command::new("dpkg-deb")
            .args(["-x", &deb])
            .arg(&root)
            .status()
            .unwrap()
            .success()
    );
    let v = Command::new(root.join("usr/bin/rollcall"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("rollcall "));
    let sum = Command::new("sha256sum")
        .arg("-c")
        .arg(format!("{deb}.sha256"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(sum.status.success());

    // A real install with dpkg, maintainer scripts and all, on this machine as it is, but
    // in a mount namespace whose /etc, /usr and /var are overlays on a scratch tmpfs: what
    // the install writes (the package, the system user) goes away with the namespace.
    let scratch = dir.path().join("overlay");
    std::fs::create_dir_all(&scratch).unwrap();
    let script = r#"set -e
mount -t tmpfs tmpfs "$1" || { echo "no scratch mount here" >&2; exit 99; }
for d in etc usr var; do
  mkdir -p "$1/$d-up" "$1/$d-work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$1/$d-up,workdir=$1/$d-work" "/$d"
done
dpkg -i "$2" >/dev/null
echo "user=$(getent passwd rollcall | cut -d: -f1,6)"
echo "data=$(stat -c '%U:%G %a' /var/lib/rollcall)"
echo "conf=$(stat -c '%U:%G %a' /etc/rollcall/rollcall.toml)"
runuser -u rollcall -- /usr/bin/rollcall --data-dir /var/lib/rollcall tenant create Installed
echo "db=$(stat -c '%U' /var/lib/rollcall/rollcall.db)"
dpkg -r rollcall >/dev/null
[ ! -e /usr/bin/rollcall ] && echo "removed"
[ -e /var/lib/rollcall/rollcall.db ] && echo "data kept"
"#;
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", script, "sh"])
        .arg(&scratch)
        .arg(&deb)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{out}");
    for want in [
        "user=rollcall:/var/lib/rollcall",
        "data=rollcall:rollcall 750",
        "conf=root:rollcall 640",
        "Created tenant Installed",
        "db=rollcall",
        "removed",
        "data kept",
    ] {
        assert!(out.contains(want), "{want} not in:\n{out}");
    }
    assert!(
        Command::new("getent")
            .args(["passwd", "rollcall"])
            .output()
            .unwrap()
            .stdout
            .is_empty(),
        "the install stayed in its namespace"
    );
}
