//! The hash-chained audit log: entries for every change, tamper detection naming the first
//! bad entry, exactly-once append after a crash, rotation, filters.

mod common;

use common::*;
use rollcall::audit::{self, Filter};
use rollcall::db;
use rollcall::model::Operation;
use rollcall::service::{self, ImportOptions};

/// An outbox row as stored: id, kind, time, actor, tenant, action, target, details, job.
type OutboxRow = (
    i64,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    Option<i64>,
);

fn populated(users: usize) -> (Env, db::Tenant) {
    let mut env = Env::new();
    let t = db::create_tenant(&env.app.conn, "Acme").unwrap();
    db::set_pool(&env.app.conn, t.id, "Standard", 100).unwrap();
    let p = env.path("add.xlsx");
    write_add_file(&p, 0..users);
    let r = service::import(
        &mut env.app,
        &t,
        Operation::Add,
        &p,
        "add.xlsx",
        ImportOptions::new(false),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(r.applied);
    (env, t)
}

fn dir(env: &Env) -> std::path::PathBuf {
    env.app.data.audit_dir()
}

fn log_lines(env: &Env) -> Vec<String> {
    audit::files(&dir(env))
        .unwrap()
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn write_log(env: &Env, text: &str) {
    let files = audit::files(&dir(env)).unwrap();
    assert_eq!(files.len(), 1);
    std::fs::write(&files[0], text).unwrap();
}

fn verdict(env: &Env) -> Option<String> {
    audit::verify(&env.app.conn, &dir(env)).unwrap().problem
}

#[test]
fn an_import_records_every_user_change_with_before_and_after() {
    let (env, _) = populated(5);
    let lines = log_lines(&env);
    let actions: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        actions,
        [
            "job.submitted",
            "upload.validated",
            "user.create",
            "user.create",
            "user.create",
            "user.create",
            "user.create",
            "job.succeeded"
        ]
    );
    let v: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(v["target"], "u0@example.com");
    assert_eq!(v["details"]["before"], serde_json::Value::Null);
    assert_eq!(v["details"]["after"][0], "u0@example.com");
    assert_eq!(v["details"]["fields"][0], "email");
    let ok = audit::verify(&env.app.conn, &dir(&env)).unwrap();
    assert_eq!((ok.entries, ok.problem), (8, None));
    // Filters: one user; one job; CSV.
    let mut out = Vec::new();
    let n = audit::show(
        &dir(&env),
        &Filter {
            user: Some("U3@example.com".into()),
            ..Default::default()
        },
        false,
        &mut out,
    )
    .unwrap();
    assert_eq!(n, 1);
    let n = audit::show(
        &dir(&env),
        &Filter {
            job: Some(1),
            ..Default::default()
        },
        true,
        &mut out,
    )
    .unwrap();
    assert_eq!(n, 7);
    assert_eq!(
        audit::show(
            &dir(&env),
            &Filter {
                tenant: Some("Other".into()),
                ..Default::default()
            },
            false,
            &mut Vec::new()
        )
        .unwrap(),
        0
    );
}

#[test]
fn tampering_is_detected_and_the_first_bad_entry_named() {
    let (env, _) = populated(4);
    let lines = log_lines(&env);
    let original = lines.join("\n") + "\n";
    assert_eq!(verdict(&env), None);

    // One byte altered inside entry 3.
    let mut altered = lines.clone();
    altered[2] = altered[2].replacen("u0@example.com", "u0@example.org", 1);
    write_log(&env, &(altered.join("\n") + "\n"));
    let p = verdict(&env).unwrap();
    assert!(p.contains("entry 3 was altered"), "{p}");

    // A line deleted.
    let mut removed = lines.clone();
    removed.remove(3);
    write_log(&env, &(removed.join("\n") + "\n"));
    let p = verdict(&env).unwrap();
    assert!(p.contains("entry 4 is missing"), "{p}");

    // Two lines swapped.
    let mut swapped = lines.clone();
    swapped.swap(2, 3);
    write_log(&env, &(swapped.join("\n") + "\n"));
    let p = verdict(&env).unwrap();
    assert!(p.contains("entry 4") && p.contains("reordered"), "{p}");

    // The last line cut short.
    write_log(&env, &original[..original.len() - 20]);
    let p = verdict(&env).unwrap();
    assert!(p.contains("entry 7") && p.contains("truncated"), "{p}");

    // The last line removed whole: the database's anchor knows it existed.
    let all_but_last = lines[..lines.len() - 1].join("\n") + "\n";
    write_log(&env, &all_but_last);
    let p = verdict(&env).unwrap();
    assert!(p.contains("entry 7") && p.contains("missing"), "{p}");

    // The last line altered.
    let mut last = lines.clone();
    let n = last.len() - 1;
    last[n] = last[n].replacen("succeeded", "succeedeD", 1);
    write_log(&env, &(last.join("\n") + "\n"));
    let p = verdict(&env).unwrap();
    assert!(p.contains("entry 7, the last one, was altered"), "{p}");

    // A line inserted (a copy of another).
    let mut inserted = lines.clone();
    inserted.insert(3, lines[5].clone());
    write_log(&env, &(inserted.join("\n") + "\n"));
    let p = verdict(&env).unwrap();
    assert!(p.contains("line 4 was inserted: it repeats entry 6"), "{p}");

    write_log(&env, &original);
    assert_eq!(verdict(&env), None);
    // A damaged log refuses further appends rather than extending a broken chain.
    write_log(&env, &all_but_last);
    let e = service::flush_audit(&env.app);
    let _ = e; // empty outbox: nothing to append, so nothing to refuse
    db::create_tenant(&env.app.conn, "Other").unwrap();
    audit::record(
        &env.app.conn,
        &audit::Event {
            actor: "t".into(),
            tenant: None,
            action: "tenant.create",
            target: "Other".into(),
            details: serde_json::json!({}),
        },
    )
    .unwrap();
    let e = service::flush_audit(&env.app).unwrap_err();
    assert!(e.to_string().contains("log ends at entry 6"), "{e}");
    // Nor is an altered last entry, or an emptied log, extended (which would hide them).
    let mut last = lines.clone();
    let n = last.len() - 1;
    last[n] = last[n].replacen("succeeded", "succeedeD", 1);
    write_log(&env, &(last.join("\n") + "\n"));
    let e = service::flush_audit(&env.app).unwrap_err();
    assert!(e.to_string().contains("was altered"), "{e}");
    write_log(&env, "");
    let e = service::flush_audit(&env.app).unwrap_err();
    assert!(e.to_string().contains("the log is empty"), "{e}");
    // An entry appended after the last one written, explaining nothing queued, is found.
    write_log(&env, &original);
    assert_eq!(verdict(&env), None);
    let fake = lines[lines.len() - 1].replacen("\"seq\":7", "\"seq\":8", 1);
    let prev = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(lines[lines.len() - 1].as_bytes()))
    };
    let fake = {
        let mut v: serde_json::Value = serde_json::from_str(&fake).unwrap();
        v["prev"] = serde_json::Value::String(prev);
        v.to_string()
    };
    env.app
        .conn
        .execute("DELETE FROM audit_outbox", [])
        .unwrap();
    write_log(&env, &(original.clone() + &fake + "\n"));
    let p = verdict(&env).unwrap();
    assert!(
        p.contains("entries 8 to 8") && p.contains("inserted"),
        "{p}"
    );
}

#[test]
fn an_append_cut_by_a_crash_resumes_exactly_once() {
    let mut env = Env::new();
    let t = db::create_tenant(&env.app.conn, "Acme").unwrap();
    db::set_pool(&env.app.conn, t.id, "Standard", 100).unwrap();
    let p = env.path("add.xlsx");
    write_add_file(&p, 0..6);
    let opts = ImportOptions {
        results_workbook: false,
        flush_audit: false,
        ..ImportOptions::default()
    };
    service::import(
        &mut env.app,
        &t,
        Operation::Add,
        &p,
        "add.xlsx",
        opts,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    // The committed change waits in the outbox; keep a copy to replay the crash.
    let conn = &env.app.conn;
    let saved: Vec<OutboxRow> = {
        let mut st = conn.prepare("SELECT id, kind, time, actor, tenant, action, target, details, job_id FROM audit_outbox ORDER BY id").unwrap();
        st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    assert_eq!(
        service::flush_audit(&env.app).unwrap(),
        9,
        "submission, upload, 6 users, job result"
    );
    let full = std::fs::read_to_string(&audit::files(&dir(&env)).unwrap()[0]).unwrap();
    // The crash: the file got the first four entries and half of the fifth; the outbox rows
    // were not yet deleted nor the anchor moved.
    let lines: Vec<&str> = full.lines().collect();
    let cut = lines[..4].join("\n") + "\n" + &lines[4][..lines[4].len() / 2];
    std::fs::write(&audit::files(&dir(&env)).unwrap()[0], &cut).unwrap();
    conn.execute("DELETE FROM audit_anchor", []).unwrap();
    for r in &saved {
        conn.execute(
            "INSERT INTO audit_outbox (id, kind, time, actor, tenant, action, target, details, job_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params![r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8],
        )
        .unwrap();
    }
    // Restart: the torn line is cut off and exactly the missing entries are appended.
    assert_eq!(service::flush_audit(&env.app).unwrap(), 5);
    let again = std::fs::read_to_string(&audit::files(&dir(&env)).unwrap()[0]).unwrap();
    assert_eq!(again, full, "the same entries, each once");
    assert_eq!(verdict(&env), None);
    // A second flush with nothing queued appends nothing, and changes nothing in the
    // database either (no commit of an unchanged anchor).
    let changes = conn.total_changes();
    assert_eq!(service::flush_audit(&env.app).unwrap(), 0);
    assert_eq!(conn.total_changes(), changes);
    let n: i64 = conn
        .query_row("SELECT count(*) FROM audit_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

#[test]
fn files_rotate_and_the_chain_runs_across_them() {
    let (env, _) = populated(30);
    // Append more with a tiny file size so the log rotates several times.
    for i in 0..20 {
        audit::record(
            &env.app.conn,
            &audit::Event {
                actor: "t".into(),
                tenant: Some("Acme".into()),
                action: "test.event",
                target: format!("n{i}"),
                details: serde_json::json!({"i": i}),
            },
        )
        .unwrap();
        audit::flush(&env.app.conn, &dir(&env), 4096).unwrap();
    }
    let files = audit::files(&dir(&env)).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let v = audit::verify(&env.app.conn, &dir(&env)).unwrap();
    assert_eq!((v.entries, v.problem), (33 + 20, None));
    // Removing a whole middle file is caught.
    std::fs::remove_file(&files[1]).unwrap();
    assert!(verdict(&env).unwrap().contains("missing"));
}
