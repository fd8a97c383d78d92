//! Operator commands on the real binary: backup during a job, restore and its refusals,
//! healthcheck, --version, and the libraries the binary links.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn count(db: &std::path::Path, sql: &str) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_backup_taken_during_a_job_restores_to_a_consistent_state() {
    let env = Env::new();
    let data = env.path("data-live");
    assert!(cli(&data, &["tenant", "create", "Acme"]).status.success());
    assert!(
        cli(
            &data,
            &["pool", "set", "--tenant", "Acme", "Standard", "100000"]
        )
        .status
        .success()
    );
    let p = env.path("big.xlsx");
    write_add_file(&p, 0..6000);
    let mut job = Command::new(BIN)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "import",
            "--tenant",
            "Acme",
            "--op",
            "add",
            p.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let archive = env.path("backup.zip");
    let o = cli(&data, &["backup", archive.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(job.wait().unwrap().success());
    // Restore into an empty directory: the archive and the audit chain are checked.
    let restored = env.path("data-restored");
    let o = cli(&restored, &["restore", archive.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let db = restored.join("rollcall.db");
    let users = count(&db, "SELECT count(*) FROM users");
    assert!(
        users == 0 || users == 6000,
        "{users} users: a job was half-applied in the backup"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM job_changes"), users);
    let o = cli(&restored, &["audit", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    // The restored directory stands alone: its worker finishes whatever was queued, from
    // the upload carried in the archive, even with the original data directory gone.
    std::fs::remove_dir_all(&data).unwrap();
    assert!(
        cli(&restored, &["jobs", "work", "--until-idle"])
            .status
            .success()
    );
    assert_eq!(count(&db, "SELECT count(*) FROM users"), 6000);
    assert!(cli(&restored, &["audit", "verify"]).status.success());
    // Restoring over existing data is refused.
    let o = cli(&restored, &["restore", archive.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("empty directory"), "{}", text(&o));
}

#[test]
fn restore_refuses_damaged_or_foreign_archives() {
    let env = Env::new();
    let data = env.path("data");
    assert!(cli(&data, &["tenant", "create", "Acme"]).status.success());
    let archive = env.path("b.zip");
    assert!(
        cli(&data, &["backup", archive.to_str().unwrap()])
            .status
            .success()
    );
    // A byte changed inside the archive.
    let mut bytes = std::fs::read(&archive).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0xFF;
    let damaged = env.path("damaged.zip");
    std::fs::write(&damaged, &bytes).unwrap();
    let o = cli(&env.path("r1"), &["restore", damaged.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cannot be restored"), "{}", text(&o));
    assert!(!env.path("r1").join("rollcall.db").exists(), "nothing kept");
    // Not a backup at all.
    let junk = env.path("junk.zip");
    std::fs::write(&junk, b"PK\x03\x04 not really").unwrap();
    let o = cli(&env.path("r2"), &["restore", junk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // A backup whose audit log was tampered with before it was taken.
    let log = rollcall::audit::files(&data.join("audit")).unwrap()[0].clone();
    let t = std::fs::read_to_string(&log)
        .unwrap()
        .replacen("Acme", "Acmf", 1);
    std::fs::write(&log, t).unwrap();
    let tampered = env.path("tampered.zip");
    assert!(
        cli(&data, &["backup", tampered.to_str().unwrap()])
            .status
            .success()
    );
    let o = cli(&env.path("r3"), &["restore", tampered.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("audit log does not verify"),
        "{}",
        text(&o)
    );
}

#[test]
fn healthcheck_and_version() {
    let env = Env::new();
    let data = env.path("data");
    let o = cli(&data, &["healthcheck", "--addr", "127.0.0.1:9"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let mut server = Command::new(BIN)
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let mut server = KillOnDrop(server);
    // Read the address, and keep the pipe open until the server has stopped.
    let mut out = std::io::BufReader::new(stdout);
    let (addr, _, _) = listen_addr(&mut out);
    let o = cli(&data, &["healthcheck", "--addr", &addr]);
    assert!(o.status.success(), "{}", text(&o));
    unsafe {
        libc::kill(server.0.id() as i32, libc::SIGTERM);
    }
    assert!(server.0.wait().unwrap().success());
    let o = Command::new(BIN).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&o.stdout);
    assert!(
        v.starts_with("rollcall ") && v.contains("commit ") && v.contains("built 20"),
        "{v}"
    );
}

#[test]
fn the_binary_links_no_system_library_beyond_the_c_runtime() {
    let o = Command::new("ldd")
        .arg(BIN)
        .output()
        .expect("ldd (Debian's libc-bin) runs");
    let libs = String::from_utf8_lossy(&o.stdout);
    let allowed = [
        "linux-vdso",
        "libgcc_s.so",
        "libm.so",
        "libc.so",
        "ld-linux",
        "libpthread.so",
        "libdl.so",
        "librt.so",
    ];
    for line in libs.lines().map(str::trim).filter(|l| !l.is_empty()) {
        assert!(
            allowed.iter().any(|a| line.contains(a)),
            "unexpected library: {line}"
        );
    }
}

#[test]
fn a_queued_job_survives_backup_and_restore_elsewhere() {
    let env = Env::new();
    let data = env.path("data-a");
    assert!(cli(&data, &["tenant", "create", "Acme"]).status.success());
    assert!(
        cli(
            &data,
            &["pool", "set", "--tenant", "Acme", "Standard", "10"]
        )
        .status
        .success()
    );
    let csv = env.path("a.csv");
    std::fs::write(&csv, "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\nada@example.com,Ada,L,,,Learner,,Standard\n").unwrap();
    assert!(
        cli(
            &data,
            &[
                "import",
                "--tenant",
                "Acme",
                "--op",
                "add",
                "--no-wait",
                csv.to_str().unwrap()
            ]
        )
        .status
        .success()
    );
    let archive = env.path("b.zip");
    assert!(
        cli(&data, &["backup", archive.to_str().unwrap()])
            .status
            .success()
    );
    std::fs::remove_dir_all(&data).unwrap();
    let other = env.path("elsewhere");
    assert!(
        cli(&other, &["restore", archive.to_str().unwrap()])
            .status
            .success()
    );
    let o = cli(&other, &["jobs", "work", "--until-idle"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        count(&other.join("rollcall.db"), "SELECT count(*) FROM users"),
        1
    );
    assert!(cli(&other, &["audit", "verify"]).status.success());
}
