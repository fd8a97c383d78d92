//! `rollcall bench`: generates 12-column add files (the 8 built-in columns and 4 custom
//! ones the bench tenant's rules declare; text in sharedStrings, as Excel writes it) and
//! times each stage of the bulk flow against the bare libraries, each stage in its own
//! process so its peak memory (RSS) is its own.
//!
//! Stages: `bare_read` (calamine alone reading every cell), `bare_insert` (SQLite alone
//! inserting the rows into the users table in one transaction), `read` (our worker + the
//! row stream, no validation), `validate` (dry run: read, validate, preview, with the rules
//! worker checking the declared custom columns), `apply` (validate + apply + before/after
//! records on rows made by the generator, not read from the file: the write side alone),
//! `import` (the end-to-end single pass: read, validate, preview, apply), `report` (the
//! results workbook of the import) and `audit` (appending the import's audit entries, one
//! per changed user with every field before and after, to the hash-chained log).
//! `validate_rowrule` and `validate_rules` validate the same file with rules that add one
//! Lua row rule, and a normaliser and two cell checks as well: the differences from
//! `validate` are what Lua costs; `import_rowrule` is the import with the row rule.
//! `lua_engine` times the rules engine alone in-process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rusqlite::params;
use serde::{Deserialize, Serialize};

use crate::bulk::{self, Mode, Request, RowSource};
use crate::config::{Config, Loaded, Overrides};
use crate::db;
use crate::error::{AppError, AppResult};
use crate::model::Operation;
use crate::service::{self, App, ImportOptions};
use crate::sheet::codec::{CellKind, RawRow};
use crate::sheet::reader::{Pace, ReadFailure, ReaderSetup, SheetReader};
use crate::sheet::worker::WorkbookInfo;

pub const STAGE_SUBCOMMAND: &str = "__bench-stage";
const TENANT: &str = "Bench";
const POOL: &str = "Standard";
const TEAMS: [&str; 8] = [
    "Sales",
    "Research",
    "Finance",
    "Operations",
    "Support",
    "Legal",
    "Marketing",
    "Engineering",
];
const FIRST: [&str; 16] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Frances", "Niklaus",
    "Radia", "Tim", "Hedy", "Dennis", "Karen", "John",
];
const LAST: [&str; 16] = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Hamilton",
    "Thompson",
    "Allen",
    "Wirth",
    "Perlman",
    "Berners-Lee",
    "Lamarr",
    "Ritchie",
    "Jones",
    "Backus",
];
const TITLES: [&str; 6] = [
    "Analyst",
    "Engineer",
    "Manager",
    "Consultant",
    "Associate",
    "Director",
];
const ROLES: [&str; 3] = ["Learner", "Learner", "Manager"];
const LANGS: [&str; 4] = ["English", "French", "German", "Spanish"];

/// The values of generated row `i` (0-based), in the add template's column order.
pub fn row_values(i: usize) -> [String; 8] {
    let first = FIRST[i % FIRST.len()];
    let last = LAST[(i / FIRST.len()) % LAST.len()];
    [
        format!(
            "{}.{}.{i}@example.com",
            first.to_lowercase(),
            last.to_lowercase()
        ),
        first.to_string(),
        last.to_string(),
        TITLES[i % TITLES.len()].to_string(),
        TEAMS[i % TEAMS.len()].to_string(),
        ROLES[i % ROLES.len()].to_string(),
        LANGS[i % LANGS.len()].to_string(),
        POOL.to_string(),
    ]
}

/// The four custom columns the bench tenant's rules declare, and their values for row `i`.
const CUSTOM_HEADERS: [&str; 4] = ["Employee ID", "Cost Centre", "Building", "Desk Phone"];
const COST_CENTRES: [&str; 4] = ["CC-100", "CC-200", "CC-300", "CC-900"];

fn custom_values(i: usize) -> [String; 4] {
    [
        format!("ab{:06}", i % 1_000_000),
        COST_CENTRES[i % COST_CENTRES.len()].to_string(),
        format!("B{}", i % 40),
        format!("020 7946 {:04}", i % 10_000),
    ]
}

/// The custom values of row `i` as the users table keeps them (a JSON object).
fn custom_json(i: usize) -> String {
    let map: serde_json::Map<String, serde_json::Value> = CUSTOM_HEADERS
        .iter()
        .zip(custom_values(i))
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// How much Lua the bench tenant's rules run on every row.
#[derive(Clone, Copy, PartialEq)]
enum BenchRules {
    /// The four custom columns declared (required, choices, max_length), no Lua function.
    Declared,
    /// Those and one row rule: the configuration the performance goal is set for.
    RowRule,
    /// Those and a normaliser and two cell checks: four Lua calls per row.
    Full,
}

/// The bench tenant's rules.
fn bench_rules(kind: BenchRules) -> String {
    let mut s = String::from(
        "rollcall.column { name = \"Employee ID\", required = true, max_length = 8 }\n\
         rollcall.column { name = \"Cost Centre\", choices = { \"CC-100\", \"CC-200\", \"CC-300\", \"CC-900\" } }\n\
         rollcall.column { name = \"Building\", max_length = 20 }\n\
         rollcall.column { name = \"Desk Phone\", max_length = 20 }\n",
    );
    if kind != BenchRules::Declared {
        s.push_str(
            "rollcall.check_row(function(row)\n\
               if row[\"Role\"] == \"Manager\" and row[\"Team\"] == \"\" then return \"A Manager must have a team.\" end\n\
             end)\n",
        );
    }
    if kind == BenchRules::Full {
        s.push_str(
            "rollcall.normalise(\"Employee ID\", function(v) return v:upper() end)\n\
             rollcall.check(\"Employee ID\", function(v)\n\
               if not v:match(\"^%u%u%d%d%d%d%d%d$\") then return \"Employee ID must be two letters and six digits.\" end\n\
             end)\n\
             rollcall.check(\"Building\", function(v)\n\
               if #v < 2 then return \"Building is too short.\" end\n\
             end)\n",
        );
    }
    s
}

/// Writes an add file of `rows` rows, the built-in columns then the four custom ones, with
/// shared strings (as Excel writes text).
pub fn generate(path: &Path, rows: usize) -> AppResult<()> {
    let xerr = |e: rust_xlsxwriter::XlsxError| AppError::internal("writing the bench file", e);
    let mut wb = rust_xlsxwriter::Workbook::new();
    let ws = wb.add_worksheet_with_low_memory().map_err(xerr)?;
    ws.set_name(Operation::Add.sheet_name()).map_err(xerr)?;
    for (c, h) in headers().iter().enumerate() {
        ws.write_string(0, c as u16, h).map_err(xerr)?;
    }
    for i in 0..rows {
        let r = u32::try_from(i + 1).map_err(|e| AppError::internal("row number", e))?;
        for (c, v) in row_values(i).iter().enumerate() {
            ws.write_string(r, c as u16, v).map_err(xerr)?;
        }
        for (c, v) in custom_values(i).iter().enumerate() {
            ws.write_string(r, (8 + c) as u16, v).map_err(xerr)?;
        }
    }
    wb.save(path).map_err(xerr)
}

/// One stage's measurement, as printed by the stage process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageResult {
    pub stage: String,
    pub rows: u64,
    pub secs: f64,
    /// CPU time (user + system) of the stage's process and of the workers it waited for,
    /// over the same span as `secs`.
    #[serde(default)]
    pub cpu_secs: f64,
    /// Peak RSS of the stage's own process, MiB.
    pub rss_mib: f64,
    /// Peak RSS of its parsing worker (0 when it has none), MiB.
    pub worker_rss_mib: f64,
    /// Size of the audit log written (the `audit` stage), bytes.
    #[serde(default)]
    pub audit_bytes: u64,
    /// CPU time of the rules worker (the `validate_*` stages), seconds.
    #[serde(default)]
    pub rules_cpu_secs: f64,
    /// Seconds before the first cell of the data sheet could be read: `bare_read`, calamine
    /// opening the workbook (it reads the shared strings whole first); `read`, the first
    /// data row reaching the parent. `apply` and `import`: seconds before the writer had
    /// written its first batch of rows (in the import, after storing the upload, recording
    /// and starting the job). 0 for the other stages.
    #[serde(default)]
    pub first_row_secs: f64,
    /// `apply` and `import`: seconds from the writer's last batch written to the stage's end
    /// (the pass's commit; in the import also the helpers' end, the job's records and the
    /// queue's look at what is next). 0 for the other stages.
    #[serde(default)]
    pub after_last_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageArgs {
    pub stage: String,
    pub file: PathBuf,
    pub data_dir: PathBuf,
    pub rows: usize,
}

fn open_app(data_dir: &Path) -> AppResult<App> {
    let loaded = Config::load_from(
        &Overrides {
            data_dir: Some(data_dir.to_path_buf()),
            ..Default::default()
        },
        // The page cache can be tried out: ROLLCALL_DATABASE_CACHE_MIB=256 rollcall bench ...
        &std::env::vars()
            .filter(|(k, _)| k == "ROLLCALL_DATABASE_CACHE_MIB")
            .collect::<Vec<_>>(),
        None,
    )?;
    let exe = std::env::current_exe().map_err(|e| AppError::internal("finding the binary", e))?;
    Ok(App::open(
        &Loaded {
            config: loaded.config,
            file: None,
            warnings: vec![],
        },
        exe,
    )?)
}

/// A fresh data directory with the bench tenant, its teams, a pool large enough and its
/// rules (loaded and audited, the entry appended to the log, before anything is timed, as a
/// running server has them: a stage must not append the setup's entries).
fn prepare(data_dir: &Path, rows: usize, rules: BenchRules) -> AppResult<App> {
    let _ = std::fs::remove_dir_all(data_dir);
    let app = open_app(data_dir)?;
    let t = db::create_tenant(&app.conn, TENANT)?;
    for team in TEAMS {
        db::add_team(&app.conn, t.id, team)?;
    }
    db::set_pool(&app.conn, t.id, POOL, rows as i64 + 10)?;
    let dir = app.data.rules_dir().join(crate::rules::folder_name(TENANT));
    std::fs::create_dir_all(&dir).map_err(|e| AppError::internal("bench rules", e))?;
    std::fs::write(dir.join("bench.lua"), bench_rules(rules))
        .map_err(|e| AppError::internal("bench rules", e))?;
    service::active_rules(&app, &t)?;
    service::flush_audit(&app)?;
    // Only what the timed part does counts.
    use std::sync::atomic::Ordering::Relaxed;
    crate::sheet::reader::MAX_WORKER_PEAK_KIB.store(0, Relaxed);
    crate::rules::client::RULES_WORKER_PEAK_KIB.store(0, Relaxed);
    crate::rules::client::RULES_WORKER_CPU_MS.store(0, Relaxed);
    Ok(app)
}

/// The headers of the bench file.
fn headers() -> Vec<String> {
    let mut h: Vec<String> = crate::model::columns(Operation::Add)
        .into_iter()
        .map(|c| c.header)
        .collect();
    h.extend(CUSTOM_HEADERS.map(String::from));
    h
}

/// Rows made on the fly by the same generator as the file (and as `bare_insert`), to time
/// the write side alone without holding a million rows in memory.
struct GeneratedSource {
    info: WorkbookInfo,
    headers: Vec<String>,
    next: usize,
    rows: usize,
}

impl RowSource for GeneratedSource {
    fn info(&self) -> &WorkbookInfo {
        &self.info
    }
    fn next_row(&mut self, row: &mut RawRow) -> Result<bool, ReadFailure> {
        let i = self.next;
        if i > self.rows {
            return Ok(false);
        }
        self.next += 1;
        row.clear(i as u32);
        if i == 0 {
            for (c, h) in self.headers.iter().enumerate() {
                row.push(c as u32, CellKind::Text, h, 0.0);
            }
        } else {
            let values = row_values(i - 1).into_iter().chain(custom_values(i - 1));
            for (c, v) in values.enumerate() {
                row.push(c as u32, CellKind::Text, &v, 0.0);
            }
        }
        Ok(true)
    }
}

/// Wall and CPU time of one measured span.
struct Timer {
    wall: Instant,
    cpu: f64,
}

impl Timer {
    fn start() -> Self {
        Timer {
            wall: Instant::now(),
            cpu: cpu_secs(),
        }
    }

    /// Seconds since the start: wall clock, and CPU (this process and its reaped children).
    fn stop(&self) -> (f64, f64) {
        (
            self.wall.elapsed().as_secs_f64(),
            (cpu_secs() - self.cpu).max(0.0),
        )
    }
}

/// When the writer wrote its first and its last batch of rows (from the pass's progress
/// callback), in wall-clock seconds since the stage's start.
#[derive(Default)]
struct Batches {
    first: std::cell::Cell<Option<f64>>,
    last: std::cell::Cell<f64>,
}

impl Batches {
    fn written(&self, start: &Timer) {
        let now = start.wall.elapsed().as_secs_f64();
        if self.first.get().is_none() {
            self.first.set(Some(now));
        }
        self.last.set(now);
    }

    /// Seconds before the first batch, and from the last batch to `end`.
    fn head_and_tail(&self, end: f64) -> (f64, f64) {
        let last = self.last.get();
        (
            self.first.get().unwrap_or_default(),
            if last > 0.0 { end - last } else { 0.0 },
        )
    }
}

/// User plus system CPU seconds of this process and of its children that were waited for.
fn cpu_secs() -> f64 {
    let secs = |who| {
        // SAFETY: getrusage fills the struct we own.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut u) } != 0 {
            return 0.0;
        }
        let t = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        t(u.ru_utime) + t(u.ru_stime)
    };
    secs(libc::RUSAGE_SELF) + secs(libc::RUSAGE_CHILDREN)
}

/// Runs one stage in this process and returns its measurement.
pub fn run_stage(a: &StageArgs) -> AppResult<StageResult> {
    let op = Operation::Add;
    let file_name = "bench.xlsx";
    let mut rows = 0u64;
    let mut audit_bytes = 0u64;
    let mut first_row_secs = 0.0;
    let mut after_last_secs = 0.0;
    let secs;
    let cpu;
    match a.stage.as_str() {
        "bare_read" => {
            let start = Timer::start();
            let mut wb: calamine::Xlsx<_> =
                calamine::open_workbook(&a.file).map_err(|e| AppError::internal("bare read", e))?;
            first_row_secs = start.stop().0;
            let mut cells = wb
                .worksheet_cells_reader(&op.sheet_name())
                .map_err(|e| AppError::internal("bare read", e))?;
            let mut chars = 0usize;
            let mut last_row = 0;
            while let Some(c) = cells
                .next_cell()
                .map_err(|e| AppError::internal("bare read", e))?
            {
                if let calamine::DataRef::SharedString(s) = c.get_value() {
                    chars += s.len();
                }
                last_row = c.get_position().0;
            }
            std::hint::black_box(chars);
            rows = u64::from(last_row);
            (secs, cpu) = start.stop();
        }
        "bare_insert" | "bare_insert_changes" => {
            // The second also records each insert as a job change with its after-image (the
            // shape `apply` writes): SQLite's own cost of keeping before/after values.
            let changes = a.stage == "bare_insert_changes";
            let app = prepare(&a.data_dir, a.rows, BenchRules::Declared)?;
            let (tenant_id, pool_id): (i64, i64) =
                app.conn
                    .query_row("SELECT tenant_id, id FROM licence_pools", [], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?;
            let teams: Vec<i64> = db::list_teams(&app.conn, tenant_id)?
                .into_iter()
                .map(|t| t.id)
                .collect();
            let job_id = if changes {
                app.conn.execute(
                    "INSERT INTO uploads (tenant_id, operation, file_name, file_sha256, file_size, stored_path, status, uploaded_by, uploaded_at) VALUES (?1, 'add', 'bench', '', 0, '', 'validated', 'bench', ?2)",
                    params![tenant_id, db::now()],
                )?;
                let upload = app.conn.last_insert_rowid();
                app.conn.execute(
                    "INSERT INTO jobs (tenant_id, upload_id, operation, state, submitted_by, submitted_at) VALUES (?1, ?2, 'add', 'running', 'bench', ?3)",
                    params![tenant_id, upload, db::now()],
                )?;
                app.conn.last_insert_rowid()
            } else {
                0
            };
            let start = Timer::start();
            let tx = app.conn.unchecked_transaction()?;
            {
                let mut change = tx.prepare(
                    "INSERT INTO job_changes (job_id, row_number, user_id, action, before, after, note) VALUES (?1, ?2, ?3, 'create', NULL, ?4, NULL)",
                )?;
                let mut st = tx.prepare(
                    "INSERT INTO users (tenant_id, email, email_norm, first_name, last_name, job_title, team_id, role, language, pool_id, status, custom, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'active', ?11, ?12, ?12)",
                )?;
                let now = db::now();
                for i in 0..a.rows {
                    let v = row_values(i);
                    let team = teams[i % teams.len()];
                    let custom = custom_json(i);
                    st.execute(params![
                        tenant_id,
                        v[0],
                        v[0].to_lowercase(),
                        v[1],
                        v[2],
                        v[3],
                        team,
                        v[5],
                        v[6],
                        pool_id,
                        custom,
                        now
                    ])?;
                    if changes {
                        let user_id = tx.last_insert_rowid();
                        // The generated values need no escaping but the custom JSON's quotes.
                        let after = format!(
                            r#"["{}","{}","{}","{}",{team},"{}","{}","{}",{pool_id},"{POOL}","active","{}"]"#,
                            v[0],
                            v[1],
                            v[2],
                            v[3],
                            v[4],
                            v[5],
                            v[6],
                            custom.replace('"', "\\\"")
                        );
                        change.execute(params![job_id, i as i64 + 2, user_id, after])?;
                    }
                    rows += 1;
                }
            }
            tx.commit()?;
            (secs, cpu) = start.stop();
        }
        "read" => {
            let setup = ReaderSetup::current(&crate::config::Limits::default())
                .map_err(|e| AppError::internal("bench", e))?;
            let start = Timer::start();
            let mut r =
                SheetReader::open(&setup, &a.file, file_name, &op.sheet_name(), Pace::Ahead)
                    .map_err(|e| AppError::internal("read", e))?;
            let mut row = RawRow::default();
            while r
                .next_row(&mut row)
                .map_err(|e| AppError::internal("read", e))?
            {
                rows += 1;
                // The header is the first row; the first data row follows it.
                if rows == 2 {
                    first_row_secs = start.stop().0;
                }
            }
            rows = rows.saturating_sub(1);
            (secs, cpu) = start.stop();
        }
        "validate" | "preview" | "validate_rowrule" | "validate_rules" => {
            let rules = match a.stage.as_str() {
                "validate" | "preview" => BenchRules::Declared,
                "validate_rowrule" => BenchRules::RowRule,
                _ => BenchRules::Full,
            };
            let app = prepare(&a.data_dir, a.rows, rules)?;
            let t = db::tenant(&app.conn, TENANT)?;
            let preview = a.stage == "preview";
            let start = Timer::start();
            // preview: `rollcall validate --json`, its output thrown away: every row's
            // effect kept (spooled, as the command does) and the document written.
            let mut effects = crate::cli::Effects::new(
                preview.then_some(crate::cli::SpoolAs::Json),
                &app.data.tmp_dir(),
            )?;
            let o = service::validate(
                &app,
                &t,
                op,
                &a.file,
                file_name,
                &mut |row, email, e| {
                    if preview {
                        effects.push(row, email, e);
                    }
                },
                &mut |_| {},
            )?;
            if preview {
                crate::cli::print_json(&mut std::io::sink(), &o, &mut effects, None, false)?;
            }
            drop(effects);
            (secs, cpu) = start.stop();
            check_valid(&o)?;
            rows = o.rows;
        }
        "lua_engine" => {
            // The rules engine alone, in this process: the same rules on the same values,
            // without the file, the pipe or the other checks.
            let op = Operation::Add;
            let builtin: Vec<String> = crate::model::columns(op)
                .into_iter()
                .map(|c| c.header)
                .collect();
            let mut engine = crate::rules::engine::Engine::load(
                &[crate::rules::Script {
                    name: "bench.lua".into(),
                    source: bench_rules(BenchRules::Full),
                }],
                &crate::rules::Context::default(),
                op,
                &builtin,
                crate::rules::client::engine_limits(&crate::config::Limits::default()),
                crate::rules::engine::CallState::new(),
                None,
            )
            .map_err(|p| AppError::internal("bench rules", format!("{p:?}")))?;
            let mut values: Vec<String> = Vec::with_capacity(12);
            let mut findings = Vec::new();
            let start = Timer::start();
            for i in 0..a.rows {
                values.clear();
                values.extend(row_values(i));
                values.extend(custom_values(i));
                findings.clear();
                engine
                    .check_row(i as u32 + 2, &mut values, &mut findings)
                    .map_err(|f| AppError::internal("bench rules", f))?;
                rows += 1;
            }
            (secs, cpu) = start.stop();
        }
        "apply" => {
            let app = prepare(&a.data_dir, a.rows, BenchRules::Declared)?;
            let t = db::tenant(&app.conn, TENANT)?;
            let active = service::active_rules(&app, &t)?;
            let db_path = app.data.database();
            let mut source = GeneratedSource {
                headers: headers(),
                info: WorkbookInfo {
                    format: "generated".into(),
                    sheets: vec![],
                    data_sheet: Some(op.sheet_name()),
                    meta: None,
                    notes: vec![],
                    estimated_rows: None,
                },
                next: 0,
                rows: a.rows,
            };
            let start = Timer::start();
            let tx = app.conn.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO uploads (tenant_id, operation, file_name, file_sha256, file_size, stored_path, status, uploaded_by, uploaded_at) VALUES (?1, 'add', 'bench', '', 0, '', 'validated', 'bench', ?2)",
                params![t.id, db::now()],
            )?;
            let upload = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO jobs (tenant_id, upload_id, operation, state, submitted_by, submitted_at) VALUES (?1, ?2, 'add', 'running', 'bench', ?3)",
                params![t.id, upload, db::now()],
            )?;
            let job_id = tx.last_insert_rowid();
            let req = Request {
                default_pool: None,
                rules: service::rules_input(&app, active.as_ref(), &db_path),
                tenant: &t,
                op,
                path: &a.file,
                file_name,
                file_sha256: None,
                mode: Mode::Apply { job_id },
                estimate: None,
            };
            let batches = Batches::default();
            let o = bulk::process_rows(
                &tx,
                &app.config.limits,
                &req,
                &mut source,
                &mut |_, _, _| {},
                &mut |_| batches.written(&start),
            )?;
            check_valid(&o)?;
            tx.commit()?;
            (secs, cpu) = start.stop();
            (first_row_secs, after_last_secs) = batches.head_and_tail(secs);
            rows = o.rows;
        }
        "import" | "import_rowrule" | "report" | "audit" => {
            let rules = if a.stage == "import_rowrule" {
                BenchRules::RowRule
            } else {
                BenchRules::Declared
            };
            let mut app = prepare(&a.data_dir, a.rows, rules)?;
            let t = db::tenant(&app.conn, TENANT)?;
            let start = Timer::start();
            let batches = Batches::default();
            let r = service::import(
                &mut app,
                &t,
                op,
                &a.file,
                file_name,
                ImportOptions {
                    results_workbook: false,
                    flush_audit: false,
                    ..ImportOptions::default()
                },
                &mut |_, _, _| {},
                &mut |_| batches.written(&start),
            )?;
            let import = start.stop();
            (first_row_secs, after_last_secs) = batches.head_and_tail(import.0);
            check_valid(&r.outcome)?;
            rows = r.outcome.rows;
            (secs, cpu) = if a.stage == "import" || a.stage == "import_rowrule" {
                import
            } else if a.stage == "audit" {
                let start = Timer::start();
                service::flush_audit(&app)?;
                let measured = start.stop();
                audit_bytes = crate::audit::files(&app.data.audit_dir())?
                    .iter()
                    .filter_map(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum();
                measured
            } else {
                let job = r.job_id;
                let start = Timer::start();
                crate::sheet::report::write_results_workbook(
                    &app.conn,
                    job,
                    "Add users",
                    &app.data.results_report(job),
                )?;
                start.stop()
            };
        }
        other => return Err(AppError::Usage(format!("unknown bench stage {other}"))),
    }
    Ok(StageResult {
        stage: a.stage.clone(),
        rows,
        secs,
        cpu_secs: cpu,
        audit_bytes,
        rss_mib: crate::sheet::codec::peak_rss_kib() as f64 / 1024.0,
        worker_rss_mib: crate::sheet::reader::MAX_WORKER_PEAK_KIB
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(
                crate::rules::client::RULES_WORKER_PEAK_KIB
                    .load(std::sync::atomic::Ordering::Relaxed),
            ) as f64
            / 1024.0,
        rules_cpu_secs: crate::rules::client::RULES_WORKER_CPU_MS
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1000.0,
        first_row_secs,
        after_last_secs,
    })
}

/// The slowest of several timings of the same work over the fastest (`None` for fewer
/// than two, or a timing that is not a positive number).
fn slowest_over_fastest(secs: &[f64]) -> Option<f64> {
    if secs.len() < 2 || secs.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return None;
    }
    let fastest = secs.iter().copied().fold(f64::INFINITY, f64::min);
    let slowest = secs.iter().copied().fold(0.0, f64::max);
    Some(slowest / fastest)
}

/// The median of `values` (of an even count, the lower middle one; NaN when empty).
fn lower_median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}

/// The median of `values` with a distribution-free 95% interval for the true median: the
/// order statistics x(k) and x(n+1-k), for the largest k with P(Binomial(n, 1/2) < k) at
/// most 2.5%. It holds whatever the timings' distribution (a busy machine's timings are
/// skewed, with rare long runs). `None` for fewer than six values (no interval that wide
/// exists) or a value that is not a number.
fn median_interval(values: &[f64]) -> Option<(f64, f64, f64)> {
    let n = values.len();
    if n < 6 || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    // P(B < k) summed term by term in logarithms (0.5^n underflows past n = 1074).
    let mut ln_term = -(n as f64) * std::f64::consts::LN_2; // ln P(B = 0)
    let mut below = 0.0; // P(B < k)
    let mut k = 0;
    while k < n / 2 {
        let next = below + ln_term.exp();
        if next > 0.025 {
            break;
        }
        below = next;
        k += 1;
        ln_term += ((n - k + 1) as f64 / k as f64).ln();
    }
    // k >= 1 for n >= 6 (P(B = 0) = 1/64 at n = 6).
    let k = k.max(1);
    Some((v[(n - 1) / 2], v[k - 1], v[n - k]))
}

/// One goal judged by its rounds: the median ratio, its 95% interval, and whether the whole
/// interval lies within the goal ("met"), beyond it ("missed"), or across it.
fn judged(ratios: &[f64], goal: f64) -> String {
    match median_interval(ratios) {
        Some((median, lo, hi)) => {
            let verdict = if hi <= goal {
                "met"
            } else if lo > goal {
                "missed"
            } else {
                "not settled: run again with a larger --repeat"
            };
            format!("{median:.2} (95% interval {lo:.2}-{hi:.2}, goal {goal}: {verdict})")
        }
        None => format!(
            "{:.2} (no interval with fewer than 6 rounds: --repeat 6 or more)",
            lower_median(ratios)
        ),
    }
}

fn check_valid(o: &bulk::Outcome) -> AppResult<()> {
    if o.is_valid() {
        return Ok(());
    }
    Err(AppError::internal(
        "bench file did not validate",
        o.problems
            .first()
            .map(|p| p.to_string())
            .unwrap_or_default(),
    ))
}

/// In run order: the two reads side by side, before anything writes.
const STAGES: [&str; 13] = [
    "bare_read",
    "read",
    "bare_insert",
    "bare_insert_changes",
    "validate",
    "preview",
    "validate_rowrule",
    "validate_rules",
    "apply",
    "import",
    "import_rowrule",
    "report",
    "audit",
];

/// Runs the benchmark for each size, printing a table per size and the goal ratios.
/// Each stage runs `repeat` times (in a fresh process each time, in rounds over all stages);
/// the median run counts (the lower one of an even count: of two runs, the faster).
pub fn run(
    sizes: &[usize],
    repeat: usize,
    dir: &Path,
    out: &mut dyn std::io::Write,
) -> AppResult<()> {
    let w = AppError::output;
    std::fs::create_dir_all(dir).map_err(|e| AppError::internal("bench directory", e))?;
    let exe = std::env::current_exe().map_err(|e| AppError::internal("finding the binary", e))?;
    for &n in sizes {
        let file = dir.join(format!("add12-{n}.xlsx"));
        if !file.exists() {
            let start = Instant::now();
            generate(&file, n)?;
            writeln!(
                out,
                "generated {} ({} rows, {:.1} MiB) in {:.1}s",
                file.display(),
                n,
                std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0,
                start.elapsed().as_secs_f64()
            )
            .map_err(w)?;
        }
        // Rounds: every stage once per round, so a drift in the machine's speed (common on
        // shared hardware) touches all stages alike. Each stage's median run counts: the
        // fastest would favour a one-process stage, which a lucky moment speeds up whole.
        let mut runs: std::collections::HashMap<&str, Vec<StageResult>> =
            std::collections::HashMap::new();
        for _ in 0..repeat.max(1) {
            for stage in STAGES {
                let args = StageArgs {
                    stage: stage.to_string(),
                    file: file.clone(),
                    data_dir: dir.join(format!("data-{stage}")),
                    rows: n,
                };
                let json = serde_json::to_string(&args)
                    .map_err(|e| AppError::internal("bench arguments", e))?;
                // The last stage's writes reach the disk now, not during this one (the
                // kernel's write-back of a 100 MB database slowed the next stage's reading).
                // SAFETY: sync takes no arguments and cannot fail.
                unsafe { libc::sync() };
                let o = Command::new(&exe)
                    .arg(STAGE_SUBCOMMAND)
                    .arg(&json)
                    .output()
                    .map_err(|e| AppError::internal("starting a bench stage", e))?;
                let _ = std::fs::remove_dir_all(&args.data_dir);
                if !o.status.success() {
                    return Err(AppError::internal(
                        format!("bench stage {stage}"),
                        String::from_utf8_lossy(&o.stderr),
                    ));
                }
                let r: StageResult = serde_json::from_slice(&o.stdout)
                    .map_err(|e| AppError::internal("bench stage output", e))?;
                runs.entry(stage).or_default().push(r);
            }
        }
        // Each round's own ratio of two stages (run minutes apart at most), then their median:
        // a drift in the machine's speed between rounds cancels out of it.
        let round_median = |of_round: &dyn Fn(usize) -> f64| {
            lower_median(&(0..repeat.max(1)).map(of_round).collect::<Vec<f64>>())
        };
        let round_ratios = |num: &dyn Fn(usize) -> f64, den: &dyn Fn(usize) -> f64| {
            (0..repeat.max(1))
                .map(|i| num(i) / den(i))
                .collect::<Vec<f64>>()
        };
        let secs_of = |stage: &str, i: usize| {
            runs.get(stage)
                .and_then(|v| v.get(i))
                .map_or(f64::NAN, |r| r.secs)
        };
        let per_round = [
            judged(
                &round_ratios(&|i| secs_of("import", i), &|i| {
                    secs_of("read", i).max(secs_of("apply", i))
                }),
                1.15,
            ),
            judged(
                &round_ratios(&|i| secs_of("read", i), &|i| secs_of("bare_read", i)),
                1.2,
            ),
            judged(
                &round_ratios(&|i| secs_of("apply", i), &|i| secs_of("bare_insert", i)),
                1.5,
            ),
        ];
        // What the Lua rules add, per round (validate and validate_rowrule run side by side).
        let lua_per_round =
            round_median(&|i| secs_of("validate_rowrule", i) - secs_of("validate", i));
        let import_lua_per_round =
            round_median(&|i| secs_of("import_rowrule", i) - secs_of("import", i));
        // The bare loops run the libraries alone, the same code in every round: how far their
        // rounds lie apart is the machine's own scatter during this run.
        let scatter_of = |stage: &str| {
            let secs: Vec<f64> = runs
                .get(stage)
                .map(|v| v.iter().map(|r| r.secs).collect())
                .unwrap_or_default();
            slowest_over_fastest(&secs)
        };
        let scatter = [scatter_of("bare_read"), scatter_of("bare_insert")];
        let results: std::collections::HashMap<&str, StageResult> = runs
            .into_iter()
            .filter_map(|(stage, mut v)| {
                v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
                let mid = v.len().saturating_sub(1) / 2;
                (mid < v.len()).then(|| (stage, v.swap_remove(mid)))
            })
            .collect();
        writeln!(
            out,
            "\n{n} rows (median of {} runs per stage)\n{:<12} {:>9} {:>9} {:>12} {:>10} {:>11}",
            repeat.max(1),
            "stage",
            "seconds",
            "CPU s",
            "rows/s",
            "RSS MiB",
            "worker MiB"
        )
        .map_err(w)?;
        for stage in STAGES {
            let Some(r) = results.get(stage) else {
                continue;
            };
            writeln!(
                out,
                "{:<12} {:>9.2} {:>9.2} {:>12.0} {:>10.0} {:>11.0}",
                r.stage,
                r.secs,
                r.cpu_secs,
                r.rows as f64 / r.secs.max(1e-9),
                r.rss_mib,
                r.worker_rss_mib
            )
            .map_err(w)?;
        }
        let t = |s: &str| results.get(s).map(|r| r.secs).unwrap_or(f64::NAN);
        let slowest = t("read").max(t("apply"));
        let peak = results
            .get("import")
            .map(|r| r.rss_mib.max(r.worker_rss_mib))
            .unwrap_or(f64::NAN);
        writeln!(
            out,
            "goals: import/slowest(read, apply) = {:.2} (<= 1.15); read/bare_read = {:.2} (<= 1.2); apply/bare_insert = {:.2} (<= 1.5); import peak RSS {:.0} MiB (<= 512)",
            t("import") / slowest,
            t("read") / t("bare_read"),
            t("apply") / t("bare_insert"),
            peak
        )
        .map_err(w)?;
        // The verdict: a round's stages run close together (seconds apart at 10k rows), so a
        // round's ratio is free of the machine's drift between rounds; the interval says how
        // far this run settles the goal.
        writeln!(
            out,
            "the same goals, median of each round's own ratio: import/slowest {}; read/bare_read {}; apply/bare_insert {}",
            per_round[0], per_round[1], per_round[2]
        )
        .map_err(w)?;
        if let [Some(read), Some(insert)] = scatter {
            writeln!(
                out,
                "the machine's scatter in this run (slowest / fastest round of the same bare loop): bare_read {read:.2}x, bare_insert {insert:.2}x; a ratio nearer its goal than that is not settled by this run"
            )
            .map_err(w)?;
        }
        let first = |s: &str| results.get(s).map(|r| r.first_row_secs).unwrap_or(f64::NAN);
        writeln!(
            out,
            "before the first row: calamine opening the workbook (shared strings read whole) {:.3} s = {:.0}% of bare_read; the first data row reaching the parent {:.3} s = {:.0}% of read",
            first("bare_read"),
            100.0 * first("bare_read") / t("bare_read"),
            first("read"),
            100.0 * first("read") / t("read"),
        )
        .map_err(w)?;
        writeln!(
            out,
            "before the writer's first rows: {:.4} s in apply; {:.4} s in import (storing the upload, recording and starting the job, the worker's start), {:.0}% of apply",
            first("apply"),
            first("import"),
            100.0 * first("import") / t("apply"),
        )
        .map_err(w)?;
        let last = |s: &str| {
            results
                .get(s)
                .map(|r| r.after_last_secs)
                .unwrap_or(f64::NAN)
        };
        writeln!(
            out,
            "after the writer's last rows: {:.3} s in apply (the commit); {:.3} s in import (the helpers' end, the job's records and commit, the queue's next look), {:.0}% of apply",
            last("apply"),
            last("import"),
            100.0 * last("import") / t("apply"),
        )
        .map_err(w)?;
        let c = |s: &str| results.get(s).map(|r| r.cpu_secs).unwrap_or(f64::NAN);
        writeln!(
            out,
            "CPU (both processes): read/bare_read = {:.2}; apply/bare_insert = {:.2}; import/(read + apply) = {:.2}",
            c("read") / c("bare_read"),
            c("apply") / c("bare_insert"),
            c("import") / (c("read") + c("apply")),
        )
        .map_err(w)?;
        let per_100k = |secs: f64| secs / (n as f64 / 100_000.0);
        writeln!(
            out,
            "rules (4 custom columns): declared only {:.0} rows/s; + a Lua row rule {:.0} rows/s: Lua adds {:.3} s per 100k rows (goal <= 0.15); + normaliser and 2 cell checks {:.0} rows/s: {:.3} s per 100k rows",
            n as f64 / t("validate"),
            n as f64 / t("validate_rowrule"),
            per_100k(t("validate_rowrule") - t("validate")),
            n as f64 / t("validate_rules"),
            per_100k(t("validate_rules") - t("validate")),
        )
        .map_err(w)?;
        writeln!(
            out,
            "the same, median of each round's own difference: Lua adds {:.3} s per 100k rows",
            per_100k(lua_per_round)
        )
        .map_err(w)?;
        // The same row rule in a pass that writes: the file's worker is paced there, and
        // the rules worker checks each row between the reader and the writer.
        writeln!(
            out,
            "a Lua row rule in an import: {:.3} s per 100k rows (import_rowrule - import; {:.3} in the round medians); import_rowrule/slowest(read, apply) = {:.2}",
            per_100k(t("import_rowrule") - t("import")),
            per_100k(import_lua_per_round),
            t("import_rowrule") / slowest,
        )
        .map_err(w)?;
        let cpu = |s: &str| results.get(s).map(|r| r.rules_cpu_secs).unwrap_or(f64::NAN);
        writeln!(
            out,
            "rules worker CPU per 100k rows: {:.3} s declared only, {:.3} s with the row rule, {:.3} s with four Lua calls per row",
            per_100k(cpu("validate")),
            per_100k(cpu("validate_rowrule")),
            per_100k(cpu("validate_rules")),
        )
        .map_err(w)?;
        if let Some(a) = results.get("audit") {
            writeln!(
                out,
                "audit: import + audit / import = {:.2} (<= 1.3); {:.1} MiB of audit log per 100k changes",
                (t("import") + a.secs) / t("import"),
                a.audit_bytes as f64 / 1048576.0 / (a.rows.max(1) as f64 / 100_000.0)
            )
            .map_err(w)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{judged, median_interval, slowest_over_fastest};

    #[test]
    fn the_median_interval_is_the_binomial_order_statistics() {
        let v: Vec<f64> = (1..=21).map(f64::from).rev().collect();
        // n = 21: P(B < 6) = 0.0133, P(B < 7) = 0.0392, so x(6) and x(16).
        assert_eq!(median_interval(&v), Some((11.0, 6.0, 16.0)));
        // n = 6: only the extremes (P(B = 0) = 1/64).
        let six = [3.0, 1.0, 2.0, 6.0, 5.0, 4.0];
        assert_eq!(median_interval(&six), Some((3.0, 1.0, 6.0)));
        // n = 100: the textbook pair x(40), x(61).
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(median_interval(&hundred), Some((50.0, 40.0, 61.0)));
        // Many rounds (0.5^n underflows): still a proper interval around the median.
        let many: Vec<f64> = (1..=2001).map(f64::from).collect();
        let (m, lo, hi) = median_interval(&many).unwrap();
        assert_eq!(m, 1001.0);
        assert!(
            lo > 940.0 && lo < 1001.0 && hi > 1001.0 && hi < 1062.0,
            "{lo} {hi}"
        );
        assert_eq!(median_interval(&[1.0; 5]), None);
        assert_eq!(median_interval(&[1.0, 2.0, 3.0, 4.0, 5.0, f64::NAN]), None);
    }

    #[test]
    fn a_goal_is_met_only_when_its_whole_interval_is_within() {
        let near = [1.0, 1.02, 1.04, 1.05, 1.06, 1.08, 1.1];
        assert!(
            judged(&near, 1.15).ends_with(": met)"),
            "{}",
            judged(&near, 1.15)
        );
        assert!(judged(&near, 1.05).contains("not settled"));
        assert!(judged(&near, 0.9).ends_with(": missed)"));
        assert!(judged(&[1.0, 1.1], 1.15).contains("fewer than 6 rounds"));
    }

    #[test]
    fn scatter_is_the_slowest_timing_over_the_fastest() {
        assert_eq!(slowest_over_fastest(&[2.0, 1.0, 1.5]), Some(2.0));
        assert_eq!(slowest_over_fastest(&[0.5, 0.5]), Some(1.0));
        assert_eq!(slowest_over_fastest(&[1.0]), None);
        assert_eq!(slowest_over_fastest(&[]), None);
        assert_eq!(slowest_over_fastest(&[1.0, 0.0]), None);
        assert_eq!(slowest_over_fastest(&[1.0, f64::NAN]), None);
    }
}
