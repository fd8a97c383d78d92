//! Intake and apply: one streaming pass over an uploaded file.
//!
//! `process` reads the data sheet through the worker (`sheet::reader`), checks the structure,
//! validates every row against the column definitions and the database, computes each row's
//! effect (the preview) and the licence forecast, and — in apply mode — writes every change
//! and its before/after images in the caller's transaction as it goes. The caller commits
//! only when the outcome has no errors (and its warnings were acknowledged), so a file
//! applies all of its rows or none. The same code validates and applies, so the checks made
//! at apply time against the current roster are exactly the ones the administrator saw.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Statement, params};
use serde::Serialize;

use crate::db::{self, Tenant, USER_COLUMNS, USER_FROM, User};
use crate::error::AppResult;
use crate::model::{
    self, CLEAR_TOKEN, Column, DEFAULT_LANGUAGE, ERRORS_HEADER, Effect, Field, FieldChange, Kind,
    LANGUAGES, Operation, PoolForecast, Problem, ROLES, Severity, TEMPLATE_VERSION, Totals,
    column_letter,
};
use crate::sheet::codec::{CellKind, RawCell, RawRow};
use crate::sheet::reader::{Pace, ReadFailure, ReaderSetup, SheetReader, Starting};
use crate::sheet::worker::WorkbookInfo;

/// How a normalisation changed values of one column, counted over the file.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Normalisation {
    pub column: String,
    pub column_name: String,
    pub kind: &'static str,
    pub count: u64,
    /// First row where it happened, and what it did there.
    pub example_row: u32,
    pub example: String,
}

/// Everything one pass found out about a file.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub operation: Operation,
    pub format: String,
    pub sheet: String,
    /// Data rows read (non-empty rows below the header).
    pub rows: u64,
    pub errors: u64,
    pub warnings: u64,
    /// The problems, at most `max_reported_problems` of them, errors and warnings in row order.
    pub problems: Vec<Problem>,
    /// True when the file was refused as a whole (unreadable or wrong structure).
    pub refused: bool,
    pub totals: Totals,
    pub forecast: Vec<PoolForecast>,
    pub normalisations: Vec<Normalisation>,
    pub notes: Vec<String>,
}

impl Outcome {
    /// An outcome with nothing found yet.
    pub fn empty(op: Operation) -> Outcome {
        Outcome::new(op)
    }

    fn new(op: Operation) -> Outcome {
        Outcome {
            operation: op,
            format: String::new(),
            sheet: op.sheet_name(),
            rows: 0,
            errors: 0,
            warnings: 0,
            problems: Vec::new(),
            refused: false,
            totals: Totals::default(),
            forecast: Vec::new(),
            normalisations: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn is_valid(&self) -> bool {
        !self.refused && self.errors == 0
    }

    /// One line for a valid file: "152 users ready to add — pool Standard: 152 of 200 free seats".
    pub fn success_message(&self) -> String {
        let n = self.totals.changing();
        let users = if n == 1 { "user" } else { "users" };
        let verb = match self.operation {
            Operation::Add => "add",
            Operation::Update => "update",
            Operation::Deactivate => "deactivate",
            Operation::Reactivate => "reactivate",
            Operation::Delete => "delete",
        };
        let mut msg = format!("{n} {users} ready to {verb}");
        if self.totals.unchanged > 0 {
            msg.push_str(&format!(", {} rows change nothing", self.totals.unchanged));
        }
        let pools: Vec<String> = self
            .forecast
            .iter()
            .filter(|f| f.needed > 0)
            .map(|f| {
                format!(
                    "pool {}: {} of {} free seats",
                    f.pool,
                    f.needed,
                    f.seats - f.used + f.freed
                )
            })
            .collect();
        if !pools.is_empty() {
            msg.push_str(" — ");
            msg.push_str(&pools.join(", "));
        }
        msg
    }

    /// "1 error", "3 errors".
    pub fn errors_message(&self) -> String {
        let n = self.errors;
        format!("{n} {}", if n == 1 { "error" } else { "errors" })
    }

    /// What an applied file did, for the one who applied it: "2 users added", "1 user
    /// deactivated, 3 rows changed nothing".
    pub fn applied_message(&self) -> String {
        let n = self.totals.changing();
        let users = if n == 1 { "user" } else { "users" };
        let done = match self.operation {
            Operation::Add => "added",
            Operation::Update => "updated",
            Operation::Deactivate => "deactivated",
            Operation::Reactivate => "reactivated",
            Operation::Delete => "deleted",
        };
        let mut msg = format!("{n} {users} {done}");
        if self.totals.unchanged > 0 {
            let rows = if self.totals.unchanged == 1 {
                "row"
            } else {
                "rows"
            };
            msg.push_str(&format!(
                ", {} {rows} changed nothing",
                self.totals.unchanged
            ));
        }
        msg
    }
}

/// Whether the pass writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Validate and preview only.
    DryRun,
    /// Validate and write, recording changes under this job id.
    Apply { job_id: i64 },
}

/// A request to process one file.
pub struct Request<'a> {
    pub tenant: &'a Tenant,
    pub op: Operation,
    pub path: &'a Path,
    /// The name the administrator gave the file.
    pub file_name: &'a str,
    /// Content hash, to warn when the same file was applied before.
    pub file_sha256: Option<&'a str>,
    pub mode: Mode,
    /// Receives the reader's estimate of the rows to come (for progress and ETA).
    pub estimate: Option<&'a std::cell::Cell<u64>>,
    /// The tenant's rules, when it has any.
    pub rules: Option<RulesInput<'a>>,
    /// The licence pool chosen for the whole file (add, reactivate): rows whose Licence
    /// Pool cell is empty take it.
    pub default_pool: Option<&'a str>,
}

/// What a pass needs to run the tenant's rules.
#[derive(Clone, Copy)]
pub struct RulesInput<'a> {
    pub active: &'a crate::rules::ActiveRules,
    /// How to start the rules worker (this binary, the limits).
    pub setup: &'a ReaderSetup,
    /// The database, read-only, for the rules' user lookups.
    pub database: Option<&'a Path>,
}

/// Called for each valid row with its Excel row number, email and effect.
pub type EffectSink<'a> = dyn FnMut(u32, &str, &Effect) + 'a;

/// Runs one pass. Database errors are returned as `Err`; everything wrong with the file
/// is in the `Outcome`. `started` is a worker already started on the file, if any (one
/// for another file is stopped and a new one started).
pub fn process(
    conn: &Connection,
    setup: &ReaderSetup,
    req: &Request<'_>,
    started: Option<Starting>,
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<Outcome> {
    // The rules worker loads the scripts, and the pass reads what it needs of the database,
    // while the file's worker starts and opens the file.
    let rules = begin_rules(conn, req)?;
    let before = Before::read(conn, &setup.limits, req)?;
    let sheet = req.op.sheet_name();
    // A pass that writes has the worker read each next chunk when it is asked for: see
    // `WorkerArgs::paced`.
    let pace = match req.mode {
        Mode::DryRun => Pace::Ahead,
        Mode::Apply { .. } => Pace::Asked,
    };
    match SheetReader::open_started(started, setup, req.path, req.file_name, &sheet, pace) {
        Ok(mut reader) => process_from(req, &mut reader, rules, before, on_effect, progress),
        Err(f) => {
            let mut out = Outcome::new(req.op);
            refuse(&mut out, &f.code, f.message);
            Ok(out)
        }
    }
}

/// Where rows come from: the worker (`SheetReader`), or rows held in memory (benchmarks).
pub trait RowSource {
    fn info(&self) -> &WorkbookInfo;
    /// The next row into `row`; `Ok(false)` at the end.
    fn next_row(&mut self, row: &mut RawRow) -> Result<bool, ReadFailure>;
    /// Notes about the file learnt while reading it (after the last row).
    fn late_notes(&self) -> Vec<String> {
        Vec::new()
    }
}

impl RowSource for SheetReader {
    fn info(&self) -> &WorkbookInfo {
        SheetReader::info(self)
    }
    fn next_row(&mut self, row: &mut RawRow) -> Result<bool, ReadFailure> {
        SheetReader::next_row(self, row)
    }
    fn late_notes(&self) -> Vec<String> {
        self.notes().to_vec()
    }
}

/// `process` on rows from any source.
pub fn process_rows(
    conn: &Connection,
    limits: &crate::config::Limits,
    req: &Request<'_>,
    reader: &mut (dyn RowSource + Send),
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<Outcome> {
    let rules = begin_rules(conn, req)?;
    let before = Before::read(conn, limits, req)?;
    process_from(req, reader, rules, before, on_effect, progress)
}

/// What a pass reads from the database before the file's first row, made while the file's
/// worker starts (its first frame comes a few milliseconds after the spawn).
struct Before<'c> {
    /// A dry run's read transaction: one snapshot of the roster for the whole file.
    snapshot: ReadSnapshot<'c>,
    /// The tenant's teams and pools, the prepared statements.
    validator: Validator<'c>,
}

impl<'c> Before<'c> {
    fn read(
        conn: &'c Connection,
        limits: &crate::config::Limits,
        req: &Request<'_>,
    ) -> AppResult<Before<'c>> {
        // A dry run reads the roster in one read transaction: one snapshot for the whole
        // file, and no lock taken and released per looked-up row. (Apply runs in the
        // caller's.) It is begun before the tenant's lists are read, so they belong to it.
        let snapshot = ReadSnapshot::begin(conn, req.mode)?;
        let cols = model::columns_with(req.op, req.rules.map(|r| &r.active.description));
        let validator = Validator::new(conn, req, &cols, limits)?;
        Ok(Before {
            snapshot,
            validator,
        })
    }
}

/// The pass itself, with the rules worker begun (`begin_rules`) and the database read
/// (`Before`).
fn process_from(
    req: &Request<'_>,
    reader: &mut (dyn RowSource + Send),
    rules: Option<RulesBegun>,
    before: Before<'_>,
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<Outcome> {
    let mut out = Outcome::new(req.op);
    let description = req.rules.map(|r| &r.active.description);
    let cols = model::columns_with(req.op, description);
    let info = reader.info().clone();
    if let Some(r) = req.rules {
        out.notes.extend(r.active.notes.iter().cloned());
    }
    if let (Some(cell), Some(n)) = (req.estimate, info.estimated_rows) {
        cell.set(n);
    }
    out.format = info.format.clone();
    out.notes.extend(info.notes.iter().cloned());
    if let Some(sheet) = &info.data_sheet {
        out.sheet = sheet.clone();
    }
    if let Err((code, msg)) = check_workbook(req.op, &info, description) {
        refuse(&mut out, code, msg);
        return Ok(out);
    }
    if info.meta.is_none() && info.format != "csv" {
        out.notes.push("The template's hidden information was not in the file (the program that saved it may have dropped it); the columns were checked instead.".into());
    }

    // The header row.
    let mut row = RawRow::default();
    let header_ok = match reader.next_row(&mut row) {
        Ok(true) if row.index == 0 => check_header(&cols, &row),
        Ok(true) | Ok(false) => Err(format!(
            "Row 1 of sheet \"{}\" must hold the column names ({}); it is empty. Download the template again and copy your rows into it.",
            out.sheet,
            cols.iter()
                .map(|c| c.header.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(f) => {
            refuse(&mut out, &f.code, f.message);
            return Ok(out);
        }
    };
    let errors_column = match header_ok {
        Ok(e) => e,
        Err(mut msg) => {
            // The template records the column set it was made for: say when that set has
            // changed since (the tenant's rules added or removed columns).
            if let Some(made_for) = info.meta.as_ref().and_then(|m| m.get("column_hash"))
                && made_for.trim() != model::column_hash(req.op, &cols)
            {
                msg.push_str(" This file comes from a template of other columns than the ones in use now (the tenant's columns changed since it was downloaded).");
            }
            refuse(&mut out, "columns_mismatch", msg);
            return Ok(out);
        }
    };

    let stage = match (req.rules, rules) {
        (Some(r), Some(begun)) => match finish_rules(begun, req, r, &cols) {
            Ok(stage) => stage,
            Err(message) => {
                refuse(&mut out, "rules_unavailable", message);
                return Ok(out);
            }
        },
        _ => None,
    };
    let declared = declared_columns(req);
    let Before {
        snapshot: _snapshot,
        validator: mut v,
    } = before;
    v.out.sheet = out.sheet.clone();
    // The checks word some messages for the file's format (a CSV cell over several lines).
    v.out.format = out.format.clone();
    if let Some(name) = req.default_pool
        && v.default_pool.is_none()
    {
        let names: Vec<&str> = v.pools.iter().map(|p| p.name.as_str()).collect();
        refuse(
            &mut out,
            "unknown_pool",
            format!(
                "There is no licence pool \"{name}\" in {} (its pools: {}); choose one of them for the file.",
                req.tenant.name,
                if names.is_empty() {
                    "none yet".to_string()
                } else {
                    names.join(", ")
                }
            ),
        );
        return Ok(out);
    }
    if let Some(sha) = req.file_sha256 {
        v.check_already_applied(sha)?;
    }
    // Two threads here (and the worker process): this one looks users up and writes while
    // the checker reads and checks the next rows.
    let mut checker = v.checker(errors_column);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Checked>, ReadFailure>>(16);
    // Batches the writer is done with come back to be freed (and their room reused) on the
    // thread that allocated their strings: freeing across threads costs the allocator locks.
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<Checked>>();
    let scoped = std::thread::scope(|scope| -> AppResult<_> {
        let mut stage = stage;
        // Named, so that a profile or a panic message says which thread it was.
        let check = std::thread::Builder::new()
            .name("check".into())
            .spawn_scoped(scope, move || {
                // The writer (this thread) is the one the pass waits for: see `priority`.
                crate::priority::lower_this_thread();
                let mut row = RawRow::default();
                let mut batch = Vec::with_capacity(CHECK_BATCH);
                let recycled = || {
                    let mut room = None;
                    while let Ok(mut b) = back_rx.try_recv() {
                        b.clear();
                        room = Some(b);
                    }
                    room.unwrap_or_else(|| Vec::with_capacity(CHECK_BATCH))
                };
                // The first batches are small, so that the writer starts on the first rows
                // at once; then they grow to `CHECK_BATCH`.
                let mut limit = FIRST_BATCH;
                'rows: loop {
                    match reader.next_row(&mut row) {
                        Ok(true) => {
                            if let Some(mut c) = checker.check(&row) {
                                if let Some(st) = stage.as_mut().filter(|s| !s.failed) {
                                    st.proc.push_row(c.row, &checker.values);
                                } else if !declared.is_empty() {
                                    checker.check_declared(&declared, &mut c);
                                }
                                batch.push(c);
                            }
                            if batch.len() >= limit {
                                limit = (limit * 2).min(CHECK_BATCH);
                                let full = std::mem::replace(&mut batch, recycled());
                                for mut ready in checker.through_rules(&mut stage, full, false) {
                                    checker.prepare(&mut ready);
                                    if tx.send(Ok(ready)).is_err() {
                                        break 'rows;
                                    }
                                }
                            }
                        }
                        Ok(false) => {
                            for mut ready in checker.through_rules(&mut stage, batch, true) {
                                checker.prepare(&mut ready);
                                let _ = tx.send(Ok(ready));
                            }
                            if let Some(st) = stage.take() {
                                st.proc.finish();
                            }
                            checker.out.notes.extend(reader.late_notes());
                            break;
                        }
                        Err(f) => {
                            let _ = tx.send(Err(f));
                            break;
                        }
                    }
                }
                checker
            })
            .map_err(|e| crate::error::AppError::internal("starting the checking thread", e))?;
        let applied = (|| -> AppResult<Option<ReadFailure>> {
            let mut seen = 0u64;
            for msg in rx {
                match msg {
                    Ok(batch) => {
                        for c in &batch {
                            v.apply(c, on_effect)?;
                            seen += 1;
                        }
                        progress(seen);
                        // Once the checker has finished, the last batches are freed here.
                        let _ = back_tx.send(batch);
                    }
                    Err(f) => return Ok(Some(f)),
                }
            }
            Ok(None)
        })();
        Ok((applied, check.join()))
    });
    let (applied, checked) = scoped?;
    let checker = checked.map_err(|_| {
        crate::error::AppError::internal("checking rows", "the checking thread failed")
    })?;
    if let Some(ReadFailure { code, message }) = applied? {
        // The file broke part-way: it is refused as a whole (nothing of it may be
        // applied), and problems of the rows before the break would only distract.
        let mut refused = Outcome::new(req.op);
        refused.sheet = v.out.sheet.clone();
        refused.format = out.format;
        refused.notes = out.notes;
        refuse(&mut refused, &code, message);
        return Ok(refused);
    }
    v.finish();
    let mut out2 = v.into_outcome(checker);
    out2.format = out.format;
    out2.notes.splice(0..0, out.notes);
    if out2.rows == 0 && out2.errors == 0 {
        // A template sent back unfilled: nothing to do is told, not applied as a job of
        // no change.
        let what = if out2.format == "csv" {
            "The file".to_string()
        } else {
            format!("The sheet \"{}\"", out2.sheet)
        };
        refuse(
            &mut out2,
            "no_rows",
            format!(
                "{what} has no rows below its column names. Fill in at least one row, from row 2, and upload the file again."
            ),
        );
    }
    Ok(out2)
}

/// The custom columns with their index among the pass's columns, when the tenant's rules
/// declare columns and register no functions: their declared checks then run in the
/// checking thread (`Checker::check_declared`), as the rules worker would run them.
/// Empty otherwise (no rules, or the worker checks them).
fn declared_columns(req: &Request<'_>) -> Vec<(usize, crate::rules::ColumnDecl)> {
    let Some(r) = req.rules else {
        return Vec::new();
    };
    let d = &r.active.description;
    if d.has_functions() {
        return Vec::new();
    }
    let builtin = model::columns(req.op).len();
    d.columns_of(req.op)
        .enumerate()
        .map(|(n, c)| (builtin + n, c.clone()))
        .collect()
}

/// A read transaction held for a dry run when the connection has none open; ended on drop.
struct ReadSnapshot<'c>(Option<&'c Connection>);

impl<'c> ReadSnapshot<'c> {
    fn begin(conn: &'c Connection, mode: Mode) -> AppResult<ReadSnapshot<'c>> {
        if mode != Mode::DryRun || !conn.is_autocommit() {
            return Ok(ReadSnapshot(None));
        }
        conn.execute_batch("BEGIN DEFERRED")?;
        Ok(ReadSnapshot(Some(conn)))
    }
}

impl Drop for ReadSnapshot<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            // Nothing was written: ending it cannot lose anything.
            let _ = c.execute_batch("ROLLBACK");
        }
    }
}

/// Rows per message from the checking thread (and per batch sent to the rules worker).
const CHECK_BATCH: usize = 256;

/// Rows in the first message (doubling up to `CHECK_BATCH`).
const FIRST_BATCH: usize = 16;

/// The rules worker of a pass, with the batch it is checking.
struct RulesStage {
    proc: crate::rules::client::RulesProcess,
    inflight: Option<Vec<Checked>>,
    failed: bool,
    /// Which script normalises each custom column (for the preview's wording).
    normaliser_of: HashMap<usize, String>,
    rules_folder: String,
}

/// A pass's rules worker as begun: loading the scripts, or why it could not start.
type RulesBegun = Result<crate::rules::client::Loading, String>;

/// Starts the rules worker of a pass, when the tenant has rules, without waiting for the
/// scripts to load (`finish_rules` does); `Some(Err(message))` when it cannot start.
fn begin_rules(conn: &Connection, req: &Request<'_>) -> AppResult<Option<RulesBegun>> {
    use crate::rules::client::RulesProcess;
    let Some(r) = req.rules else {
        return Ok(None);
    };
    if !r.active.description.has_functions() {
        // Declared columns alone: the checking thread checks them (`declared_columns`).
        return Ok(None);
    }
    let ctx = crate::rules::context(conn, req.tenant)?;
    Ok(Some(
        RulesProcess::begin(
            r.setup,
            &r.active.scripts,
            &ctx,
            req.op,
            r.database.map(Path::to_path_buf),
            req.tenant.id,
        )
        .map_err(|e| start_message(req, r, e)),
    ))
}

/// What the administrator is told when the rules cannot run.
fn start_message(
    req: &Request<'_>,
    r: RulesInput<'_>,
    e: crate::rules::client::StartError,
) -> String {
    use crate::rules::client::StartError;
    match e {
        StartError::Problems(p) => {
            let list: Vec<String> = p.iter().take(5).map(|p| p.to_string()).collect();
            format!(
                "The rules of {} ({}) do not load, so this file cannot be checked: {}. Nothing was changed; tell whoever maintains the rules.",
                req.tenant.name,
                r.active.origin,
                list.join("; ")
            )
        }
        StartError::Failed(f) => format!(
            "The rules of {} cannot run, so this file cannot be checked: {f}. Nothing was changed; tell whoever maintains the rules.",
            req.tenant.name
        ),
    }
}

/// Waits for the rules worker begun by `begin_rules` to load the scripts; `Err(message)`
/// when the rules cannot run (the file is then refused with that message), `Ok(None)` when
/// they do nothing here.
fn finish_rules(
    begun: RulesBegun,
    req: &Request<'_>,
    r: RulesInput<'_>,
    cols: &[Column],
) -> Result<Option<RulesStage>, String> {
    let proc = begun?.ready().map_err(|e| start_message(req, r, e))?;
    let expected: Vec<&str> = cols.iter().map(|c| c.header.as_str()).collect();
    if proc.headers() != expected.as_slice() {
        return Err(format!(
            "The rules of {} changed while this file was being checked; upload it again.",
            req.tenant.name
        ));
    }
    if proc.loaded.idle {
        proc.finish();
        return Ok(None);
    }
    let normaliser_of = cols
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            r.active
                .description
                .normaliser_script(&c.header)
                .map(|s| (i, s.to_string()))
        })
        .collect();
    Ok(Some(RulesStage {
        proc,
        inflight: None,
        failed: false,
        normaliser_of,
        rules_folder: r.active.folder.clone(),
    }))
}

fn file_problem(sheet: &str, code: &str, message: String) -> Problem {
    Problem {
        severity: Severity::Error,
        sheet: sheet.to_string(),
        row: None,
        column: None,
        column_name: None,
        value: None,
        code: model::intern_code(code),
        message,
    }
}

fn refuse(out: &mut Outcome, code: &str, message: String) {
    out.refused = true;
    out.errors += 1;
    let sheet = out.sheet.clone();
    out.problems.push(file_problem(&sheet, code, message));
}

/// Checks the sheet set and the template metadata. `rules` gives the tenant's own columns,
/// named with the built-in ones when a file of another operation is refused.
fn check_workbook(
    op: Operation,
    info: &WorkbookInfo,
    rules: Option<&crate::rules::Description>,
) -> Result<(), (&'static str, String)> {
    if let Some(meta) = &info.meta {
        if let Some(found) = meta.get("operation")
            && let Ok(found_op) = found.parse::<Operation>()
            && found_op != op
        {
            return Err((
                "wrong_operation",
                format!(
                    "This file is a template for {} users, not {} users: {} Upload it as {}, or download the {} template.",
                    found_op.title(),
                    op.title(),
                    columns_compared(found_op, op, rules),
                    found_op.title(),
                    op.title()
                ),
            ));
        }
        if let Some(v) = meta.get("template_version")
            && let Ok(v) = v.trim().parse::<f64>()
            && v > f64::from(TEMPLATE_VERSION)
        {
            return Err((
                "template_too_new",
                "This template was made by a newer version of rollcall than this one. Download the template from this server and copy your rows into it.".into(),
            ));
        }
    }
    if info.data_sheet.is_some() {
        return Ok(());
    }
    let names: Vec<&str> = info.sheets.iter().map(|s| s.name.as_str()).collect();
    for other in Operation::ALL {
        if other != op
            && names
                .iter()
                .any(|n| n.trim().eq_ignore_ascii_case(&other.sheet_name()))
        {
            return Err((
                "wrong_operation",
                format!(
                    "This file is a template for {} users (it has the sheet \"{}\"), not {} users: {} Upload it as {}, or download the {} template.",
                    other.title(),
                    other.sheet_name(),
                    op.title(),
                    columns_compared(other, op, rules),
                    other.title(),
                    op.title()
                ),
            ));
        }
    }
    Err((
        "sheet_missing",
        format!(
            "The file has no sheet named \"{}\" (its sheets: {}). Fill in the {} template without renaming its sheets, or rename your data sheet to \"{}\".",
            op.sheet_name(),
            names
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", "),
            op.title(),
            op.sheet_name()
        ),
    ))
}

/// The columns of the template of the operation a file was made for against those of `op`'s
/// (the tenant's own columns included, as they are now), by letter and name: "an Update
/// users file has A Email, B New Email, …; an Add users file has A Email, B First Name, …."
fn columns_compared(
    found: Operation,
    op: Operation,
    rules: Option<&crate::rules::Description>,
) -> String {
    let describe = |o: Operation| {
        let article = if o.title().starts_with(['A', 'E', 'I', 'O', 'U']) {
            "an"
        } else {
            "a"
        };
        let cols = model::columns_with(o, rules)
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} {}", column_letter(i), c.header))
            .collect::<Vec<_>>()
            .join(", ");
        format!("{article} {} users file has {cols}", o.title())
    };
    format!("{}; {}.", describe(found), describe(op))
}

fn cell_text(c: &RawCell) -> String {
    match c.kind {
        CellKind::Text | CellKind::DateIso | CellKind::Error => c.text.clone(),
        _ => format_number(c.num),
    }
}

fn header_norm(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Compares the header row with the template's columns; one message naming every difference.
/// `Ok(true)` when the row carries the error workbook's Errors column after the template's.
pub fn check_header(cols: &[Column], row: &RawRow) -> Result<bool, String> {
    let n = cols.len();
    let expected: Vec<String> = cols.iter().map(|c| header_norm(&c.header)).collect();
    let mut found: BTreeMap<u32, String> = BTreeMap::new();
    for c in row.cells() {
        let t = cell_text(c);
        if !t.trim().is_empty() {
            found.insert(c.col, t.trim().to_string());
        }
    }
    // The error workbook's own column, right after the template's, is ignored.
    let errors_column = found
        .get(&(n as u32))
        .is_some_and(|h| header_norm(h) == header_norm(ERRORS_HEADER));
    if errors_column {
        found.remove(&(n as u32));
    }
    let mut parts = Vec::new();
    let mut renamed_at = vec![false; n];
    for (&c, h) in &found {
        let hn = header_norm(h);
        let letter = column_letter(c as usize);
        if (c as usize) < n && hn == expected[c as usize] {
            continue;
        }
        if let Some(j) = expected.iter().position(|e| *e == hn) {
            parts.push(format!(
                "column \"{}\" is in column {letter} but belongs in column {}",
                cols[j].header,
                column_letter(j)
            ));
        } else if (c as usize) < n {
            renamed_at[c as usize] = true;
            parts.push(format!(
                "column {letter} is \"{h}\" but should be \"{}\"",
                cols[c as usize].header
            ));
        } else {
            parts.push(format!(
                "column {letter} \"{h}\" is not part of the template"
            ));
        }
    }
    for (j, e) in expected.iter().enumerate() {
        let present = found.values().any(|h| header_norm(h) == *e);
        if !present && !renamed_at[j] {
            parts.push(format!(
                "column \"{}\" (column {} of the template) is missing",
                cols[j].header,
                column_letter(j)
            ));
        }
    }
    if parts.is_empty() {
        return Ok(errors_column);
    }
    Err(format!(
        "The columns do not match the template: {}. Do not add, remove, rename or move columns: restore them, or download the template again and copy your rows into it.",
        parts.join("; ")
    ))
}

/// Error values spreadsheets show in cells.
const EXCEL_ERRORS: [&str; 8] = [
    "#N/A",
    "#REF!",
    "#VALUE!",
    "#DIV/0!",
    "#NAME?",
    "#NULL!",
    "#NUM!",
    "#GETTING_DATA",
];

/// Formats a spreadsheet number the way it looks in a cell: 42 not 42.0.
pub fn format_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

/// An Excel serial date as ISO 8601 (date, or date and time).
pub fn excel_date(serial: f64) -> Option<String> {
    if !(0.0..2_958_466.0).contains(&serial) {
        return None;
    }
    // Excel's day 0 is 1899-12-30 once its fictitious 1900-02-29 is accounted for.
    let base = time::Date::from_calendar_date(1899, time::Month::December, 30).ok()?;
    let days = serial.floor() as i64;
    let date = base.checked_add(time::Duration::days(days))?;
    let secs = ((serial - serial.floor()) * 86_400.0).round() as i64;
    if secs == 0 {
        Some(format!("{date}"))
    } else {
        let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
        Some(format!("{date} {h:02}:{m:02}:{s:02}"))
    }
}

/// Checks an email address; `Err` says what is wrong in words.
pub fn check_email(s: &str) -> Result<(), &'static str> {
    // Nearly every address is ASCII and valid: that is settled byte by byte, and only the
    // rest is looked at character by character, to say what is wrong.
    if email_ascii_ok(s.as_bytes()) {
        return Ok(());
    }
    email_problem(s)
}

/// `check_email` character by character: what is wrong with the address.
fn email_problem(s: &str) -> Result<(), &'static str> {
    if s.chars().any(char::is_whitespace) {
        return Err("an email address cannot contain spaces");
    }
    let Some((local, domain)) = s.rsplit_once('@') else {
        return Err("an email address needs an @ between name and domain");
    };
    if local.is_empty() {
        return Err("nothing before the @");
    }
    if local.contains('@') {
        return Err("an email address has only one @");
    }
    if local.len() > 64 {
        return Err("the part before the @ is longer than 64 characters");
    }
    if local.starts_with('.')
        || local.ends_with('.')
        || local.as_bytes().windows(2).any(|w| w == b"..")
    {
        return Err("dots cannot start or end the name or follow each other");
    }
    // Letters and digits of any script, and these ASCII signs (matched by byte, not by
    // searching a string for every character).
    let local_ok = local.chars().all(|c| {
        c.is_alphanumeric()
            || matches!(
                c,
                '!' | '#'
                    | '$'
                    | '%'
                    | '&'
                    | '\''
                    | '*'
                    | '+'
                    | '/'
                    | '='
                    | '?'
                    | '^'
                    | '_'
                    | '`'
                    | '{'
                    | '|'
                    | '}'
                    | '~'
                    | '.'
                    | '-'
            )
    });
    if !local_ok {
        return Err("the part before the @ has a character an address cannot have");
    }
    if domain.is_empty() {
        return Err("nothing after the @");
    }
    let Some((_, tld)) = domain.rsplit_once('.') else {
        return Err("the domain needs a dot, as in example.com");
    };
    for l in domain.split('.') {
        if l.is_empty() || l.len() > 63 {
            return Err("the domain has an empty or overlong part");
        }
        if l.starts_with('-') || l.ends_with('-') {
            return Err("a domain part cannot start or end with a hyphen");
        }
        if !l.chars().all(|c| c.is_alphanumeric() || c == '-') {
            return Err("the domain has a character a domain cannot have");
        }
    }
    if tld.len() < 2 || tld.chars().all(|c| c.is_ascii_digit()) {
        return Err("the domain must end in a real top-level domain, as in .com");
    }
    Ok(())
}

/// Whether `b` is an ASCII address `check_email` accepts, tested byte by byte with the
/// same rules (a false answer only sends the address to `check_email`'s own tests).
fn email_ascii_ok(b: &[u8]) -> bool {
    let Some(at) = b.iter().rposition(|&c| c == b'@') else {
        return false;
    };
    let (local, domain) = (&b[..at], &b[at + 1..]);
    if local.is_empty() || local.len() > 64 {
        return false;
    }
    let mut prev = b'.';
    for &c in local {
        let ok = c.is_ascii_alphanumeric() || LOCAL_SIGNS.contains(&c);
        if !ok || (c == b'.' && prev == b'.') {
            return false;
        }
        prev = c;
    }
    if prev == b'.' {
        return false;
    }
    let mut tld: &[u8] = &[];
    let mut count = 0;
    for l in domain.split(|&c| c == b'.') {
        let ok = !l.is_empty()
            && l.len() <= 63
            && l[0] != b'-'
            && l[l.len() - 1] != b'-'
            && l.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-');
        if !ok {
            return false;
        }
        tld = l;
        count += 1;
    }
    count >= 2 && tld.len() >= 2 && !tld.iter().all(u8::is_ascii_digit)
}

/// The signs the part of an address before the @ may have besides letters and digits.
const LOCAL_SIGNS: &[u8] = b"!#$%&'*+/=?^_`{|}~.-";

struct PoolState {
    id: i64,
    name: String,
    seats: i64,
    used: i64,
    freed: i64,
    needed: i64,
}

/// A row's values after normalisation, resolved against the tenant's data. Its texts are
/// kept one after the other in one buffer (`text`), each field naming its part (`Span`): a
/// row costs one allocation, not one per value, on the thread that checks it and on the one
/// that frees it.
#[derive(Default)]
struct RowValues {
    text: String,
    email: Span,
    /// `email` lowercased: the key users are matched by.
    email_norm: Span,
    new_email: Option<Span>,
    first_name: Option<Span>,
    last_name: Option<Span>,
    job_title: Option<Option<Span>>,
    team: Option<Option<i64>>,
    role: Option<&'static str>,
    language: Option<&'static str>,
    pool: Option<i64>,
    /// The Reason column of deactivate and delete files, kept with the change.
    reason: Option<Span>,
    /// Custom columns given: (n-th custom column, value; `None` clears it in an update).
    custom: Vec<(u16, Option<Span>)>,
    /// For a new user in apply mode, what the writer records, made ahead by the checking
    /// thread (which has time to spare) so the writing thread only writes.
    prepared: Option<PreparedCreate>,
}

/// Where one of a row's texts lies in `RowValues::text` (byte offsets).
#[derive(Clone, Copy, Default, PartialEq, Debug)]
struct Span {
    start: u32,
    end: u32,
}

impl RowValues {
    /// Appends `v` to the row's text and says where it lies.
    fn keep(&mut self, v: &str) -> Span {
        // A row's text is a few cells of at most `max_cell_chars` each: far below 4 GiB.
        let at = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let start = at(self.text.len());
        self.text.push_str(v);
        Span {
            start,
            end: at(self.text.len()),
        }
    }

    /// The text of a span ("" for one that does not lie in the row's text).
    fn get(&self, s: Span) -> &str {
        self.text
            .get(s.start as usize..s.end as usize)
            .unwrap_or_default()
    }

    fn email(&self) -> &str {
        self.get(self.email)
    }

    fn email_norm(&self) -> &str {
        self.get(self.email_norm)
    }

    fn new_email(&self) -> Option<&str> {
        self.new_email.map(|s| self.get(s))
    }

    fn first_name(&self) -> Option<&str> {
        self.first_name.map(|s| self.get(s))
    }

    fn last_name(&self) -> Option<&str> {
        self.last_name.map(|s| self.get(s))
    }

    /// `Some(None)`: cleared (an update's `CLEAR_TOKEN`).
    fn job_title(&self) -> Option<Option<&str>> {
        self.job_title.map(|t| t.map(|s| self.get(s)))
    }

    fn reason(&self) -> Option<&str> {
        self.reason.map(|s| self.get(s))
    }

    /// The custom columns given, in the file's order (`None`: cleared).
    fn custom(&self) -> impl Iterator<Item = (u16, Option<&str>)> + '_ {
        self.custom
            .iter()
            .map(|(n, v)| (*n, v.map(|s| self.get(s))))
    }
}

/// A new user's custom values (as the users table keeps them) and after-image, in the
/// row's text.
struct PreparedCreate {
    custom: Option<Span>,
    after: Span,
}

/// The after-image of a new user made from a row (the defaults of an add filled in).
fn create_image<'a>(
    rv: &'a RowValues,
    team: Option<&'a str>,
    pool: &'a str,
    custom: Option<&'a str>,
    custom_quoted: Option<&'a str>,
) -> Image<'a> {
    Image {
        email: rv.email(),
        first_name: rv.first_name().unwrap_or(""),
        last_name: rv.last_name().unwrap_or(""),
        job_title: rv.job_title().flatten(),
        team_id: rv.team.flatten(),
        team,
        role: rv.role.unwrap_or("Learner"),
        language: rv.language.unwrap_or(DEFAULT_LANGUAGE),
        pool_id: rv.pool.unwrap_or_default(),
        pool,
        status: "active",
        custom,
        custom_quoted,
    }
}

fn exists_hint(u: &User) -> &'static str {
    if u.status == "active" {
        "use an update file to change them"
    } else {
        "they are deactivated: use a reactivate file to bring them back"
    }
}

/// A user's full image, as recorded before and after a change: a JSON array in the order of
/// `model::IMAGE_KEYS` (compact: a million-row job writes a million of them).
struct Image<'a> {
    email: &'a str,
    first_name: &'a str,
    last_name: &'a str,
    job_title: Option<&'a str>,
    team_id: Option<i64>,
    team: Option<&'a str>,
    role: &'a str,
    language: &'a str,
    pool_id: i64,
    pool: &'a str,
    status: &'a str,
    custom: Option<&'a str>,
    /// `custom` already written as a JSON string (quotes included), when it was made with
    /// it (`CustomKeys::json`): written as it is.
    custom_quoted: Option<&'a str>,
}

impl Image<'_> {
    /// Appends the image as a compact JSON array in the order of `model::IMAGE_KEYS`: the
    /// same text serde_json writes for the tuple of its fields, without its byte-by-byte
    /// escaping of text that needs none (a million-row job writes a million images).
    fn write_json(&self, out: &mut String) {
        out.push('[');
        json_str(out, self.email);
        out.push(',');
        json_str(out, self.first_name);
        out.push(',');
        json_str(out, self.last_name);
        out.push(',');
        json_opt_str(out, self.job_title);
        out.push(',');
        match self.team_id {
            Some(id) => json_int(out, id),
            None => out.push_str("null"),
        }
        out.push(',');
        json_opt_str(out, self.team);
        out.push(',');
        json_str(out, self.role);
        out.push(',');
        json_str(out, self.language);
        out.push(',');
        json_int(out, self.pool_id);
        out.push(',');
        json_str(out, self.pool);
        out.push(',');
        json_str(out, self.status);
        out.push(',');
        match self.custom_quoted {
            Some(q) => out.push_str(q),
            None => json_opt_str(out, self.custom),
        }
        out.push(']');
    }
}

/// Appends `s` as a JSON string, the same text as serde_json's: text with nothing to escape
/// (nearly all of it) is copied whole, quotes and backslashes (a custom-values object inside
/// an image) are escaped here, and text with a control character (never in a checked value)
/// is left to serde_json.
fn json_str(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    if json_plain(bytes) {
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    if bytes.iter().any(|&b| b < 0x20) {
        // Writing a string cannot fail.
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
        return;
    }
    out.push('"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' || b == b'\\' {
            // `i` is at an ASCII byte, so both slices end on character boundaries.
            out.push_str(&s[start..i]);
            out.push('\\');
            start = i;
        }
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Whether every byte is printable ASCII (a space to `~`), as nearly all of a roster's text
/// is.
fn printable_ascii(s: &[u8]) -> bool {
    words(s).all(|x| !(any_below(x, 0x20) | (x & HIGHS != 0) | any_is(x, 0x7f)))
}

/// Whether a JSON string holds `s` as it is: no control character, quote or backslash.
fn json_plain(s: &[u8]) -> bool {
    words(s).all(|x| !(any_below(x, 0x20) | any_is(x, b'"') | any_is(x, b'\\')))
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The bytes of `s` eight at a time, as words (the last one filled up with `a`s), for the
/// tests below: a roster's strings are mostly shorter than a vector register, where a
/// byte-by-byte loop is all the compiler makes, and a word tests eight bytes in a few
/// instructions.
fn words(s: &[u8]) -> impl Iterator<Item = u64> + '_ {
    let chunks = s.chunks_exact(8);
    let rest = chunks.remainder();
    let last = (!rest.is_empty()).then(|| {
        let mut w = [b'a'; 8];
        w[..rest.len()].copy_from_slice(rest);
        u64::from_le_bytes(w)
    });
    chunks
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([b'a'; 8])))
        .chain(last)
}

/// Whether a byte of `x` is below `n` (at most 128): a byte below borrows into its top bit,
/// which a byte of 128 or more (`!x`) cannot give.
fn any_below(x: u64, n: u8) -> bool {
    x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS != 0
}

/// Whether a byte of `x` is `b` (a zero byte of `x ^ b…b`).
fn any_is(x: u64, b: u8) -> bool {
    any_below(x ^ (ONES * u64::from(b)), 1)
}

/// `str::trim`, without its character-by-character look at both ends when they are
/// visible ASCII characters (nearly always).
fn trim(s: &str) -> &str {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(f), Some(l)) if f.is_ascii_graphic() && l.is_ascii_graphic() => s,
        _ => s.trim(),
    }
}

fn json_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

fn json_int(out: &mut String, n: i64) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(out, "{n}");
}

/// A user's recorded image as JSON (what `job_changes` holds).
pub fn image_json(u: &User) -> String {
    let mut out = String::with_capacity(256);
    image_of(u).write_json(&mut out);
    out
}

fn image_of(u: &User) -> Image<'_> {
    Image {
        email: &u.email,
        first_name: &u.first_name,
        last_name: &u.last_name,
        job_title: u.job_title.as_deref(),
        team_id: u.team_id,
        team: u.team.as_deref(),
        role: &u.role,
        language: &u.language,
        pool_id: u.pool_id,
        pool: &u.pool,
        status: &u.status,
        custom: u.custom.as_deref(),
        custom_quoted: None,
    }
}

/// The spelling a choice cell is corrected to: one of ours, or the tenant's team or pool.
#[derive(Clone, Copy)]
enum Canon {
    Name(&'static str),
    Team(i64),
    /// Index into `Checker::pools`.
    Pool(usize),
}

/// `s` lowercased into `buf`, as `str::to_lowercase` would (ASCII text, nearly all of it,
/// without a new string).
fn lower_into<'b>(buf: &'b mut String, s: &str) -> &'b str {
    buf.clear();
    if s.is_ascii() {
        buf.push_str(s);
        buf.make_ascii_lowercase();
    } else {
        buf.push_str(&s.to_lowercase());
    }
    buf
}

/// One row's values after the checks that need no database, with whether they passed.
struct Checked {
    row: u32,
    rv: RowValues,
    ok: bool,
    /// Errors this row added (a duplicate also flags the earlier row).
    errors: u64,
}

/// The maps a pass looks up for every row (teams, pools, the emails seen so far). Their
/// hasher is seeded at random per process, as the standard one is, and several times
/// faster on short keys.
type FastMap<K, V> = HashMap<K, V, foldhash::quality::RandomState>;

/// The checks of a row that need no database: normalisation, required cells, formats,
/// choices, lengths and duplicates within the file. It runs on its own thread, ahead of the
/// `Validator` that looks users up and writes, so the two share the work across cores.
struct Checker {
    op: Operation,
    cols: std::sync::Arc<[Column]>,
    limits: crate::config::Limits,
    tenant: Tenant,
    teams: FastMap<String, (i64, String)>,
    pools: Vec<PoolState>,
    pool_index: FastMap<String, usize>,
    /// The pool rows with an empty Licence Pool cell take (index into `pools`).
    default_pool: Option<usize>,
    /// Emails claimed by a row of the file (Email, and New Email in updates):
    /// lowercased email -> (row, whether that row was flagged as duplicate already).
    seen: FastMap<Box<str>, (u32, bool)>,
    out: Outcome,
    norms: BTreeMap<(usize, &'static str), Normalisation>,
    values: Vec<String>,
    row_errors: u64,
    /// The header has the error workbook's Errors column (its cells are ignored).
    errors_column: bool,
    /// Make each new user's records ahead (`RowValues::prepared`): adding, in apply mode.
    prepare_creates: bool,
    /// Team names by id and the custom columns' names, for those records.
    team_names: FastMap<i64, String>,
    custom_keys: CustomKeys,
    /// Scratch for a new user's custom values, as the users table and as an image hold
    /// them, and for the after-image.
    custom_json: String,
    quoted: String,
    after: String,
    /// Scratch for the lowercased key of a team or pool looked up.
    lower: String,
}

impl Checker {
    /// Makes the records of the new users of a batch about to be written (see
    /// `RowValues::prepared`); rows with errors are never written and are left alone.
    fn prepare(&mut self, batch: &mut [Checked]) {
        if !self.prepare_creates {
            return;
        }
        for c in batch
            .iter_mut()
            .filter(|c| c.ok && !c.rv.email().is_empty())
        {
            let rv = &c.rv;
            self.quoted.clear();
            self.custom_json.clear();
            let has_custom = self.custom_keys.json_into(
                rv.custom(),
                &mut self.custom_json,
                Some(&mut self.quoted),
            );
            let custom = has_custom.then_some(self.custom_json.as_str());
            let quoted = has_custom.then_some(self.quoted.as_str());
            let (team, pool) = team_and_pool(&self.team_names, &self.pools, rv);
            self.after.clear();
            create_image(rv, team, pool, custom, quoted).write_json(&mut self.after);
            let rv = &mut c.rv;
            let custom = has_custom.then(|| rv.keep(&self.custom_json));
            let after = rv.keep(&self.after);
            rv.prepared = Some(PreparedCreate { custom, after });
        }
    }

    /// Checks one row; `None` for a row of nothing but spaces.
    fn check(&mut self, raw: &RawRow) -> Option<Checked> {
        let row = raw.index + 1;
        let errors_before = self.out.errors;
        self.row_errors = 0;
        let mut ok = self.normalise(raw, row);
        if self.values.iter().all(String::is_empty) && ok {
            return None;
        }
        self.out.rows += 1;
        // Room for the row's values, the email's key and (adding) the new user's records.
        let given: usize = self.values.iter().map(String::len).sum();
        let room = if self.prepare_creates {
            4 * given + 256
        } else {
            2 * given + 16
        };
        let mut rv = RowValues {
            text: String::with_capacity(room),
            ..RowValues::default()
        };
        ok &= self.resolve(row, &mut rv);
        if !rv.email().is_empty() {
            lower_into(&mut self.lower, rv.email());
            rv.email_norm = rv.keep(&self.lower);
            let email_col = self.col_of(Field::Email);
            ok &= self.claim(rv.email_norm(), rv.email(), row, email_col);
            if let Some(ne) = rv.new_email() {
                let ne_norm = ne.to_lowercase();
                if ne_norm != rv.email_norm() {
                    let c = self.col_of(Field::NewEmail);
                    ok &= self.claim(&ne_norm, ne, row, c);
                }
            }
        }
        Some(Checked {
            row,
            rv,
            ok,
            errors: self.out.errors - errors_before,
        })
    }

    fn note(&mut self, col: usize, kind: &'static str, row: u32, example: impl FnOnce() -> String) {
        let header = &self.cols[col].header;
        self.norms
            .entry((col, kind))
            .and_modify(|n| n.count += 1)
            .or_insert_with(|| Normalisation {
                column: column_letter(col),
                column_name: header.to_string(),
                kind,
                count: 1,
                example_row: row,
                example: example(),
            });
    }

    /// Turns the raw cells into normalised text per column; false when a cell is unusable.
    fn normalise(&mut self, raw: &RawRow, row: u32) -> bool {
        let n = self.cols.len();
        for v in &mut self.values {
            v.clear();
        }
        let mut ok = true;
        for cell in raw.cells() {
            let c = cell.col as usize;
            if c >= n {
                // A value outside the template; the error workbook's column is ignored.
                if c == n && self.errors_column {
                    continue;
                }
                let text = cell_text(cell);
                if text.trim().is_empty() {
                    continue;
                }
                self.problem(
                    Severity::Error,
                    Some(row),
                    None,
                    Some(&text),
                    "value_outside_template",
                    format!(
                        "Column {} has a value but is not a column of the template. Move the value into the right column or delete it.",
                        column_letter(c)
                    ),
                );
                ok = false;
                continue;
            }
            if !self.values[c].is_empty() {
                // Two cells for one column in a row: only a crafted file has that, and joining
                // them could make a value no spreadsheet shows.
                let v = cell_text(cell);
                self.problem(
                    Severity::Error,
                    Some(row),
                    Some(c),
                    Some(&v),
                    "cell_repeated",
                    "The file holds two values for this cell; it is damaged or was not saved by a spreadsheet program. Save it again and upload the new copy.".into(),
                );
                ok = false;
                continue;
            }
            match cell.kind {
                CellKind::Text
                    if cell.text.trim_start().starts_with('#')
                        && EXCEL_ERRORS.contains(&cell.text.trim()) =>
                {
                    // An error value pasted or echoed as text is still not a value.
                    let t = cell.text.trim().to_string();
                    self.problem(Severity::Error, Some(row), Some(c), Some(&t), "cell_error", format!("The cell shows the spreadsheet error {t}. Replace it with a value (a formula's result may be broken)."));
                    ok = false;
                }
                CellKind::Text => {
                    let t = &cell.text;
                    let has_nbsp = !t.is_ascii() && t.contains(['\u{a0}', '\u{2007}', '\u{202f}']);
                    let cleaned: std::borrow::Cow<'_, str> = if has_nbsp {
                        t.replace(['\u{a0}', '\u{2007}', '\u{202f}'], " ").into()
                    } else {
                        t.as_str().into()
                    };
                    let trimmed = trim(&cleaned);
                    if has_nbsp {
                        self.note(c, "non-breaking space replaced by a space", row, || {
                            format!("{t:?} -> {trimmed:?}")
                        });
                    }
                    if trimmed.len() != cleaned.len() {
                        self.note(c, "spaces trimmed", row, || format!("{t:?} -> {trimmed:?}"));
                    }
                    self.values[c].push_str(trimmed);
                }
                CellKind::Int | CellKind::Float => {
                    let s = format_number(cell.num);
                    self.note(c, "number read as text", row, || s.clone());
                    self.values[c].push_str(&s);
                }
                CellKind::Bool => {
                    self.values[c].push_str(if cell.num != 0.0 { "TRUE" } else { "FALSE" });
                }
                CellKind::Date => match excel_date(cell.num) {
                    Some(d) => {
                        self.note(c, "Excel date written as YYYY-MM-DD", row, || {
                            format!("{} -> {d}", cell.num)
                        });
                        self.values[c].push_str(&d);
                    }
                    None => {
                        self.problem(
                            Severity::Error,
                            Some(row),
                            Some(c),
                            Some(&format_number(cell.num)),
                            "invalid_date",
                            "The cell holds a date outside the calendar. Type the value again."
                                .into(),
                        );
                        ok = false;
                    }
                },
                CellKind::DateIso => self.values[c].push_str(cell.text.trim()),
                CellKind::Error => {
                    let t = cell.text.clone();
                    self.problem(Severity::Error, Some(row), Some(c), Some(&t), "cell_error", format!("The cell shows the spreadsheet error {t}. Replace it with a value (a formula's result may be broken)."));
                    ok = false;
                }
                CellKind::TooLong => {
                    let max = self.limits.max_cell_chars;
                    self.problem(
                        Severity::Error,
                        Some(row),
                        Some(c),
                        None,
                        "cell_too_long",
                        format!(
                            "The cell has {} characters; the limit for any cell is {max}.",
                            cell.num as u64
                        ),
                    );
                    ok = false;
                }
            }
        }
        // Control characters (line breaks, tabs inside a value) are never valid here.
        for c in 0..n {
            let v = &self.values[c];
            // ASCII text (nearly all of it) has no control character but C0 and DEL.
            if printable_ascii(v.as_bytes()) {
                continue;
            }
            if let Some(bad) = v.chars().find(|ch| ch.is_control()) {
                let v = self.values[c].clone();
                let message = if self.out.format == "csv" && v.contains(['\n', '\r']) {
                    // The usual cause in a CSV file is a quote opened and never closed.
                    "The value runs over several lines. In a CSV file that happens when a cell opens a quote (\") that is not closed at its end: the lines after it, up to the next quote, are read into this cell. Close or remove the quote (the rows it swallowed are checked once it is fixed), or remove the line breaks.".to_string()
                } else {
                    format!(
                        "The value contains a line break or control character (U+{:04X}). Remove it.",
                        bad as u32
                    )
                };
                self.problem(
                    Severity::Error,
                    Some(row),
                    Some(c),
                    Some(&v),
                    "control_character",
                    message,
                );
                ok = false;
            }
        }
        ok
    }

    /// Validates the normalised values of one column; `None` when invalid (already reported).
    fn resolve(&mut self, row: u32, rv: &mut RowValues) -> bool {
        let mut ok = true;
        let cols = self.cols.clone();
        for (c, col) in cols.iter().enumerate() {
            let raw = std::mem::take(&mut self.values[c]);
            let v = raw.as_str();
            let mut canon: Option<Canon> = None;
            let clear = v.eq_ignore_ascii_case(CLEAR_TOKEN);
            if v.is_empty()
                && col.field == Field::Pool
                && matches!(self.op, Operation::Add | Operation::Reactivate)
                && let Some(i) = self.default_pool
            {
                rv.pool = Some(self.pools[i].id);
                let name = self.pools[i].name.clone();
                self.note(c, "licence pool chosen for the file", row, || name.clone());
                // The row carries the pool as if typed in, so the tenant's rules see it.
                self.values[c] = name;
                continue;
            }
            if v.is_empty() {
                if col.required {
                    self.problem(
                        Severity::Error,
                        Some(row),
                        Some(c),
                        None,
                        "required_missing",
                        format!("{} is required. Fill it in.", col.header),
                    );
                    ok = false;
                }
                self.values[c] = raw;
                continue;
            }
            if clear {
                let clearable = self.op == Operation::Update
                    && (matches!(col.field, Field::JobTitle | Field::Team) || col.clearable);
                if !clearable {
                    let msg = if self.op == Operation::Update {
                        format!(
                            "{} cannot be cleared; only Job Title, Team and your organisation's optional columns can be cleared with {CLEAR_TOKEN}.",
                            col.header
                        )
                    } else {
                        format!(
                            "{CLEAR_TOKEN} is only used in update files to clear a field. Leave the cell empty or give a value."
                        )
                    };
                    self.problem(
                        Severity::Error,
                        Some(row),
                        Some(c),
                        Some(v),
                        "cannot_clear",
                        msg,
                    );
                    ok = false;
                } else if let Field::Custom(n) = col.field {
                    rv.custom.push((n, None));
                } else if col.field == Field::JobTitle {
                    rv.job_title = Some(None);
                } else {
                    rv.team = Some(None);
                }
                self.values[c] = raw;
                continue;
            }
            let chars = v.chars().count();
            if chars > col.max_chars {
                self.problem(
                    Severity::Error,
                    Some(row),
                    Some(c),
                    Some(v),
                    "too_long",
                    format!(
                        "{} has {chars} characters; at most {} are allowed.",
                        col.header, col.max_chars
                    ),
                );
                ok = false;
                self.values[c] = raw;
                continue;
            }
            match col.kind {
                Kind::Custom => {
                    // Checked by the rules worker (declared checks and the scripts').
                    if let Field::Custom(n) = col.field {
                        let kept = rv.keep(v);
                        rv.custom.push((n, Some(kept)));
                    }
                }
                Kind::Email => {
                    if let Err(why) = check_email(v) {
                        self.problem(
                            Severity::Error,
                            Some(row),
                            Some(c),
                            Some(v),
                            "email_invalid",
                            format!("{} is not a valid email address: {why}.", col.header),
                        );
                        ok = false;
                    } else if col.field == Field::Email {
                        rv.email = rv.keep(v);
                    } else {
                        rv.new_email = Some(rv.keep(v));
                    }
                }
                Kind::Text => match col.field {
                    Field::FirstName => rv.first_name = Some(rv.keep(v)),
                    Field::LastName => rv.last_name = Some(rv.keep(v)),
                    Field::JobTitle => rv.job_title = Some(Some(rv.keep(v))),
                    Field::Reason => rv.reason = Some(rv.keep(v)),
                    _ => {}
                },
                Kind::Choice => match col.field {
                    Field::Role => match ROLES.iter().find(|r| r.eq_ignore_ascii_case(v)) {
                        Some(r) => {
                            if *r != v {
                                self.note(c, "case of value corrected", row, || {
                                    format!("{v:?} -> {r:?}")
                                });
                            }
                            rv.role = Some(r);
                            canon = Some(Canon::Name(r));
                        }
                        None => {
                            self.problem(
                                Severity::Error,
                                Some(row),
                                Some(c),
                                Some(v),
                                "invalid_choice",
                                format!("Role must be one of {}.", ROLES.join(", ")),
                            );
                            ok = false;
                        }
                    },
                    Field::Language => match LANGUAGES.iter().find(|(name, code)| {
                        name.eq_ignore_ascii_case(v) || code.eq_ignore_ascii_case(v)
                    }) {
                        Some((name, _)) => {
                            if *name != v {
                                self.note(c, "language written as its name", row, || {
                                    format!("{v:?} -> {name:?}")
                                });
                            }
                            rv.language = Some(name);
                            canon = Some(Canon::Name(name));
                        }
                        None => {
                            self.problem(Severity::Error, Some(row), Some(c), Some(v), "invalid_choice", format!("Language must be one of the drop-down's languages (for example {}).", LANGUAGES.iter().take(6).map(|l| l.0).collect::<Vec<_>>().join(", ")));
                            ok = false;
                        }
                    },
                    Field::Team => match self.teams.get(lower_into(&mut self.lower, v)) {
                        Some(&(id, ref name)) => {
                            if name != v {
                                let name = name.clone();
                                self.note(c, "case of value corrected", row, || {
                                    format!("{v:?} -> {name:?}")
                                });
                            }
                            rv.team = Some(Some(id));
                            canon = Some(Canon::Team(id));
                        }
                        None => {
                            let mut names: Vec<&str> =
                                self.teams.values().map(|t| t.1.as_str()).collect();
                            names.sort_unstable();
                            let list = if names.is_empty() {
                                "it has no teams yet".to_string()
                            } else {
                                format!(
                                    "its teams: {}{}",
                                    names
                                        .iter()
                                        .take(10)
                                        .cloned()
                                        .collect::<Vec<_>>()
                                        .join(", "),
                                    if names.len() > 10 { ", ..." } else { "" }
                                )
                            };
                            let msg = format!(
                                "There is no team \"{v}\" in {} ({list}). Choose a team from the drop-down, or ask an operator to create it.",
                                self.tenant.name
                            );
                            self.problem(
                                Severity::Error,
                                Some(row),
                                Some(c),
                                Some(v),
                                "unknown_team",
                                msg,
                            );
                            ok = false;
                        }
                    },
                    Field::Pool => match self.pool_index.get(lower_into(&mut self.lower, v)) {
                        Some(&i) => {
                            if self.pools[i].name != v {
                                let name = self.pools[i].name.clone();
                                self.note(c, "case of value corrected", row, || {
                                    format!("{v:?} -> {name:?}")
                                });
                            }
                            rv.pool = Some(self.pools[i].id);
                            canon = Some(Canon::Pool(i));
                        }
                        None => {
                            let names: Vec<&str> =
                                self.pools.iter().map(|p| p.name.as_str()).collect();
                            let msg = format!(
                                "There is no licence pool \"{v}\" in {} (its pools: {}). Choose a pool from the drop-down.",
                                self.tenant.name,
                                if names.is_empty() {
                                    "none yet".to_string()
                                } else {
                                    names.join(", ")
                                }
                            );
                            self.problem(
                                Severity::Error,
                                Some(row),
                                Some(c),
                                Some(v),
                                "unknown_pool",
                                msg,
                            );
                            ok = false;
                        }
                    },
                    _ => {}
                },
            }
            // The rules see the corrected spelling ("manager" -> "Manager"), written into the
            // row's own buffer (kept for the next row).
            let mut raw = raw;
            if let Some(canon) = canon {
                let name = match canon {
                    Canon::Name(name) => name,
                    Canon::Team(id) => self.team_names.get(&id).map_or("", String::as_str),
                    Canon::Pool(i) => self.pools[i].name.as_str(),
                };
                raw.clear();
                raw.push_str(name);
            }
            self.values[c] = raw;
        }
        ok
    }

    /// Passes a full batch through the rules worker, if any: sends it, and returns the
    /// batches whose findings are merged and that can go on (the previous one; at the end,
    /// this one too). The worker checks one batch while this thread reads the next.
    fn through_rules(
        &mut self,
        stage: &mut Option<RulesStage>,
        batch: Vec<Checked>,
        last: bool,
    ) -> Vec<Vec<Checked>> {
        let Some(st) = stage.as_mut() else {
            return vec![batch];
        };
        let mut ready = Vec::with_capacity(2);
        if let Some(mut prev) = st.inflight.take() {
            self.receive_rules(st, &mut prev);
            ready.push(prev);
        }
        if st.failed {
            st.proc.clear_batch();
            ready.push(batch);
            return ready;
        }
        if !batch.is_empty() {
            match st.proc.send_batch() {
                Ok(()) => st.inflight = Some(batch),
                Err(f) => {
                    self.rules_failed(st, f);
                    ready.push(batch);
                }
            }
        }
        if last && let Some(mut prev) = st.inflight.take() {
            self.receive_rules(st, &mut prev);
            ready.push(prev);
        }
        ready
    }

    fn receive_rules(&mut self, st: &mut RulesStage, batch: &mut [Checked]) {
        if st.failed {
            return;
        }
        match st.proc.receive() {
            Ok(findings) => self.merge_findings(&st.normaliser_of, batch, findings),
            Err(f) => self.rules_failed(st, f),
        }
    }

    /// One error for the file: its rules broke, so it cannot be fully checked.
    fn rules_failed(&mut self, st: &mut RulesStage, f: crate::rules::engine::RuleFailure) {
        st.failed = true;
        let msg = format!(
            "A rule of {} failed, so this file cannot be checked completely: {f}. Nothing was changed. Tell whoever maintains the rules (folder rules/{}).",
            self.tenant.name, st.rules_folder
        );
        self.row_errors = 0;
        self.problem(Severity::Error, None, None, None, "rule_failed", msg);
    }

    /// The declared checks of custom columns on the row just checked (`declared_columns`),
    /// merged as the rules worker's findings are.
    fn check_declared(&mut self, declared: &[(usize, crate::rules::ColumnDecl)], c: &mut Checked) {
        use crate::rules::engine::{Finding, declared_checks};
        let mut found = Vec::new();
        declared_checks(
            declared,
            self.op == Operation::Update,
            &mut self.values,
            &mut found,
        );
        if found.is_empty() {
            return;
        }
        // With each finding, what the worker's answer carries: the cell's value for an
        // error, the value before the correction for a correction.
        let findings = found
            .into_iter()
            .map(|f| {
                let extra = match &f {
                    Finding::Error { col, .. } | Finding::Warning { col, .. } => col
                        .and_then(|i| self.values.get(i))
                        .cloned()
                        .unwrap_or_default(),
                    Finding::Normalised { from, .. } | Finding::CaseCorrected { from, .. } => {
                        from.clone()
                    }
                };
                (c.row, f, extra)
            })
            .collect();
        self.merge_findings(&HashMap::new(), std::slice::from_mut(c), findings);
    }

    fn merge_findings(
        &mut self,
        normaliser_of: &HashMap<usize, String>,
        batch: &mut [Checked],
        findings: Vec<(u32, crate::rules::engine::Finding, String)>,
    ) {
        use crate::rules::engine::Finding;
        let mut i = 0;
        for (row, f, extra) in findings {
            while i < batch.len() && batch[i].row < row {
                i += 1;
            }
            let Some(c) = batch.get_mut(i).filter(|c| c.row == row) else {
                continue;
            };
            self.row_errors = 0;
            let value = (!extra.is_empty()).then_some(extra.as_str());
            match f {
                Finding::Error { col, message } => {
                    self.problem(
                        Severity::Error,
                        Some(row),
                        col,
                        value,
                        "rule_error",
                        message,
                    );
                    c.ok = false;
                    c.errors += 1;
                }
                Finding::Warning { col, message } => {
                    self.problem(
                        Severity::Warning,
                        Some(row),
                        col,
                        value,
                        "rule_warning",
                        message,
                    );
                }
                Finding::Normalised { col, value, from } => {
                    let script = normaliser_of.get(&col).cloned().unwrap_or_default();
                    self.note(col, "changed by the tenant's rules", row, || {
                        format!("{from:?} -> {value:?} ({script})")
                    });
                    set_custom(&self.cols, &mut c.rv, col, value);
                }
                Finding::CaseCorrected { col, value, from } => {
                    self.note(col, "case of value corrected", row, || {
                        format!("{from:?} -> {value:?}")
                    });
                    set_custom(&self.cols, &mut c.rv, col, value);
                }
            }
        }
    }

    /// Records that `email` (lowercased: `key`) is used by `row`; reports both rows when it
    /// was used before.
    fn claim(&mut self, key: &str, email: &str, row: u32, col: Option<usize>) -> bool {
        // One look-up for the usual case, a new email (a duplicate's key is made in vain).
        match self.seen.entry(key.into()) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert((row, false));
                true
            }
            std::collections::hash_map::Entry::Occupied(mut seen) => {
                let (first, flagged) = seen.get_mut();
                let first = *first;
                let first_flagged = std::mem::replace(flagged, true);
                if !first_flagged {
                    // The first row's value as its key holds it (the same lowercased email).
                    self.problem(Severity::Error, Some(first), col, Some(key), "duplicate_in_file", format!("The email {email} appears again in row {row}; each user may appear only once in a file. Keep one of the rows."));
                }
                self.problem(Severity::Error, Some(row), col, Some(email), "duplicate_in_file", format!("The email {email} appears already in row {first}; each user may appear only once in a file. Keep one of the rows."));
                false
            }
        }
    }
}

/// Replaces the value of custom column `col` in a row (after a rule normalised it).
fn set_custom(cols: &[Column], rv: &mut RowValues, col: usize, value: String) {
    if let Some(Field::Custom(n)) = cols.get(col).map(|c| c.field)
        && let Some(i) = rv.custom.iter().position(|(k, _)| *k == n)
    {
        let kept = rv.keep(&value);
        rv.custom[i].1 = Some(kept);
    }
}

/// What `Checker` and `Validator` share: reporting problems against the file's columns.
trait Reporter {
    /// The outcome, this row's error count, the columns and the cap on listed problems.
    fn parts(&mut self) -> (&mut Outcome, &mut u64, &[Column], usize);
    fn columns(&self) -> &[Column];

    #[allow(clippy::too_many_arguments)]
    fn problem(
        &mut self,
        severity: Severity,
        row: Option<u32>,
        col: Option<usize>,
        value: Option<&str>,
        code: &'static str,
        message: String,
    ) {
        let (out, row_errors, cols, cap) = self.parts();
        push_problem(
            out,
            row_errors,
            cols,
            cap,
            (severity, row, col, value, code, message),
        );
    }

    fn col_of(&self, f: Field) -> Option<usize> {
        self.columns().iter().position(|c| c.field == f)
    }
}

impl Reporter for Checker {
    fn parts(&mut self) -> (&mut Outcome, &mut u64, &[Column], usize) {
        let cap = self.limits.max_reported_problems as usize;
        (&mut self.out, &mut self.row_errors, &self.cols, cap)
    }
    fn columns(&self) -> &[Column] {
        &self.cols
    }
}

impl Reporter for Validator<'_> {
    fn parts(&mut self) -> (&mut Outcome, &mut u64, &[Column], usize) {
        let cap = self.limits.max_reported_problems as usize;
        (&mut self.out, &mut self.row_errors, &self.cols, cap)
    }
    fn columns(&self) -> &[Column] {
        &self.cols
    }
}

/// Records a problem in `out`, counting it even when the list is full.
fn push_problem(
    out: &mut Outcome,
    row_errors: &mut u64,
    cols: &[Column],
    cap: usize,
    (severity, row, col, value, code, message): (
        Severity,
        Option<u32>,
        Option<usize>,
        Option<&str>,
        &'static str,
        String,
    ),
) {
    match severity {
        Severity::Error => {
            out.errors += 1;
            *row_errors += 1;
        }
        Severity::Warning => out.warnings += 1,
    }
    if out.problems.len() >= cap {
        return;
    }
    out.problems.push(Problem {
        severity,
        sheet: out.sheet.clone(),
        row,
        column: col.map(column_letter),
        column_name: col.and_then(|c| cols.get(c)).map(|c| c.header.to_string()),
        value: value.map(|v| v.chars().take(200).collect()),
        code,
        message,
    });
}

/// The checks of a row that need the roster (does the user exist, in which state), the
/// effect of each row, the licence counts, and — in apply mode — the writes.
struct Validator<'c> {
    conn: &'c Connection,
    op: Operation,
    mode: Mode,
    cols: std::sync::Arc<[Column]>,
    limits: crate::config::Limits,
    tenant: Tenant,
    teams: FastMap<String, (i64, String)>,
    /// Team names by id (the after-images name the team).
    team_names: FastMap<i64, String>,
    pools: Vec<PoolState>,
    pool_index: FastMap<String, usize>,
    /// The pool chosen for the file (index into `pools`), when one was and it exists.
    default_pool: Option<usize>,
    find_user: Statement<'c>,
    writer: Option<Writer<'c>>,
    out: Outcome,
    now: String,
    row_errors: u64,
    /// Errors the `Checker` found in the rows received so far.
    checker_errors: u64,
    /// The custom columns' names, by their number (`Field::Custom(n)`).
    custom_keys: CustomKeys,
    /// Which custom columns name a user (checked against the roster, then the file).
    custom_refs: Vec<bool>,
    /// Values of such columns that name no existing user: (row, column, value).
    pending_refs: Vec<(u32, usize, String)>,
}

struct Writer<'c> {
    job_id: i64,
    insert: Statement<'c>,
    update: Statement<'c>,
    set_status: Statement<'c>,
    delete: Statement<'c>,
    change: Statement<'c>,
    before: String,
    after: String,
}

impl<'c> Validator<'c> {
    fn new(
        conn: &'c Connection,
        req: &Request<'_>,
        cols: &[Column],
        limits: &crate::config::Limits,
    ) -> AppResult<Validator<'c>> {
        let teams: FastMap<String, (i64, String)> = db::list_teams(conn, req.tenant.id)?
            .into_iter()
            .map(|t| (db::norm(&t.name), (t.id, t.name)))
            .collect();
        let team_names = teams.values().map(|(id, n)| (*id, n.clone())).collect();
        let mut pools = Vec::new();
        let mut pool_index = FastMap::default();
        for p in db::list_pools(conn, req.tenant.id)? {
            pool_index.insert(db::norm(&p.name), pools.len());
            pools.push(PoolState {
                id: p.id,
                name: p.name,
                seats: p.seats,
                used: p.used,
                freed: 0,
                needed: 0,
            });
        }
        let find_user = conn.prepare(&format!(
            "SELECT {USER_COLUMNS} FROM {USER_FROM} WHERE u.tenant_id = ?1 AND u.email_norm = ?2"
        ))?;
        let writer = match req.mode {
            Mode::DryRun => None,
            Mode::Apply { job_id } => Some(Writer {
                job_id,
                insert: conn.prepare(
                    "INSERT INTO users (tenant_id, email, email_norm, first_name, last_name, job_title, team_id, role, language, pool_id, status, custom, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'active', ?12, ?11, ?11)",
                )?,
                update: conn.prepare(
                    "UPDATE users SET email = ?2, email_norm = ?3, first_name = ?4, last_name = ?5, job_title = ?6, team_id = ?7, role = ?8, language = ?9, pool_id = ?10, updated_at = ?11, custom = ?12 WHERE id = ?1",
                )?,
                set_status: conn.prepare(
                    "UPDATE users SET status = ?2, pool_id = ?3, updated_at = ?4 WHERE id = ?1",
                )?,
                delete: conn.prepare("DELETE FROM users WHERE id = ?1")?,
                change: conn.prepare(
                    "INSERT INTO job_changes (job_id, row_number, user_id, action, before, after, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?,
                before: String::with_capacity(512),
                after: String::with_capacity(512),
            }),
        };
        let out = Outcome::new(req.op);
        let default_pool = req
            .default_pool
            .and_then(|name| pool_index.get(&db::norm(name)).copied());
        Ok(Validator {
            conn,
            op: req.op,
            mode: req.mode,
            cols: cols.into(),
            limits: limits.clone(),
            tenant: req.tenant.clone(),
            teams,
            team_names,
            pools,
            pool_index,
            default_pool,
            find_user,
            writer,
            out,
            now: db::now(),
            row_errors: 0,
            checker_errors: 0,
            custom_keys: CustomKeys::new(
                cols.iter()
                    .filter(|c| matches!(c.field, Field::Custom(_)))
                    .map(|c| c.header.clone())
                    .collect(),
            ),
            custom_refs: cols
                .iter()
                .filter(|c| matches!(c.field, Field::Custom(_)))
                .map(|c| c.user_reference)
                .collect(),
            pending_refs: Vec::new(),
        })
    }

    /// The row checker for this file, with its own copy of the tenant's lists.
    fn checker(&self, errors_column: bool) -> Checker {
        let mut out = Outcome::new(self.op);
        out.sheet = self.out.sheet.clone();
        out.format = self.out.format.clone();
        Checker {
            op: self.op,
            cols: self.cols.clone(),
            limits: self.limits.clone(),
            tenant: self.tenant.clone(),
            teams: self.teams.clone(),
            pools: self
                .pools
                .iter()
                .map(|p| PoolState {
                    id: p.id,
                    name: p.name.clone(),
                    seats: p.seats,
                    used: p.used,
                    freed: 0,
                    needed: 0,
                })
                .collect(),
            pool_index: self.pool_index.clone(),
            default_pool: self.default_pool,
            seen: FastMap::default(),
            out,
            norms: BTreeMap::new(),
            values: vec![String::new(); self.cols.len()],
            row_errors: 0,
            errors_column,
            prepare_creates: self.op == Operation::Add && self.writer.is_some(),
            team_names: self.team_names.clone(),
            custom_keys: self.custom_keys.clone(),
            custom_json: String::new(),
            quoted: String::new(),
            after: String::new(),
            lower: String::new(),
        }
    }

    /// Errors found so far, by both halves.
    fn errors_so_far(&self) -> u64 {
        self.out.errors + self.checker_errors
    }

    /// Merges the checker's findings into the outcome.
    fn into_outcome(mut self, mut checker: Checker) -> Outcome {
        // Users named by a custom column must exist or be in the file.
        for (row, col, value) in std::mem::take(&mut self.pending_refs) {
            if checker.seen.contains_key(value.to_lowercase().as_str()) {
                continue;
            }
            let name = self.cols[col].header.clone();
            let msg = format!(
                "{name} names {value}, who is neither a user of {} nor added by this file. Check the spelling, or add that user first.",
                self.tenant.name
            );
            self.row_errors = 0;
            self.problem(
                Severity::Error,
                Some(row),
                Some(col),
                Some(&value),
                "user_reference_unknown",
                msg,
            );
        }
        checker.seen.clear();
        let c = checker.out;
        self.out.rows = c.rows;
        self.out.errors += c.errors;
        self.out.warnings += c.warnings;
        self.out.problems.extend(c.problems);
        self.out
            .problems
            .sort_by_key(|p| (p.row.unwrap_or(0), p.severity));
        self.out
            .problems
            .truncate(self.limits.max_reported_problems as usize);
        self.out.normalisations = checker.norms.into_values().collect();
        self.out.notes.extend(c.notes);
        self.out
    }

    fn check_already_applied(&mut self, sha: &str) -> AppResult<()> {
        let prev: Option<(i64, String, String)> = self
            .conn
            .query_row(
                "SELECT j.id, j.submitted_by, j.finished_at FROM jobs j JOIN uploads u ON u.id = j.upload_id
                 WHERE u.file_sha256 = ?1 AND j.tenant_id = ?2 AND j.operation = ?3 AND j.state = 'succeeded'
                 ORDER BY j.id DESC LIMIT 1",
                params![sha, self.tenant.id, self.op.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Option<String>>(2)?.unwrap_or_default())),
            )
            .optional()?;
        if let Some((job, by, at)) = prev {
            self.problem(
                Severity::Warning,
                None,
                None,
                None,
                "already_applied",
                format!("This same file was already applied on {at} by {by} (job {job}). Submit it again only if that is what you mean."),
            );
        }
        Ok(())
    }

    fn lookup(&mut self, email: &str) -> AppResult<Option<User>> {
        self.lookup_norm(&email.to_lowercase())
    }

    fn lookup_norm(&mut self, email_norm: &str) -> AppResult<Option<User>> {
        Ok(self
            .find_user
            .query_row(params![self.tenant.id, email_norm], db::user_from_row)
            .optional()?)
    }

    fn pool_state(&mut self, id: i64) -> Option<&mut PoolState> {
        self.pools.iter_mut().find(|p| p.id == id)
    }

    fn pool_name(&self, id: i64) -> String {
        pool_name_in(&self.pools, id).to_string()
    }

    fn team_name(&self, id: Option<i64>) -> Option<String> {
        self.team_names.get(&id?).cloned()
    }

    /// Takes one checked row: looks the user up, computes the effect and, when writing and
    /// no error was found so far, writes it.
    fn apply(&mut self, c: &Checked, on_effect: &mut EffectSink<'_>) -> AppResult<()> {
        let Checked {
            row,
            ref rv,
            ok,
            errors,
        } = *c;
        self.checker_errors += errors;
        self.row_errors = 0;
        let email_col = self.col_of(Field::Email);
        if rv.email().is_empty() {
            return Ok(());
        }
        let email = rv.email();
        let email_norm = rv.email_norm();
        // Adding while writing without errors so far: the insert itself finds an existing
        // user (its unique index), which spares a lookup per row.
        let insert_finds_existing =
            self.op == Operation::Add && self.writer.is_some() && self.errors_so_far() == 0;
        let existing = if insert_finds_existing {
            None
        } else {
            self.lookup_norm(email_norm)?
        };
        let effect = match self.op {
            Operation::Add => {
                if let Some(u) = &existing {
                    let hint = exists_hint(u);
                    self.problem(
                        Severity::Error,
                        Some(row),
                        email_col,
                        Some(email),
                        "user_exists",
                        format!("A user with the email {} already exists; {hint}.", u.email),
                    );
                    return Ok(());
                }
                if let Some(p) = rv.pool
                    && let Some(ps) = self.pool_state(p)
                {
                    ps.needed += 1;
                }
                Effect::Create
            }
            _ => {
                let Some(u) = existing.as_ref() else {
                    let msg = format!(
                        "There is no user with the email {email} in {}. Check the spelling{}.",
                        self.tenant.name,
                        if self.op == Operation::Delete {
                            " (the user may have been deleted already)"
                        } else {
                            ""
                        }
                    );
                    self.problem(
                        Severity::Error,
                        Some(row),
                        email_col,
                        Some(email),
                        "user_not_found",
                        msg,
                    );
                    return Ok(());
                };
                match self.op {
                    Operation::Update => self.update_effect(row, u, rv)?,
                    Operation::Deactivate => {
                        if u.status == "deactivated" {
                            self.problem(
                                Severity::Warning,
                                Some(row),
                                email_col,
                                Some(email),
                                "already_deactivated",
                                format!(
                                    "{} is already deactivated; this row changes nothing.",
                                    u.email
                                ),
                            );
                            Effect::Unchanged {
                                reason: "already deactivated".into(),
                            }
                        } else {
                            if let Some(ps) = self.pool_state(u.pool_id) {
                                ps.freed += 1;
                            }
                            Effect::Deactivate
                        }
                    }
                    Operation::Reactivate => {
                        if u.status == "active" {
                            self.problem(
                                Severity::Warning,
                                Some(row),
                                email_col,
                                Some(email),
                                "already_active",
                                format!("{} is already active; this row changes nothing.", u.email),
                            );
                            Effect::Unchanged {
                                reason: "already active".into(),
                            }
                        } else {
                            let pool = rv.pool.unwrap_or(u.pool_id);
                            if let Some(ps) = self.pool_state(pool) {
                                ps.needed += 1;
                            }
                            Effect::Reactivate
                        }
                    }
                    Operation::Delete => {
                        if u.status == "active"
                            && let Some(ps) = self.pool_state(u.pool_id)
                        {
                            ps.freed += 1;
                        }
                        Effect::Delete
                    }
                    Operation::Add => Effect::Create,
                }
            }
        };
        self.check_user_refs(row, rv)?;
        if !ok || self.row_errors > 0 {
            return Ok(());
        }
        if self.writer.is_some() && self.errors_so_far() == 0 {
            let written = self.write(row, rv, email_norm, existing.as_ref(), &effect)?;
            if !written {
                // The insert met an existing user: report it as validation would have.
                if let Some(u) = self.lookup_norm(email_norm)? {
                    self.problem(
                        Severity::Error,
                        Some(row),
                        email_col,
                        Some(email),
                        "user_exists",
                        format!(
                            "A user with the email {} already exists; {}.",
                            u.email,
                            exists_hint(&u)
                        ),
                    );
                }
                return Ok(());
            }
        }
        self.out.totals.count(&effect);
        on_effect(row, email, &effect);
        Ok(())
    }

    /// Notes the values of user-naming custom columns that name no existing user; they
    /// must then be added by the file (checked at the end, in `into_outcome`).
    fn check_user_refs(&mut self, row: u32, rv: &RowValues) -> AppResult<()> {
        for (n, v) in rv.custom() {
            let (Some(v), Some(true)) = (v, self.custom_refs.get(n as usize)) else {
                continue;
            };
            if self.lookup(v)?.is_none() {
                let col = self
                    .cols
                    .iter()
                    .position(|c| c.field == Field::Custom(n))
                    .unwrap_or(0);
                self.pending_refs.push((row, col, v.to_string()));
            }
        }
        Ok(())
    }

    /// A user's custom values with a row's applied (`None` when there are none).
    fn merged_custom(&self, old: Option<&str>, rv: &RowValues) -> Option<String> {
        if old.is_none() {
            return self.custom_keys.json(rv.custom(), None);
        }
        let mut map: serde_json::Map<String, serde_json::Value> = old
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        for (n, v) in rv.custom() {
            let Some(name) = self.custom_keys.names.get(n as usize) else {
                continue;
            };
            match v {
                Some(v) => {
                    map.insert(name.clone(), serde_json::Value::String(v.to_string()));
                }
                None => {
                    map.remove(name);
                }
            }
        }
        (!map.is_empty()).then(|| serde_json::Value::Object(map).to_string())
    }

    fn update_effect(&mut self, row: u32, u: &User, rv: &RowValues) -> AppResult<Effect> {
        let mut changes = Vec::new();
        let mut diff = |field: &'static str, old: Option<String>, new: Option<String>| {
            if old != new {
                changes.push(FieldChange {
                    field: field.into(),
                    old,
                    new,
                });
            }
        };
        if let Some(ne) = rv.new_email() {
            if ne.to_lowercase() != u.email.to_lowercase()
                && let Some(other) = self.lookup(ne)?
            {
                let c = self.col_of(Field::NewEmail);
                self.problem(
                    Severity::Error,
                    Some(row),
                    c,
                    Some(ne),
                    "email_taken",
                    format!(
                        "The new email {ne} belongs to another user ({}). Choose another address.",
                        other.email
                    ),
                );
                return Ok(Effect::Unchanged {
                    reason: String::new(),
                });
            }
            diff("Email", Some(u.email.clone()), Some(ne.to_string()));
        }
        if let Some(v) = rv.first_name() {
            diff(
                "First Name",
                Some(u.first_name.clone()),
                Some(v.to_string()),
            );
        }
        if let Some(v) = rv.last_name() {
            diff("Last Name", Some(u.last_name.clone()), Some(v.to_string()));
        }
        if let Some(v) = rv.job_title() {
            diff("Job Title", u.job_title.clone(), v.map(str::to_string));
        }
        if let Some(v) = rv.team {
            diff("Team", u.team.clone(), self.team_name(v));
        }
        if let Some(v) = rv.role {
            diff("Role", Some(u.role.clone()), Some(v.to_string()));
        }
        if let Some(v) = rv.language {
            diff("Language", Some(u.language.clone()), Some(v.to_string()));
        }
        if let Some(p) = rv.pool
            && p != u.pool_id
        {
            diff(
                "Licence Pool",
                Some(u.pool.clone()),
                Some(self.pool_name(p)),
            );
            if u.status == "active" {
                if let Some(ps) = self.pool_state(u.pool_id) {
                    ps.freed += 1;
                }
                if let Some(ps) = self.pool_state(p) {
                    ps.needed += 1;
                }
            }
        }
        if !rv.custom.is_empty() {
            let old: serde_json::Map<String, serde_json::Value> = u
                .custom
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default();
            for (n, v) in rv.custom() {
                let Some(name) = self.custom_keys.names.get(n as usize) else {
                    continue;
                };
                let before = old.get(name).and_then(|x| x.as_str());
                if before != v {
                    changes.push(FieldChange {
                        field: name.clone().into(),
                        old: before.map(str::to_string),
                        new: v.map(str::to_string),
                    });
                }
            }
        }
        Ok(if changes.is_empty() {
            Effect::Unchanged {
                reason: "every value is already as given".into(),
            }
        } else {
            Effect::Change { changes }
        })
    }

    /// Writes one row's change; `Ok(false)` when an add met an existing user (nothing written).
    fn write(
        &mut self,
        row: u32,
        rv: &RowValues,
        email_norm: &str,
        existing: Option<&User>,
        effect: &Effect,
    ) -> AppResult<bool> {
        let tenant_id = self.tenant.id;
        // The after-image of changed users, built from the existing user and the row.
        let mut after_user = existing.cloned();
        let prepared = rv
            .prepared
            .as_ref()
            .filter(|_| matches!(effect, Effect::Create));
        let new_custom = match (effect, existing) {
            (Effect::Create, _) if prepared.is_some() => None,
            (Effect::Create, _) => self.merged_custom(None, rv),
            (Effect::Change { .. }, Some(u)) => self.merged_custom(u.custom.as_deref(), rv),
            _ => None,
        };
        if let Some(u) = after_user.as_mut() {
            match effect {
                Effect::Change { .. } => {
                    u.custom.clone_from(&new_custom);
                    if let Some(v) = rv.new_email() {
                        u.email = v.to_string();
                    }
                    if let Some(v) = rv.first_name() {
                        u.first_name = v.to_string();
                    }
                    if let Some(v) = rv.last_name() {
                        u.last_name = v.to_string();
                    }
                    if let Some(v) = rv.job_title() {
                        u.job_title = v.map(str::to_string);
                    }
                    if let Some(v) = rv.team {
                        u.team_id = v;
                        u.team = self.team_name(v);
                    }
                    if let Some(v) = rv.role {
                        u.role = v.to_string();
                    }
                    if let Some(v) = rv.language {
                        u.language = v.to_string();
                    }
                    if let Some(p) = rv.pool {
                        u.pool_id = p;
                        u.pool = self.pool_name(p);
                    }
                }
                Effect::Deactivate => u.status = "deactivated".into(),
                Effect::Reactivate => {
                    u.status = "active".into();
                    if let Some(p) = rv.pool {
                        u.pool_id = p;
                        u.pool = self.pool_name(p);
                    }
                }
                _ => {}
            }
        }
        // Borrowed field by field, beside the writer: nothing is copied per row.
        let now = self.now.as_str();
        let (team_name, pool_name) = team_and_pool(&self.team_names, &self.pools, rv);
        let Some(w) = self.writer.as_mut() else {
            return Ok(true);
        };
        w.before.clear();
        w.after.clear();
        let (user_id, action) = match effect {
            Effect::Create => {
                let custom = match prepared {
                    Some(p) => p.custom.map(|s| rv.get(s)),
                    None => new_custom.as_deref(),
                };
                let img = create_image(rv, team_name, pool_name, custom, None);
                let inserted = w.insert.execute(params![
                    tenant_id,
                    img.email,
                    email_norm,
                    img.first_name,
                    img.last_name,
                    img.job_title,
                    img.team_id,
                    img.role,
                    img.language,
                    img.pool_id,
                    now,
                    img.custom
                ]);
                match inserted {
                    Ok(_) => {}
                    // The unique index met an existing user (the statement alone is undone).
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
                    {
                        return Ok(false);
                    }
                    Err(e) => return Err(e.into()),
                }
                let id = self.conn.last_insert_rowid();
                match prepared {
                    Some(p) => w.after.push_str(rv.get(p.after)),
                    None => img.write_json(&mut w.after),
                }
                (id, "create")
            }
            Effect::Unchanged { .. } => {
                let Some(u) = existing else { return Ok(true) };
                image_of(u).write_json(&mut w.before);
                (u.id, "unchanged")
            }
            _ => {
                let Some(u) = existing else { return Ok(true) };
                image_of(u).write_json(&mut w.before);
                match (effect, after_user.as_ref()) {
                    (Effect::Delete, _) => {
                        w.delete.execute([u.id])?;
                        (u.id, "delete")
                    }
                    (Effect::Change { .. }, Some(a)) => {
                        w.update.execute(params![
                            u.id,
                            a.email,
                            a.email.to_lowercase(),
                            a.first_name,
                            a.last_name,
                            a.job_title,
                            a.team_id,
                            a.role,
                            a.language,
                            a.pool_id,
                            now,
                            a.custom
                        ])?;
                        image_of(a).write_json(&mut w.after);
                        (u.id, "change")
                    }
                    (Effect::Deactivate | Effect::Reactivate, Some(a)) => {
                        w.set_status
                            .execute(params![u.id, a.status, a.pool_id, now])?;
                        image_of(a).write_json(&mut w.after);
                        (u.id, effect.label())
                    }
                    _ => return Ok(true),
                }
            }
        };
        let before = (!w.before.is_empty()).then_some(w.before.as_str());
        let after = (!w.after.is_empty()).then_some(w.after.as_str());
        w.change.execute(params![
            w.job_id,
            row,
            user_id,
            action,
            before,
            after,
            rv.reason()
        ])?;
        Ok(true)
    }

    /// The licence forecast, and its error when a pool runs out of seats.
    fn finish(&mut self) {
        let mut short = Vec::new();
        for p in &self.pools {
            if p.needed == 0 && p.freed == 0 {
                continue;
            }
            let free_after = p.seats - p.used + p.freed - p.needed;
            self.out.forecast.push(PoolForecast {
                pool: p.name.clone(),
                seats: p.seats,
                used: p.used,
                freed: p.freed,
                needed: p.needed,
                free_after,
            });
            if free_after < 0 {
                short.push(format!(
                    "Licence pool \"{}\" has {} free seats{} but this file needs {}: {} seats are missing. Remove rows for this pool, free seats by deactivating users, or ask an operator for more seats.",
                    p.name,
                    p.seats - p.used,
                    if p.freed > 0 { format!(" (plus {} freed by this file)", p.freed) } else { String::new() },
                    p.needed,
                    -free_after
                ));
            }
        }
        for msg in short {
            self.problem(
                Severity::Error,
                None,
                self.col_of(Field::Pool),
                None,
                "licence_pool_full",
                msg,
            );
        }
        if let Mode::Apply { .. } = self.mode {
            // Nothing else: the caller commits or rolls back.
        }
        // Errors first within a row, file-level problems first of all.
        self.out
            .problems
            .sort_by_key(|p| (p.row.unwrap_or(0), p.severity));
    }
}

/// The names of a row's team and pool, borrowed (none, and "", when it names none).
fn team_and_pool<'a>(
    team_names: &'a FastMap<i64, String>,
    pools: &'a [PoolState],
    rv: &RowValues,
) -> (Option<&'a str>, &'a str) {
    let team = rv
        .team
        .flatten()
        .and_then(|id| team_names.get(&id))
        .map(String::as_str);
    let pool = rv.pool.map(|p| pool_name_in(pools, p)).unwrap_or("");
    (team, pool)
}

/// The name of pool `id` among `pools` ("" when it is not one of them).
fn pool_name_in(pools: &[PoolState], id: i64) -> &str {
    pools
        .iter()
        .find(|p| p.id == id)
        .map(|p| p.name.as_str())
        .unwrap_or("")
}

/// The custom columns' names, for writing a new user's custom values: the users table keeps
/// them as a JSON object with the keys in the order a JSON map keeps them (by name), and an
/// image holds that text as a JSON string. Each name is written as a key, in both forms,
/// once per pass instead of once per row.
#[derive(Clone)]
struct CustomKeys {
    /// By the column's number (`Field::Custom(n)`).
    names: Vec<String>,
    /// Per column: its name's place among the names in order (the same name, the same place).
    rank: Vec<usize>,
    /// Per column: `"name":`, as JSON writes the key.
    key: Vec<String>,
    /// Per column: the key as it reads inside a JSON string (`\"name\":`).
    quoted_key: Vec<String>,
}

impl CustomKeys {
    fn new(names: Vec<String>) -> CustomKeys {
        let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let rank = names
            .iter()
            .map(|n| sorted.binary_search(&n.as_str()).unwrap_or_default())
            .collect();
        let key: Vec<String> = names
            .iter()
            .map(|n| {
                let mut k = String::new();
                json_str(&mut k, n);
                k.push(':');
                k
            })
            .collect();
        let quoted_key = key.iter().map(|k| quoted_inner(k)).collect();
        CustomKeys {
            names,
            rank,
            key,
            quoted_key,
        }
    }

    /// A new user's custom values as the users table keeps them (`None` when there are
    /// none): the same text as building a `serde_json::Map`, without the map and its copies.
    /// With `quoted`, that text is also appended to it as a JSON string (what
    /// `json_str` would write for it), piece by piece as it is made.
    fn json<'v>(
        &self,
        custom: impl IntoIterator<Item = (u16, Option<&'v str>)>,
        quoted: Option<&mut String>,
    ) -> Option<String> {
        let mut out = String::new();
        self.json_into(custom, &mut out, quoted).then_some(out)
    }

    /// `json`, appended to `out`; false (nothing appended) when there are no values.
    fn json_into<'v>(
        &self,
        custom: impl IntoIterator<Item = (u16, Option<&'v str>)>,
        out: &mut String,
        mut quoted: Option<&mut String>,
    ) -> bool {
        let mut pairs: Vec<(usize, usize, &str)> = custom
            .into_iter()
            .filter_map(|(n, v)| {
                let n = n as usize;
                Some((*self.rank.get(n)?, n, v?))
            })
            .collect();
        if pairs.is_empty() {
            return false;
        }
        // Stable, so a column given twice keeps its last value (as a map insert would).
        pairs.sort_by_key(|p| p.0);
        let room: usize = pairs
            .iter()
            .map(|(_, n, v)| self.key[*n].len() + v.len() + 3)
            .sum();
        let base = out.len();
        out.reserve(2 + room);
        out.push('{');
        if let Some(q) = quoted.as_deref_mut() {
            q.reserve(4 + room + room / 4);
            q.push_str("\"{");
        }
        for (i, &(rank, n, v)) in pairs.iter().enumerate() {
            if pairs.get(i + 1).is_some_and(|next| next.0 == rank) {
                continue;
            }
            if out.len() > base + 1 {
                out.push(',');
                if let Some(q) = quoted.as_deref_mut() {
                    q.push(',');
                }
            }
            out.push_str(&self.key[n]);
            let start = out.len();
            json_str(out, v);
            if let Some(q) = quoted.as_deref_mut() {
                q.push_str(&self.quoted_key[n]);
                if json_plain(v.as_bytes()) {
                    q.push_str("\\\"");
                    q.push_str(v);
                    q.push_str("\\\"");
                } else {
                    q.push_str(&quoted_inner(&out[start..]));
                }
            }
        }
        out.push('}');
        if let Some(q) = quoted {
            q.push_str("}\"");
        }
        true
    }
}

/// `s` as it reads inside a JSON string: what `json_str` writes, without the quotes.
fn quoted_inner(s: &str) -> String {
    let mut q = String::new();
    json_str(&mut q, s);
    q.get(1..q.len().saturating_sub(1))
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sheet::codec::CellKind;

    #[test]
    fn new_custom_values_are_written_as_a_json_map_would_write_them() {
        let names: Vec<String> = ["Zone", "Badge \"No\"", "Émploi", "A\u{1}"]
            .map(String::from)
            .to_vec();
        let custom = vec![
            (0, Some("z\\1".to_string())),
            (1, Some("ça \"va\"\n".to_string())),
            (2, None),
            (3, Some("x".to_string())),
            (9, Some("no such column".to_string())),
            (0, Some("last wins".to_string())),
        ];
        let mut map = serde_json::Map::new();
        for (n, v) in &custom {
            if let (Some(name), Some(v)) = (names.get(*n as usize), v) {
                map.insert(name.clone(), serde_json::Value::String(v.clone()));
            }
        }
        let keys = CustomKeys::new(names);
        let text = serde_json::Value::Object(map).to_string();
        fn borrowed(v: &[(u16, Option<String>)]) -> Vec<(u16, Option<&str>)> {
            v.iter().map(|(n, v)| (*n, v.as_deref())).collect()
        }
        assert_eq!(keys.json(borrowed(&custom), None), Some(text.clone()));
        // Appended after what the buffer holds already.
        let mut out = String::from("[1,");
        assert!(keys.json_into(borrowed(&custom), &mut out, None));
        assert_eq!(out, format!("[1,{text}"));
        // The same text as an image's JSON string, made beside it.
        let mut quoted = String::from("x");
        assert_eq!(
            keys.json(borrowed(&custom), Some(&mut quoted)),
            Some(text.clone())
        );
        assert_eq!(
            quoted,
            format!("x{}", serde_json::to_string(&text).unwrap())
        );
        for (n, v) in [
            (0, "plain"),
            (1, "a \"quote\""),
            (2, "back\\slash"),
            (3, "tab\t"),
        ] {
            let one = [(n, Some(v))];
            let mut quoted = String::new();
            let text = keys.json(one, Some(&mut quoted)).unwrap();
            assert_eq!(quoted, serde_json::to_string(&text).unwrap(), "{v:?}");
        }
        let mut untouched = String::new();
        assert_eq!(keys.json([(2, None)], Some(&mut untouched)), None);
        assert_eq!(untouched, "");
        let mut out = String::from("kept");
        assert!(!keys.json_into([], &mut out, None));
        assert_eq!(out, "kept");
        // Two columns of the same name: the later one's value, as a map keeps it.
        let twice = CustomKeys::new(vec!["B".into(), "A".into(), "B".into()]);
        let given = [(0, Some("1")), (1, Some("2")), (2, Some("3"))];
        assert_eq!(twice.json(given, None).unwrap(), r#"{"A":"2","B":"3"}"#);
    }

    #[test]
    fn images_are_the_text_serde_json_writes_for_their_fields() {
        let texts = [
            "plain",
            "",
            "quote \" and back\\slash",
            "tab\there, line\nbreak, \u{1}\u{1f}\u{7f}",
            "ünïcödé — 東京 \u{a0}",
            "</script>",
        ];
        for (i, t) in texts.iter().enumerate() {
            let some = (i % 2 == 0).then_some(*t);
            let img = Image {
                email: t,
                first_name: t,
                last_name: "Lovelace",
                job_title: some,
                team_id: some.map(|_| -7 * i as i64),
                team: some,
                role: "Learner",
                language: t,
                pool_id: i64::MAX - i as i64,
                pool: t,
                status: "active",
                custom: some,
                custom_quoted: None,
            };
            let tuple = (
                img.email,
                img.first_name,
                img.last_name,
                img.job_title,
                img.team_id,
                img.team,
                img.role,
                img.language,
                img.pool_id,
                img.pool,
                img.status,
                img.custom,
            );
            let mut ours = String::new();
            img.write_json(&mut ours);
            assert_eq!(ours, serde_json::to_string(&tuple).unwrap(), "{t:?}");
            let mut s = String::from("x");
            json_str(&mut s, t);
            assert_eq!(s, format!("x{}", serde_json::to_string(t).unwrap()));
        }
    }

    #[test]
    fn byte_tests_by_word_are_the_byte_by_byte_ones() {
        let printable = |s: &[u8]| s.iter().all(|&b| (0x20..0x7f).contains(&b));
        let plain = |s: &[u8]| s.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\');
        for len in 0..=17 {
            for at in 0..len {
                for filler in [b'a', b' ', 0x7e, 0xc3] {
                    for b in 0..=255u8 {
                        let mut s = vec![filler; len];
                        s[at] = b;
                        assert_eq!(printable_ascii(&s), printable(&s), "{s:?}");
                        assert_eq!(json_plain(&s), plain(&s), "{s:?}");
                    }
                }
            }
        }
        assert!(printable_ascii(b"") && json_plain(b""));
        for s in [
            "Ann-Marie O'Neil",
            "caf\u{e9}",
            "a\"b",
            "C:\\x",
            "tab\there",
            "\u{7f}",
        ] {
            assert_eq!(
                printable_ascii(s.as_bytes()),
                printable(s.as_bytes()),
                "{s}"
            );
            assert_eq!(json_plain(s.as_bytes()), plain(s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn lowercase_keys_match_str_to_lowercase() {
        let mut buf = String::from("left over");
        for s in ["Sales", "ÉQUIPE Nord", "ΣΑΣ", "İstanbul", "", "a-B_c 1"] {
            assert_eq!(lower_into(&mut buf, s), s.to_lowercase());
        }
    }

    #[test]
    fn emails() {
        for ok in [
            "a@b.co",
            "Ada.Lovelace+x@example.com",
            "o'neil@ex-ample.org",
            "jörg@bücher.de",
        ] {
            assert!(check_email(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@",
            "@b.co",
            "a@b",
            "a b@c.com",
            "a@@b.co",
            "a..b@c.com",
            ".a@c.com",
            "a@-b.com",
            "a@b.c",
            "a@b.123",
            "a@b..com",
            "a,b@c.com",
        ] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        // Every sign a name may have before the @, and signs it may not.
        for c in "!#$%&'*+/=?^_`{|}~-".chars() {
            assert!(check_email(&format!("a{c}b@c.com")).is_ok(), "{c}");
        }
        for c in "()<>[]:;\"\\,\u{a0}€".chars() {
            assert!(check_email(&format!("a{c}b@c.com")).is_err(), "{c:?}");
        }
    }

    #[test]
    fn ascii_addresses_are_judged_by_bytes_as_by_characters() {
        // Addresses made of the parts that matter (signs, dots, hyphens, digits, spaces,
        // a non-ASCII letter, quotes), whole and at random, judged both ways.
        let parts = [
            "a", "Z", "0", "9", ".", "..", "-", "@", "_", "+", " ", "\t", "é", "\"", "\\", ",",
            "!", "~", "co", "com", "123", "x-y", "a.b", "@b.co", "@", "é.de",
        ];
        let mut next = crate::test_random(0x2545_f491_4f6c_dd1d);
        let mut judged = 0;
        let mut valid = 0;
        for _ in 0..100_000 {
            let mut s = String::new();
            for _ in 0..next(9) {
                s.push_str(parts[next(parts.len())]);
            }
            if next(2) == 0 {
                s.push('@');
                // Mostly well-formed domains, some with a fault.
                let labels = ["co", "com", "x-y", "b", "123", "", "-a", "é", "q_"];
                for i in 0..1 + next(4) {
                    if i > 0 {
                        s.push('.');
                    }
                    let among = if next(4) == 0 { labels.len() } else { 5 };
                    s.push_str(labels[next(among)]);
                }
            }
            let by_chars = s.is_ascii() && email_problem(&s).is_ok();
            assert_eq!(email_ascii_ok(s.as_bytes()), by_chars, "{s:?}");
            judged += 1;
            valid += usize::from(by_chars);
        }
        let long = format!("{}@example.com", "a".repeat(64));
        let longer = format!("{}@example.com", "a".repeat(65));
        let label = format!("a@{}.com", "b".repeat(64));
        for s in [
            long.as_str(),
            &longer,
            &label,
            "a@b.c0",
            "a@b.00",
            "a@b-.co",
            "a@-b.co",
        ] {
            assert_eq!(
                email_ascii_ok(s.as_bytes()),
                email_problem(s).is_ok(),
                "{s}"
            );
        }
        // The random addresses hit both answers often.
        assert!(
            valid > 1_000 && judged - valid > 1_000,
            "{valid} of {judged}"
        );
    }

    #[test]
    fn numbers_and_dates() {
        assert_eq!(format_number(42.0), "42");
        assert_eq!(format_number(1.5), "1.5");
        assert_eq!(excel_date(45000.0).as_deref(), Some("2023-03-15"));
        assert_eq!(excel_date(45000.5).as_deref(), Some("2023-03-15 12:00:00"));
        assert_eq!(excel_date(-1.0), None);
    }

    fn header(names: &[&str]) -> RawRow {
        let mut r = RawRow::default();
        r.clear(0);
        for (i, n) in names.iter().enumerate() {
            if !n.is_empty() {
                r.push(i as u32, CellKind::Text, n, 0.0);
            }
        }
        r
    }

    #[test]
    fn header_differences_are_named() {
        let cols = model::columns(Operation::Deactivate);
        assert!(check_header(&cols, &header(&["Email", "Reason"])).is_ok());
        assert!(check_header(&cols, &header(&[" email ", "REASON", "Errors"])).is_ok());
        let e = check_header(&cols, &header(&["Reason", "Email"])).unwrap_err();
        assert!(
            e.contains("column \"Reason\" is in column A but belongs in column B"),
            "{e}"
        );
        let e = check_header(&cols, &header(&["Email"])).unwrap_err();
        assert!(
            e.contains("column \"Reason\" (column B of the template) is missing"),
            "{e}"
        );
        let e = check_header(&cols, &header(&["Email", "Why"])).unwrap_err();
        assert!(
            e.contains("column B is \"Why\" but should be \"Reason\""),
            "{e}"
        );
        let e = check_header(&cols, &header(&["Email", "Reason", "Notes"])).unwrap_err();
        assert!(
            e.contains("column C \"Notes\" is not part of the template"),
            "{e}"
        );
    }
}
