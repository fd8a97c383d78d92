//! The rules worker: `rollcall __rules-worker`, one process per validation run (or per
//! `rules check`). It loads one tenant's scripts into a sandboxed Lua state and checks the
//! rows the parent sends. A watchdog thread ends the process when one rule call runs past
//! its budget inside a C function (a string pattern that backtracks for minutes), where
//! Lua's instruction hook cannot fire: the process, not the rule, is what can really be
//! stopped. Memory is capped by Lua's allocator limit and by RLIMIT_AS (set by the parent).
//!
//! Frames both ways: one tag byte, a little-endian u32 length, the payload.
//! Parent -> worker: `I` init (JSON `WorkerInit`), `B` a batch of rows, `E` end.
//! Worker -> parent: `D` loaded (JSON `Loaded`), `R` findings of a batch, `F` a rule failed
//! (JSON `RuleFailure`; the worker then exits).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::engine::{CallState, Engine, EngineLimits, Finding, Observer, RuleFailure};
use super::{Context, Description, LoadProblem, RuleLocations, Script, UserInfo, UserLookup};
use crate::model::Operation;

/// Name of the hidden subcommand.
pub const WORKER_SUBCOMMAND: &str = "__rules-worker";

#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerInit {
    pub scripts: Vec<Script>,
    pub context: Context,
    pub op: Operation,
    /// The operation's built-in column headers, in file order.
    pub builtin: Vec<String>,
    pub limits: EngineLimits,
    /// Read-only database for `ctx.user(...)` lookups.
    pub database: Option<PathBuf>,
    pub tenant_id: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Loaded {
    pub problems: Vec<LoadProblem>,
    pub description: Description,
    /// The run's columns: built-in, then the operation's custom ones.
    pub headers: Vec<String>,
    /// True when the rules neither check nor declare anything for this operation.
    pub idle: bool,
}

pub const TAG_INIT: u8 = b'I';
pub const TAG_BATCH: u8 = b'B';
pub const TAG_END: u8 = b'E';
pub const TAG_LOADED: u8 = b'D';
pub const TAG_REPLY: u8 = b'R';
pub const TAG_FAILED: u8 = b'F';
pub const TAG_STATS: u8 = b'Z';

/// What the worker used, sent when it is told to end.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Stats {
    /// User plus system CPU time, milliseconds.
    pub cpu_ms: u64,
    pub peak_rss_kib: u64,
}

fn own_cpu_ms() -> u64 {
    // SAFETY: getrusage fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0;
    }
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(u.ru_utime) + ms(u.ru_stime)
}

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 256 * 1024 * 1024;

pub fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&[tag])?;
    w.write_all(&(payload.len() as u32).to_le_bytes())?;
    w.write_all(payload)
}

/// Reads one frame into `buf`; `Ok(None)` at a clean end of input.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<Option<u8>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..])?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other("frame too large"));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(Some(head[0]))
}

/// Appends a batch row: row number, then each value as length and bytes.
pub fn encode_row(buf: &mut Vec<u8>, row: u32, values: &[String]) {
    buf.extend_from_slice(&row.to_le_bytes());
    buf.extend_from_slice(&(values.len() as u16).to_le_bytes());
    for v in values {
        buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        buf.extend_from_slice(v.as_bytes());
    }
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.b.len() < n {
            return None;
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    /// The next text into `into` (its buffer reused).
    fn text_into(&mut self, into: &mut String) -> Option<()> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        into.clear();
        match std::str::from_utf8(bytes) {
            Ok(t) => into.push_str(t),
            Err(_) => into.push_str(&String::from_utf8_lossy(bytes)),
        }
        Some(())
    }

    fn text(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        self.take(n)
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }
}

const NO_COL: u16 = u16::MAX;

/// Appends one finding of `row` to a reply, with the cell's value (`values`: the row).
pub fn encode_finding(buf: &mut Vec<u8>, row: u32, f: &Finding, values: &[String]) {
    let cell = |c: &Option<usize>| c.and_then(|c| values.get(c)).map_or("", String::as_str);
    let (kind, col, text, extra) = match f {
        Finding::Error { col, message } => (0u8, *col, message.as_str(), cell(col)),
        Finding::Warning { col, message } => (1, *col, message.as_str(), cell(col)),
        Finding::Normalised { col, value, from } => (2, Some(*col), value.as_str(), from.as_str()),
        Finding::CaseCorrected { col, value, from } => {
            (3, Some(*col), value.as_str(), from.as_str())
        }
    };
    buf.extend_from_slice(&row.to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(&col.map_or(NO_COL, |c| c as u16).to_le_bytes());
    for t in [text, extra] {
        buf.extend_from_slice(&(t.len() as u32).to_le_bytes());
        buf.extend_from_slice(t.as_bytes());
    }
}

/// Decodes a reply: each finding with its row (the cell's value is in `Error` and
/// `Warning` as the third item; normalisations carry their old value).
pub fn decode_reply(payload: &[u8]) -> Option<Vec<(u32, Finding, String)>> {
    let mut c = Cursor { b: payload };
    let mut out = Vec::new();
    while !c.b.is_empty() {
        let row = c.u32()?;
        let kind = c.u8()?;
        let col = c.u16()?;
        let col = (col != NO_COL).then_some(col as usize);
        let text = c.text()?;
        let extra = c.text()?;
        let f = match (kind, col) {
            (0, col) => Finding::Error { col, message: text },
            (1, col) => Finding::Warning { col, message: text },
            (2, Some(col)) => Finding::Normalised {
                col,
                value: text,
                from: extra.clone(),
            },
            (3, Some(col)) => Finding::CaseCorrected {
                col,
                value: text,
                from: extra.clone(),
            },
            _ => return None,
        };
        out.push((row, f, extra));
    }
    Some(out)
}

fn user_lookup(path: PathBuf, tenant_id: i64) -> UserLookup {
    let conn: RefCell<Option<Connection>> = RefCell::new(None);
    let cache: RefCell<HashMap<String, Option<UserInfo>>> = RefCell::new(HashMap::new());
    Box::new(move |email: &str| {
        let key = email.trim().to_lowercase();
        if let Some(hit) = cache.borrow().get(&key) {
            return Ok(hit.clone());
        }
        let mut slot = conn.borrow_mut();
        if slot.is_none() {
            let c = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| format!("the user directory cannot be read: {e}"))?;
            let _ = c.busy_timeout(Duration::from_secs(5));
            *slot = Some(c);
        }
        let Some(c) = slot.as_ref() else {
            return Ok(None);
        };
        let user = c
            .prepare_cached(&format!(
                "SELECT {} FROM {} WHERE u.tenant_id = ?1 AND u.email_norm = ?2",
                crate::db::USER_COLUMNS,
                crate::db::USER_FROM
            ))
            .and_then(|mut st| {
                st.query_row(params![tenant_id, key], crate::db::user_from_row)
                    .optional()
            })
            .map_err(|e| format!("the user directory cannot be read: {e}"))?;
        let info = user.map(|u| UserInfo {
            custom: u
                .custom
                .as_deref()
                .and_then(|j| {
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(j).ok()
                })
                .map(|m| {
                    m.into_iter()
                        .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            email: u.email,
            first_name: u.first_name,
            last_name: u.last_name,
            role: u.role,
            team: u.team,
            pool: u.pool,
            status: u.status,
        });
        let mut cache = cache.borrow_mut();
        if cache.len() < 100_000 {
            cache.insert(key, info.clone());
        }
        Ok(info)
    })
}

/// The worker's entry point; returns the exit code. `confinement` (from its command line)
/// is applied first thing, before anything is read from the parent.
pub fn run(confinement: crate::confine::Confinement) -> i32 {
    if let Err(e) = confinement.apply() {
        eprintln!("rules worker: cannot limit its memory and time: {e}");
        return 2;
    }
    let stdin = std::io::stdin();
    let mut input = BufReader::with_capacity(1 << 20, stdin.lock());
    let out = Arc::new(Mutex::new(BufWriter::with_capacity(
        1 << 16,
        std::io::stdout(),
    )));
    let mut buf = Vec::new();
    let init: WorkerInit = match read_frame(&mut input, &mut buf) {
        Ok(Some(TAG_INIT)) => match serde_json::from_slice(&buf) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("rules worker: bad init: {e}");
                return 2;
            }
        },
        _ => {
            eprintln!("rules worker: no init frame");
            return 2;
        }
    };
    let state = CallState::new();
    let locations: RuleLocations = Arc::new(Mutex::new(Vec::new()));
    start_watchdog(state.clone(), locations.clone(), out.clone(), init.limits);

    let lookup = init
        .database
        .clone()
        .map(|p| user_lookup(p, init.tenant_id));
    let send = |tag: u8, payload: &[u8]| -> bool {
        let Ok(mut w) = out.lock() else { return false };
        write_frame(&mut *w, tag, payload)
            .and_then(|_| w.flush())
            .is_ok()
    };
    let mut engine = match Engine::load(
        &init.scripts,
        &init.context,
        init.op,
        &init.builtin,
        init.limits,
        state.clone(),
        lookup,
    ) {
        Ok(e) => e,
        Err(problems) => {
            let loaded = Loaded {
                problems,
                description: Description::default(),
                headers: vec![],
                idle: true,
            };
            let json = serde_json::to_vec(&loaded).unwrap_or_default();
            send(TAG_LOADED, &json);
            return 0;
        }
    };
    if let Ok(mut l) = locations.lock() {
        *l = engine.rule_locations();
    }
    let loaded = Loaded {
        problems: vec![],
        description: engine.description().clone(),
        headers: engine.headers().to_vec(),
        idle: engine.is_idle(),
    };
    let json = serde_json::to_vec(&loaded).unwrap_or_default();
    if !send(TAG_LOADED, &json) {
        return 2;
    }
    let ncols = engine.headers().len();
    let mut values: Vec<String> = vec![String::new(); ncols];
    let mut findings = Vec::new();
    let mut reply = Vec::with_capacity(1 << 16);
    loop {
        match read_frame(&mut input, &mut buf) {
            Ok(Some(TAG_BATCH)) => {}
            Ok(Some(TAG_END)) => {
                let stats = Stats {
                    cpu_ms: own_cpu_ms(),
                    peak_rss_kib: crate::sheet::codec::peak_rss_kib(),
                };
                send(TAG_STATS, &serde_json::to_vec(&stats).unwrap_or_default());
                return 0;
            }
            Ok(None) => return 0,
            Ok(Some(t)) => {
                eprintln!("rules worker: unexpected frame {t}");
                return 2;
            }
            Err(e) => {
                eprintln!("rules worker: {e}");
                return 2;
            }
        }
        reply.clear();
        let mut c = Cursor { b: &buf };
        while !c.b.is_empty() {
            let (Some(row), Some(n)) = (c.u32(), c.u16()) else {
                eprintln!("rules worker: bad batch");
                return 2;
            };
            for (i, v) in values.iter_mut().enumerate() {
                v.clear();
                if i < n as usize && c.text_into(v).is_none() {
                    eprintln!("rules worker: bad batch");
                    return 2;
                }
            }
            for _ in ncols..n as usize {
                let _ = c.text();
            }
            findings.clear();
            if let Err(f) = engine.check_row(row, &mut values, &mut findings) {
                let json = serde_json::to_vec(&f).unwrap_or_default();
                send(TAG_FAILED, &json);
                return 0;
            }
            for f in &findings {
                encode_finding(&mut reply, row, f, &values);
            }
        }
        if !send(TAG_REPLY, &reply) {
            return 2;
        }
    }
}

/// Ends the process when a call has run past its budget (and the hook did not stop it: the
/// call is inside a C function). Grace: half the budget, at least 200 ms.
fn start_watchdog(
    state: Arc<CallState>,
    locations: RuleLocations,
    out: Arc<Mutex<BufWriter<std::io::Stdout>>>,
    limits: EngineLimits,
) {
    let grace = (limits.call_ms / 2).max(200);
    let tick = Duration::from_millis((limits.call_ms / 10).clamp(10, 100));
    std::thread::spawn(move || {
        let mut seen = Observer::default();
        loop {
            std::thread::sleep(tick);
            let Some(ms) = state.observe(&mut seen) else {
                continue;
            };
            if ms > limits.call_ms {
                // A Lua loop stops at the next hook, naming its line.
                state
                    .overdue
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if ms <= limits.call_ms + grace {
                continue;
            }
            let rule = state.rule.load(std::sync::atomic::Ordering::Relaxed);
            let row = state.row.load(std::sync::atomic::Ordering::Relaxed) as u32;
            let (script, line) = if rule == u64::MAX || rule == usize::MAX as u64 {
                (
                    state.script.lock().map(|s| s.clone()).unwrap_or_default(),
                    None,
                )
            } else {
                locations
                    .lock()
                    .ok()
                    .and_then(|l| l.get(rule as usize).cloned())
                    .unwrap_or_default()
            };
            let failure = RuleFailure {
                script,
                line,
                row: (row > 0).then_some(row),
                message: format!(
                    "the rule ran past its time limit of {} ms inside a library call (a string pattern that backtracks, or a very long string operation) and was stopped",
                    limits.call_ms
                ),
            };
            let json = serde_json::to_vec(&failure).unwrap_or_default();
            // The main thread is inside the rule, not writing: the lock is free.
            if let Ok(mut w) = out.lock() {
                let _ = write_frame(&mut *w, TAG_FAILED, &json);
                let _ = w.flush();
            }
            // SAFETY: ends this process at once; nothing of it needs to be kept.
            unsafe { libc::_exit(0) };
        }
    });
}
