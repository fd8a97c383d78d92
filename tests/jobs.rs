//! The job queue: order, cancel, not-before, the server as worker, and crash safety proven
//! by killing the real binary at many moments of a large job.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rollcall::db;
use rollcall::model::Operation;
use rollcall::scheduler::{self, JobOptions};
use rollcall::service;
use rollcall::sheet::reader::Pace;

fn add_file(env: &Env, name: &str, from: usize, n: usize) -> std::path::PathBuf {
    let p = env.path(name);
    write_add_file(&p, from..from + n);
    p
}

fn submit(env: &Env, t: &db::Tenant, p: &std::path::Path, not_before: Option<&str>) -> i64 {
    let name = p.file_name().unwrap().to_string_lossy().to_string();
    let stored = service::store_upload(&env.app.data, p, &name).unwrap();
    scheduler::submit(
        &env.app,
        t,
        Operation::Add,
        &stored,
        &name,
        &JobOptions::default(),
        not_before,
    )
    .unwrap()
    .1
}

fn state(env: &Env, job: i64) -> String {
    env.app
        .conn
        .query_row("SELECT state FROM jobs WHERE id = ?1", [job], |r| r.get(0))
        .unwrap()
}

fn setup() -> (Env, db::Tenant) {
    let env = Env::new();
    let t = db::create_tenant(&env.app.conn, "Acme").unwrap();
    db::set_pool(&env.app.conn, t.id, "Standard", 1_000_000).unwrap();
    // Tiny rosters: any deletion is a large share; the safeguard test sets its own.
    let mut s = db::tenant_settings(&env.app.conn, t.id).unwrap();
    s.large_change_percent = 100;
    db::set_tenant_settings(&env.app.conn, t.id, &s).unwrap();
    (env, t)
}

#[test]
fn jobs_run_one_at_a_time_in_order_and_waiting_ones_can_be_cancelled() {
    let (env, t) = setup();
    let a = submit(&env, &t, &add_file(&env, "a.xlsx", 0, 30), None);
    let b = submit(&env, &t, &add_file(&env, "b.xlsx", 100, 30), None);
    let c = submit(&env, &t, &add_file(&env, "c.xlsx", 200, 30), None);
    let listed = scheduler::list(&env.app.conn, None, 10).unwrap();
    let pos: Vec<(i64, Option<i64>)> = listed.iter().map(|j| (j.id, j.position)).collect();
    assert_eq!(pos, vec![(c, Some(3)), (b, Some(2)), (a, Some(1))]);
    scheduler::cancel(&env.app, b).unwrap();
    assert!(
        scheduler::cancel(&env.app, b)
            .unwrap_err()
            .to_string()
            .contains("cancelled")
    );
    let lock = scheduler::WorkerLock::try_take(&env.app.data)
        .unwrap()
        .unwrap();
    // One worker per data directory.
    assert!(
        scheduler::WorkerLock::try_take(&env.app.data)
            .unwrap()
            .is_none()
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    scheduler::work(
        &env.app,
        &lock,
        &stop,
        true,
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        (state(&env, a), state(&env, b), state(&env, c)),
        ("succeeded".into(), "cancelled".into(), "succeeded".into())
    );
    let (sa, sc): (String, String) = env.app.conn.query_row(
        "SELECT (SELECT finished_at FROM jobs WHERE id = ?1), (SELECT started_at FROM jobs WHERE id = ?2)",
        [a, c],
        |r| Ok((r.get(0)?, r.get(1)?)),
    ).unwrap();
    assert!(sa <= sc, "job {a} finished before job {c} started");
    let users: i64 = env
        .app
        .conn
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .unwrap();
    assert_eq!(users, 60);
    assert!(
        scheduler::cancel(&env.app, a)
            .unwrap_err()
            .to_string()
            .contains("succeeded")
    );
}

#[test]
fn a_not_before_time_holds_the_job() {
    let (env, t) = setup();
    let fmt = time::format_description::well_known::Rfc3339;
    let at = (time::OffsetDateTime::now_utc() + time::Duration::seconds(2))
        .format(&fmt)
        .unwrap();
    let job = submit(&env, &t, &add_file(&env, "later.xlsx", 0, 5), Some(&at));
    assert_eq!(state(&env, job), "scheduled");
    assert_eq!(scheduler::next_job(&env.app.conn).unwrap(), None);
    let lock = scheduler::WorkerLock::try_take(&env.app.data)
        .unwrap()
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    // The worker sleeps until the job is due, then runs it.
    scheduler::work(
        &env.app,
        &lock,
        &stop,
        false,
        Some(job),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .ok();
    while state(&env, job) != "succeeded" && start.elapsed() < Duration::from_secs(10) {
        scheduler::work(
            &env.app,
            &lock,
            &stop,
            true,
            None,
            &mut |_, _, _| {},
            &mut |_| {},
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state(&env, job), "succeeded");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "ran too early"
    );
}

#[test]
fn the_server_runs_what_import_submits_and_import_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(cli(&data, &["tenant", "create", "Acme"]).status.success());
    assert!(
        cli(
            &data,
            &["pool", "set", "--tenant", "Acme", "Standard", "100"]
        )
        .status
        .success()
    );
    let mut server = Command::new(BIN)
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    // Give the worker a moment to take the lock, then import through the CLI.
    std::thread::sleep(Duration::from_millis(700));
    let csv = dir.path().join("a.csv");
    std::fs::write(&csv, "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\nada@example.com,Ada,L,,,Learner,,Standard\n").unwrap();
    let start = Instant::now();
    let o = cli(
        &data,
        &[
            "import",
            "--tenant",
            "Acme",
            "--op",
            "add",
            csv.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success() && text.contains("Applied as job 1"),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "woken at once, not by slow polling"
    );
    let o = cli(
        &data,
        &[
            "import",
            "--tenant",
            "Acme",
            "--op",
            "add",
            "--no-wait",
            csv.to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("Submitted as job 2"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = cli(&data, &["jobs", "show", "2"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if v["job"]["state"] == "failed" {
            assert!(v["job"]["error"].as_str().unwrap().contains("errors"));
            break;
        }
        assert!(Instant::now() < deadline, "job 2 not processed: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe {
        libc::kill(server.id() as i32, libc::SIGTERM);
    }
    assert!(server.wait().unwrap().success());
}

#[test]
fn killing_the_process_at_any_moment_never_half_applies_nor_applies_twice() {
    let env = Env::new();
    let rows = 6000;
    let file = add_file(&env, "big.xlsx", 0, rows);
    let mut seen_before_restart = Vec::new();
    for (i, delay_ms) in [0u64, 15, 40, 80, 120, 180, 260, 350, 500, 700, 1000, 1500]
        .into_iter()
        .enumerate()
    {
        let data = env.path(&format!("data-{i}"));
        assert!(cli(&data, &["tenant", "create", "Acme"]).status.success());
        assert!(
            cli(
                &data,
                &["pool", "set", "--tenant", "Acme", "Standard", "100000"]
            )
            .status
            .success()
        );
        let mut child = Command::new(BIN)
            .arg("--data-dir")
            .arg(&data)
            .args([
                "import",
                "--tenant",
                "Acme",
                "--op",
                "add",
                file.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let _ = child.wait();
        {
            let conn = rusqlite::Connection::open(data.join("rollcall.db")).unwrap();
            let s: Option<String> = conn
                .query_row("SELECT state FROM jobs", [], |r| r.get(0))
                .ok();
            let users: i64 = conn
                .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
                .unwrap();
            assert!(
                users == 0 || users == rows as i64,
                "delay {delay_ms} ms: {users} users after the kill"
            );
            seen_before_restart.push(s.unwrap_or_else(|| "none".into()));
        }
        // Restart: the worker recovers and finishes what was submitted.
        let o = cli(&data, &["jobs", "work", "--until-idle"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let conn = rusqlite::Connection::open(data.join("rollcall.db")).unwrap();
        let jobs: Vec<String> = {
            let mut st = conn.prepare("SELECT state FROM jobs").unwrap();
            st.query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let users: i64 = conn
            .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
            .unwrap();
        let changes: i64 = conn
            .query_row("SELECT count(*) FROM job_changes", [], |r| r.get(0))
            .unwrap();
        match jobs.as_slice() {
            [] => assert_eq!(users, 0, "killed before submitting: nothing applied"),
            [s] => {
                assert_eq!(s, "succeeded", "delay {delay_ms} ms");
                assert_eq!(users, rows as i64, "delay {delay_ms} ms: all rows, once");
            }
            other => panic!("delay {delay_ms} ms: {other:?}"),
        }
        assert_eq!(changes, users);
        let v = cli(&data, &["audit", "verify"]);
        assert!(
            v.status.success(),
            "delay {delay_ms} ms: {}",
            String::from_utf8_lossy(&v.stdout)
        );
        let o = cli(&data, &["audit", "show", "--format", "jsonl"]);
        let audited = String::from_utf8_lossy(&o.stdout)
            .matches("\"action\":\"user.create\"")
            .count();
        assert_eq!(
            audited as i64, users,
            "delay {delay_ms} ms: one audit entry per change"
        );
    }
    // The kills landed both mid-job (the job left running) and after it finished.
    assert!(
        seen_before_restart.iter().any(|s| s == "running"),
        "{seen_before_restart:?}"
    );
    assert!(
        seen_before_restart.iter().any(|s| s == "succeeded"),
        "{seen_before_restart:?}"
    );
}

fn import_csv(
    env: &mut Env,
    t: &db::Tenant,
    op: Operation,
    name: &str,
    text: &str,
) -> service::ImportResult {
    let p = env.path(name);
    std::fs::write(&p, text).unwrap();
    service::import(
        &mut env.app,
        t,
        op,
        &p,
        name,
        service::ImportOptions::new(true),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap()
}

fn undo(env: &Env, job: i64) -> (String, Option<String>) {
    let id = rollcall::undo::submit(&env.app, job).unwrap();
    scheduler::run_or_wait(&env.app, id).unwrap()
}

fn user_row(env: &Env, email: &str) -> Option<(i64, String, String, String)> {
    env.app
        .conn
        .query_row(
            "SELECT id, first_name, status, email FROM users WHERE email_norm = ?1",
            [email.to_lowercase()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .ok()
}

#[test]
fn undo_reverts_each_operation_and_is_audited() {
    let (mut env, t) = setup();
    let header = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n";
    let add = import_csv(
        &mut env,
        &t,
        Operation::Add,
        "add.csv",
        &format!(
            "{header}ada@example.com,Ada,L,,,Learner,,Standard\nbob@example.com,Bob,B,,,Learner,,Standard\n"
        ),
    );
    assert!(add.applied);
    let upd = import_csv(
        &mut env,
        &t,
        Operation::Update,
        "upd.csv",
        "Email,New Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\nada@example.com,ada.k@example.com,Adah,,,,,,\n",
    );
    assert!(upd.applied);
    let deact = import_csv(
        &mut env,
        &t,
        Operation::Deactivate,
        "d.csv",
        "Email,Reason\nbob@example.com,x\n",
    );
    let del = import_csv(
        &mut env,
        &t,
        Operation::Delete,
        "del.csv",
        "Email,Reason\nada.k@example.com,x\n",
    );
    let bob_id = user_row(&env, "bob@example.com").unwrap().0;
    let ada_id = user_row(&env, "ada.k@example.com").map(|u| u.0);
    assert!(ada_id.is_none(), "deleted");

    // Undo in reverse order: the delete, the deactivation, the update, the add.
    assert_eq!(undo(&env, del.job_id).0, "succeeded");
    let ada = user_row(&env, "ada.k@example.com").unwrap();
    assert_eq!((ada.1.as_str(), ada.2.as_str()), ("Adah", "active"));
    assert_eq!(undo(&env, deact.job_id).0, "succeeded");
    assert_eq!(user_row(&env, "bob@example.com").unwrap().2, "active");
    assert_eq!(undo(&env, upd.job_id).0, "succeeded");
    let ada = user_row(&env, "ada@example.com").unwrap();
    assert_eq!((ada.1.as_str(), ada.3.as_str()), ("Ada", "ada@example.com"));
    assert_eq!(undo(&env, add.job_id).0, "succeeded");
    assert!(
        user_row(&env, "ada@example.com").is_none() && user_row(&env, "bob@example.com").is_none()
    );
    let _ = bob_id;
    // The Reason column is kept with the change in the audit log.
    let mut out = Vec::new();
    rollcall::audit::show(
        &env.app.data.audit_dir(),
        &rollcall::audit::Filter::default(),
        false,
        &mut out,
    )
    .unwrap();
    assert!(String::from_utf8(out).unwrap().contains("\"reason\":\"x\""));
    // Once only.
    let e = rollcall::undo::submit(&env.app, add.job_id).unwrap_err();
    assert!(e.to_string().contains("already undone"), "{e}");
    // Every reverting change is in the audit log, and the chain is whole.
    let mut out = Vec::new();
    rollcall::audit::show(
        &env.app.data.audit_dir(),
        &rollcall::audit::Filter::default(),
        false,
        &mut out,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("\"action\":\"user.delete\"") && text.contains("\"undo_of\""));
    assert!(
        rollcall::audit::verify(&env.app.conn, &env.app.data.audit_dir())
            .unwrap()
            .problem
            .is_none()
    );
}

#[test]
fn undo_stops_on_users_changed_since_and_changes_nothing() {
    let (mut env, t) = setup();
    let header = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n";
    let add = import_csv(
        &mut env,
        &t,
        Operation::Add,
        "add.csv",
        &format!(
            "{header}ada@example.com,Ada,L,,,Learner,,Standard\nbob@example.com,Bob,B,,,Learner,,Standard\n"
        ),
    );
    import_csv(
        &mut env,
        &t,
        Operation::Update,
        "upd.csv",
        "Email,New Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\nbob@example.com,,Robert,,,,,,\n",
    );
    let (state, error) = undo(&env, add.job_id);
    assert_eq!(state, "failed");
    let error = error.unwrap();
    assert!(
        error.contains("1 conflicts")
            && error.contains("bob@example.com")
            && error.contains("changed since"),
        "{error}"
    );
    assert!(
        user_row(&env, "ada@example.com").is_some(),
        "nothing changed"
    );
    assert_eq!(user_row(&env, "bob@example.com").unwrap().1, "Robert");
    // An old email taken by someone else since is a conflict too.
    let upd = import_csv(
        &mut env,
        &t,
        Operation::Update,
        "ren.csv",
        "Email,New Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\nada@example.com,ada.k@example.com,,,,,,,\n",
    );
    assert!(upd.applied);
    let header = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n";
    assert!(
        import_csv(
            &mut env,
            &t,
            Operation::Add,
            "new-ada.csv",
            &format!("{header}ada@example.com,Another,Ada,,,Learner,,Standard\n")
        )
        .applied
    );
    let (state, error) = undo(&env, upd.job_id);
    assert_eq!(state, "failed");
    assert!(error.unwrap().contains("belongs to another user"));
    // Past the undo window the images are gone.
    env.app
        .conn
        .execute(
            "UPDATE jobs SET finished_at = '2020-01-01T00:00:00Z' WHERE id = ?1",
            [add.job_id],
        )
        .unwrap();
    let e = rollcall::undo::submit(&env.app, add.job_id).unwrap_err();
    assert!(e.to_string().contains("30 days"), "{e}");
}

#[test]
fn housekeeping_tasks_purge_what_is_past_retention_and_rotate_the_audit_log() {
    let (mut env, t) = setup();
    let header = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n";
    let add = import_csv(
        &mut env,
        &t,
        Operation::Add,
        "add.csv",
        &format!("{header}ada@example.com,Ada,L,,,Learner,,Standard\n"),
    );
    let del = import_csv(
        &mut env,
        &t,
        Operation::Delete,
        "del.csv",
        "Email,Reason\nada@example.com,x\n",
    );
    let tasks = rollcall::tasks::list(&env.app).unwrap();
    assert_eq!(
        tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["purge_files", "purge_undo_data", "rotate_audit"]
    );
    // Nothing is old yet: nothing is purged.
    assert!(
        rollcall::tasks::run(&env.app, "purge_undo_data")
            .unwrap()
            .starts_with("0 before/after")
    );
    // Age the first job and upload past both windows.
    env.app
        .conn
        .execute(
            "UPDATE jobs SET finished_at = '2020-01-01T00:00:00Z' WHERE id = ?1",
            [add.job_id],
        )
        .unwrap();
    env.app
        .conn
        .execute(
            "UPDATE uploads SET uploaded_at = '2020-01-01T00:00:00Z' WHERE id = ?1",
            [add.upload_id],
        )
        .unwrap();
    let stored: String = env
        .app
        .conn
        .query_row(
            "SELECT stored_path FROM uploads WHERE id = ?1",
            [add.upload_id],
            |r| r.get(0),
        )
        .unwrap();
    assert!(std::path::Path::new(&stored).exists());
    let r = rollcall::tasks::run(&env.app, "purge_undo_data").unwrap();
    assert!(r.starts_with("1 before/after images of 1 jobs"), "{r}");
    let left: i64 = env
        .app
        .conn
        .query_row(
            "SELECT count(*) FROM job_changes WHERE job_id = ?1",
            [add.job_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    let kept: i64 = env
        .app
        .conn
        .query_row(
            "SELECT count(*) FROM job_changes WHERE job_id = ?1",
            [del.job_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept, 1, "the recent job keeps its images");
    let r = rollcall::tasks::run(&env.app, "purge_files").unwrap();
    assert!(r.contains("1 uploads"), "{r}");
    assert!(!std::path::Path::new(&stored).exists());
    assert!(!env.app.data.results_report(add.job_id).exists());
    assert!(env.app.data.results_report(del.job_id).exists());
    // Rotation starts a new file; the next entries go there and the chain stays whole.
    let before = rollcall::audit::files(&env.app.data.audit_dir())
        .unwrap()
        .len();
    rollcall::tasks::run(&env.app, "rotate_audit").unwrap();
    import_csv(
        &mut env,
        &t,
        Operation::Add,
        "add2.csv",
        &format!("{header}bob@example.com,Bob,B,,,Learner,,Standard\n"),
    );
    let files = rollcall::audit::files(&env.app.data.audit_dir()).unwrap();
    assert_eq!(files.len(), before + 1);
    assert!(std::fs::metadata(files.last().unwrap()).unwrap().len() > 0);
    assert!(
        rollcall::audit::verify(&env.app.conn, &env.app.data.audit_dir())
            .unwrap()
            .problem
            .is_none()
    );
    let info = rollcall::tasks::list(&env.app).unwrap();
    assert!(
        info.iter()
            .all(|t| t.last_run.is_some() && t.last_error.is_none())
    );
    assert!(rollcall::tasks::run(&env.app, "nope").is_err());
}

#[test]
fn large_deactivations_need_a_typed_confirmation_and_deletes_can_need_a_second_admin() {
    let (mut env, t) = setup();
    let header = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n";
    let mut rows = String::from(header);
    for i in 0..5 {
        rows.push_str(&format!("u{i}@example.com,A,B,,,Learner,,Standard\n"));
    }
    assert!(import_csv(&mut env, &t, Operation::Add, "add.csv", &rows).applied);
    let mut s = db::tenant_settings(&env.app.conn, t.id).unwrap();
    s.large_change_percent = 20;
    db::set_tenant_settings(&env.app.conn, t.id, &s).unwrap();
    // 2 of 5 users is 40%, above 20%.
    let p = env.path("d.csv");
    std::fs::write(&p, "Email,Reason\nu0@example.com,\nu1@example.com,\n").unwrap();
    let r = service::import(
        &mut env.app,
        &t,
        Operation::Deactivate,
        &p,
        "d.csv",
        service::ImportOptions::new(false),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(!r.applied);
    assert_eq!(r.needs_confirmation.as_deref(), Some("DEACTIVATE 2 USERS"));
    assert!(r.error.unwrap().contains("Deactivating 2 of 5 users (40%)"));
    assert_eq!(
        user_row(&env, "u0@example.com").unwrap().2,
        "active",
        "nothing changed"
    );
    let opts = service::ImportOptions {
        confirm: Some("deactivate 2 users".into()),
        ..service::ImportOptions::new(false)
    };
    let r = service::import(
        &mut env.app,
        &t,
        Operation::Deactivate,
        &p,
        "d.csv",
        opts,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(r.applied, "{:?}", r.error);

    // A second administrator must approve deletions.
    let mut s = db::tenant_settings(&env.app.conn, t.id).unwrap();
    s.require_approval = true;
    s.large_change_percent = 100;
    db::set_tenant_settings(&env.app.conn, t.id, &s).unwrap();
    std::fs::write(&p, "Email,Reason\nu4@example.com,\n").unwrap();
    env.app.actor = "console:alice".into();
    let r = service::import(
        &mut env.app,
        &t,
        Operation::Delete,
        &p,
        "del.csv",
        service::ImportOptions::new(false),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r.state, "awaiting_approval");
    // No run appended its submission to the audit log; the import did before returning.
    let queued: i64 = env
        .app
        .conn
        .query_row("SELECT count(*) FROM audit_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(queued, 0);
    let log: String = rollcall::audit::files(&env.app.data.audit_dir())
        .unwrap()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let submitted = format!("\"target\":\"job {}\"", r.job_id);
    assert!(
        log.lines()
            .any(|l| l.contains("\"job.submitted\"") && l.contains(&submitted)),
        "{log}"
    );
    let e = scheduler::approve(&env.app, r.job_id).unwrap_err();
    assert!(e.to_string().contains("second administrator"), "{e}");
    env.app.actor = "console:bob".into();
    scheduler::approve(&env.app, r.job_id).unwrap();
    assert_eq!(
        scheduler::run_or_wait(&env.app, r.job_id).unwrap().0,
        "succeeded"
    );
    assert!(user_row(&env, "u4@example.com").is_none());
    let (by,): (String,) = env
        .app
        .conn
        .query_row(
            "SELECT approved_by FROM jobs WHERE id = ?1",
            [r.job_id],
            |r| Ok((r.get(0)?,)),
        )
        .unwrap();
    assert_eq!(by, "console:bob");
    // A count threshold applies too.
    s.require_approval = false;
    s.large_change_count = Some(1);
    db::set_tenant_settings(&env.app.conn, t.id, &s).unwrap();
    std::fs::write(&p, "Email,Reason\nu2@example.com,\nu3@example.com,\n").unwrap();
    let r = service::import(
        &mut env.app,
        &t,
        Operation::Delete,
        &p,
        "del2.csv",
        service::ImportOptions::new(false),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r.needs_confirmation.as_deref(), Some("DELETE 2 USERS"));
}

fn age(p: &std::path::Path) {
    let f = std::fs::File::options().append(true).open(p).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
        .unwrap();
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn drop_folder_files_are_checked_or_submitted_once_and_half_written_ones_wait() {
    let (env, t) = setup();
    let header = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n";
    let folder = env.app.data.inbox_dir().join("acme").join("add");
    std::fs::create_dir_all(&folder).unwrap();
    // Checked only (the tenant's default): a result beside it, nothing applied.
    let f = folder.join("hires.csv");
    std::fs::write(
        &f,
        format!("{header}ada@example.com,Ada,L,,,Learner,,Standard\n"),
    )
    .unwrap();
    age(&f);
    let s = rollcall::inbox::scan(&env.app).unwrap();
    assert_eq!((s.picked, s.finished), (1, 1));
    let results = files_in(&folder.join("results"));
    assert!(
        results
            .iter()
            .any(|r| r.ends_with("-hires.csv.result.json")),
        "{results:?}"
    );
    let text = std::fs::read_to_string(
        folder
            .join("results")
            .join(results.iter().find(|r| r.ends_with(".json")).unwrap()),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["valid"].as_bool(), v["applied"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(files_in(&folder.join("processed")).len(), 1);
    assert!(files_in(&folder).is_empty());
    assert!(user_row(&env, "ada@example.com").is_none());

    // Submitted when the tenant allows it; files still being written wait.
    let mut st = db::tenant_settings(&env.app.conn, t.id).unwrap();
    st.drop_folder_submit = true;
    db::set_tenant_settings(&env.app.conn, t.id, &st).unwrap();
    let f = folder.join("more.csv");
    std::fs::write(
        &f,
        format!("{header}bob@example.com,Bob,B,,,Learner,,Standard\n"),
    )
    .unwrap();
    age(&f);
    std::fs::write(folder.join("next.csv.partial"), header).unwrap();
    std::fs::write(folder.join("fresh.csv"), header).unwrap();
    let s = rollcall::inbox::scan(&env.app).unwrap();
    assert_eq!((s.picked, s.waiting), (1, 2));
    // A file left in processing/ by a crash right after its claim is taken up once.
    let crashed = folder.join("processing").join("1700000000000-crashed.csv");
    std::fs::write(
        &crashed,
        format!("{header}cy@example.com,Cy,C,,,Learner,,Standard\n"),
    )
    .unwrap();
    let lock = scheduler::WorkerLock::try_take(&env.app.data)
        .unwrap()
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    scheduler::work(
        &env.app,
        &lock,
        &stop,
        true,
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    drop(lock);
    let dbg: Vec<(i64, String, Option<String>)> = {
        let mut st = env
            .app
            .conn
            .prepare("SELECT id, state, error FROM jobs")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert!(
        user_row(&env, "bob@example.com").is_some() && user_row(&env, "cy@example.com").is_some(),
        "{dbg:?}"
    );
    let jobs: i64 = env
        .app
        .conn
        .query_row(
            "SELECT count(*) FROM jobs WHERE submitted_by = 'drop-folder'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(jobs, 2, "each file submitted once");
    let results = files_in(&folder.join("results"));
    assert!(
        results
            .iter()
            .any(|r| r.ends_with("-more.csv.results.xlsx")),
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .any(|r| r == "1700000000000-crashed.csv.result.json"),
        "{results:?}"
    );
    assert!(files_in(&folder.join("processing")).is_empty());
    // Nothing is taken twice.
    let s = rollcall::inbox::scan(&env.app).unwrap();
    assert_eq!((s.picked, s.finished), (0, 0));
    assert_eq!(
        files_in(&folder),
        vec!["fresh.csv".to_string(), "next.csv.partial".to_string()]
    );
}

#[test]
fn a_validated_upload_is_submitted_later_and_rechecked_when_it_runs() {
    let (env, t) = setup();
    let header = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n";
    let p = env.path("hires.csv");
    std::fs::write(
        &p,
        format!("{header}ada@example.com,Ada,L,,,Learner,,Standard\n"),
    )
    .unwrap();
    let up = service::upload(
        &env.app,
        &t,
        Operation::Add,
        &p,
        "hires.csv",
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(up.outcome.is_valid() && up.error_report.is_none());
    let status: (String, i64) = env
        .app
        .conn
        .query_row(
            "SELECT status, rows_total FROM uploads WHERE id = ?1",
            [up.upload_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(status, ("validated".to_string(), 1));
    let job =
        scheduler::submit_upload(&env.app, up.upload_id, &JobOptions::default(), None).unwrap();
    let again =
        scheduler::submit_upload(&env.app, up.upload_id, &JobOptions::default(), None).unwrap_err();
    assert!(again.to_string().contains("already submitted"), "{again}");
    assert_eq!(
        scheduler::run_or_wait(&env.app, job).unwrap().0,
        "succeeded"
    );
    // The same file uploaded again is rejected now (the user exists): it cannot be submitted.
    let up2 = service::upload(
        &env.app,
        &t,
        Operation::Add,
        &p,
        "hires.csv",
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(!up2.outcome.is_valid() && up2.error_report.is_some());
    let e = scheduler::submit_upload(&env.app, up2.upload_id, &JobOptions::default(), None)
        .unwrap_err();
    assert!(e.to_string().contains("rejected"), "{e}");
    // Valid at upload, but the roster changed before the job ran: the job re-checks and fails.
    let q = env.path("more.csv");
    std::fs::write(
        &q,
        format!("{header}bob@example.com,Bob,B,,,Learner,,Standard\n"),
    )
    .unwrap();
    let up3 = service::upload(
        &env.app,
        &t,
        Operation::Add,
        &q,
        "more.csv",
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(up3.outcome.is_valid());
    let r = std::fs::write(
        env.path("bob.csv"),
        format!("{header}bob@example.com,Bob,B,,,Learner,,Standard\n"),
    );
    r.unwrap();
    let first = service::upload(
        &env.app,
        &t,
        Operation::Add,
        &env.path("bob.csv"),
        "bob.csv",
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    let j1 =
        scheduler::submit_upload(&env.app, first.upload_id, &JobOptions::default(), None).unwrap();
    let j2 =
        scheduler::submit_upload(&env.app, up3.upload_id, &JobOptions::default(), None).unwrap();
    assert_eq!(scheduler::run_or_wait(&env.app, j2).unwrap().0, "failed");
    assert_eq!(state(&env, j1), "succeeded");
    let codes: Vec<String> = {
        let mut st = env
            .app
            .conn
            .prepare("SELECT code FROM upload_problems WHERE upload_id = ?1")
            .unwrap();
        st.query_map([up3.upload_id], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(codes, ["already_applied", "user_exists"]);
    // An upload with warnings is submitted only with them acknowledged, and its job's
    // findings replace the upload's.
    let d = env.path("d.csv");
    std::fs::write(&d, "Email,Reason\nada@example.com,\nzed@example.com,\n").unwrap();
    let bad = service::upload(
        &env.app,
        &t,
        Operation::Deactivate,
        &d,
        "d.csv",
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(!bad.outcome.is_valid());
    std::fs::write(&d, "Email,Reason\nada@example.com,\n").unwrap();
    let ok = service::upload(
        &env.app,
        &t,
        Operation::Deactivate,
        &d,
        "d.csv",
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(ok.outcome.is_valid());
    let j = scheduler::submit_upload(&env.app, ok.upload_id, &JobOptions::default(), None).unwrap();
    assert_eq!(scheduler::run_or_wait(&env.app, j).unwrap().0, "succeeded");
    let again = service::upload(
        &env.app,
        &t,
        Operation::Deactivate,
        &d,
        "d2.csv",
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        again.outcome.warnings, 2,
        "already applied, already deactivated"
    );
    assert!(
        scheduler::submit_upload(&env.app, again.upload_id, &JobOptions::default(), None)
            .unwrap_err()
            .to_string()
            .contains("--yes")
    );
    let opts = JobOptions {
        acknowledge_warnings: true,
        ..Default::default()
    };
    let j = scheduler::submit_upload(&env.app, again.upload_id, &opts, None).unwrap();
    assert_eq!(scheduler::run_or_wait(&env.app, j).unwrap().0, "succeeded");
}

#[test]
fn the_reader_estimates_the_rows_to_come_for_progress() {
    let env = Env::new();
    let setup = reader_setup(&env);
    let open = |p: &std::path::Path, name: &str, sheet: &str| {
        rollcall::sheet::reader::SheetReader::open(&setup, p, name, sheet, Pace::Ahead)
            .unwrap()
            .info()
            .estimated_rows
    };
    // An .xlsx declares its size (Excel and our writer both write it).
    let x = env.path("g.xlsx");
    rollcall::bench::generate(&x, 2500).unwrap();
    assert_eq!(open(&x, "g.xlsx", "Add Users"), Some(2500));
    // A CSV is estimated from its size.
    let c = env.path("g.csv");
    let mut text = String::from("Email,Reason\n");
    for i in 0..3000 {
        text.push_str(&format!("user{i:05}@example.com,left\n"));
    }
    std::fs::write(&c, text).unwrap();
    let est = open(&c, "g.csv", "Deactivate Users").unwrap();
    assert!((2700..=3300).contains(&est), "{est}");
    // Legacy .xls: its range is read whole, so the count is exact.
    let xls =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deactivate.xls");
    assert_eq!(open(&xls, "deactivate.xls", "Deactivate Users"), Some(2));
}

/// The file and rules workers of the tests: the built binary, with the test data's limits.
fn reader_setup(env: &Env) -> rollcall::sheet::reader::ReaderSetup {
    rollcall::sheet::reader::ReaderSetup {
        worker_exe: std::path::PathBuf::from(BIN),
        limits: env.app.config.limits.clone(),
    }
}

/// Whether process `pid` is still there (running, or exited and not yet reaped). Looked up
/// by pid: a child just spawned may still be inside exec, its command line not yet set.
fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Bytes process `pid` has written so far (`wchar` of /proc/PID/io); `None` where the
/// kernel keeps no such count.
fn writes_of(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// `writes_of(pid)` once it has stayed the same for 0.6 s (the process waits, or has ended).
fn settled_writes(pid: u32) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = writes_of(pid);
    let mut same = 0;
    while same < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(150));
        let now = writes_of(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last.expect("the worker's /proc/PID/io cannot be read")
}

/// Whether a pipe can be made 1 MiB large here, as the reader makes its worker's.
fn big_pipes() -> bool {
    let mut fds = [0; 2];
    // SAFETY: pipe and fcntl on descriptors made here, closed before returning.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return false;
        }
        let ok = libc::fcntl(fds[0], libc::F_SETPIPE_SZ, 1 << 20) >= 1 << 20;
        libc::close(fds[0]);
        libc::close(fds[1]);
        ok
    }
}

/// Reads the file through a worker at `pace` and returns: the bytes the worker had sent
/// once the reader had taken the header and asked for nothing more, and every row (index,
/// cells) up to the end or the worker's refusal.
fn read_paced(
    setup: &rollcall::sheet::reader::ReaderSetup,
    file: &std::path::Path,
    name: &str,
    pace: Pace,
    want_ahead: u64,
) -> (u64, Vec<(u32, usize)>, Option<String>) {
    use rollcall::sheet::codec::RawRow;
    use rollcall::sheet::reader::SheetReader;
    let sheet = Operation::Add.sheet_name();
    let mut r = SheetReader::open(setup, file, name, &sheet, pace).unwrap();
    let mut row = RawRow::default();
    assert!(r.next_row(&mut row).unwrap());
    assert_eq!(row.index, 0, "the header comes first");
    let written = if pace == Pace::Ahead {
        // Reading ahead, it writes on until the pipe is full.
        let deadline = Instant::now() + Duration::from_secs(20);
        while writes_of(r.pid()).unwrap_or(0) < want_ahead && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        writes_of(r.pid()).unwrap_or(0)
    } else {
        settled_writes(r.pid())
    };
    let mut rows = Vec::new();
    loop {
        match r.next_row(&mut row) {
            Ok(true) => rows.push((row.index, row.cells().len())),
            Ok(false) => return (written, rows, None),
            Err(f) => return (written, rows, Some(f.code)),
        }
    }
}

#[test]
fn a_paced_worker_reads_each_next_chunk_only_when_asked_and_loses_no_row() {
    if writes_of(std::process::id()).is_none() {
        eprintln!("skipped: this kernel keeps no /proc/PID/io");
        return;
    }
    let env = Env::new();
    let setup = reader_setup(&env);
    // More rows than the pipe holds, so that a worker reading ahead is stopped by the
    // full pipe, not by the end of the file.
    let xlsx = env.path("many.xlsx");
    rollcall::bench::generate(&xlsx, 20_000).unwrap();
    // A CSV whose row 15,002 has more columns than the limit: the worker refuses the file
    // there, after the rows before it.
    let csv = env.path("many.csv");
    let mut text = String::from("Email,First Name,Last Name\n");
    for i in 1..=15_000 {
        text.push_str(&format!("user{i}@example.com,Ann,Lee\n"));
    }
    text.push_str(&"x,".repeat(80));
    text.push('\n');
    std::fs::write(&csv, text).unwrap();
    // What a worker reading ahead sends before it must wait: at least one 64 KiB chunk
    // beside the first small ones, when pipes can be enlarged as the reader enlarges them.
    let control = big_pipes();
    let want_ahead = if control { 256 * 1024 } else { 0 };

    for (file, name, rows, refusal) in [
        (&xlsx, "many.xlsx", 20_000, None),
        (&csv, "many.csv", 15_000, Some("too_many_columns")),
    ] {
        let (ahead_written, ahead_rows, ahead_end) =
            read_paced(&setup, file, name, Pace::Ahead, want_ahead);
        let (asked_written, asked_rows, asked_end) =
            read_paced(&setup, file, name, Pace::Asked, want_ahead);
        assert_eq!(asked_rows.len(), rows, "{name}");
        assert_eq!(
            asked_rows, ahead_rows,
            "{name}: a paced worker sends the same rows as one reading ahead"
        );
        assert!(
            (1..=rows as u32).eq(asked_rows.iter().map(|r| r.0)),
            "{name}: rows out of order or missing"
        );
        assert_eq!(asked_end.as_deref(), refusal, "{name}");
        assert_eq!(ahead_end.as_deref(), refusal, "{name}");
        // Paced: the workbook's description, the header and at most the one small chunk
        // asked for (4 KiB and a row) before the reader asked for more.
        assert!(
            asked_written < 16 * 1024,
            "{name}: a paced worker that was not asked read on: {asked_written} bytes sent"
        );
        if control {
            assert!(
                ahead_written >= want_ahead,
                "{name}: the worker reading ahead sent only {ahead_written} bytes"
            );
        }
    }
}

#[test]
fn a_reader_started_early_serves_its_own_file_and_is_stopped_for_another() {
    use rollcall::sheet::reader::SheetReader;
    let (env, t) = setup();
    let setup = reader_setup(&env);
    // Files that declare their size, so each reader tells which file it read.
    let (a, b) = (env.path("a.xlsx"), env.path("b.xlsx"));
    rollcall::bench::generate(&a, 30).unwrap();
    rollcall::bench::generate(&b, 40).unwrap();
    let sheet = Operation::Add.sheet_name();
    let rows = |r: &SheetReader| r.info().estimated_rows;

    // Started on a, opened for a: the same worker.
    let started = SheetReader::start(&setup, &a, "a.xlsx", &sheet, Pace::Ahead).unwrap();
    let pid = started.pid();
    assert!(started.is_for(&a, "a.xlsx", &sheet, Pace::Ahead));
    assert!(
        !started.is_for(&a, "a.csv", &sheet, Pace::Ahead),
        "the declared name matters"
    );
    assert!(!started.is_for(&a, "a.xlsx", "Update Users", Pace::Ahead));
    assert!(
        !started.is_for(&a, "a.xlsx", &sheet, Pace::Asked),
        "a worker reading ahead is not one the reader paces"
    );
    let r = SheetReader::open_started(Some(started), &setup, &a, "a.xlsx", &sheet, Pace::Ahead)
        .unwrap();
    assert_eq!(rows(&r), Some(30));
    assert_eq!(
        r.pid(),
        pid,
        "the worker started early was not the one used"
    );
    drop(r);
    assert!(!process_exists(pid), "the worker was not reaped");

    // Started on a, opened for b: a's worker is stopped, b is read. a's rows overfill the
    // pipe, so its worker cannot finish on its own while the test looks.
    rollcall::bench::generate(&a, 3000).unwrap();
    let started = SheetReader::start(&setup, &a, "a.xlsx", &sheet, Pace::Ahead).unwrap();
    let pid = started.pid();
    assert!(process_exists(pid));
    let r = SheetReader::open_started(Some(started), &setup, &b, "b.xlsx", &sheet, Pace::Ahead)
        .unwrap();
    assert_eq!(rows(&r), Some(40));
    assert_ne!(r.pid(), pid);
    assert!(
        !process_exists(pid),
        "the worker for another file was left running"
    );
    drop(r);

    // Dropped unopened: stopped, nothing waits.
    let started = SheetReader::start(&setup, &a, "a.xlsx", &sheet, Pace::Ahead).unwrap();
    let pid = started.pid();
    drop(started);
    assert!(!process_exists(pid));

    // A file the worker refuses is refused when opened, as without starting early.
    let png = env.path("picture.xlsx");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n0000000000000000").unwrap();
    let started = SheetReader::start(&setup, &png, "picture.xlsx", &sheet, Pace::Ahead).unwrap();
    let early = started.open().err().unwrap();
    let late = SheetReader::open(&setup, &png, "picture.xlsx", &sheet, Pace::Ahead)
        .err()
        .unwrap();
    assert_eq!(early, late);

    // An import with jobs ahead of it in the queue runs them first, then its own, whose
    // early reader was stopped (it would have waited for them) and started again.
    let a = add_file(&env, "a2.xlsx", 0, 30);
    let b = add_file(&env, "b2.xlsx", 100, 40);
    let ahead = submit(&env, &t, &a, None);
    let mut app = env.app.reopen().unwrap();
    let r = service::import(
        &mut app,
        &t,
        Operation::Add,
        &b,
        "b2.xlsx",
        service::ImportOptions::new(false),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(r.applied, "{:?}", r.error);
    assert_eq!(r.outcome.rows, 40);
    assert_eq!(state(&env, ahead), "succeeded");
    let users: i64 = env
        .app
        .conn
        .query_row(
            "SELECT count(*) FROM users WHERE tenant_id = ?1",
            [t.id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(users, 70);
}

/// The nice value of a process or thread, from its `/proc/.../stat` (field 19).
fn nice_of(stat: &str) -> i32 {
    let text = std::fs::read_to_string(stat).unwrap();
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = &text[text.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(16).unwrap().parse().unwrap()
}

/// One line of /proc/PID/limits: (soft, hard) of the limit named `name`.
fn limit_of(pid: u32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text.lines().find(|l| l.starts_with(name)).unwrap();
    let mut fields = line[name.len()..].split_whitespace();
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

/// Waits up to 20 s for `probe` to give `want` (a helper sets its limits one after the
/// other), failing with `what` and the last state seen.
fn await_state<T: PartialEq + std::fmt::Debug>(what: &str, probe: impl Fn() -> T, want: T) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = probe();
        if seen == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {seen:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The helpers confine themselves once started (no hook runs between fork and exec): checked
/// after each has answered, so the limits are known to be in place.
#[test]
fn the_helpers_of_a_pass_run_nicer_than_the_writer_and_under_their_limits() {
    use rollcall::priority::HELPER_NICE;
    let (env, _t) = setup();
    let setup = reader_setup(&env);
    let ours = nice_of("/proc/thread-self/stat");
    let expected = (ours + HELPER_NICE).min(19);
    const { assert!(HELPER_NICE > 0) };

    // The file's worker, once it has sent the workbook's description (the pipe holds the
    // 20 rows: it may have finished, unreaped, which keeps its /proc entry).
    let a = env.path("n.xlsx");
    rollcall::bench::generate(&a, 20).unwrap();
    let sheet = Operation::Add.sheet_name();
    let started =
        rollcall::sheet::reader::SheetReader::start(&setup, &a, "n.xlsx", &sheet, Pace::Ahead)
            .unwrap();
    let pid = started.pid();
    let reader = started.open().unwrap();
    assert_eq!(nice_of(&format!("/proc/{pid}/stat")), expected);
    let mem = (setup.limits.worker_memory_mib * 1024 * 1024).to_string();
    assert_eq!(
        limit_of(pid, "Max address space"),
        (mem.clone(), mem.clone())
    );
    let cpu = setup.limits.worker_cpu_seconds.to_string();
    assert_eq!(limit_of(pid, "Max cpu time"), (cpu.clone(), cpu));
    assert_eq!(limit_of(pid, "Max file size"), ("0".into(), "0".into()));
    assert_eq!(
        limit_of(pid, "Max core file size"),
        ("0".into(), "0".into())
    );
    drop(reader);

    // In place before the file is opened: on a named pipe that nobody writes to, the worker
    // waits in opening it (reading nothing), and its limits are seen meanwhile.
    let fifo = env.path("pipe.xlsx");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let started = rollcall::sheet::reader::SheetReader::start(
        &setup,
        &fifo,
        "pipe.xlsx",
        &sheet,
        Pace::Ahead,
    )
    .unwrap();
    let pid = started.pid();
    // (The limits are set one after the other: wait for the whole set, the priority last.)
    let confined = || {
        (
            limit_of(pid, "Max address space"),
            limit_of(pid, "Max file size"),
            nice_of(&format!("/proc/{pid}/stat")),
        )
    };
    let want = (
        (mem.clone(), mem.clone()),
        ("0".to_string(), "0".to_string()),
        expected,
    );
    await_state(
        "the worker did not confine itself before opening its file",
        confined,
        want,
    );
    drop(started);

    // The rules worker, once it has loaded the (no) scripts.
    let p = rollcall::rules::client::RulesProcess::start(
        &setup,
        &[],
        &rollcall::rules::Context::default(),
        Operation::Add,
        None,
        0,
    )
    .unwrap_or_else(|_| panic!("the rules worker did not start"));
    assert_eq!(nice_of(&format!("/proc/{}/stat", p.pid())), expected);
    let mem = ((setup.limits.rules_memory_mib + rollcall::rules::client::WORKER_OVERHEAD_MIB)
        * 1024
        * 1024)
        .to_string();
    assert_eq!(limit_of(p.pid(), "Max address space"), (mem.clone(), mem));
    let cpu = (setup.limits.rules_seconds.max(1) + 5).to_string();
    assert_eq!(limit_of(p.pid(), "Max cpu time"), (cpu.clone(), cpu));
    assert_eq!(
        limit_of(p.pid(), "Max core file size"),
        ("0".into(), "0".into())
    );
    p.finish();

    // In place before it reads anything from the parent: a rules worker whose parent never
    // writes its scripts is confined meanwhile (the limits come on its command line).
    let confinement = rollcall::confine::Confinement {
        memory_bytes: 300 << 20,
        cpu_seconds: 7,
        may_write_files: true,
    };
    let mut silent = std::process::Command::new(BIN)
        .arg(rollcall::rules::worker::WORKER_SUBCOMMAND)
        .arg(serde_json::to_string(&confinement).unwrap())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .env_clear()
        .spawn()
        .unwrap();
    let pid = silent.id();
    let bytes = (300u64 << 20).to_string();
    let confined = || {
        (
            limit_of(pid, "Max address space"),
            limit_of(pid, "Max cpu time"),
            nice_of(&format!("/proc/{pid}/stat")),
        )
    };
    let want = (
        (bytes.clone(), bytes),
        ("7".to_string(), "7".to_string()),
        expected,
    );
    await_state(
        "the rules worker did not confine itself before reading its scripts",
        confined,
        want,
    );
    drop(silent.stdin.take());
    assert!(!silent.wait().unwrap().success(), "no init, no work");

    // The checking thread lowers only itself: the thread that writes keeps its priority.
    let inner = std::thread::spawn(move || {
        rollcall::priority::lower_this_thread();
        nice_of("/proc/thread-self/stat")
    })
    .join()
    .unwrap();
    assert_eq!(inner, expected);
    assert_eq!(nice_of("/proc/thread-self/stat"), ours);
}

/// An upload is stored once per content, under the SHA-256 of exactly its bytes (hashed in
/// the pass that copies it), with the declared name's extension; the temporary copy is gone.
/// A web upload's body, received into tmp/ already, is moved into place instead.
#[test]
fn uploads_are_stored_under_the_hash_of_their_bytes() {
    use sha2::Digest;
    let env = Env::new();
    // Larger than the copying buffer, so that the hash spans several reads.
    let bytes: Vec<u8> = (0..(3 << 20) + 12345)
        .map(|i: u32| (i % 251) as u8)
        .collect();
    let p = env.path("big.bin");
    std::fs::write(&p, &bytes).unwrap();
    let stored = service::store_upload(&env.app.data, &p, "Big.XLSX").unwrap();
    assert_eq!(stored.sha256, hex::encode(sha2::Sha256::digest(&bytes)));
    assert_eq!(stored.size, bytes.len() as u64);
    assert_eq!(std::fs::read(&stored.path).unwrap(), bytes);
    assert!(
        stored.path.to_string_lossy().ends_with(".xlsx"),
        "{:?}",
        stored.path
    );
    let again = service::store_upload(&env.app.data, &p, "again.xlsx").unwrap();
    assert_eq!(again.path, stored.path);
    let left: Vec<_> = std::fs::read_dir(env.app.data.tmp_dir()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    let missing = service::store_upload(&env.app.data, &env.path("nope.xlsx"), "nope.xlsx");
    assert!(missing.unwrap_err().to_string().contains("cannot read"));

    // A body received into tmp/ (the web server's uploads) is hashed piece by piece as it
    // arrives, then moved into place: not copied, not read again. Content stored already
    // leaves it where it is, for its owner to remove.
    let received = env.app.data.tmp_dir().join("web-upload-1.partial");
    let other: Vec<u8> = bytes.iter().rev().copied().collect();
    let receive = |body: &[u8]| {
        let mut hash = service::ContentHash::default();
        // Pieces of uneven size, as a body's chunks come.
        for piece in body.chunks(65_521) {
            hash.update(piece);
        }
        assert_eq!(hash.size(), body.len() as u64);
        std::fs::write(&received, body).unwrap();
        hash.finish()
    };
    let hashed = receive(&other);
    assert_eq!(hashed.sha256, hex::encode(sha2::Sha256::digest(&other)));
    let moved = service::store_received(&env.app.data, &received, hashed, "b.xlsx").unwrap();
    assert_eq!(moved.sha256, hex::encode(sha2::Sha256::digest(&other)));
    assert_eq!(moved.size, other.len() as u64);
    assert_eq!(std::fs::read(&moved.path).unwrap(), other);
    assert!(!received.exists());
    let hashed = receive(&bytes);
    let known = service::store_received(&env.app.data, &received, hashed, "c.xlsx").unwrap();
    assert_eq!(known.path, stored.path);
    assert!(received.exists());
}

/// `PRAGMA synchronous` of the app's connection: 2 is FULL (every commit waits for the disk).
fn synchronous(env: &Env) -> i64 {
    env.app
        .conn
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .unwrap()
}

#[test]
fn an_import_run_at_once_leaves_its_file_and_its_records_on_disk_and_commits_synced_again() {
    use sha2::Digest;
    let (mut env, t) = setup();
    assert_eq!(synchronous(&env), 2);
    let header = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n";
    let text = format!("{header}a@example.com,A,B,,,Learner,,Standard\n");
    // Applied: the stored copy holds the bytes under their hash, nothing is left in tmp/,
    // and the connection waits for the disk again.
    let r = import_csv(&mut env, &t, Operation::Add, "a.csv", &text);
    assert!(r.applied, "{:?}", r.error);
    assert_eq!(synchronous(&env), 2);
    let (path, sha): (String, String) = env
        .app
        .conn
        .query_row(
            "SELECT stored_path, file_sha256 FROM uploads WHERE id = ?1",
            [r.upload_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let stored = std::fs::read(&path).unwrap();
    assert_eq!(stored, text.as_bytes());
    assert_eq!(sha, hex::encode(sha2::Sha256::digest(&stored)));
    let left: Vec<_> = std::fs::read_dir(env.app.data.tmp_dir()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    // Refused (a file with errors): the same.
    let bad = format!("{header}not-an-email,A,B,,,Learner,,Standard\n");
    let r = import_csv(&mut env, &t, Operation::Add, "bad.csv", &bad);
    assert!(!r.applied);
    assert_eq!(r.state, "failed");
    assert_eq!(synchronous(&env), 2);

    // Left awaiting approval (it does not run): the same, and its submission is recorded.
    let mut s = db::tenant_settings(&env.app.conn, t.id).unwrap();
    s.require_approval = true;
    db::set_tenant_settings(&env.app.conn, t.id, &s).unwrap();
    let r = import_csv(
        &mut env,
        &t,
        Operation::Deactivate,
        "d.csv",
        "Email,Reason\na@example.com,\n",
    );
    assert_eq!(r.state, "awaiting_approval");
    assert_eq!(synchronous(&env), 2);
    assert_eq!(state(&env, r.job_id), "awaiting_approval");

    // Behind a job queued earlier: that one runs first, then this one.
    let earlier = submit(&env, &t, &add_file(&env, "earlier.xlsx", 100, 3), None);
    let r = import_csv(
        &mut env,
        &t,
        Operation::Add,
        "later.csv",
        &format!("{header}b@example.com,A,B,,,Learner,,Standard\n"),
    );
    assert!(r.applied, "{:?}", r.error);
    assert_eq!(state(&env, earlier), "succeeded");
    assert_eq!(synchronous(&env), 2);
}

#[test]
fn a_damaged_stored_copy_is_replaced_by_the_next_upload_of_its_content() {
    let env = Env::new();
    let p = env.path("a.csv");
    std::fs::write(&p, "Email\nx@example.com\n").unwrap();
    let stored = service::store_upload(&env.app.data, &p, "a.csv").unwrap();
    // What a power cut between a rename and its fsync can leave: the name, other bytes.
    for damage in [&b""[..], &b"Email\nx@example.con\n"[..]] {
        std::fs::write(&stored.path, damage).unwrap();
        let again = service::store_upload(&env.app.data, &p, "a.csv").unwrap();
        assert_eq!(again.path, stored.path);
        assert_eq!(
            std::fs::read(&again.path).unwrap(),
            b"Email\nx@example.com\n"
        );
    }
    // The same through the import's path (the fsyncs on a thread).
    std::fs::write(&stored.path, b"").unwrap();
    let (again, sync) = service::store_upload_unsynced(&env.app.data, &p, "a.csv").unwrap();
    sync.wait().unwrap();
    assert_eq!(again.path, stored.path);
    assert_eq!(
        std::fs::read(&again.path).unwrap(),
        b"Email\nx@example.com\n"
    );
    let left: Vec<_> = std::fs::read_dir(env.app.data.tmp_dir()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A queued job whose stored copy is no longer the file it was stored as (what a power cut
/// can leave when the job's records reached the disk before the file did) fails when it
/// runs, saying so, and changes nothing; the queue goes on.
#[test]
fn a_job_whose_stored_copy_was_damaged_or_lost_fails_saying_so_and_changes_nothing() {
    let (env, t) = setup();
    let damaged = add_file(&env, "d.xlsx", 0, 3);
    let lost = add_file(&env, "l.xlsx", 10, 3);
    let fine = add_file(&env, "f.xlsx", 20, 3);
    let (a, b, c) = (
        submit(&env, &t, &damaged, None),
        submit(&env, &t, &lost, None),
        submit(&env, &t, &fine, None),
    );
    let stored_path = |job: i64| -> String {
        env.app
            .conn
            .query_row(
                "SELECT u.stored_path FROM jobs j JOIN uploads u ON u.id = j.upload_id WHERE j.id = ?1",
                [job],
                |r| r.get(0),
            )
            .unwrap()
    };
    // Same size, other bytes; and no file at all.
    let mut bytes = std::fs::read(stored_path(a)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(stored_path(a), &bytes).unwrap();
    std::fs::remove_file(stored_path(b)).unwrap();

    let lock = scheduler::WorkerLock::try_take(&env.app.data)
        .unwrap()
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let worked = scheduler::work(
        &env.app,
        &lock,
        &stop,
        true,
        None,
        &mut |_, _, _| {},
        &mut |_| {},
    );
    assert!(worked.is_ok(), "the queue goes on: {:?}", worked.err());
    let error = |job: i64| -> String {
        env.app
            .conn
            .query_row("SELECT error FROM jobs WHERE id = ?1", [job], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(state(&env, a), "failed");
    assert!(error(a).contains("is damaged"), "{}", error(a));
    assert!(error(a).contains("upload the file again"), "{}", error(a));
    assert_eq!(state(&env, b), "failed");
    assert!(error(b).contains("is missing"), "{}", error(b));
    assert_eq!(state(&env, c), "succeeded");
    let users: i64 = env
        .app
        .conn
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .unwrap();
    assert_eq!(users, 3, "only the intact job's three users");
    assert!(!env.app.data.progress_file(a).exists());
}

/// The pass's outcome is committed only once the upload's fsyncs are done: a sync thread that
/// takes its time finds the job still 'running' when it ends, and the job succeeds after it.
/// A sync that fails fails the job, applying nothing.
#[test]
fn a_job_run_at_once_commits_its_outcome_only_after_its_uploads_fsyncs() {
    let (env, t) = setup();
    let run = |name: &str, from: usize, sync_fails: bool| -> (i64, Option<String>) {
        let p = add_file(&env, name, from, 3);
        let job = submit(&env, &t, &p, None);
        let db = env.app.data.database();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let saw = seen.clone();
        let sync = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let c = rusqlite::Connection::open(db).unwrap();
            let state: String = c
                .query_row("SELECT state FROM jobs WHERE id = ?1", [job], |r| r.get(0))
                .unwrap();
            *saw.lock().unwrap() = Some(state);
            if sync_fails {
                Err(std::io::Error::other("the disk is gone"))
            } else {
                Ok(())
            }
        });
        let ahead = scheduler::Ahead {
            worker: None,
            stored: Some(service::PendingSync::from_thread(sync)),
            unsynced: None,
        };
        let _ = scheduler::run_job(
            &env.app,
            job,
            scheduler::RunOptions::default(),
            ahead,
            &mut |_, _, _| {},
            &mut |_| {},
        );
        let seen = seen.lock().unwrap().clone();
        (job, seen)
    };
    let (job, seen) = run("slow-sync.xlsx", 0, false);
    assert_eq!(seen.as_deref(), Some("running"));
    assert_eq!(state(&env, job), "succeeded");

    let users = |env: &Env| -> i64 {
        env.app
            .conn
            .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
            .unwrap()
    };
    let before = users(&env);
    let (job, seen) = run("failed-sync.xlsx", 10, true);
    assert_eq!(seen.as_deref(), Some("running"));
    assert_eq!(state(&env, job), "failed");
    assert_eq!(
        users(&env),
        before,
        "nothing of a job whose file is not on disk"
    );
}
