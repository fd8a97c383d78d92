//! The audit log: append-only files of one JSON object per line in `audit/`, each line
//! carrying the SHA-256 of the line before it, so `rollcall audit verify` proves that nothing
//! was changed, removed, inserted or reordered.
//!
//! Entries are first written to the `audit_outbox` table in the same transaction as the change
//! they record (`record`, `record_job`), then appended to the files after commit by `flush`,
//! which fsyncs before the change is reported done. Every line names the outbox row (and job
//! row) it came from, so after a crash `flush` resumes exactly where the file ends: every
//! committed change gets exactly one entry. The last appended entry is anchored in the
//! database (`audit_anchor`), so a removed last entry is detected too.
//!
//! A line: `{"seq":N,"time":…,"actor":…,"tenant":…,"action":…,"target":…,"details":{…},
//! "source":[outbox_id,job_row],"prev":"<sha256 of the previous line>"}`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{AppError, AppResult};
use crate::model::IMAGE_KEYS;

/// The `prev` of the very first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One event to record.
pub struct Event {
    pub actor: String,
    pub tenant: Option<String>,
    /// Dotted name, e.g. `tenant.create`, `upload.rejected`, `user.change`.
    pub action: &'static str,
    /// What was acted on: a tenant, a file, a job, a user's email.
    pub target: String,
    pub details: Value,
}

/// Queues an entry in the caller's transaction.
pub fn record(conn: &Connection, e: &Event) -> AppResult<()> {
    conn.execute(
        "INSERT INTO audit_outbox (kind, time, actor, tenant, action, target, details) VALUES ('entry', ?1, ?2, ?3, ?4, ?5, ?6)",
        params![crate::db::now(), e.actor, e.tenant, e.action, e.target, e.details.to_string()],
    )?;
    Ok(())
}

/// Queues one entry per row of `job_changes` of `job_id` (every field before and after).
pub fn record_job(conn: &Connection, actor: &str, tenant: &str, job_id: i64) -> AppResult<()> {
    conn.execute(
        "INSERT INTO audit_outbox (kind, time, actor, tenant, action, target, details, job_id) VALUES ('job', ?1, ?2, ?3, 'user', '', '{}', ?4)",
        params![crate::db::now(), actor, tenant, job_id],
    )?;
    Ok(())
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> AppError {
    AppError::internal(
        format!("{what} {}", path.display()),
        crate::config::describe_io(&e),
    )
}

/// The log files in order.
pub fn files(dir: &Path) -> AppResult<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(io_err("reading", dir, e)),
    };
    v.sort();
    Ok(v)
}

fn file_name(n: u64) -> String {
    format!("audit-{n:06}.jsonl")
}

/// The number in a log file's name (`audit-000042.jsonl` -> 42).
fn file_number(path: &Path) -> u64 {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| {
            n.trim_start_matches("audit-")
                .trim_end_matches(".jsonl")
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
}

/// Closes the current log file and starts the next one (the chain continues into it).
/// Returns the new file, or `None` when there is nothing to rotate (no file, or an empty one).
pub fn rotate(dir: &Path) -> AppResult<Option<PathBuf>> {
    let _lock = DirLock::take(dir)?;
    let Some(last) = files(dir)?.pop() else {
        return Ok(None);
    };
    if fs::metadata(&last).map(|m| m.len() == 0).unwrap_or(true) {
        return Ok(None);
    }
    let next = dir.join(file_name(file_number(&last) + 1));
    File::create_new(&next).map_err(|e| io_err("creating", &next, e))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Some(next))
}

fn sha_hex(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// An exclusive lock on the audit directory, held while appending (one appender per data
/// directory, whichever process).
struct DirLock {
    _file: File,
}

impl DirLock {
    fn take(dir: &Path) -> AppResult<DirLock> {
        fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        let path = dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        // SAFETY: flock on a descriptor we own; released when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err("locking", &path, std::io::Error::last_os_error()));
        }
        Ok(DirLock { _file: file })
    }
}

/// Runs `f` while holding the audit log's lock: no entry is appended meanwhile (a backup
/// copies the files and snapshots the database's anchor under it).
pub fn with_lock<T>(dir: &Path, f: impl FnOnce() -> AppResult<T>) -> AppResult<T> {
    let _lock = DirLock::take(dir)?;
    f()
}

/// Where the log ends: the last entry's number and hash, and the source it came from.
#[derive(Debug, Clone, PartialEq)]
struct Tail {
    seq: u64,
    hash: String,
    source: (i64, i64),
}

/// The last complete line of a file (however long), and the length of the file up to the
/// end of that line (anything after it is a write cut short).
fn last_line(path: &Path) -> AppResult<(Option<Vec<u8>>, u64)> {
    const CHUNK: u64 = 64 * 1024;
    let mut f = File::open(path).map_err(|e| io_err("reading", path, e))?;
    let len = f.metadata().map_err(|e| io_err("reading", path, e))?.len();
    let mut pos = len;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if pos == 0 && buf.is_empty() {
            return Ok((None, 0));
        }
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))
            .map_err(|e| io_err("reading", path, e))?;
        f.read_exact(&mut chunk)
            .map_err(|e| io_err("reading", path, e))?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        pos = start;
        if let Some(end) = buf.iter().rposition(|&b| b == b'\n') {
            match buf[..end].iter().rposition(|&b| b == b'\n') {
                Some(b) => return Ok((Some(buf[b + 1..end].to_vec()), pos + end as u64 + 1)),
                None if pos == 0 => return Ok((Some(buf[..end].to_vec()), end as u64 + 1)),
                None => continue,
            }
        }
        if pos == 0 {
            return Ok((None, 0));
        }
    }
}

/// Where the log ends. A last line without its newline, past the anchor, is a write cut
/// short by a crash: it is cut off (its outbox row is still queued). Returns the tail and the
/// newest file.
fn tail(dir: &Path, anchor: Option<(u64, String)>) -> AppResult<(Option<Tail>, Option<PathBuf>)> {
    let all = files(dir)?;
    let Some(newest) = all.last().cloned() else {
        if anchor.as_ref().is_some_and(|a| a.0 > 0) {
            return Err(AppError::internal(
                "the audit log is missing",
                "the database records entries written but audit/ holds no file; run `rollcall audit verify`",
            ));
        }
        return Ok((None, None));
    };
    // The last complete entry, looking back across files (a new file may hold none yet).
    let mut found = None;
    let mut newest_complete = 0;
    for (k, path) in all.iter().enumerate().rev() {
        let (line, complete) = last_line(path)?;
        if k == all.len() - 1 {
            newest_complete = complete;
        }
        if let Some(line) = line {
            found = Some(parse_tail(&line).ok_or_else(|| {
                AppError::internal(
                    format!("the audit log {} ends with a damaged entry", path.display()),
                    "run `rollcall audit verify`",
                )
            })?);
            break;
        }
    }
    let len = fs::metadata(&newest)
        .map_err(|e| io_err("reading", &newest, e))?
        .len();
    if newest_complete < len {
        let anchored = anchor.as_ref().map(|a| a.0).unwrap_or(0);
        let have = found.as_ref().map(|t| t.seq).unwrap_or(0);
        if have < anchored {
            return Err(AppError::internal(
                "the audit log's last entry is incomplete",
                "it was already recorded as written, so this is not a crash; run `rollcall audit verify`",
            ));
        }
        let f = OpenOptions::new()
            .write(true)
            .open(&newest)
            .map_err(|e| io_err("repairing", &newest, e))?;
        f.set_len(newest_complete)
            .map_err(|e| io_err("repairing", &newest, e))?;
        f.sync_all().map_err(|e| io_err("repairing", &newest, e))?;
    }
    Ok((found, Some(newest)))
}

fn parse_tail(line: &[u8]) -> Option<Tail> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let seq = v.get("seq")?.as_u64()?;
    let src = v.get("source")?.as_array()?;
    Some(Tail {
        seq,
        hash: sha_hex(line),
        source: (src.first()?.as_i64()?, src.get(1)?.as_i64()?),
    })
}

/// Appends what the outbox holds to the log, fsyncs, then clears the outbox and moves the
/// anchor. Returns the number of entries appended.
pub fn flush(conn: &Connection, dir: &Path, max_file_bytes: u64) -> AppResult<u64> {
    // Nothing queued: nothing to append and nothing to change, so no lock, no read of the
    // log's end and no commit (a flush runs after every audited step, most find nothing).
    let queued: bool = conn.query_row("SELECT EXISTS (SELECT 1 FROM audit_outbox)", [], |r| {
        r.get(0)
    })?;
    if !queued {
        return Ok(0);
    }
    let _lock = DirLock::take(dir)?;
    let anchor: Option<(u64, String)> = conn
        .query_row(
            "SELECT last_seq, last_hash FROM audit_anchor WHERE id = 1",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )
        .optional()?;
    let (tail, newest) = tail(dir, anchor.clone())?;
    check_end(conn, &anchor, &tail)?;
    let mut w = Appender::open(dir, newest, tail.clone(), max_file_bytes)?;
    let mut st = conn.prepare(
        "SELECT id, kind, time, actor, tenant, action, target, details, job_id FROM audit_outbox ORDER BY id",
    )?;
    let mut rows = st.query([])?;
    let mut max_id = 0i64;
    let done = tail.as_ref().map(|t| t.source).unwrap_or((0, 0));
    let mut changes = conn.prepare(
        "SELECT row_number, action, before, after, note FROM job_changes WHERE job_id = ?1 AND row_number > ?2 ORDER BY row_number",
    )?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        max_id = id;
        if id < done.0 {
            continue;
        }
        let kind: String = r.get(1)?;
        let time: String = r.get(2)?;
        let actor: String = r.get(3)?;
        let tenant: Option<String> = r.get(4)?;
        if kind == "entry" {
            if id == done.0 {
                continue;
            }
            let action: String = r.get(5)?;
            let target: String = r.get(6)?;
            let details: String = r.get(7)?;
            w.append(
                &time,
                &actor,
                tenant.as_deref(),
                &action,
                &target,
                &details,
                (id, 0),
            )?;
            continue;
        }
        let job: i64 = r.get(8)?;
        let start = if id == done.0 { done.1 } else { 0 };
        let mut cr = changes.query(params![job, start])?;
        let mut details = String::with_capacity(512);
        while let Some(c) = cr.next()? {
            let row: i64 = c.get(0)?;
            let action: String = c.get(1)?;
            let before: Option<String> = c.get(2)?;
            let after: Option<String> = c.get(3)?;
            let note: Option<String> = c.get(4)?;
            let email = image_email(after.as_deref().or(before.as_deref()));
            details.clear();
            details.push_str(&format!("{{\"job\":{job},\"row\":{row},\"fields\":"));
            details.push_str(FIELDS_JSON.as_str());
            details.push_str(",\"before\":");
            details.push_str(before.as_deref().unwrap_or("null"));
            details.push_str(",\"after\":");
            details.push_str(after.as_deref().unwrap_or("null"));
            if let Some(n) = &note {
                details.push_str(",\"reason\":");
                details.push_str(&serde_json::to_string(n).unwrap_or_else(|_| "null".into()));
            }
            details.push('}');
            w.append(
                &time,
                &actor,
                tenant.as_deref(),
                &format!("user.{action}"),
                &email,
                &details,
                (id, row),
            )?;
        }
    }
    drop(rows);
    let appended = w.finish()?;
    if let Some(t) = &w.tail {
        let tx = conn.unchecked_transaction()?;
        tx.execute("DELETE FROM audit_outbox WHERE id <= ?1", [max_id])?;
        tx.execute(
            "INSERT INTO audit_anchor (id, last_seq, last_hash) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET last_seq = excluded.last_seq, last_hash = excluded.last_hash",
            params![t.seq as i64, t.hash],
        )?;
        tx.commit()?;
    }
    Ok(appended)
}

/// Refuses to extend a log whose end does not match the database's anchor: appending would
/// make tampering (an edited or removed last entry, an emptied log) permanent.
fn check_end(
    conn: &Connection,
    anchor: &Option<(u64, String)>,
    tail: &Option<Tail>,
) -> AppResult<()> {
    let refuse = |why: String| -> AppResult<()> {
        Err(AppError::internal(
            "the audit log does not end where the database says it does",
            format!("{why}; nothing more is appended until `rollcall audit verify` is clean"),
        ))
    };
    match (anchor, tail) {
        (None, _) | (Some((0, _)), None) => Ok(()),
        (Some((aseq, _)), None) => refuse(format!("entry {aseq} was written but the log is empty")),
        (Some((aseq, _)), Some(t)) if t.seq < *aseq => refuse(format!(
            "entry {aseq} was written but the log ends at entry {}",
            t.seq
        )),
        (Some((aseq, ahash)), Some(t)) if t.seq == *aseq && t.hash != *ahash => {
            refuse(format!("entry {aseq}, the last one, was altered"))
        }
        (Some((aseq, _)), Some(t)) if t.seq > *aseq => {
            // Entries past the anchor come from a flush cut by a crash: their outbox rows
            // are still queued.
            let queued: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM audit_outbox WHERE id = ?1)",
                [t.source.0],
                |r| r.get(0),
            )?;
            if queued {
                Ok(())
            } else {
                refuse(format!(
                    "entries after entry {aseq} match nothing queued to be written"
                ))
            }
        }
        _ => Ok(()),
    }
}

static FIELDS_JSON: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| serde_json::to_string(&IMAGE_KEYS).unwrap_or_default());

/// The email of a recorded image (its first field), read without building the whole value.
fn image_email(img: Option<&str>) -> String {
    use serde::de::IgnoredAny as Any;
    type Image = (
        String,
        Any,
        Any,
        Any,
        Any,
        Any,
        Any,
        Any,
        Any,
        Any,
        Any,
        Any,
    );
    img.and_then(|s| serde_json::from_str::<Image>(s).ok())
        .map(|i| i.0)
        .unwrap_or_default()
}

/// Appends lines to the newest file, rotating by size; the chain runs across files.
struct Appender {
    dir: PathBuf,
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max: u64,
    tail: Option<Tail>,
    appended: u64,
    line: Vec<u8>,
    new_files: bool,
}

impl Appender {
    fn open(
        dir: &Path,
        newest: Option<PathBuf>,
        tail: Option<Tail>,
        max: u64,
    ) -> AppResult<Appender> {
        let path = newest.unwrap_or_else(|| dir.join(file_name(1)));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        let size = file
            .metadata()
            .map_err(|e| io_err("reading", &path, e))?
            .len();
        Ok(Appender {
            dir: dir.to_path_buf(),
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            size,
            max: max.max(4096),
            tail,
            appended: 0,
            line: Vec::with_capacity(1024),
            new_files: false,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        time: &str,
        actor: &str,
        tenant: Option<&str>,
        action: &str,
        target: &str,
        details: &str,
        source: (i64, i64),
    ) -> AppResult<()> {
        if self.size >= self.max {
            self.rotate()?;
        }
        let (seq, prev) = match &self.tail {
            Some(t) => (t.seq + 1, t.hash.as_str()),
            None => (1, GENESIS),
        };
        let js = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        self.line.clear();
        write!(
            self.line,
            "{{\"seq\":{seq},\"time\":{},\"actor\":{},\"tenant\":{},\"action\":{},\"target\":{},\"details\":{details},\"source\":[{},{}],\"prev\":\"{prev}\"}}",
            js(time),
            js(actor),
            tenant.map(js).unwrap_or_else(|| "null".into()),
            js(action),
            js(target),
            source.0,
            source.1
        )
        .map_err(|e| AppError::internal("building an audit entry", e))?;
        let hash = sha_hex(&self.line);
        self.line.push(b'\n');
        self.out
            .write_all(&self.line)
            .map_err(|e| io_err("writing", &self.path, e))?;
        self.size += self.line.len() as u64;
        self.tail = Some(Tail { seq, hash, source });
        self.appended += 1;
        Ok(())
    }

    fn rotate(&mut self) -> AppResult<()> {
        self.out
            .flush()
            .map_err(|e| io_err("writing", &self.path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| io_err("syncing", &self.path, e))?;
        self.path = self.dir.join(file_name(file_number(&self.path) + 1));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| io_err("opening", &self.path, e))?;
        self.out = BufWriter::with_capacity(1 << 20, file);
        self.size = 0;
        self.new_files = true;
        Ok(())
    }

    /// Flushes and fsyncs; after this the entries are durable.
    fn finish(&mut self) -> AppResult<u64> {
        self.out
            .flush()
            .map_err(|e| io_err("writing", &self.path, e))?;
        if self.appended > 0 {
            self.out
                .get_ref()
                .sync_all()
                .map_err(|e| io_err("syncing", &self.path, e))?;
            if self.new_files
                && let Ok(d) = File::open(&self.dir)
            {
                let _ = d.sync_all();
            }
        }
        Ok(self.appended)
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verification {
    pub entries: u64,
    pub files: usize,
    /// `None` when the chain is whole; else what is wrong, naming the first bad entry.
    pub problem: Option<String>,
}

/// Checks the whole chain, and its end against the database's anchor.
pub fn verify(conn: &Connection, dir: &Path) -> AppResult<Verification> {
    // Under the appenders' lock, so a flush in progress is not mistaken for damage.
    let _lock = DirLock::take(dir)?;
    let anchor: Option<(u64, String)> = conn
        .query_row(
            "SELECT last_seq, last_hash FROM audit_anchor WHERE id = 1",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )
        .optional()?;
    let mut hash_at_anchor: Option<String> = None;
    let all = files(dir)?;
    let mut prev_hash = GENESIS.to_string();
    let mut prev_seq = 0u64;
    let mut entries = 0u64;
    let bad = |problem: String, entries: u64, files: usize| {
        Ok(Verification {
            entries,
            files,
            problem: Some(problem),
        })
    };
    for (fi, path) in all.iter().enumerate() {
        let f = File::open(path).map_err(|e| io_err("reading", path, e))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut line = Vec::new();
        let mut lno = 0u64;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_string();
        loop {
            line.clear();
            let n = r
                .read_until(b'\n', &mut line)
                .map_err(|e| io_err("reading", path, e))?;
            if n == 0 {
                break;
            }
            lno += 1;
            let at = format!("{name} line {lno}");
            if line.last() != Some(&b'\n') {
                return bad(
                    format!(
                        "entry {} ({at}) is incomplete: the log was cut inside it (truncated)",
                        prev_seq + 1
                    ),
                    entries,
                    all.len(),
                );
            }
            let body = &line[..line.len() - 1];
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return bad(
                    format!(
                        "the line after entry {prev_seq} ({at}) is not a valid entry: it was altered or inserted"
                    ),
                    entries,
                    all.len(),
                );
            };
            let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
            let prev = v.get("prev").and_then(Value::as_str).unwrap_or("");
            if seq != prev_seq + 1 {
                let later = if seq > prev_seq + 1 {
                    find_seq(&all[fi..], lno, prev_seq + 1)?
                } else {
                    None
                };
                let repeated = find_seq(&all[fi..], lno, seq)?;
                let what = if let (Some(_), Some(again)) = (&later, &repeated) {
                    format!(
                        "the line at {at} was inserted: it repeats entry {seq}, which is at {again}"
                    )
                } else if let Some(place) = later {
                    format!(
                        "entry {} is at {place}, after entry {seq} at {at}: entries were reordered",
                        prev_seq + 1
                    )
                } else if seq > prev_seq + 1 {
                    if seq == prev_seq + 2 {
                        format!("entry {} is missing before {at} (removed)", prev_seq + 1)
                    } else {
                        format!(
                            "entries {} to {} are missing before {at} (removed)",
                            prev_seq + 1,
                            seq - 1
                        )
                    }
                } else {
                    format!(
                        "entry {seq} at {at} comes after entry {prev_seq}: entries were reordered or one was inserted"
                    )
                };
                return bad(what, entries, all.len());
            }
            if prev != prev_hash {
                return bad(
                    if prev_seq == 0 {
                        format!("entry {seq} ({at}) does not start the chain: it was altered")
                    } else {
                        format!(
                            "entry {prev_seq} was altered: its hash no longer matches the one entry {seq} ({at}) records"
                        )
                    },
                    entries,
                    all.len(),
                );
            }
            prev_hash = sha_hex(body);
            prev_seq = seq;
            entries += 1;
            if anchor.as_ref().is_some_and(|a| a.0 == seq) {
                hash_at_anchor = Some(prev_hash.clone());
            }
        }
    }
    if let Some((aseq, ahash)) = anchor {
        if prev_seq < aseq {
            return bad(
                if prev_seq + 1 == aseq {
                    format!(
                        "entry {aseq}, the last one written, is missing: the log ends at entry {prev_seq} (removed)"
                    )
                } else {
                    format!(
                        "entries {} to {aseq} are missing: the log ends at entry {prev_seq} (removed)",
                        prev_seq + 1
                    )
                },
                entries,
                all.len(),
            );
        }
        if hash_at_anchor.as_deref().is_some_and(|h| h != ahash) {
            return bad(
                if prev_seq == aseq {
                    format!(
                        "entry {aseq}, the last one, was altered: its hash differs from the one recorded when it was written"
                    )
                } else {
                    format!(
                        "entry {aseq} or one before it was altered and the chain rebuilt: entry {aseq}'s hash differs from the one recorded when it was written"
                    )
                },
                entries,
                all.len(),
            );
        }
        if prev_seq > aseq {
            // Only a flush cut by a crash leaves entries past the anchor, and their outbox
            // rows are then still queued.
            let queued: i64 =
                conn.query_row("SELECT count(*) FROM audit_outbox", [], |r| r.get(0))?;
            if queued == 0 {
                return bad(
                    format!(
                        "entries {} to {prev_seq} follow the last entry written ({aseq}) but nothing was queued to be written: they were inserted",
                        aseq + 1
                    ),
                    entries,
                    all.len(),
                );
            }
        }
    }
    Ok(Verification {
        entries,
        files: all.len(),
        problem: None,
    })
}

/// Where the entry numbered `seq` is ("file line N"), searching these files after the first
/// `skip` lines of the first one.
fn find_seq(files: &[PathBuf], skip: u64, seq: u64) -> AppResult<Option<String>> {
    for (fi, path) in files.iter().enumerate() {
        let f = File::open(path).map_err(|e| io_err("reading", path, e))?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            if fi == 0 && (i as u64) < skip {
                continue;
            }
            let line = line.map_err(|e| io_err("reading", path, e))?;
            let found = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v.get("seq").and_then(Value::as_u64))
                == Some(seq);
            if found {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
                return Ok(Some(format!("{name} line {}", i + 1)));
            }
        }
    }
    Ok(None)
}

/// Filters for `show`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub user: Option<String>,
    pub job: Option<i64>,
    pub actor: Option<String>,
    /// RFC 3339 bounds, inclusive.
    pub since: Option<String>,
    pub until: Option<String>,
}

impl Filter {
    fn keeps(&self, v: &Value) -> bool {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
        let eq = |a: &str, b: &Option<String>| b.as_ref().is_none_or(|b| a.eq_ignore_ascii_case(b));
        eq(s("tenant"), &self.tenant)
            && eq(s("actor"), &self.actor)
            && self.user.as_ref().is_none_or(|u| {
                s("action").starts_with("user.") && s("target").eq_ignore_ascii_case(u)
            })
            && self.job.is_none_or(|j| {
                v.get("details")
                    .and_then(|d| d.get("job"))
                    .and_then(Value::as_i64)
                    == Some(j)
            })
            && self.since.as_ref().is_none_or(|t| s("time") >= t.as_str())
            && self.until.as_ref().is_none_or(|t| s("time") <= t.as_str())
    }
}

/// Writes the entries that pass the filter as JSON lines or CSV; returns how many.
pub fn show(dir: &Path, filter: &Filter, csv_out: bool, out: &mut dyn Write) -> AppResult<u64> {
    let werr = AppError::output;
    if !csv_out {
        return each_entry(dir, filter, |_, line| writeln!(out, "{line}").map_err(werr));
    }
    let cerr = |e: csv::Error| AppError::writing_csv("writing CSV", e);
    let mut c = csv::Writer::from_writer(out);
    c.write_record([
        "seq", "time", "actor", "tenant", "action", "target", "details",
    ])
    .map_err(cerr)?;
    let n = each_entry(dir, filter, |v, _| {
        let s = |k: &str| match v.get(k) {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => String::new(),
            Some(other) => other.to_string(),
        };
        let rec = [
            s("seq"),
            s("time"),
            s("actor"),
            s("tenant"),
            s("action"),
            s("target"),
            s("details"),
        ];
        c.write_record(rec.iter().map(|f| crate::model::csv_safe(f).into_owned()))
            .map_err(cerr)
    })?;
    c.flush().map_err(werr)?;
    Ok(n)
}

/// The newest `limit` entries that pass the filter and whose action starts with
/// `action_prefix`, newest first, and how many passed in all. Memory holds only `limit`
/// entries however long the log is.
pub fn newest(
    dir: &Path,
    filter: &Filter,
    action_prefix: Option<&str>,
    limit: usize,
) -> AppResult<(Vec<Value>, u64)> {
    let mut ring: std::collections::VecDeque<Value> = std::collections::VecDeque::new();
    let mut total = 0u64;
    each_entry(dir, filter, |v, _| {
        let action = v.get("action").and_then(Value::as_str).unwrap_or("");
        if action_prefix.is_some_and(|a| !action.starts_with(a)) {
            return Ok(());
        }
        total += 1;
        if ring.len() == limit {
            ring.pop_front();
        }
        if limit > 0 {
            ring.push_back(v.clone());
        }
        Ok(())
    })?;
    Ok((ring.into_iter().rev().collect(), total))
}

/// Calls `f` with every entry (parsed, and its line) that passes the filter.
fn each_entry(
    dir: &Path,
    filter: &Filter,
    mut f: impl FnMut(&Value, &str) -> AppResult<()>,
) -> AppResult<u64> {
    let mut n = 0u64;
    for path in files(dir)? {
        let file = File::open(&path).map_err(|e| io_err("reading", &path, e))?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| io_err("reading", &path, e))?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if filter.keeps(&v) {
                n += 1;
                f(&v, &line)?;
            }
        }
    }
    Ok(n)
}
