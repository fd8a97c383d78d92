//! The built binary, run as an administrator would: exit codes, output, files, the server.

mod common;

use std::process::Command;

use common::*;
use rollcall::model::Operation;

#[test]
fn a_first_session_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.as_path();
    assert!(cli(d, &["tenant", "create", "Acme"]).status.success());
    assert!(
        cli(d, &["pool", "set", "--tenant", "acme", "Standard", "2"])
            .status
            .success()
    );
    assert!(
        cli(d, &["team", "add", "--tenant", "Acme", "Sales"])
            .status
            .success()
    );
    let tpl = dir.path().join("add.xlsx");
    let o = cli(
        d,
        &[
            "template",
            "--tenant",
            "Acme",
            "--op",
            "add",
            "-o",
            tpl.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(tpl.exists());
    // Checked as another operation: refused, naming the columns, no sheet named that the
    // file does not have.
    let o = cli(
        d,
        &[
            "validate",
            "--tenant",
            "Acme",
            "--op",
            "deactivate",
            tpl.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("[wrong_operation]") && t.contains("B First Name"),
        "{t}"
    );
    assert!(!t.contains("sheet \"Deactivate Users\""), "{t}");

    let csv = dir.path().join("add.csv");
    std::fs::write(&csv, "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\nada@example.com,Ada,Lovelace,,Sales,Learner,,Standard\nbob@example.com,Bob,Byron,,,Manager,,Standard\n").unwrap();
    let o = cli(
        d,
        &[
            "validate",
            "--tenant",
            "Acme",
            "--op",
            "add",
            csv.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("OK: 2 users ready to add — pool Standard: 2 of 2 free seats"),
        "{}",
        text(&o)
    );

    let o = cli(
        d,
        &[
            "validate",
            "--tenant",
            "Acme",
            "--op",
            "add",
            "--json",
            csv.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["preview"]["rows"][0]["action"], "create");
    assert_eq!(v["licence_forecast"][0]["free_after"], 0);
    assert_eq!(v["needs_acknowledgement"], false);
    assert_eq!(v["preview"]["rows"].as_array().unwrap().len(), 2);
    assert_eq!(v["preview"]["rows"][1]["email"], "bob@example.com");
    // Every row, as text; the rows were kept in a file of the data directory's tmp/ while
    // the pass ran, and that file is gone.
    let o = cli(
        d,
        &[
            "validate",
            "--tenant",
            "Acme",
            "--op",
            "add",
            "--preview",
            csv.to_str().unwrap(),
        ],
    );
    assert!(
        text(&o).contains("row 3: create bob@example.com"),
        "{}",
        text(&o)
    );
    let left: Vec<_> = std::fs::read_dir(d.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A file with errors: the document is whole, its preview has no rows to show.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\nnot-an-email,A,B,,,Learner,,Standard\n").unwrap();
    let o = cli(
        d,
        &[
            "validate",
            "--tenant",
            "Acme",
            "--op",
            "add",
            "--json",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["problems"][0]["code"], "email_invalid");
    assert!(v["preview"]["rows"].is_array());

    // A report into a folder that does not exist: a usage error naming it, before any work.
    let missing = dir.path().join("no-such-folder").join("r.xlsx");
    let o = cli(
        d,
        &[
            "validate",
            "--tenant",
            "Acme",
            "--op",
            "add",
            csv.to_str().unwrap(),
            "--report",
            missing.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "{} does not exist",
            dir.path().join("no-such-folder").display()
        )),
        "{}",
        text(&o)
    );
    // The same for an import: refused before anything is applied.
    for cmd in ["import", "upload"] {
        let o = cli(
            d,
            &[
                cmd,
                "--tenant",
                "Acme",
                "--op",
                "add",
                csv.to_str().unwrap(),
                "--report",
                missing.to_str().unwrap(),
            ],
        );
        assert_eq!(o.status.code(), Some(2), "{cmd}: {}", text(&o));
        assert!(text(&o).contains("does not exist"), "{cmd}: {}", text(&o));
    }
    let o = cli(d, &["users", "list", "--tenant", "Acme"]);
    assert!(!text(&o).contains("ada@example.com"), "{}", text(&o));

    let o = cli(
        d,
        &[
            "import",
            "--tenant",
            "Acme",
            "--op",
            "add",
            csv.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains(": 2 users added."), "{}", text(&o));
    let o = cli(d, &["pool", "list", "--tenant", "Acme"]);
    assert!(
        text(&o).contains("Standard") && text(&o).contains(" 2 "),
        "{}",
        text(&o)
    );
    // The tenants with their users by status.
    let o = cli(d, &["tenant", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8(o.stdout.clone()).unwrap(),
        "Acme\t2 active, 0 deactivated\n"
    );
    // The roster: one line per user, tab-separated; filtered by status.
    let o = cli(d, &["users", "list", "--tenant", "Acme"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let listed = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        [
            "ada@example.com\tAda Lovelace\tSales\tLearner\tEnglish\tStandard\tactive",
            "bob@example.com\tBob Byron\t-\tManager\tEnglish\tStandard\tactive",
        ],
        "{listed}"
    );
    let o = cli(
        d,
        &[
            "users",
            "list",
            "--tenant",
            "Acme",
            "--status",
            "deactivated",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(o.stdout.is_empty(), "{}", text(&o));
    let o = cli(
        d,
        &["users", "list", "--tenant", "Acme", "--status", "asleep"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--status is active or deactivated"));

    // A file with errors: exit 1, error workbook written, nothing applied.
    let bad = dir.path().join("bad.xlsx");
    write_xlsx(
        &bad,
        &[data_sheet(
            Operation::Add,
            &[vec![
                "carl@example.com",
                "Carl",
                "",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ]],
        )],
    );
    let report = dir.path().join("errors.xlsx");
    let o = cli(
        d,
        &[
            "import",
            "--tenant",
            "Acme",
            "--op",
            "add",
            bad.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("required_missing") && text(&o).contains("licence_pool_full"),
        "{}",
        text(&o)
    );
    assert!(report.exists());
    // `validate` says the same, with the same exit code, and writes the error workbook:
    // the rows as uploaded plus an Errors column.
    let checked = dir.path().join("checked.xlsx");
    let o = cli(
        d,
        &[
            "validate",
            "--tenant",
            "Acme",
            "--op",
            "add",
            bad.to_str().unwrap(),
            "--report",
            checked.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("required_missing"), "{}", text(&o));
    let rows = sheet_rows(&checked, "Add Users");
    let (header, row) = (&rows[0], &rows[1]);
    assert_eq!(header.first().map(String::as_str), Some("Email"));
    assert_eq!(
        header.last().map(String::as_str),
        Some("Errors"),
        "{header:?}"
    );
    assert_eq!(row[0], "carl@example.com");
    assert!(row.last().unwrap().contains("Last Name"), "{row:?}");

    // Deactivating 1 of 2 users is above the tenant's 20%: a typed confirmation first.
    let deact = dir.path().join("deact.csv");
    std::fs::write(&deact, "Email,Reason\nada@example.com,left\n").unwrap();
    let dpath = deact.to_str().unwrap();
    let o = cli(
        d,
        &["import", "--tenant", "Acme", "--op", "deactivate", dpath],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("--confirm \"DEACTIVATE 1 USERS\""),
        "{}",
        text(&o)
    );
    let o = cli(
        d,
        &[
            "import",
            "--tenant",
            "Acme",
            "--op",
            "deactivate",
            "--confirm",
            "DEACTIVATE 1 USERS",
            dpath,
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Warnings need --yes.
    let o = cli(
        d,
        &["import", "--tenant", "Acme", "--op", "deactivate", dpath],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    assert_eq!(
        cli(
            d,
            &[
                "import",
                "--tenant",
                "Acme",
                "--op",
                "deactivate",
                "--yes",
                dpath
            ]
        )
        .status
        .code(),
        Some(0)
    );

    // Usage errors: exit 2.
    let o = cli(
        d,
        &[
            "validate",
            "--tenant",
            "Nope",
            "--op",
            "add",
            csv.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("tenants are: Acme"), "{}", text(&o));
    assert_eq!(
        cli(
            d,
            &[
                "validate",
                "--tenant",
                "Acme",
                "--op",
                "adds",
                csv.to_str().unwrap()
            ]
        )
        .status
        .code(),
        Some(2)
    );

    // Export: CSV on stdout, formulas neutralised.
    let o = cli(d, &["users", "export", "--tenant", "Acme"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("Email,First Name"), "{out}");
    assert!(
        out.contains("ada@example.com,Ada,Lovelace,,Sales,Learner,English,Standard,deactivated"),
        "{out}"
    );
    // Every change above is in the audit log, and the chain is whole.
    let o = cli(d, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).starts_with("OK:"), "{}", text(&o));
    let o = cli(
        d,
        &[
            "audit",
            "show",
            "--user",
            "ada@example.com",
            "--format",
            "csv",
        ],
    );
    let shown = text(&o);
    assert!(
        shown.contains("user.create") && shown.contains("user.deactivate"),
        "{shown}"
    );
    let o = cli(d, &["audit", "show", "--tenant", "Acme"]);
    for action in [
        "tenant.create",
        "pool.set",
        "team.create",
        "upload.validated",
        "upload.rejected",
        "job.submitted",
        "job.succeeded",
        "file.checked",
    ] {
        assert!(
            text(&o).contains(&format!("\"action\":\"{action}\"")),
            "{action} missing"
        );
    }
    let xlsx = dir.path().join("users.xlsx");
    assert!(
        cli(
            d,
            &[
                "users",
                "export",
                "--tenant",
                "Acme",
                "-o",
                xlsx.to_str().unwrap()
            ]
        )
        .status
        .success()
    );
    assert!(xlsx.exists());
}

#[test]
fn the_bench_command_times_every_stage_and_prints_the_goals() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("bench");
    let o = cli(
        &dir.path().join("data"),
        &[
            "bench",
            "--rows",
            "30",
            "--repeat",
            "2",
            "--dir",
            files.to_str().unwrap(),
        ],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(files.join("add12-30.xlsx").exists(), "{out}");
    assert!(
        out.contains("30 rows (median of 2 runs per stage)"),
        "{out}"
    );
    for stage in [
        "bare_read",
        "read",
        "bare_insert",
        "validate",
        "preview",
        "validate_rowrule",
        "apply",
        "import",
        "report",
        "audit",
    ] {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(stage))
            .unwrap_or_else(|| panic!("no line for {stage}: {out}"));
        // seconds, CPU seconds, rows/second, RSS, worker RSS
        assert_eq!(line.split_whitespace().count(), 6, "{line}");
    }
    for line in [
        "goals: import/slowest(read, apply) = ",
        "the same goals, median of each round's own ratio: ",
        "the machine's scatter in this run (slowest / fastest round of the same bare loop): bare_read ",
        "audit: import + audit / import = ",
        "before the writer's first rows: ",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    // Both writing stages timed their first batch (a stage that never wrote one would show 0).
    let first = out
        .lines()
        .find(|l| l.starts_with("before the writer's first rows: "))
        .unwrap();
    let secs: Vec<f64> = first
        .split(' ')
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    assert!(secs.len() >= 2 && secs[0] > 0.0 && secs[1] > 0.0, "{first}");
    // The stages' databases are removed after each run; the generated file is kept.
    assert!(!files.join("data-import").exists());
}

#[test]
fn startup_problems_are_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let o = cli(&file.join("data"), &["tenant", "list"]);
    assert_eq!(o.status.code(), Some(3));
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(
        msg.contains("--data-dir") && msg.trim().lines().count() == 1,
        "{msg}"
    );
    // A database from a newer rollcall is refused.
    let data = dir.path().join("d");
    assert!(cli(&data, &["tenant", "list"]).status.success());
    let conn = rusqlite::Connection::open(data.join("rollcall.db")).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let o = cli(&data, &["tenant", "list"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("newer rollcall"));
}

#[test]
fn serve_starts_answers_and_stops_cleanly() {
    use std::io::{BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut child = KillOnDrop(child);
    // First start: the operator account's one-time password comes first, then the address.
    let (addr, first_start, _) = listen_addr(&mut lines);
    assert!(
        first_start.contains("First start: created the operator account \"operator\". Its one-time password, shown only here: "),
        "{first_start}"
    );
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("\"status\":\"ok\""),
        "{resp}"
    );
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("stopped"));
}

/// A database file that is not one: one sentence saying what is wrong and what to do.
#[test]
fn a_damaged_database_is_told_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("rollcall.db"), vec![0x42u8; 8192]).unwrap();
    let o = cli(&data, &["tenant", "list"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("rollcall.db") && t.contains("restore it from a backup"),
        "{t}"
    );
    assert_eq!(t.trim().lines().count(), 1, "{t}");
}

/// Output read only in part (`rollcall … | head`): the reader went away, so the command
/// ends quietly, as a program stopped by SIGPIPE does (141), with no error message.
#[test]
fn output_closed_by_its_reader_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(cli(&data, &["tenant", "create", "Acme"]).status.success());
    // A pipe whose reading end is closed before the command starts: its first write fails.
    // Plain text, CSV through the CSV writer, JSON through the JSON writer.
    for args in [
        &["tenant", "list"][..],
        &["users", "export", "--tenant", "Acme"],
        &["tenant", "show", "Acme"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = Command::new(BIN)
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(141), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&o.stderr), "", "{args:?}");
    }
}
