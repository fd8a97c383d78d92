//! Email through a real SMTP server (Python's aiosmtpd, started by each test on a loopback
//! port; tests/fixtures/smtp_sink.py) and through the outbox folder: job and upload
//! notifications with their workbooks, STARTTLS, retry after the server was down, no
//! second send after an interrupted one, header injection.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rollcall::db;
use rollcall::model::Operation;
use rollcall::service::{self, ImportOptions};
use serde_json::Value;

const SINK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/smtp_sink.py");

fn python() -> String {
    std::env::var("ROLLCALL_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running SMTP server that writes what it receives into `out`.
struct Sink {
    child: Child,
    out: PathBuf,
}

impl Sink {
    fn start(port: u16, out: &Path, tls_dir: Option<&Path>) -> Sink {
        let mut flags = Vec::new();
        if let Some(d) = tls_dir {
            flags.push("--starttls".to_string());
            flags.push(d.to_string_lossy().into_owned());
        }
        Sink::start_with(port, out, &flags)
    }

    fn start_with(port: u16, out: &Path, flags: &[String]) -> Sink {
        let mut cmd = Command::new(python());
        cmd.arg(SINK).arg(port.to_string()).arg(out).args(flags);
        // Its log (e.g. a handshake a test makes fail on purpose) goes beside the messages.
        std::fs::create_dir_all(out).unwrap();
        let log = std::fs::File::create(out.join("server.log")).unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("python3 with aiosmtpd (tests/run.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the SMTP server did not start");
        Sink {
            child,
            out: out.to_path_buf(),
        }
    }

    /// The messages received so far, in order.
    fn messages(&self) -> Vec<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "json")
                    && !p.file_name().unwrap().to_string_lossy().starts_with('.')
            })
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap())
            .collect()
    }

    fn wait_for(&self, n: usize) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let m = self.messages();
            if m.len() >= n || start.elapsed() > Duration::from_secs(20) {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a certificate for localhost it signed (made with openssl by the fixture).
fn make_certs() -> tempfile::TempDir {
    let certs = tempfile::tempdir().unwrap();
    let o = Command::new(python())
        .arg(SINK)
        .arg("--make-certs")
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    certs
}

fn smtp_env(port: u16) -> Env {
    Env::with(|c| {
        c.mail.transport = "smtp".into();
        c.mail.smtp_host = "127.0.0.1".into();
        c.mail.smtp_port = Some(port);
        c.mail.smtp_security = "none".into();
        c.mail.smtp_timeout_seconds = 5;
        c.mail.from = "rollcall <rollcall@example.org>".into();
        c.mail.support_contact = "helpdesk@example.org".into();
    })
}

fn text_part(m: &Value, ct: &str) -> String {
    m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["content_type"] == ct)
        .map(|p| p["text"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn attachment(m: &Value) -> Option<(String, PathBuf)> {
    m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| !p["filename"].is_null())
        .map(|p| {
            (
                p["filename"].as_str().unwrap().to_string(),
                PathBuf::from(p["saved"].as_str().unwrap_or("")),
            )
        })
}

fn tenant(env: &Env) -> db::Tenant {
    let t = db::create_tenant(&env.app.conn, "Acme").unwrap();
    db::set_pool(&env.app.conn, t.id, "Standard", 100).unwrap();
    t
}

fn import(env: &mut Env, t: &db::Tenant, file: &Path, to: &str) -> service::ImportResult {
    service::import(
        &mut env.app,
        t,
        Operation::Add,
        file,
        &file.file_name().unwrap().to_string_lossy(),
        ImportOptions {
            notify: Some(to.into()),
            ..ImportOptions::new(true)
        },
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap()
}

#[test]
fn a_job_tells_its_submitter_when_it_starts_and_ends_with_the_results_workbook() {
    let port = free_port();
    let sink = Sink::start(port, &tempfile::tempdir().unwrap().keep(), None);
    let mut env = smtp_env(port);
    let t = tenant(&env);
    let file = env.path("new-staff.xlsx");
    write_add_file(&file, 0..3);
    let r = import(&mut env, &t, &file, "Grace Hopper <grace@example.com>");
    assert!(r.applied);
    let msgs = sink.wait_for(2);
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let (started, finished) = (&msgs[0], &msgs[1]);
    for m in [started, finished] {
        assert_eq!(m["rcpt_tos"], serde_json::json!(["grace@example.com"]));
        assert_eq!(m["mail_from"], "rollcall@example.org");
        assert_eq!(m["tls"], false);
    }
    assert_eq!(
        started["subject"],
        format!(
            "Acme: processing of new-staff.xlsx has started (job {})",
            r.job_id
        )
    );
    assert_eq!(
        finished["subject"],
        format!("Acme: job {} is done: 3 users added", r.job_id)
    );
    let text = text_part(finished, "text/plain");
    assert!(text.contains("- 3 users added"), "{text}");
    assert!(text.contains("Questions: helpdesk@example.org"), "{text}");
    let html = text_part(finished, "text/html");
    assert!(html.contains("<li>3 users added</li>"), "{html}");
    let (name, saved) = attachment(finished).expect("the results workbook is attached");
    assert_eq!(name, format!("job-{}-results.xlsx", r.job_id));
    let rows = sheet_rows(&saved, "Results");
    assert!(
        rows.iter().any(|r| r.iter().any(|c| c == "u0@example.com")),
        "{rows:?}"
    );
    // Queued and sent messages are audited, bodies not.
    let sent: Vec<String> = env
        .app
        .conn
        .prepare("SELECT state FROM mail_outbox ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(sent, vec!["sent", "sent"]);
    let log = audit_text(&env);
    assert_eq!(log.matches("\"action\":\"mail.queued\"").count(), 2);
    assert_eq!(log.matches("\"action\":\"mail.sent\"").count(), 2);
    assert!(
        !log.contains("3 users added\\n"),
        "bodies stay out of the audit log"
    );
}

fn audit_text(env: &Env) -> String {
    service::flush_audit(&env.app).unwrap();
    let mut s = String::new();
    for e in std::fs::read_dir(env.app.data.audit_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "jsonl") {
            s.push_str(&std::fs::read_to_string(p).unwrap());
        }
    }
    s
}

#[test]
fn a_rejected_upload_and_a_failed_job_send_their_problems_and_the_error_workbook() {
    let port = free_port();
    let sink = Sink::start(port, &tempfile::tempdir().unwrap().keep(), None);
    let mut env = smtp_env(port);
    let t = tenant(&env);
    let bad = env.path("bad.csv");
    std::fs::write(
        &bad,
        "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n\
         not-an-email,Ada,Lovelace,,,Learner,,Standard\n",
    )
    .unwrap();
    let up = service::upload(
        &env.app,
        &t,
        Operation::Add,
        &bad,
        "bad.csv",
        Some("ada@example.com"),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(!up.outcome.is_valid());
    rollcall::scheduler::send_mail(&env.app);
    let r = import(&mut env, &t, &bad, "ada@example.com");
    assert!(!r.applied);
    let msgs = sink.wait_for(3);
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    let rejected = &msgs[0];
    assert_eq!(
        rejected["subject"],
        "Acme: your file bad.csv was not accepted (1 error)"
    );
    let text = text_part(rejected, "text/plain");
    assert!(
        text.contains("- Row 2, Email: Email is not a valid email address"),
        "{text}"
    );
    let (name, saved) = attachment(rejected).expect("the error workbook is attached");
    assert_eq!(name, "bad-errors.xlsx");
    let rows = sheet_rows(&saved, "Add Users");
    assert_eq!(rows[0].last().unwrap(), "Errors");
    assert!(
        rows[1]
            .last()
            .unwrap()
            .contains("not a valid email address"),
        "{rows:?}"
    );
    let failed = &msgs[2];
    assert_eq!(
        failed["subject"],
        format!("Acme: job {} failed: nothing was changed", r.job_id)
    );
    let text = text_part(failed, "text/plain");
    assert!(
        text.contains("Reason: the file has 1 errors; nothing was changed"),
        "{text}"
    );
    assert_eq!(attachment(failed).unwrap().0, "bad-errors.xlsx");
}

#[test]
fn a_server_that_is_down_gets_the_message_once_it_is_up_and_never_twice() {
    let port = free_port();
    let mut env = smtp_env(port);
    let t = tenant(&env);
    let file = env.path("new-staff.xlsx");
    write_add_file(&file, 0..2);
    // Nobody listens: both messages wait, with the reason.
    import(&mut env, &t, &file, "ada@example.com");
    let rows = rollcall::mail::list(&env.app.conn, None, 10).unwrap();
    assert_eq!(rows.len(), 2);
    for m in &rows {
        assert_eq!(m.state, "queued");
        assert_eq!(m.attempts, 1);
        let e = m.last_error.as_deref().unwrap_or("");
        assert!(e.contains("connection refused"), "{e}");
    }
    // Not due yet (back-off): nothing is tried.
    let s = rollcall::mail::send_due(&env.app.conn, &env.app.data, &env.app.config.mail).unwrap();
    assert_eq!(s.sent + s.retrying + s.failed, 0);
    // The server comes up and the back-off ends.
    let sink = Sink::start(port, &tempfile::tempdir().unwrap().keep(), None);
    env.app
        .conn
        .execute(
            "UPDATE mail_outbox SET next_attempt_at = '2000-01-01T00:00:00Z'",
            [],
        )
        .unwrap();
    let s = rollcall::mail::send_due(&env.app.conn, &env.app.data, &env.app.config.mail).unwrap();
    assert_eq!((s.sent, s.retrying, s.failed), (2, 0, 0));
    let s = rollcall::mail::send_due(&env.app.conn, &env.app.data, &env.app.config.mail).unwrap();
    assert_eq!(s.sent, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sink.messages().len(),
        2,
        "each message arrives exactly once"
    );

    // A send cut off by a crash ('sending' left behind) is not repeated: it is failed,
    // visible, and retried only when asked.
    env.app
        .conn
        .execute("UPDATE mail_outbox SET state = 'sending' WHERE id = 1", [])
        .unwrap();
    let s = rollcall::mail::send_due(&env.app.conn, &env.app.data, &env.app.config.mail).unwrap();
    assert_eq!(s.sent, 0);
    let failed = rollcall::mail::list(&env.app.conn, Some("failed"), 10).unwrap();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("may or may not have been delivered")
    );
    assert!(rollcall::mail::retry(&env.app.conn, 1, "test").unwrap());
    let s = rollcall::mail::send_due(&env.app.conn, &env.app.data, &env.app.config.mail).unwrap();
    assert_eq!(s.sent, 1);
    assert_eq!(sink.wait_for(3).len(), 3);
}

#[test]
fn starttls_with_the_organisations_ca_and_clear_errors_from_send_test_email() {
    let certs = make_certs();
    let port = free_port();
    let sink = Sink::start(
        port,
        &tempfile::tempdir().unwrap().keep(),
        Some(certs.path()),
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let send = |env: &[(&str, String)]| {
        let mut c = Command::new(BIN);
        c.arg("--data-dir")
            .arg(&data)
            .args(["send-test-email", "--to", "ops@example.com"])
            .env("ROLLCALL_MAIL_TRANSPORT", "smtp")
            .env("ROLLCALL_MAIL_SMTP_HOST", "localhost")
            .env("ROLLCALL_MAIL_SMTP_PORT", port.to_string())
            .env("ROLLCALL_MAIL_SMTP_TIMEOUT_SECONDS", "5");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let ca = certs.path().join("ca.pem").to_string_lossy().into_owned();
    let o = send(&[("ROLLCALL_MAIL_SMTP_CA_FILE", ca.clone())]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("SMTP localhost:") && text(&o).contains("(STARTTLS) accepted"),
        "{}",
        text(&o)
    );
    let m = sink.wait_for(1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["tls"], true);
    assert_eq!(m[0]["subject"], "rollcall test message");
    // Without the CA the certificate is not trusted: said as a TLS failure.
    let o = send(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("the TLS connection to SMTP localhost"),
        "{}",
        text(&o)
    );
    // Nobody listening: said as such.
    let closed = free_port();
    let o = Command::new(BIN)
        .arg("--data-dir")
        .arg(&data)
        .args(["send-test-email", "--to", "ops@example.com"])
        .env("ROLLCALL_MAIL_TRANSPORT", "smtp")
        .env("ROLLCALL_MAIL_SMTP_HOST", "127.0.0.1")
        .env("ROLLCALL_MAIL_SMTP_PORT", closed.to_string())
        .env("ROLLCALL_MAIL_SMTP_SECURITY", "none")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("connection refused"), "{}", text(&o));
    // A name that does not resolve: DNS.
    let o = Command::new(BIN)
        .arg("--data-dir")
        .arg(&data)
        .args(["send-test-email", "--to", "ops@example.com"])
        .env("ROLLCALL_MAIL_TRANSPORT", "smtp")
        .env("ROLLCALL_MAIL_SMTP_HOST", "no-such-host.invalid")
        .env("ROLLCALL_MAIL_SMTP_SECURITY", "none")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("(DNS)"), "{}", text(&o));
}

#[test]
fn the_outbox_folder_holds_standard_eml_files() {
    let mut env = Env::new();
    let t = tenant(&env);
    let file = env.path("new-staff.xlsx");
    write_add_file(&file, 0..2);
    let r = import(&mut env, &t, &file, "ada@example.com");
    assert!(r.applied);
    let mut files: Vec<PathBuf> = std::fs::read_dir(env.app.data.outbox_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files[1]
            .to_string_lossy()
            .ends_with("000002-job_finished.eml")
    );
    let o = Command::new(python())
        .arg(SINK)
        .arg("--parse")
        .arg(&files[1])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let m: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["to"], "ada@example.com");
    assert_eq!(
        m["subject"],
        format!("Acme: job {} is done: 2 users added", r.job_id)
    );
    let types: Vec<&str> = m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["content_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        vec![
            "text/plain",
            "text/html",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
        ]
    );
}

#[test]
fn line_breaks_cannot_add_headers_or_recipients() {
    let port = free_port();
    let sink = Sink::start(port, &tempfile::tempdir().unwrap().keep(), None);
    let env = smtp_env(port);
    let t = tenant(&env);
    // A recipient with a line break is refused on the command line...
    let o = cli(
        env.app.data.root(),
        &[
            "upload",
            "--tenant",
            "Acme",
            "--op",
            "add",
            "--email",
            "ada@example.com\r\nBcc: eve@example.com",
            "x.csv",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("line break"), "{}", text(&o));
    // ...and never queued when it reaches the queue another way.
    let queued = rollcall::mail::queue(
        &env.app.conn,
        &env.app.data,
        &env.app.config.mail,
        "test",
        &rollcall::mail::Outgoing {
            event: "job_started",
            tenant: Some(&t.name),
            to: "ada@example.com\nBcc: eve@example.com",
            template: "job_started",
            context: serde_json::json!({"job_id": 1, "file_name": "x.csv", "operation": "add users"}),
            attachment: None,
        },
    )
    .unwrap();
    assert_eq!(queued, None);
    // A file name with a line break stays inside the subject.
    rollcall::mail::queue(
        &env.app.conn,
        &env.app.data,
        &env.app.config.mail,
        "test",
        &rollcall::mail::Outgoing {
            event: "job_started",
            tenant: Some(&t.name),
            to: "ada@example.com",
            template: "job_started",
            context: serde_json::json!({"job_id": 1, "file_name": "x\r\nBcc: eve@example.com\r\n.csv", "operation": "add users"}),
            attachment: None,
        },
    )
    .unwrap()
    .unwrap();
    let s = rollcall::mail::send_due(&env.app.conn, &env.app.data, &env.app.config.mail).unwrap();
    assert_eq!(s.sent, 1);
    let m = &sink.wait_for(1)[0];
    assert_eq!(m["rcpt_tos"], serde_json::json!(["ada@example.com"]));
    assert_eq!(
        m["subject"],
        "Acme: processing of x Bcc: eve@example.com .csv has started (job 1)"
    );
    let names: Vec<&str> = m["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.eq_ignore_ascii_case("bcc")),
        "{names:?}"
    );
}

#[test]
fn getting_started_messages_go_to_added_users_and_are_counted_per_user() {
    let port = free_port();
    let sink = Sink::start(port, &tempfile::tempdir().unwrap().keep(), None);
    let mut env = Env::with(|c| {
        c.mail.transport = "smtp".into();
        c.mail.smtp_host = "127.0.0.1".into();
        c.mail.smtp_port = Some(port);
        c.mail.smtp_security = "none".into();
        c.mail.sign_in_url = "https://learn.example.com".into();
    });
    let t = tenant(&env);
    let file = env.path("new-staff.xlsx");
    write_add_file(&file, 0..3);
    let r = service::import(
        &mut env.app,
        &t,
        Operation::Add,
        &file,
        "new-staff.xlsx",
        ImportOptions {
            getting_started: true,
            ..ImportOptions::new(true)
        },
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(r.applied);
    let msgs = sink.wait_for(3);
    assert_eq!(
        msgs.len(),
        3,
        "no submitter address: only the users are written to"
    );
    let mut to: Vec<String> = msgs
        .iter()
        .map(|m| m["rcpt_tos"][0].as_str().unwrap().to_string())
        .collect();
    to.sort();
    assert_eq!(
        to,
        vec!["u0@example.com", "u1@example.com", "u2@example.com"]
    );
    let m = &msgs[0];
    assert_eq!(m["subject"], "Your account at Acme is ready");
    let body = text_part(m, "text/plain");
    assert!(body.starts_with("Hello A,"), "{body}");
    assert!(body.contains("Your sign-in name: u0@example.com"), "{body}");
    assert!(
        body.contains("Sign in at https://learn.example.com"),
        "{body}"
    );
    let counts: Vec<(i64, bool)> = env
        .app
        .conn
        .prepare("SELECT welcome_count, welcome_sent_at IS NOT NULL FROM users ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(counts, vec![(1, true); 3]);
    // Later, for a selection (the command line), and only for active users.
    let o = Command::new(BIN)
        .arg("--data-dir")
        .arg(env.app.data.root())
        .args([
            "users",
            "welcome",
            "--tenant",
            "Acme",
            "--user",
            "U1@example.com",
            "--user",
            "nobody@example.com",
        ])
        .env("ROLLCALL_MAIL_TRANSPORT", "smtp")
        .env("ROLLCALL_MAIL_SMTP_HOST", "127.0.0.1")
        .env("ROLLCALL_MAIL_SMTP_PORT", port.to_string())
        .env("ROLLCALL_MAIL_SMTP_SECURITY", "none")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(
            "Queued 1 Getting Started messages; 1 of the users given are not active users of Acme."
        ),
        "{}",
        text(&o)
    );
    let msgs = sink.wait_for(4);
    assert_eq!(msgs.len(), 4);
    assert_eq!(msgs[3]["rcpt_tos"], serde_json::json!(["u1@example.com"]));
    let c: i64 = env
        .app
        .conn
        .query_row(
            "SELECT welcome_count FROM users WHERE email_norm = 'u1@example.com'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(c, 2);
    assert_eq!(
        audit_text(&env)
            .matches("\"event\":\"getting_started\"")
            .count(),
        8,
        "4 queued and 4 sent entries"
    );
}

#[test]
fn approvers_are_asked_and_the_submitter_hears_of_the_approval() {
    let port = free_port();
    let sink = Sink::start(port, &tempfile::tempdir().unwrap().keep(), None);
    let mut env = smtp_env(port);
    let t = tenant(&env);
    let file = env.path("new-staff.xlsx");
    write_add_file(&file, 0..2);
    assert!(import(&mut env, &t, &file, "ada@example.com").applied);
    let mut s = db::tenant_settings(&env.app.conn, t.id).unwrap();
    s.require_approval = true;
    s.approvers = vec!["boss@example.com".into(), "deputy@example.com".into()];
    db::set_tenant_settings(&env.app.conn, t.id, &s).unwrap();
    let deact = env.path("leavers.csv");
    std::fs::write(&deact, "Email,Reason\nu0@example.com,left\n").unwrap();
    env.app.actor = "console:alice".into();
    let stored = service::store_upload(&env.app.data, &deact, "leavers.csv").unwrap();
    let (_, job) = rollcall::scheduler::submit(
        &env.app,
        &t,
        Operation::Deactivate,
        &stored,
        "leavers.csv",
        &rollcall::scheduler::JobOptions {
            notify: Some("alice@example.com".into()),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    rollcall::scheduler::send_mail(&env.app);
    env.app.actor = "console:bob".into();
    rollcall::scheduler::approve(&env.app, job).unwrap();
    rollcall::scheduler::send_mail(&env.app);
    // The import's two messages, two approvers, one approval.
    let msgs = sink.wait_for(5);
    assert_eq!(msgs.len(), 5, "{msgs:?}");
    let asked: Vec<&Value> = msgs
        .iter()
        .filter(|m| {
            m["subject"]
                .as_str()
                .unwrap()
                .contains("waits for your approval")
        })
        .collect();
    assert_eq!(asked.len(), 2, "{msgs:?}");
    assert_eq!(
        asked[0]["rcpt_tos"],
        serde_json::json!(["boss@example.com"])
    );
    assert_eq!(
        asked[1]["rcpt_tos"],
        serde_json::json!(["deputy@example.com"])
    );
    assert_eq!(
        asked[0]["subject"],
        format!("Acme: job {job} waits for your approval (deactivate users)")
    );
    assert!(text_part(asked[0], "text/plain").contains(&format!("rollcall jobs approve {job}")));
    let granted = msgs
        .iter()
        .find(|m| m["subject"].as_str().unwrap().contains("was approved"))
        .expect("the submitter hears of the approval");
    assert_eq!(
        granted["rcpt_tos"],
        serde_json::json!(["alice@example.com"])
    );
    assert_eq!(
        granted["subject"],
        format!("Acme: job {job} was approved by console:bob")
    );
}

#[test]
fn implicit_tls_with_sign_in_and_a_clear_message_for_a_wrong_password() {
    let certs = make_certs();
    let port = free_port();
    let sink = Sink::start_with(
        port,
        &tempfile::tempdir().unwrap().keep(),
        &[
            "--tls".into(),
            certs.path().to_string_lossy().into_owned(),
            "--auth".into(),
            "rollcall:s3cret".into(),
        ],
    );
    let ca = certs.path().join("ca.pem");
    let env_with = |password: &str| {
        let password = password.to_string();
        let ca = ca.clone();
        Env::with(move |c| {
            c.mail.transport = "smtp".into();
            c.mail.smtp_host = "localhost".into();
            c.mail.smtp_port = Some(port);
            c.mail.smtp_security = "tls".into();
            c.mail.smtp_username = "rollcall".into();
            c.mail.smtp_password = password;
            c.mail.smtp_ca_file = Some(ca);
            c.mail.smtp_timeout_seconds = 5;
        })
    };
    let bad = env_with("wrong");
    let e = rollcall::mail::send_test(
        &bad.app.data,
        &bad.app.config.mail,
        "ops@example.com",
        "test",
    )
    .unwrap_err();
    assert!(e.contains("refused the user name or password"), "{e}");
    let good = env_with("s3cret");
    let ok = rollcall::mail::send_test(
        &good.app.data,
        &good.app.config.mail,
        "ops@example.com",
        "test",
    )
    .unwrap();
    assert!(ok.contains("(TLS) accepted"), "{ok}");
    let m = sink.wait_for(1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["tls"], true);
}

#[test]
fn a_tenant_can_replace_a_template_and_a_broken_one_falls_back() {
    let mut env = Env::new();
    let t = tenant(&env);
    let dir = env.app.data.rules_dir().join("acme").join("emails");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("job_started.subject"),
        "[Acme HR] Job {{ job_id }} is running",
    )
    .unwrap();
    std::fs::write(
        dir.join("job_started.txt"),
        "Dear colleague, job {{ job_id }} runs.",
    )
    .unwrap();
    std::fs::write(dir.join("job_started.html"), "{% if %}broken").unwrap();
    let file = env.path("new-staff.xlsx");
    write_add_file(&file, 0..1);
    let r = import(&mut env, &t, &file, "ada@example.com");
    let eml = env.app.data.outbox_dir().join("000001-job_started.eml");
    let o = Command::new(python())
        .arg(SINK)
        .arg("--parse")
        .arg(&eml)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let m: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        m["subject"],
        format!("[Acme HR] Job {} is running", r.job_id)
    );
    assert_eq!(
        text_part(&m, "text/plain"),
        format!("Dear colleague, job {} runs.", r.job_id)
    );
    // The broken HTML override is replaced by the built-in one.
    assert!(text_part(&m, "text/html").contains("You will get another message"));
}

#[test]
fn a_refused_recipient_is_said_as_such_and_fails_at_once() {
    let port = free_port();
    let _sink = Sink::start(port, &tempfile::tempdir().unwrap().keep(), None);
    let mut env = smtp_env(port);
    let e = rollcall::mail::send_test(
        &env.app.data,
        &env.app.config.mail,
        "nobody@example.com",
        "test",
    )
    .unwrap_err();
    assert!(e.contains("rejected the recipient or sender"), "{e}");
    assert!(e.contains("No such mailbox here"), "{e}");
    // Queued, it is failed at the first try (a permanent refusal), not retried.
    let t = tenant(&env);
    let file = env.path("new-staff.xlsx");
    write_add_file(&file, 0..1);
    import(&mut env, &t, &file, "nobody@example.com");
    let failed = rollcall::mail::list(&env.app.conn, Some("failed"), 10).unwrap();
    assert_eq!(failed.len(), 2);
    assert!(failed.iter().all(|m| m.attempts == 1));
}

#[test]
fn a_workbook_above_the_attachment_limit_is_named_not_attached() {
    let mut env = Env::with(|c| {
        c.mail.attach_max_mib = 0;
        c.mail.web_url = "https://rollcall.example.com/".into();
    });
    let t = tenant(&env);
    let file = env.path("new-staff.xlsx");
    write_add_file(&file, 0..2);
    let r = import(&mut env, &t, &file, "ada@example.com");
    let eml = env.app.data.outbox_dir().join("000002-job_finished.eml");
    let o = Command::new(python())
        .arg(SINK)
        .arg("--parse")
        .arg(&eml)
        .output()
        .unwrap();
    let m: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(attachment(&m).is_none());
    let body = text_part(&m, "text/plain");
    assert!(
        body.contains(&format!(
            "The results workbook \"job-{0}-results.xlsx\" is too large to attach (",
            r.job_id
        )),
        "{body}"
    );
    // A link to the job's page in the web UI (which names the tenant).
    assert!(
        body.contains(&format!(
            "download it from rollcall: https://rollcall.example.com/#/t/{}/jobs/{}.",
            t.name, r.job_id
        )),
        "{body}"
    );
    let html = text_part(&m, "text/html");
    // (The HTML escapes the slashes of the address; browsers read it the same.)
    assert!(
        html.contains("<a href=\"https:&#x2f;&#x2f;rollcall.example.com/#/t/")
            && html.contains(&format!(
                "/#/t/{}/jobs/{}\">download it from rollcall</a>",
                t.name, r.job_id
            )),
        "{html}"
    );
}

#[test]
fn sent_messages_and_eml_files_are_purged_after_the_retention_period() {
    let mut env = Env::with(|c| c.jobs.file_retention_days = 0);
    let t = tenant(&env);
    let file = env.path("new-staff.xlsx");
    write_add_file(&file, 0..1);
    import(&mut env, &t, &file, "ada@example.com");
    let outbox = env.app.data.outbox_dir();
    assert_eq!(std::fs::read_dir(&outbox).unwrap().count(), 2);
    // A message still waiting is kept whatever its age.
    env.app
        .conn
        .execute("UPDATE mail_outbox SET state = 'queued' WHERE id = 2", [])
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let r = rollcall::tasks::run(&env.app, "purge_files").unwrap();
    assert!(r.contains("1 sent or failed messages removed"), "{r}");
    assert_eq!(std::fs::read_dir(&outbox).unwrap().count(), 0);
    let left: Vec<String> = env
        .app
        .conn
        .prepare("SELECT state FROM mail_outbox")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(left, vec!["queued"]);
}
