//! Email: notifications queued in the database with the event that causes them, rendered
//! from templates (built in, overridable per tenant in `rules/<folder>/emails/`), and sent by
//! the job worker through the configured transport: the outbox folder (.eml files, the
//! default, for air-gapped sites) or SMTP (lettre with rustls).
//!
//! Delivery: a message is marked `sending` (committed) before the transport is called and
//! `sent` after; one found `sending` when the worker starts was interrupted and is marked
//! failed ("may have been delivered"), never sent twice. A transport error is retried
//! with back-off (30 s doubling to 1 h) up to `max_attempts`; a permanent refusal (5xx)
//! fails at once. Failed messages are listed by `rollcall mail list` and can be retried.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::{Message, SmtpTransport, Transport as _};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use crate::audit::{self, Event};
use crate::config::{DataDir, MailConfig};
use crate::db;
use crate::error::{AppError, AppResult};

/// A message to queue.
pub struct Outgoing<'a> {
    pub event: &'static str,
    /// The tenant's name (its templates may override the built-in ones).
    pub tenant: Option<&'a str>,
    pub to: &'a str,
    /// Template name: `<name>.subject`, `<name>.txt`, `<name>.html`.
    pub template: &'static str,
    pub context: Value,
    /// A workbook to attach (it may be written after the event; checked at send time).
    pub attachment: Option<(PathBuf, String)>,
}

const BUILT_IN: &[(&str, &str)] = &[
    (
        "upload_rejected.subject",
        include_str!("templates/upload_rejected.subject"),
    ),
    (
        "upload_rejected.txt",
        include_str!("templates/upload_rejected.txt"),
    ),
    (
        "upload_rejected.html",
        include_str!("templates/upload_rejected.html"),
    ),
    (
        "job_started.subject",
        include_str!("templates/job_started.subject"),
    ),
    ("job_started.txt", include_str!("templates/job_started.txt")),
    (
        "job_started.html",
        include_str!("templates/job_started.html"),
    ),
    (
        "job_finished.subject",
        include_str!("templates/job_finished.subject"),
    ),
    (
        "job_finished.txt",
        include_str!("templates/job_finished.txt"),
    ),
    (
        "job_finished.html",
        include_str!("templates/job_finished.html"),
    ),
    (
        "getting_started.subject",
        include_str!("templates/getting_started.subject"),
    ),
    (
        "getting_started.txt",
        include_str!("templates/getting_started.txt"),
    ),
    (
        "getting_started.html",
        include_str!("templates/getting_started.html"),
    ),
    (
        "approval_requested.subject",
        include_str!("templates/approval_requested.subject"),
    ),
    (
        "approval_requested.txt",
        include_str!("templates/approval_requested.txt"),
    ),
    (
        "approval_requested.html",
        include_str!("templates/approval_requested.html"),
    ),
    (
        "approval_granted.subject",
        include_str!("templates/approval_granted.subject"),
    ),
    (
        "approval_granted.txt",
        include_str!("templates/approval_granted.txt"),
    ),
    (
        "approval_granted.html",
        include_str!("templates/approval_granted.html"),
    ),
    ("test.subject", include_str!("templates/test.subject")),
    ("test.txt", include_str!("templates/test.txt")),
    ("test.html", include_str!("templates/test.html")),
];

/// An address as a mailbox; refuses anything with a line break (header injection) or
/// that is not one plain address.
pub fn mailbox(addr: &str) -> Result<Mailbox, String> {
    if addr.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{:?} has a line break or control character; an email address cannot",
            addr.chars().take(80).collect::<String>()
        ));
    }
    Mailbox::from_str(addr.trim()).map_err(|e| format!("{addr:?} is not an email address: {e}"))
}

/// One line of header text: control characters (CR, LF, ...) become spaces, runs of
/// spaces one, and it is cut at 200 characters.
pub fn header_text(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.chars().count() > 200 {
        out = out.chars().take(199).collect::<String>() + "…";
    }
    out
}

/// The text of template `name.ext` for a tenant: its override if it has one and it
/// renders, else the built-in one.
fn render(data: &DataDir, tenant: Option<&str>, file: &str, ctx: &Value) -> AppResult<String> {
    let built_in = BUILT_IN
        .iter()
        .find(|(n, _)| *n == file)
        .map(|(_, t)| *t)
        .ok_or_else(|| AppError::internal("rendering an email", format!("no template {file}")))?;
    if let Some(t) = tenant {
        let path = data
            .rules_dir()
            .join(crate::rules::folder_name(t))
            .join("emails")
            .join(file);
        if let Ok(source) = std::fs::read_to_string(&path)
            && let Ok(text) = render_source(file, &source, ctx)
        {
            return Ok(text);
        }
    }
    render_source(file, built_in, ctx).map_err(|e| AppError::internal("rendering an email", e))
}

fn render_source(name: &str, source: &str, ctx: &Value) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    // A tenant's template runs in the job worker: a bounded amount of work, whatever it says.
    env.set_fuel(Some(200_000));
    // HTML templates escape what they insert (names, file names, problems).
    env.set_auto_escape_callback(|n| {
        if n.ends_with(".html") {
            minijinja::AutoEscape::Html
        } else {
            minijinja::AutoEscape::None
        }
    });
    env.add_template_owned(name.to_string(), source.to_string())
        .map_err(|e| e.to_string())?;
    env.get_template(name)
        .and_then(|t| t.render(minijinja::value::Serde(ctx)))
        .map_err(|e| e.to_string())
}

fn support_contact(cfg: &MailConfig) -> Value {
    if cfg.support_contact.is_empty() {
        Value::Null
    } else {
        Value::String(cfg.support_contact.clone())
    }
}

/// Queues a message in the caller's transaction and audits it (recipient, subject, event).
/// A recipient that is not an address is not queued: the refusal is audited instead.
pub fn queue(
    conn: &Connection,
    data: &DataDir,
    cfg: &MailConfig,
    actor: &str,
    m: &Outgoing<'_>,
) -> AppResult<Option<i64>> {
    let mut ctx = m.context.clone();
    if let Value::Object(o) = &mut ctx {
        o.entry("tenant")
            .or_insert_with(|| Value::String(m.tenant.unwrap_or("").to_string()));
        o.insert("support_contact".into(), support_contact(cfg));
    }
    if let Err(why) = mailbox(m.to) {
        audit::record(
            conn,
            &Event {
                actor: actor.to_string(),
                tenant: m.tenant.map(str::to_string),
                action: "mail.refused",
                target: header_text(m.to),
                details: serde_json::json!({"event": m.event, "reason": why}),
            },
        )?;
        return Ok(None);
    }
    let subject = header_text(&render(
        data,
        m.tenant,
        &format!("{}.subject", m.template),
        &ctx,
    )?);
    let now = db::now();
    let message_id = format!(
        "<{}.{}@rollcall>",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos(),
        std::process::id()
    );
    conn.execute(
        "INSERT INTO mail_outbox (tenant, event, recipient, subject, template, context, attachment_path, attachment_name, next_attempt_at, message_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?9)",
        params![
            m.tenant,
            m.event,
            m.to.trim(),
            subject,
            m.template,
            ctx.to_string(),
            m.attachment.as_ref().map(|a| a.0.to_string_lossy().into_owned()),
            m.attachment.as_ref().map(|a| a.1.clone()),
            now,
            message_id,
        ],
    )?;
    let id = conn.last_insert_rowid();
    audit::record(
        conn,
        &Event {
            actor: actor.to_string(),
            tenant: m.tenant.map(str::to_string),
            action: "mail.queued",
            target: m.to.trim().to_string(),
            details: serde_json::json!({"mail": id, "event": m.event, "subject": subject}),
        },
    )?;
    Ok(Some(id))
}

/// Which users get a Getting Started message.
pub enum Welcome<'a> {
    /// The users an add job created.
    AddedBy(i64),
    /// These users (emails, any case).
    Users(&'a [String]),
    /// Every active user who never got one.
    NotYetWelcomed,
}

/// Queues a Getting Started message for each selected active user of a tenant, in the
/// caller's transaction, each audited; returns how many. One statement for the messages
/// and one for their audit entries, so an add job of a million users stays one pass.
pub fn queue_welcomes(
    conn: &Connection,
    data: &DataDir,
    cfg: &MailConfig,
    actor: &str,
    tenant: &db::Tenant,
    which: Welcome<'_>,
) -> AppResult<u64> {
    let ctx = serde_json::json!({"tenant": tenant.name, "support_contact": support_contact(cfg)});
    let subject = header_text(&render(
        data,
        Some(&tenant.name),
        "getting_started.subject",
        &ctx,
    )?);
    let (filter, arg) = match which {
        Welcome::AddedBy(job) => (
            "u.id IN (SELECT user_id FROM job_changes WHERE job_id = ?6 AND action = 'create')",
            Value::from(job),
        ),
        Welcome::Users(emails) => (
            "u.email_norm IN (SELECT value FROM json_each(?6))",
            Value::String(
                serde_json::to_string(
                    &emails
                        .iter()
                        .map(|e| e.trim().to_lowercase())
                        .collect::<Vec<_>>(),
                )
                .unwrap_or_default(),
            ),
        ),
        // Not those whose first one still waits in the queue.
        Welcome::NotYetWelcomed => (
            "u.welcome_count = 0 AND ?6 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM mail_outbox m
                 WHERE m.event = 'getting_started' AND m.state IN ('queued', 'sending')
                   AND m.tenant = ?1 AND m.recipient = u.email)",
            Value::from(1),
        ),
    };
    let before: i64 = conn.query_row("SELECT coalesce(max(id), 0) FROM mail_outbox", [], |r| {
        r.get(0)
    })?;
    let now = db::now();
    let arg_sql: Box<dyn rusqlite::ToSql> = match arg {
        Value::Number(n) => Box::new(n.as_i64().unwrap_or_default()),
        Value::String(s) => Box::new(s),
        _ => Box::new(rusqlite::types::Null),
    };
    let n = conn.execute(
        &format!(
            "INSERT INTO mail_outbox (tenant, event, recipient, subject, template, context, next_attempt_at, message_id, created_at)
             SELECT ?1, 'getting_started', u.email, ?2, 'getting_started',
                    json_object('tenant', ?1, 'email', u.email, 'first_name', u.first_name,
                                'last_name', u.last_name, 'role', u.role),
                    ?3, '<gs.' || u.id || '.' || lower(hex(randomblob(8))) || '@rollcall>', ?3
             FROM users u WHERE u.tenant_id = ?4 AND u.status = 'active' AND ?5 = ?5 AND {filter}
             ORDER BY u.id"
        ),
        params![tenant.name, subject, now, tenant.id, 0, arg_sql],
    )?;
    conn.execute(
        "INSERT INTO audit_outbox (kind, time, actor, tenant, action, target, details)
         SELECT 'entry', ?1, ?2, tenant, 'mail.queued', recipient,
                json_object('mail', id, 'event', event, 'subject', subject)
         FROM mail_outbox WHERE id > ?3 AND event = 'getting_started' ORDER BY id",
        params![now, actor, before],
    )?;
    Ok(n as u64)
}

/// Where messages go.
pub enum Transport {
    Outbox(PathBuf),
    Smtp(Box<SmtpTransport>, String),
}

impl Transport {
    pub fn describe(&self) -> String {
        match self {
            Transport::Outbox(p) => format!("the outbox folder {}", p.display()),
            Transport::Smtp(_, d) => d.clone(),
        }
    }
}

/// The transport the configuration names.
pub fn transport(cfg: &MailConfig, data: &DataDir) -> Result<Transport, String> {
    match cfg.transport.trim().to_ascii_lowercase().as_str() {
        "outbox" | "" => Ok(Transport::Outbox(data.outbox_dir())),
        "smtp" => {
            let host = cfg.smtp_host.trim();
            if host.is_empty() {
                return Err("mail.transport is smtp but mail.smtp_host is not set".into());
            }
            let security = cfg.smtp_security.trim().to_ascii_lowercase();
            let (port, tls) = match security.as_str() {
                "starttls" | "" => (cfg.smtp_port.unwrap_or(587), Some(false)),
                "tls" => (cfg.smtp_port.unwrap_or(465), Some(true)),
                "none" => (cfg.smtp_port.unwrap_or(25), None),
                other => {
                    return Err(format!(
                        "mail.smtp_security is {other:?}; use starttls, tls or none"
                    ));
                }
            };
            let mut b = SmtpTransport::builder_dangerous(host)
                .port(port)
                .timeout(Some(Duration::from_secs(cfg.smtp_timeout_seconds.max(1))));
            if let Some(wrapper) = tls {
                let mut params =
                    lettre::transport::smtp::client::TlsParameters::builder(host.to_string());
                if let Some(ca) = &cfg.smtp_ca_file {
                    let pem = std::fs::read(ca).map_err(|e| {
                        format!("mail.smtp_ca_file {} cannot be read: {e}", ca.display())
                    })?;
                    let cert = lettre::transport::smtp::client::Certificate::from_pem(&pem)
                        .map_err(|e| {
                            format!(
                                "mail.smtp_ca_file {} is not a PEM certificate: {e}",
                                ca.display()
                            )
                        })?;
                    params = params.add_root_certificate(cert);
                }
                let params = params
                    .build_rustls()
                    .map_err(|e| format!("TLS settings for {host}: {e}"))?;
                b = b.tls(if wrapper {
                    lettre::transport::smtp::client::Tls::Wrapper(params)
                } else {
                    lettre::transport::smtp::client::Tls::Required(params)
                });
            }
            if !cfg.smtp_username.is_empty() {
                b = b.credentials(lettre::transport::smtp::authentication::Credentials::new(
                    cfg.smtp_username.clone(),
                    cfg.smtp_password.clone(),
                ));
            }
            let what = format!(
                "SMTP {host}:{port} ({})",
                match tls {
                    Some(true) => "TLS",
                    Some(false) => "STARTTLS",
                    None => "no TLS",
                }
            );
            Ok(Transport::Smtp(Box::new(b.build()), what))
        }
        other => Err(format!("mail.transport is {other:?}; use outbox or smtp")),
    }
}

/// Why a send failed, and whether trying again later may help.
#[derive(Debug)]
pub struct SendError {
    pub message: String,
    pub permanent: bool,
}

/// Says what failed in words an operator can act on (DNS, connect, TLS, sign-in, refusal).
fn describe_smtp(e: &lettre::transport::smtp::Error, what: &str) -> SendError {
    let mut chain = Vec::new();
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        chain.push(s.to_string());
        src = s.source();
    }
    let all = chain.join(": ");
    let lower = all.to_lowercase();
    let code = e.status().map(|c| c.to_string());
    let message = if lower.contains("failed to lookup address")
        || lower.contains("name or service not known")
        || lower.contains("no address")
    {
        format!("the server's name could not be resolved (DNS) for {what}: {all}")
    } else if lower.contains("connection refused") {
        format!("nothing accepts connections at {what} (connection refused)")
    } else if e.is_timeout() || lower.contains("timed out") {
        // It may have stopped answering after taking the message: not retried by itself.
        return SendError {
            message: format!(
                "{what} did not answer in time ({all}); the message may or may not have been delivered (retry it with rollcall mail retry to send it again)"
            ),
            permanent: true,
        };
    } else if e.is_tls() || lower.contains("certificate") || lower.contains("tls") {
        format!("the TLS connection to {what} failed: {all}")
    } else if matches!(
        code.as_deref(),
        Some("535") | Some("534") | Some("530") | Some("538")
    ) {
        format!("{what} refused the user name or password: {all}")
    } else if matches!(
        code.as_deref(),
        Some("550") | Some("551") | Some("553") | Some("501")
    ) {
        format!("{what} rejected the recipient or sender: {all}")
    } else {
        format!("{what}: {all}")
    };
    SendError {
        message,
        permanent: e.is_permanent(),
    }
}

/// Sends one built message.
pub fn deliver(t: &Transport, msg: &Message, file_stem: &str) -> Result<(), SendError> {
    match t {
        Transport::Outbox(dir) => {
            let fail = |e: std::io::Error| SendError {
                message: format!("the outbox folder {} cannot be written: {e}", dir.display()),
                permanent: false,
            };
            std::fs::create_dir_all(dir).map_err(fail)?;
            let tmp = dir.join(format!(".{file_stem}.eml.tmp"));
            std::fs::write(&tmp, msg.formatted()).map_err(fail)?;
            std::fs::rename(&tmp, dir.join(format!("{file_stem}.eml"))).map_err(fail)?;
            Ok(())
        }
        Transport::Smtp(smtp, what) => smtp
            .send(msg)
            .map(|_| ())
            .map_err(|e| describe_smtp(&e, what)),
    }
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / 1048576.0)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// Builds a message with a text and an HTML part, and the attachment when it exists and is
/// small enough (the bodies say which).
#[allow(clippy::too_many_arguments)]
fn build(
    data: &DataDir,
    cfg: &MailConfig,
    tenant: Option<&str>,
    to: &str,
    subject: &str,
    template: &str,
    mut ctx: Value,
    attachment: Option<(&Path, &str)>,
    message_id: &str,
) -> Result<Message, String> {
    let from = mailbox(&cfg.from).map_err(|e| format!("mail.from: {e}"))?;
    let to = mailbox(to)?;
    let mut file = None;
    let mut info = serde_json::json!({"name": null, "attached": false, "size": null});
    if let Some((path, name)) = attachment {
        info["name"] = Value::String(name.to_string());
        if let Ok(meta) = std::fs::metadata(path) {
            let limit = cfg.attach_max_mib.saturating_mul(1024 * 1024);
            if meta.len() <= limit {
                if let Ok(bytes) = std::fs::read(path) {
                    info["attached"] = Value::Bool(true);
                    file = Some(bytes);
                }
            } else {
                info["size"] = Value::String(human_size(meta.len()));
            }
        }
    }
    if let Value::Object(o) = &mut ctx {
        o.insert("attachment".into(), info);
        // As configured now (a corrected contact reaches messages still queued).
        o.insert("support_contact".into(), support_contact(cfg));
        o.insert("sign_in_url".into(), Value::String(cfg.sign_in_url.clone()));
        o.insert(
            "web_url".into(),
            Value::String(cfg.web_url.trim().trim_end_matches('/').to_string()),
        );
    }
    let text = render(data, tenant, &format!("{template}.txt"), &ctx).map_err(|e| e.to_string())?;
    let html =
        render(data, tenant, &format!("{template}.html"), &ctx).map_err(|e| e.to_string())?;
    let body = MultiPart::alternative()
        .singlepart(SinglePart::plain(text))
        .singlepart(SinglePart::html(html));
    let builder = Message::builder()
        .from(from)
        .to(to)
        .subject(header_text(subject))
        .message_id(Some(message_id.to_string()));
    let msg = match (file, attachment) {
        (Some(bytes), Some((_, name))) => {
            let ct = ContentType::parse(
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            )
            .map_err(|e| e.to_string())?;
            builder.multipart(
                MultiPart::mixed()
                    .multipart(body)
                    .singlepart(Attachment::new(header_text(name)).body(bytes, ct)),
            )
        }
        _ => builder.multipart(body),
    };
    msg.map_err(|e| e.to_string())
}

/// What one `send_due` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SendSummary {
    pub sent: u64,
    pub retrying: u64,
    pub failed: u64,
}

fn backoff(attempts: i64) -> Duration {
    let secs = 30u64.saturating_mul(1u64 << attempts.clamp(0, 7));
    Duration::from_secs(secs.min(3600))
}

fn later(d: Duration) -> String {
    let t = time::OffsetDateTime::now_utc() + d;
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| db::now())
}

/// Messages left `sending` by a worker that stopped mid-send: marked failed, not resent.
fn recover(conn: &Connection) -> AppResult<u64> {
    Ok(conn.execute(
        "UPDATE mail_outbox SET state = 'failed', last_error = 'interrupted while being sent: it may or may not have been delivered (retry it with rollcall mail retry to send it again)' WHERE state = 'sending'",
        [],
    )? as u64)
}

/// Sends the messages that are due. Only the job worker (the holder of the scheduler lock)
/// calls this, so no message is taken twice.
pub fn send_due(conn: &Connection, data: &DataDir, cfg: &MailConfig) -> AppResult<SendSummary> {
    recover(conn)?;
    let mut summary = SendSummary::default();
    let now = db::now();
    type Row = (
        i64,
        Option<String>,
        String,
        String,
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        i64,
        String,
    );
    let due: Vec<Row> = {
        let mut st = conn.prepare(
            "SELECT id, tenant, event, recipient, subject, template, context, attachment_path, attachment_name, attempts, message_id
             FROM mail_outbox WHERE state = 'queued' AND next_attempt_at <= ?1 ORDER BY id LIMIT 100",
        )?;
        st.query_map([&now], |r| {
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
                r.get(9)?,
                r.get(10)?,
            ))
        })?
        .collect::<Result<_, _>>()?
    };
    if due.is_empty() {
        return Ok(summary);
    }
    let transport = transport(cfg, data);
    for (id, tenant, event, to, subject, template, context, apath, aname, attempts, mid) in due {
        conn.execute(
            "UPDATE mail_outbox SET state = 'sending', attempts = attempts + 1 WHERE id = ?1",
            [id],
        )?;
        let ctx: Value = serde_json::from_str(&context).unwrap_or(Value::Null);
        let attachment = apath.as_deref().map(Path::new).zip(aname.as_deref());
        let result = match &transport {
            Err(e) => Err(SendError {
                message: e.clone(),
                permanent: false,
            }),
            Ok(t) => build(
                data,
                cfg,
                tenant.as_deref(),
                &to,
                &subject,
                &template,
                ctx,
                attachment,
                &mid,
            )
            // A message that cannot be built now (a setting such as mail.from, a
            // template) may be buildable after a fix: retried like a transport error.
            .map_err(|m| SendError {
                message: m,
                permanent: false,
            })
            .and_then(|msg| deliver(t, &msg, &format!("{id:06}-{event}"))),
        };
        let tx = conn.unchecked_transaction()?;
        let ev = |action: &'static str, details: Value| Event {
            actor: "system:mail".into(),
            tenant: tenant.clone(),
            action,
            target: to.clone(),
            details,
        };
        match result {
            Ok(()) => {
                let now = db::now();
                tx.execute(
                    "UPDATE mail_outbox SET state = 'sent', sent_at = ?2, last_error = NULL WHERE id = ?1",
                    params![id, now],
                )?;
                if event == "getting_started" {
                    tx.execute(
                        "UPDATE users SET welcome_sent_at = ?1, welcome_count = welcome_count + 1
                         WHERE email_norm = ?2 AND tenant_id = (SELECT id FROM tenants WHERE name = ?3)",
                        params![now, db::norm(&to), tenant],
                    )?;
                }
                audit::record(
                    &tx,
                    &ev(
                        "mail.sent",
                        serde_json::json!({"mail": id, "event": event, "subject": subject}),
                    ),
                )?;
                summary.sent += 1;
            }
            Err(e) if e.permanent || attempts + 1 >= i64::from(cfg.max_attempts.max(1)) => {
                tx.execute(
                    "UPDATE mail_outbox SET state = 'failed', last_error = ?2 WHERE id = ?1",
                    params![id, e.message],
                )?;
                audit::record(
                    &tx,
                    &ev(
                        "mail.failed",
                        serde_json::json!({"mail": id, "event": event, "subject": subject, "reason": e.message}),
                    ),
                )?;
                summary.failed += 1;
            }
            Err(e) => {
                tx.execute(
                    "UPDATE mail_outbox SET state = 'queued', last_error = ?2, next_attempt_at = ?3 WHERE id = ?1",
                    params![id, e.message, later(backoff(attempts))],
                )?;
                summary.retrying += 1;
            }
        }
        tx.commit()?;
    }
    Ok(summary)
}

/// How long until the next queued message is due (at most `cap`).
pub fn next_due(conn: &Connection, cap: Duration) -> Duration {
    let next: Option<String> = conn
        .query_row(
            "SELECT min(next_attempt_at) FROM mail_outbox WHERE state = 'queued'",
            [],
            |r| r.get(0),
        )
        .ok()
        .flatten();
    next.map_or(cap, |t| db::duration_until(&t, cap))
}

/// A failed message queued again (its attempts start over); false when there is none.
pub fn retry(conn: &Connection, id: i64, actor: &str) -> AppResult<bool> {
    let tx = conn.unchecked_transaction()?;
    let row: Option<(Option<String>, String)> = tx
        .query_row(
            "SELECT tenant, recipient FROM mail_outbox WHERE id = ?1 AND state = 'failed'",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((tenant, to)) = row else {
        return Ok(false);
    };
    tx.execute(
        "UPDATE mail_outbox SET state = 'queued', attempts = 0, next_attempt_at = ?2 WHERE id = ?1",
        params![id, db::now()],
    )?;
    audit::record(
        &tx,
        &Event {
            actor: actor.to_string(),
            tenant,
            action: "mail.retry",
            target: to,
            details: serde_json::json!({"mail": id}),
        },
    )?;
    tx.commit()?;
    Ok(true)
}

/// One row of `mail list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MailInfo {
    pub id: i64,
    pub tenant: Option<String>,
    pub event: String,
    pub recipient: String,
    pub subject: String,
    pub state: String,
    pub attempts: i64,
    pub created_at: String,
    pub sent_at: Option<String>,
    pub next_attempt_at: String,
    pub last_error: Option<String>,
}

pub fn list(conn: &Connection, state: Option<&str>, limit: i64) -> AppResult<Vec<MailInfo>> {
    let mut st = conn.prepare(
        "SELECT id, tenant, event, recipient, subject, state, attempts, created_at, sent_at, next_attempt_at, last_error
         FROM mail_outbox WHERE (?1 IS NULL OR state = ?1) ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = st
        .query_map(params![state, limit], |r| {
            Ok(MailInfo {
                id: r.get(0)?,
                tenant: r.get(1)?,
                event: r.get(2)?,
                recipient: r.get(3)?,
                subject: r.get(4)?,
                state: r.get(5)?,
                attempts: r.get(6)?,
                created_at: r.get(7)?,
                sent_at: r.get(8)?,
                next_attempt_at: r.get(9)?,
                last_error: r.get(10)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Sends a test message at once (not through the queue); says what was used, or exactly
/// what failed.
pub fn send_test(
    data: &DataDir,
    cfg: &MailConfig,
    to: &str,
    sent_by: &str,
) -> Result<String, String> {
    let t = transport(cfg, data)?;
    let ctx = serde_json::json!({
        "sent_by": sent_by,
        "now": db::now(),
        "transport": t.describe(),
    });
    let subject = render(data, None, "test.subject", &ctx).map_err(|e| e.to_string())?;
    let mid = format!(
        "<test.{}.{}@rollcall>",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos(),
        std::process::id()
    );
    let msg = build(data, cfg, None, to, &subject, "test", ctx, None, &mid)?;
    let stem = format!(
        "test-{}",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    deliver(&t, &msg, &stem).map_err(|e| e.message)?;
    Ok(match &t {
        Transport::Outbox(dir) => format!(
            "The test message to {to} was written to {} (mail.transport is outbox).",
            dir.join(format!("{stem}.eml")).display()
        ),
        Transport::Smtp(_, what) => format!("{what} accepted the test message to {to}."),
    })
}

/// The first `n` problems of an outcome as lines for a message, and how many more there are.
pub fn problem_lines(outcome: &crate::bulk::Outcome, n: usize) -> (Vec<String>, u64) {
    let lines: Vec<String> = outcome
        .problems
        .iter()
        .take(n)
        .map(|p| {
            let mut s = String::new();
            if let Some(r) = p.row {
                s.push_str(&format!("Row {r}"));
            }
            if let Some(c) = &p.column_name {
                s.push_str(&format!("{}{c}", if s.is_empty() { "" } else { ", " }));
            }
            if !s.is_empty() {
                s.push_str(": ");
            }
            if p.severity == crate::model::Severity::Warning {
                s.push_str("(warning) ");
            }
            s.push_str(&header_text(&p.message));
            s
        })
        .collect();
    let total = outcome.errors + outcome.warnings;
    (lines.clone(), total.saturating_sub(lines.len() as u64))
}

/// What a succeeded job changed, one line per kind of change.
pub fn count_lines(t: &crate::model::Totals) -> Vec<String> {
    let mut v = Vec::new();
    let plural = |n: u64| if n == 1 { "user" } else { "users" };
    for (n, what) in [
        (t.create, "added"),
        (t.change, "updated"),
        (t.deactivate, "deactivated"),
        (t.reactivate, "reactivated"),
        (t.delete, "deleted"),
    ] {
        if n > 0 {
            v.push(format!("{n} {} {what}", plural(n)));
        }
    }
    if t.unchanged > 0 {
        v.push(format!(
            "{} {} unchanged (already as the file says)",
            t.unchanged,
            if t.unchanged == 1 { "row" } else { "rows" }
        ));
    }
    if v.is_empty() {
        v.push("nothing to change".into());
    }
    v
}

/// The words of an outcome's verdict: "3 errors and 1 warning".
pub fn summary(outcome: &crate::bulk::Outcome) -> String {
    if outcome.refused {
        return outcome
            .problems
            .first()
            .map(|p| header_text(&p.message))
            .unwrap_or_else(|| "the file could not be read".into());
    }
    let e = outcome.errors;
    let w = outcome.warnings;
    let mut s = format!("{e} {}", if e == 1 { "error" } else { "errors" });
    if w > 0 {
        s.push_str(&format!(
            " and {w} {}",
            if w == 1 { "warning" } else { "warnings" }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_injection_is_refused_in_addresses_and_neutralised_in_text() {
        assert!(mailbox("ada@example.com").is_ok());
        assert!(mailbox("Ada <ada@example.com>").is_ok());
        assert!(mailbox("ada@example.com\r\nBcc: eve@example.com").is_err());
        assert!(mailbox("ada@example.com\nX: y").is_err());
        assert!(mailbox("not an address").is_err());
        assert_eq!(
            header_text("Acme\r\nBcc: eve@example.com: file.xlsx"),
            "Acme Bcc: eve@example.com: file.xlsx"
        );
        assert_eq!(header_text(&"x".repeat(300)).chars().count(), 200);
    }

    #[test]
    fn html_templates_escape_what_they_insert() {
        let out = render_source(
            "t.html",
            "<p>{{ file_name }}</p>",
            &serde_json::json!({"file_name": "<script>x</script>"}),
        )
        .unwrap();
        assert_eq!(out, "<p>&lt;script&gt;x&lt;&#x2f;script&gt;</p>");
        let out = render_source(
            "t.txt",
            "{{ file_name }}",
            &serde_json::json!({"file_name": "<b>"}),
        )
        .unwrap();
        assert_eq!(out, "<b>");
    }

    #[test]
    fn back_off_doubles_from_30_seconds_to_an_hour() {
        assert_eq!(backoff(0), Duration::from_secs(30));
        assert_eq!(backoff(1), Duration::from_secs(60));
        assert_eq!(backoff(6), Duration::from_secs(1920));
        assert_eq!(backoff(7), Duration::from_secs(3600));
        assert_eq!(backoff(20), Duration::from_secs(3600));
    }
}
