//! The command line: clap definitions and one function per command. Exit codes: 0 success,
//! 1 the file has errors or was refused, 2 usage error, 3 the environment stopped us.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::bulk::Outcome;
use crate::config::{Config, Overrides};
use crate::db;
use crate::error::{AppError, AppResult};
use crate::model::{Effect, Operation, Severity};
use crate::scheduler;
use crate::service::{self, App};
use crate::sheet::template;

/// `rollcall --version`: version, commit and build date (set by build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BUILD_GIT_COMMIT"),
    ", built ",
    env!("BUILD_DATE_UTC"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "rollcall",
    version = VERSION,
    about = "Bulk user management from spreadsheets: templates, validation, all-or-nothing imports.",
    after_help = "Data lives in rollcall-data/ beside the binary unless --data-dir or ROLLCALL_DATA_DIR says otherwise.\nExample: rollcall tenant create Acme && rollcall template --tenant Acme --op add -o add.xlsx"
)]
pub struct Cli {
    /// Data directory (default: rollcall-data beside the binary).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Configuration file (default: rollcall.toml beside the binary or in the data directory).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the web UI, the HTTP API (/api/v1) and the job worker.
    ///
    /// Example: rollcall serve --listen 127.0.0.1:8080
    Serve {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
    },
    /// Create and list tenants (organisations).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Add and list a tenant's teams.
    #[command(subcommand)]
    Team(TeamCmd),
    /// Set and list a tenant's licence pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Write the .xlsx template of an operation for a tenant.
    ///
    /// Example: rollcall template --tenant Acme --op add -o add-users.xlsx
    Template {
        #[arg(long)]
        tenant: String,
        /// add, update, deactivate, reactivate or delete.
        #[arg(long)]
        op: Operation,
        /// Where to write the workbook.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Check a filled-in file and show every problem and the preview; changes nothing.
    ///
    /// Exit code 0: valid; 1: the file has errors or was refused; 2: usage error.
    /// Example: rollcall validate --tenant Acme --op add new-hires.xlsx --report errors.xlsx
    Validate {
        #[command(flatten)]
        file: FileArgs,
        /// Write the error workbook here when the file has problems.
        #[arg(long, value_name = "OUT.xlsx")]
        report: Option<PathBuf>,
        /// Print the result (problems, preview, licence forecast) as JSON.
        #[arg(long)]
        json: bool,
        /// Print the effect of every row, not only the first ten.
        #[arg(long)]
        preview: bool,
    },
    /// Validate a file and apply it in one transaction: all rows or none.
    ///
    /// Exit codes as for validate. Example: rollcall import --tenant Acme --op deactivate leavers.xlsx --yes
    Import {
        #[command(flatten)]
        file: FileArgs,
        /// Send each user the job adds a Getting Started message.
        #[arg(long)]
        getting_started: bool,
        /// Your email address: told when the job starts and ends (and why it failed).
        #[arg(long, value_name = "ADDRESS", value_parser = parse_email)]
        email: Option<String>,
        /// Acknowledge warnings (e.g. users already deactivated) and apply anyway.
        #[arg(long)]
        yes: bool,
        /// Copy the results workbook (or the error workbook) here.
        #[arg(long, value_name = "OUT.xlsx")]
        report: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Submit to the job queue and return at once (the worker of `rollcall serve` or
        /// `rollcall jobs work` runs it).
        #[arg(long)]
        no_wait: bool,
        /// Hold the job until this time (RFC 3339, e.g. 2026-12-31T17:00:00Z); implies --no-wait.
        #[arg(long, value_name = "TIME")]
        not_before: Option<String>,
        /// Confirm a large deactivation or deletion with the phrase rollcall asks for,
        /// e.g. --confirm "DELETE 152 USERS".
        #[arg(long, value_name = "PHRASE")]
        confirm: Option<String>,
    },
    /// Store and validate a file as an upload, to submit later (the web UI's first step).
    ///
    /// Exit code 0: valid; 1: errors. Example: rollcall upload --tenant Acme --op add hires.xlsx
    Upload {
        #[command(flatten)]
        file: FileArgs,
        /// Your email address: sent the problems and the error workbook if it is rejected.
        #[arg(long, value_name = "ADDRESS", value_parser = parse_email)]
        email: Option<String>,
        /// Copy the error workbook here when the file has problems.
        #[arg(long, value_name = "OUT.xlsx")]
        report: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Submit a valid upload as a job and wait for it (unless --no-wait).
    ///
    /// Example: rollcall submit 7 --yes
    Submit {
        /// Send each user the job adds a Getting Started message.
        #[arg(long)]
        getting_started: bool,
        /// Your email address: told when the job starts and ends (and why it failed).
        #[arg(long, value_name = "ADDRESS", value_parser = parse_email)]
        email: Option<String>,
        /// The upload's number, as `rollcall upload` printed it.
        upload: i64,
        /// Acknowledge the upload's warnings.
        #[arg(long)]
        yes: bool,
        /// Confirm a large deactivation or deletion with the phrase rollcall asks for.
        #[arg(long, value_name = "PHRASE")]
        confirm: Option<String>,
        /// Hold the job until this time (RFC 3339); implies --no-wait.
        #[arg(long, value_name = "TIME")]
        not_before: Option<String>,
        /// Return once queued.
        #[arg(long)]
        no_wait: bool,
    },
    /// List, follow, cancel and run jobs.
    #[command(subcommand)]
    Jobs(JobsCmd),
    /// The drop folder (inbox/<tenant>/<operation>/ in the data directory).
    #[command(subcommand)]
    Inbox(InboxCmd),
    /// Housekeeping tasks: their last and next run and last error; run one now.
    #[command(subcommand)]
    Tasks(TasksCmd),
    /// List or export a tenant's users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Write a consistent backup (database, audit log, rules, configuration) to one
    /// archive, safe while the server runs. Example: rollcall backup /media/usb/rollcall.zip
    Backup { output: PathBuf },
    /// Restore a backup into an empty data directory, checking the archive and the audit
    /// chain first. Example: rollcall --data-dir /srv/rollcall restore rollcall.zip
    Restore { archive: PathBuf },
    /// Exit 0 when the server answers (for service managers and monitoring).
    ///
    /// Example: rollcall healthcheck --addr 127.0.0.1:8080
    Healthcheck {
        /// The server's address (default: the configured listen address).
        #[arg(long, value_name = "ADDR:PORT")]
        addr: Option<String>,
    },
    /// Check and read the hash-chained audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Administrator accounts: the way back in when every password is lost.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// API tokens for scripts (Authorization: Bearer TOKEN), as in the web UI's Settings.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The mail outbox: list messages, send what is due, retry a failed one.
    #[command(subcommand)]
    Mail(MailCmd),
    /// Send a test message now with the configured transport, and say exactly what failed.
    ///
    /// Example: rollcall send-test-email --to ops@example.com
    SendTestEmail {
        #[arg(long, value_name = "ADDRESS", value_parser = parse_email)]
        to: String,
    },
    /// Check tenants' Lua rules and try them on a file (see docs/RULES.md).
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Measure each stage of an import against the bare libraries (see docs/BENCHMARKS.md).
    ///
    /// Generates add files of the given sizes (kept in --dir for the next run) and prints
    /// seconds, rows/second and peak memory per stage, and the ratios the goals are set in.
    /// Example: rollcall bench --rows 10000,100000
    Bench {
        /// Row counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1048575")]
        rows: Vec<usize>,
        /// Runs of each stage, in rounds over all stages; the median counts (timings vary on a
        /// busy machine).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Where generated files go (default: rollcall-bench in the temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Internal: parse an untrusted file under limits (started by rollcall itself).
    #[command(name = "__read-worker", hide = true)]
    ReadWorker { args_json: String },
    /// Internal: run a tenant's Lua rules under limits (started by rollcall itself).
    #[command(name = "__rules-worker", hide = true)]
    RulesWorker { confinement_json: String },
    /// Internal: one benchmark stage in its own process.
    #[command(name = "__bench-stage", hide = true)]
    BenchStage { args_json: String },
}

#[derive(Args, Debug)]
pub struct FileArgs {
    #[arg(long)]
    pub tenant: String,
    /// add, update, deactivate, reactivate or delete.
    #[arg(long)]
    pub op: Operation,
    /// The .xlsx, .xls, .ods or .csv file.
    pub file: PathBuf,
    /// The licence pool for rows whose Licence Pool cell is empty (add, reactivate).
    #[arg(long)]
    pub pool: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Create a tenant (an organisation whose users are managed apart).
    ///
    /// Example: rollcall tenant create "Acme Ltd"
    Create { name: String },
    /// List tenants with their user counts.
    ///
    /// Example: rollcall tenant list
    List,
    /// Show a tenant's settings. Example: rollcall tenant show Acme
    Show { name: String },
    /// Change a tenant's settings.
    ///
    /// Example: rollcall tenant set Acme --require-approval true --large-change-percent 10
    Set {
        name: String,
        /// Deactivating/deleting more than this percent of the users needs a typed confirmation.
        #[arg(long)]
        large_change_percent: Option<u32>,
        /// ... or more than this many users (0 turns the count off).
        #[arg(long)]
        large_change_count: Option<u64>,
        /// Delete and deactivate jobs wait for a second administrator's approval.
        #[arg(long)]
        require_approval: Option<bool>,
        /// Valid files dropped in the tenant's inbox folder are submitted (else only checked).
        #[arg(long)]
        drop_folder_submit: Option<bool>,
        /// Addresses told when a job waits for approval, comma-separated ("" for none).
        #[arg(long, value_name = "ADDRESSES")]
        approvers: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TeamCmd {
    /// Add a team to a tenant (teams appear in the templates' Team drop-down).
    ///
    /// Example: rollcall team add --tenant Acme Sales
    Add {
        #[arg(long)]
        tenant: String,
        name: String,
    },
    /// List a tenant's teams.
    ///
    /// Example: rollcall team list --tenant Acme
    List {
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Create a pool or change its seats. Example: rollcall pool set --tenant Acme Standard 200
    Set {
        #[arg(long)]
        tenant: String,
        name: String,
        seats: i64,
    },
    /// Seats, used and free per pool. Example: rollcall pool list --tenant Acme
    List {
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// Jobs, newest first, with queue positions. Example: rollcall jobs list --tenant Acme
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One job: state, place in the queue, progress with ETA, result. Example: rollcall jobs show 12
    Show { id: i64 },
    /// Cancel a job that has not started. Example: rollcall jobs cancel 12
    Cancel { id: i64 },
    /// Approve a job waiting for a second administrator (not its submitter).
    ///
    /// Example: rollcall jobs approve 12
    Approve { id: i64 },
    /// Revert a succeeded job from its before-images, as a new job; users changed since
    /// stop it with a list of conflicts. Example: rollcall jobs undo 12
    Undo {
        id: i64,
        /// Return once queued instead of waiting for the result.
        #[arg(long)]
        no_wait: bool,
    },
    /// Run the job worker in the foreground (what `serve` does besides the web server).
    ///
    /// Example: rollcall jobs work --until-idle
    Work {
        /// Stop when no job is waiting instead of waiting for more.
        #[arg(long)]
        until_idle: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum InboxCmd {
    /// Take up the files waiting in the drop folders now (the job worker does this by
    /// itself every few seconds). Example: rollcall inbox scan
    Scan,
}

#[derive(Subcommand, Debug)]
pub enum AdminCmd {
    /// Create an account; prints its one-time password (to be changed at the first sign-in).
    ///
    /// Example: rollcall admin create grace --role tenant-admin --tenant Acme --email grace@example.com
    Create {
        username: String,
        /// operator, tenant-admin or auditor.
        #[arg(long)]
        role: crate::admin::Role,
        /// The tenant of a tenant admin (or of an auditor limited to one tenant).
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_parser = parse_email)]
        email: Option<String>,
    },
    /// Every account with its role, tenant and state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Change an administrator's role.
    ///
    /// Example: rollcall admin set-role grace operator
    SetRole {
        username: String,
        role: crate::admin::Role,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Stop an account from signing in (its history stays).
    Disable {
        username: String,
    },
    Enable {
        username: String,
    },
    /// A new one-time password (also lifts a lock-out); printed once.
    ResetPassword {
        username: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token; prints its secret once. Example: rollcall token create hr-sync --role tenant-admin --tenant Acme
    Create {
        name: String,
        /// operator, tenant-admin or auditor.
        #[arg(long)]
        role: crate::admin::Role,
        /// The tenant it is limited to (required for tenant-admin).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Every token (never its secret).
    List,
    /// Revoke an API token: it stops working at once.
    ///
    /// Example: rollcall token revoke 3
    Revoke { id: i64 },
}

#[derive(Subcommand, Debug)]
pub enum MailCmd {
    /// Messages, newest first. Example: rollcall mail list --state failed
    List {
        /// queued, sending, sent or failed.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Send the messages that are due now (what the job worker does by itself).
    Send,
    /// Queue a failed message again. Example: rollcall mail retry 12
    Retry { id: i64 },
}

/// An email address for a flag: one plain address, no line breaks.
fn parse_email(s: &str) -> Result<String, String> {
    crate::mail::mailbox(s)?;
    Ok(s.trim().to_string())
}

#[derive(Subcommand, Debug)]
pub enum RulesCmd {
    /// Load the rules of one tenant (or of all) and report every problem, with what the
    /// scripts declare and whether it is the version in use. Changes nothing.
    ///
    /// Exit code 0: all rules load; 1: some do not. Example: rollcall rules check --tenant Acme
    Check {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Run the rules as they are on disk now on a file and print its errors and warnings,
    /// without storing anything (the version in use is not changed).
    ///
    /// Example: rollcall rules test --tenant Acme --op add new-users.xlsx
    Test {
        #[arg(long)]
        tenant: String,
        /// add, update, deactivate, reactivate or delete.
        #[arg(long)]
        op: Operation,
        file: PathBuf,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TasksCmd {
    /// List the housekeeping tasks with their schedules and last runs.
    ///
    /// Example: rollcall tasks list
    List,
    /// Run a task now. Example: rollcall tasks run purge_files
    Run { name: String },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Check the whole chain; names the first entry altered, removed, inserted or reordered.
    ///
    /// Exit code 0: intact; 1: broken. Example: rollcall audit verify
    Verify {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print entries, filtered, as JSON lines (default) or CSV.
    ///
    /// Example: rollcall audit show --tenant Acme --user ada@example.com --format csv
    Show {
        #[arg(long)]
        tenant: Option<String>,
        /// A user's email: the changes made to that user.
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        job: Option<i64>,
        #[arg(long)]
        actor: Option<String>,
        /// Entries at or after this time (RFC 3339, e.g. 2026-11-24T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Entries at or before this time.
        #[arg(long)]
        until: Option<String>,
        /// jsonl or csv.
        #[arg(long, default_value = "jsonl")]
        format: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum UsersCmd {
    /// List a tenant's users.
    ///
    /// Example: rollcall users list --tenant Acme --status active
    List {
        #[arg(long)]
        tenant: String,
        /// active or deactivated.
        #[arg(long)]
        status: Option<String>,
    },
    /// Write every user to a .csv or .xlsx file (or CSV to standard output).
    ///
    /// Example: rollcall users export --tenant Acme -o users.xlsx
    Export {
        #[arg(long)]
        tenant: String,
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Queue a Getting Started message for some active users (sent by the job worker).
    ///
    /// Example: rollcall users welcome --tenant Acme --user ada@example.com --user grace@example.com
    Welcome {
        #[arg(long)]
        tenant: String,
        /// A user's email (repeat for several).
        #[arg(long = "user", value_name = "EMAIL")]
        users: Vec<String>,
        /// Every active user who never got one.
        #[arg(long, conflicts_with = "users")]
        not_welcomed: bool,
    },
}

/// Prints what `rules check` found for one tenant; false when its rules do not load.
fn rules_check(
    out: &mut dyn std::io::Write,
    app: &service::App,
    t: &db::Tenant,
) -> AppResult<bool> {
    let w = AppError::output;
    let files = crate::rules::find_files(&app.data, &t.name)?;
    if files.scripts.is_empty() {
        writeln!(
            out,
            "{}: no rules (scripts would go in {}).",
            t.name,
            app.data.rules_dir().join(&files.folder).display()
        )
        .map_err(w)?;
        return Ok(true);
    }
    let hash = files.hash();
    let in_use: Option<(String, String)> = app
        .conn
        .query_row(
            "SELECT hash, loaded_at FROM rule_sets WHERE tenant_id = ?1",
            [t.id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok();
    let ctx = crate::rules::context(&app.conn, t)?;
    writeln!(
        out,
        "{}: {} scripts in {} (hash {})",
        t.name,
        files.scripts.len(),
        files.origin,
        &hash[..12]
    )
    .map_err(w)?;
    let ok = match crate::rules::describe(&app.reader, &files, &ctx) {
        Ok(d) => {
            for c in &d.columns {
                let ops: Vec<&str> = c.operations.iter().map(|o| o.as_str()).collect();
                let mut traits = vec![if c.required { "required" } else { "optional" }.to_string()];
                if !c.choices.is_empty() {
                    traits.push(format!("{} choices", c.choices.len()));
                }
                if let Some(m) = c.max_length {
                    traits.push(format!("at most {m} characters"));
                }
                if c.user_reference {
                    traits.push("names a user".into());
                }
                writeln!(
                    out,
                    "  column {:?} ({}) in {}: {}",
                    c.name,
                    traits.join(", "),
                    ops.join(", "),
                    c.script
                )
                .map_err(w)?;
            }
            for (what, list) in [
                ("normaliser", &d.normalisers),
                ("check", &d.checks),
                ("row check", &d.row_checks),
            ] {
                for r in list {
                    writeln!(
                        out,
                        "  {what}{} at {}{}",
                        r.column
                            .as_deref()
                            .map(|c| format!(" of {c:?}"))
                            .unwrap_or_default(),
                        r.script,
                        r.line.map(|l| format!(":{l}")).unwrap_or_default()
                    )
                    .map_err(w)?;
                }
            }
            writeln!(out, "  loads: OK").map_err(w)?;
            true
        }
        Err(problems) => {
            for p in &problems {
                writeln!(out, "  problem: {p}").map_err(w)?;
            }
            false
        }
    };
    match in_use {
        Some((h, at)) if h == hash => writeln!(out, "  in use since {at}").map_err(w)?,
        Some((h, at)) => writeln!(
            out,
            "  in use: another version (hash {}, loaded {at}){}",
            h.get(..12).unwrap_or(&h),
            if ok {
                "; this one takes over at the next template or upload"
            } else {
                "; it stays in use until these problems are fixed"
            }
        )
        .map_err(w)?,
        None => writeln!(
            out,
            "  in use: {}",
            if ok {
                "not yet; from the next template or upload"
            } else {
                "none; this tenant's files cannot be checked until these problems are fixed"
            }
        )
        .map_err(w)?,
    }
    Ok(ok)
}

/// The helper processes' command lines (`rollcall __read-worker ARGS`, `rollcall
/// __rules-worker`), recognised before the full command line is parsed: a pass starts one
/// or two of them, and building the whole command tree would only delay their first answer.
/// `None` for any other command line (which `Cli::parse` then takes).
pub fn run_helper(args: &[std::ffi::OsString]) -> Option<i32> {
    match args {
        [_, cmd, json] if cmd == "__read-worker" => Some(run_read_worker(json.to_str()?)),
        [_, cmd, json] if cmd == "__rules-worker" => Some(run_rules_worker(json.to_str()?)),
        _ => None,
    }
}

fn run_rules_worker(confinement_json: &str) -> i32 {
    match serde_json::from_str(confinement_json) {
        Ok(confinement) => crate::rules::worker::run(confinement),
        Err(e) => {
            eprintln!("rollcall: bad rules worker arguments: {e}");
            2
        }
    }
}

fn run_read_worker(args_json: &str) -> i32 {
    match serde_json::from_str(args_json) {
        Ok(args) => crate::sheet::worker::run(&args),
        Err(e) => {
            eprintln!("rollcall: bad worker arguments: {e}");
            2
        }
    }
}

/// Refuses, before any work, a report or output path whose folder does not exist (a usage
/// error naming the path), rather than failing after the file was checked.
fn writable_destination(path: &Path) -> AppResult<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if path.is_dir() {
        return Err(AppError::Usage(format!(
            "cannot write {}: it is a folder; give a file name such as {}",
            path.display(),
            path.join("report.xlsx").display()
        )));
    }
    if !folder.is_dir() {
        let why = if folder.exists() {
            "is not a folder"
        } else {
            "does not exist"
        };
        return Err(AppError::Usage(format!(
            "cannot write {}: {} {why}",
            path.display(),
            folder.display()
        )));
    }
    // Whether a file can be made there (a read-only folder, one of another user's).
    let probe = folder.join(format!(".rollcall-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(AppError::Usage(format!(
            "cannot write {}: no file can be made in {} ({e})",
            path.display(),
            folder.display()
        ))),
    }
}

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> i32 {
    if let Command::ReadWorker { args_json } = &cli.command {
        return run_read_worker(args_json);
    }
    if let Command::RulesWorker { confinement_json } = &cli.command {
        return run_rules_worker(confinement_json);
    }
    if let Command::BenchStage { args_json } = &cli.command {
        let result = serde_json::from_str(args_json)
            .map_err(|e| AppError::Usage(format!("bad bench arguments: {e}")))
            .and_then(|a| crate::bench::run_stage(&a));
        return match result {
            Ok(r) => {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
                0
            }
            Err(e) => e.report(),
        };
    }
    if let Command::Bench { rows, repeat, dir } = &cli.command {
        let dir = dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("rollcall-bench"));
        return match crate::bench::run(rows, *repeat, &dir, &mut std::io::stdout()) {
            Ok(()) => 0,
            Err(e) => e.report(),
        };
    }
    if matches!(
        cli.command,
        Command::Restore { .. } | Command::Healthcheck { .. }
    ) {
        // Neither may create a database: restore needs an empty directory, a health check
        // only asks the server.
        return match no_app(&cli) {
            Ok(code) => code,
            Err(e) => e.report(),
        };
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => e.report(),
    }
}

/// The commands that run without opening the database.
fn no_app(cli: &Cli) -> AppResult<i32> {
    let loaded = Config::load(&Overrides {
        config_file: cli.config.clone(),
        data_dir: cli.data_dir.clone(),
        listen: None,
    })?;
    match &cli.command {
        Command::Restore { archive } => {
            let root = loaded
                .config
                .data_dir
                .clone()
                .ok_or(crate::error::StartupError::NoDataDir)?;
            let data = crate::config::DataDir::open(&root)?;
            let n = crate::ops::restore(archive, &data)?;
            println!("Restored {n} files into {data}; the audit chain verifies.");
            Ok(0)
        }
        Command::Healthcheck { addr } => {
            let addr = addr.clone().unwrap_or(loaded.config.listen.clone());
            crate::ops::healthcheck(&addr)?;
            println!("OK: the server at {addr} answers.");
            Ok(0)
        }
        _ => Ok(2),
    }
}

fn open_app(cli: &Cli, listen: Option<String>) -> AppResult<App> {
    let loaded = Config::load(&Overrides {
        config_file: cli.config.clone(),
        data_dir: cli.data_dir.clone(),
        listen,
    })?;
    for w in &loaded.warnings {
        eprintln!("rollcall: warning: {w}");
    }
    let exe = std::env::current_exe()
        .map_err(|e| AppError::internal("finding the rollcall binary", e))?;
    Ok(App::open(&loaded, exe)?)
}

fn dispatch(cli: Cli) -> AppResult<i32> {
    let listen = match &cli.command {
        Command::Serve { listen } => listen.clone(),
        _ => None,
    };
    let mut app = open_app(&cli, listen)?;
    let out = &mut std::io::stdout().lock();
    let w = AppError::output;
    match cli.command {
        Command::ReadWorker { .. }
        | Command::RulesWorker { .. }
        | Command::BenchStage { .. }
        | Command::Bench { .. }
        | Command::Restore { .. }
        | Command::Healthcheck { .. } => Ok(2),
        Command::Backup { output } => {
            let n = crate::ops::backup(&app, &output)?;
            writeln!(out, "Backed up {n} files to {}.", output.display()).map_err(w)?;
            Ok(0)
        }
        Command::Serve { .. } => {
            crate::serve::run(&app)?;
            Ok(0)
        }
        Command::Tenant(TenantCmd::Create { name }) => {
            let t = service::change_audited(&app, "tenant.create", |c| {
                let t = db::create_tenant(c, &name)?;
                let (tn, id) = (t.name.clone(), t.id);
                Ok((t, Some(tn.clone()), tn, serde_json::json!({ "id": id })))
            })?;
            writeln!(out, "Created tenant {} (id {}).", t.name, t.id).map_err(w)?;
            Ok(0)
        }
        Command::Tenant(TenantCmd::List) => {
            let tenants = db::list_tenants(&app.conn)?;
            if tenants.is_empty() {
                writeln!(
                    out,
                    "No tenants yet. Create one with: rollcall tenant create NAME"
                )
                .map_err(w)?;
            }
            for t in tenants {
                let counts = db::user_counts(&app.conn, t.id)?;
                writeln!(
                    out,
                    "{}\t{} active, {} deactivated",
                    t.name,
                    counts.get("active").copied().unwrap_or(0),
                    counts.get("deactivated").copied().unwrap_or(0)
                )
                .map_err(w)?;
            }
            Ok(0)
        }
        Command::Tenant(TenantCmd::Show { name }) => {
            let t = db::tenant(&app.conn, &name)?;
            let s = db::tenant_settings(&app.conn, t.id)?;
            serde_json::to_writer_pretty(
                &mut *out,
                &serde_json::json!({ "tenant": t.name, "settings": s }),
            )
            .map_err(AppError::writing_json)?;
            writeln!(out).map_err(w)?;
            Ok(0)
        }
        Command::Tenant(TenantCmd::Set {
            name,
            large_change_percent,
            large_change_count,
            require_approval,
            drop_folder_submit,
            approvers,
        }) => {
            let t = db::tenant(&app.conn, &name)?;
            let after = service::change_audited(&app, "settings.change", |c| {
                let before = db::tenant_settings(c, t.id)?;
                let mut s = before.clone();
                if let Some(p) = large_change_percent {
                    if p > 100 {
                        return Err(AppError::Usage(
                            "--large-change-percent is between 0 and 100".into(),
                        ));
                    }
                    s.large_change_percent = p;
                }
                if let Some(n) = large_change_count {
                    s.large_change_count = (n > 0).then_some(n);
                }
                if let Some(b) = require_approval {
                    s.require_approval = b;
                }
                if let Some(b) = drop_folder_submit {
                    s.drop_folder_submit = b;
                }
                if let Some(list) = &approvers {
                    let mut v = Vec::new();
                    for a in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                        v.push(parse_email(a).map_err(AppError::Usage)?);
                    }
                    s.approvers = v;
                }
                db::set_tenant_settings(c, t.id, &s)?;
                let details = serde_json::json!({ "before": before, "after": s });
                Ok((s, Some(t.name.clone()), t.name.clone(), details))
            })?;
            writeln!(
                out,
                "Settings of {}: {}",
                t.name,
                serde_json::to_string(&after).unwrap_or_default()
            )
            .map_err(w)?;
            Ok(0)
        }
        Command::Team(TeamCmd::Add { tenant, name }) => {
            let t = db::tenant(&app.conn, &tenant)?;
            let team = service::change_audited(&app, "team.create", |c| {
                let team = db::add_team(c, t.id, &name)?;
                let (n, id) = (team.name.clone(), team.id);
                Ok((
                    team,
                    Some(t.name.clone()),
                    n,
                    serde_json::json!({ "id": id }),
                ))
            })?;
            writeln!(out, "Added team {} to {}.", team.name, t.name).map_err(w)?;
            Ok(0)
        }
        Command::Team(TeamCmd::List { tenant }) => {
            let t = db::tenant(&app.conn, &tenant)?;
            for team in db::list_teams(&app.conn, t.id)? {
                writeln!(out, "{}", team.name).map_err(w)?;
            }
            Ok(0)
        }
        Command::Pool(PoolCmd::Set {
            tenant,
            name,
            seats,
        }) => {
            let t = db::tenant(&app.conn, &tenant)?;
            let p = service::change_audited(&app, "pool.set", |c| {
                let before = db::list_pools(c, t.id)?
                    .into_iter()
                    .find(|p| db::norm(&p.name) == db::norm(&name))
                    .map(|p| p.seats);
                let p = db::set_pool(c, t.id, &name, seats)?;
                let details =
                    serde_json::json!({ "id": p.id, "seats_before": before, "seats": p.seats });
                let n = p.name.clone();
                Ok((p, Some(t.name.clone()), n, details))
            })?;
            writeln!(
                out,
                "Licence pool {} of {}: {} seats, {} used, {} free.",
                p.name,
                t.name,
                p.seats,
                p.used,
                p.free()
            )
            .map_err(w)?;
            Ok(0)
        }
        Command::Pool(PoolCmd::List { tenant }) => {
            let t = db::tenant(&app.conn, &tenant)?;
            writeln!(
                out,
                "{:<24} {:>8} {:>8} {:>8}",
                "POOL", "SEATS", "USED", "FREE"
            )
            .map_err(w)?;
            for p in db::list_pools(&app.conn, t.id)? {
                writeln!(
                    out,
                    "{:<24} {:>8} {:>8} {:>8}",
                    p.name,
                    p.seats,
                    p.used,
                    p.free()
                )
                .map_err(w)?;
            }
            Ok(0)
        }
        Command::Template { tenant, op, output } => {
            let t = db::tenant(&app.conn, &tenant)?;
            let lists = service::template_lists(&app, &t)?;
            template::write_template(op, &lists, &output)
                .map_err(|e| AppError::Usage(format!("cannot write {}: {e}", output.display())))?;
            writeln!(
                out,
                "Wrote the {} template for {} to {}.",
                op.title(),
                t.name,
                output.display()
            )
            .map_err(w)?;
            Ok(0)
        }
        Command::Validate {
            file,
            report,
            json,
            preview,
        } => {
            let t = db::tenant(&app.conn, &file.tenant)?;
            if let Some(r) = &report {
                writable_destination(r)?;
            }
            let name = file_name(&file.file);
            let mut effects = Effects::new(
                if json {
                    Some(SpoolAs::Json)
                } else if preview {
                    Some(SpoolAs::Text)
                } else {
                    None
                },
                &app.data.tmp_dir(),
            )?;
            let mut sink = |row: u32, email: &str, e: &Effect| effects.push(row, email, e);
            let mut bar = Progress::new(json);
            let outcome = service::validate_with(
                &app,
                &t,
                file.op,
                &file.file,
                &name,
                file.pool.as_deref(),
                &mut sink,
                &mut |n| bar.tick(n),
            )?;
            bar.done();
            let mut report_path = None;
            if let Some(path) = report
                && (!outcome.is_valid() || outcome.warnings > 0)
            {
                let lists = service::template_lists(&app, &t)?;
                crate::sheet::report::write_error_workbook(
                    &app.reader,
                    file.op,
                    &lists,
                    &file.file,
                    &name,
                    &outcome,
                    &path,
                )
                .map_err(|e| match e {
                    // Saving it, not reading the upload again: the path is what to fix.
                    AppError::Internal { context, reason } if context == "writing a workbook" => {
                        AppError::Usage(format!("cannot write {}: {reason}", path.display()))
                    }
                    other => other,
                })?;
                report_path = Some(path);
            }
            if json {
                // Submitting it would need the warnings acknowledged (--yes).
                let needs_ack = outcome.is_valid() && outcome.warnings > 0;
                print_json(out, &outcome, &mut effects, None, needs_ack)?;
            } else {
                print_outcome(out, &name, &outcome, &mut effects, preview)?;
                if let Some(p) = &report_path {
                    writeln!(out, "Error workbook: {}", p.display()).map_err(w)?;
                }
            }
            Ok(if outcome.is_valid() { 0 } else { 1 })
        }
        Command::Import {
            file,
            getting_started,
            email,
            yes,
            report,
            json,
            no_wait,
            not_before,
            confirm,
        } => {
            let t = db::tenant(&app.conn, &file.tenant)?;
            if let Some(r) = &report {
                writable_destination(r)?;
            }
            if no_wait || not_before.is_some() {
                let not_before = not_before.as_deref().map(parse_time).transpose()?;
                let name = file_name(&file.file);
                let stored = service::store_upload(&app.data, &file.file, &name)?;
                let opts = scheduler::JobOptions {
                    acknowledge_warnings: yes,
                    confirm: confirm.clone(),
                    notify: email.clone(),
                    getting_started,
                    default_pool: file.pool.clone(),
                };
                let (_, job) = scheduler::submit(
                    &app,
                    &t,
                    file.op,
                    &stored,
                    &name,
                    &opts,
                    not_before.as_deref(),
                )?;
                match not_before {
                    Some(at) => writeln!(
                        out,
                        "Scheduled as job {job}: it will not start before {at}."
                    )
                    .map_err(w)?,
                    None => writeln!(
                        out,
                        "Submitted as job {job}; follow it with: rollcall jobs show {job}"
                    )
                    .map_err(w)?,
                }
                return Ok(0);
            }
            let name = file_name(&file.file);
            let mut effects = Effects::new(json.then_some(SpoolAs::Json), &app.data.tmp_dir())?;
            let mut sink = |row: u32, email: &str, e: &Effect| effects.push(row, email, e);
            let mut bar = Progress::new(json);
            let res = service::import(
                &mut app,
                &t,
                file.op,
                &file.file,
                &name,
                service::ImportOptions {
                    confirm: confirm.clone(),
                    notify: email.clone(),
                    getting_started,
                    default_pool: file.pool.clone(),
                    ..service::ImportOptions::new(yes)
                },
                &mut sink,
                &mut |n| bar.tick(n),
            )?;
            bar.done();
            let produced = res.results_report.as_ref().or(res.error_report.as_ref());
            if let (Some(dest), Some(src)) = (&report, produced)
                && let Err(e) = std::fs::copy(src, dest)
            {
                // The job is done whatever happens to the copy: said, not an error.
                eprintln!(
                    "rollcall: warning: cannot write {} ({e}); the report is at {}",
                    dest.display(),
                    src.display()
                );
            }
            if json {
                print_json(
                    out,
                    &res.outcome,
                    &mut effects,
                    Some(res.job_id),
                    res.needs_acknowledgement,
                )?;
            } else {
                print_outcome(out, &name, &res.outcome, &mut effects, false)?;
                let job = res.job_id;
                if res.applied {
                    writeln!(
                        out,
                        "Applied as job {job}: {}.",
                        res.outcome.applied_message()
                    )
                    .map_err(w)?;
                } else if let Some(phrase) = &res.needs_confirmation {
                    writeln!(out, "Nothing was applied (job {job} failed): {}.\nTo go ahead, run the same command with: --confirm \"{phrase}\"", res.error.as_deref().unwrap_or("a typed confirmation is needed")).map_err(w)?;
                } else if res.state == "awaiting_approval" {
                    writeln!(out, "Job {job} waits for a second administrator's approval (the tenant requires it): rollcall jobs approve {job}").map_err(w)?;
                } else if res.needs_acknowledgement {
                    writeln!(out, "Nothing was applied (job {job} failed): {} warnings need acknowledgement. Check them, then run the same command with --yes.", res.outcome.warnings).map_err(w)?;
                } else {
                    writeln!(
                        out,
                        "Nothing was applied (job {job} {}{}).",
                        res.state,
                        res.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )
                    .map_err(w)?;
                }
                if let Some(p) = produced {
                    writeln!(out, "Report: {}", report.as_ref().unwrap_or(p).display())
                        .map_err(w)?;
                }
            }
            Ok(if res.applied { 0 } else { 1 })
        }
        Command::Upload {
            file,
            email,
            report,
            json,
        } => {
            let t = db::tenant(&app.conn, &file.tenant)?;
            if let Some(r) = &report {
                writable_destination(r)?;
            }
            let name = file_name(&file.file);
            let mut effects = Effects::new(json.then_some(SpoolAs::Json), &app.data.tmp_dir())?;
            let mut sink = |row: u32, email: &str, e: &Effect| effects.push(row, email, e);
            let mut bar = Progress::new(json);
            let up = service::upload_with(
                &app,
                &t,
                file.op,
                &file.file,
                &name,
                email.as_deref(),
                file.pool.as_deref(),
                &mut sink,
                &mut |n| bar.tick(n),
            )?;
            bar.done();
            // A rejection message goes out now unless a running worker sends it.
            if email.is_some()
                && let Some(lock) = scheduler::WorkerLock::try_take(&app.data)?
            {
                scheduler::send_mail(&app);
                drop(lock);
            }
            if let (Some(dest), Some(src)) = (&report, &up.error_report)
                && let Err(e) = std::fs::copy(src, dest)
            {
                // The upload is recorded whatever happens to the copy: said, not an error.
                eprintln!(
                    "rollcall: warning: cannot write {} ({e}); the report is at {}",
                    dest.display(),
                    src.display()
                );
            }
            if json {
                let o = &up.outcome;
                let needs_ack = o.is_valid() && o.warnings > 0;
                print_json(out, o, &mut effects, None, needs_ack)?;
            } else {
                print_outcome(out, &name, &up.outcome, &mut effects, false)?;
                if up.outcome.is_valid() {
                    writeln!(
                        out,
                        "Upload {} is ready: submit it with `rollcall submit {}`{}.",
                        up.upload_id,
                        up.upload_id,
                        if up.outcome.warnings > 0 {
                            " --yes"
                        } else {
                            ""
                        }
                    )
                    .map_err(w)?;
                } else {
                    writeln!(out, "Upload {} was rejected.", up.upload_id).map_err(w)?;
                }
                if let Some(p) = report.as_ref().or(up.error_report.as_ref()) {
                    writeln!(out, "Error workbook: {}", p.display()).map_err(w)?;
                }
            }
            Ok(if up.outcome.is_valid() { 0 } else { 1 })
        }
        Command::Submit {
            getting_started,
            email,
            upload,
            yes,
            confirm,
            not_before,
            no_wait,
        } => {
            let not_before = not_before.as_deref().map(parse_time).transpose()?;
            let opts = scheduler::JobOptions {
                acknowledge_warnings: yes,
                confirm,
                notify: email,
                getting_started,
                default_pool: None,
            };
            let job = scheduler::submit_upload(&app, upload, &opts, not_before.as_deref())?;
            if no_wait || not_before.is_some() {
                writeln!(out, "Submitted upload {upload} as job {job}; follow it with: rollcall jobs show {job}").map_err(w)?;
                return Ok(0);
            }
            let (state, error) = scheduler::run_or_wait(&app, job)?;
            match state.as_str() {
                "succeeded" => writeln!(out, "Applied as job {job}.").map_err(w)?,
                "awaiting_approval" => writeln!(out, "Job {job} waits for a second administrator's approval: rollcall jobs approve {job}").map_err(w)?,
                _ => writeln!(out, "Nothing was applied (job {job} {state}{}).", error.map(|e| format!(": {e}")).unwrap_or_default()).map_err(w)?,
            }
            Ok(if state == "succeeded" { 0 } else { 1 })
        }
        Command::Jobs(JobsCmd::List { tenant, limit }) => {
            let tid = match tenant {
                Some(t) => Some(db::tenant(&app.conn, &t)?.id),
                None => None,
            };
            writeln!(
                out,
                "{:>6}  {:<10} {:<11} {:<18} {:<12} FILE",
                "JOB", "TENANT", "OPERATION", "STATE", "QUEUE"
            )
            .map_err(w)?;
            for j in scheduler::list(&app.conn, tid, limit)? {
                let queue = match (j.position, j.estimated_start_secs) {
                    (Some(p), Some(s)) => format!("#{p} ~{s:.0}s"),
                    (Some(p), None) => format!("#{p}"),
                    _ => String::new(),
                };
                writeln!(
                    out,
                    "{:>6}  {:<10} {:<11} {:<18} {:<12} {}",
                    j.id, j.tenant, j.operation, j.state, queue, j.file_name
                )
                .map_err(w)?;
            }
            Ok(0)
        }
        Command::Jobs(JobsCmd::Show { id }) => {
            let Some(j) = scheduler::get(&app.conn, None, id)? else {
                return Err(AppError::Usage(format!("there is no job {id}")));
            };
            let progress = scheduler::progress(&app.data, id);
            let v = serde_json::json!({ "job": j, "progress": progress });
            serde_json::to_writer_pretty(&mut *out, &v).map_err(AppError::writing_json)?;
            writeln!(out).map_err(w)?;
            Ok(0)
        }
        Command::Jobs(JobsCmd::Approve { id }) => {
            scheduler::approve(&app, id)?;
            writeln!(out, "Approved job {id}; it joins the queue.").map_err(w)?;
            Ok(0)
        }
        Command::Jobs(JobsCmd::Cancel { id }) => {
            scheduler::cancel(&app, id)?;
            writeln!(out, "Cancelled job {id}.").map_err(w)?;
            Ok(0)
        }
        Command::Jobs(JobsCmd::Undo { id, no_wait }) => {
            let undo = crate::undo::submit(&app, id)?;
            if no_wait {
                writeln!(out, "Submitted the undo of job {id} as job {undo}.").map_err(w)?;
                return Ok(0);
            }
            let (state, error) = scheduler::run_or_wait(&app, undo)?;
            if state == "succeeded" {
                writeln!(out, "Job {id} was undone by job {undo}.").map_err(w)?;
                Ok(0)
            } else {
                writeln!(
                    out,
                    "Job {id} was not undone (job {undo} {state}): {}",
                    error.unwrap_or_default()
                )
                .map_err(w)?;
                Ok(1)
            }
        }
        Command::Jobs(JobsCmd::Work { until_idle }) => {
            let Some(lock) = scheduler::WorkerLock::try_take(&app.data)? else {
                return Err(AppError::Usage(
                    "another rollcall process is the job worker of this data directory".into(),
                ));
            };
            let stop = std::sync::atomic::AtomicBool::new(false);
            scheduler::work(
                &app,
                &lock,
                &stop,
                until_idle,
                None,
                &mut |_, _, _| {},
                &mut |_| {},
            )?;
            Ok(0)
        }
        Command::Inbox(InboxCmd::Scan) => {
            // Only the job worker takes up drop-folder files (one at a time, never twice).
            let Some(_lock) = scheduler::WorkerLock::try_take(&app.data)? else {
                return Err(AppError::Usage(
                    "a job worker (rollcall serve or jobs work) runs in this data directory and takes up the drop folders itself".into(),
                ));
            };
            let s = crate::inbox::scan(&app)?;
            writeln!(
                out,
                "{} files taken up, {} results written, {} files still being written",
                s.picked, s.finished, s.waiting
            )
            .map_err(w)?;
            Ok(0)
        }
        Command::Tasks(TasksCmd::List) => {
            for t in crate::tasks::list(&app)? {
                writeln!(
                    out,
                    "{:<16} last run {:<32} next run {:<32} {}\n                 {}{}",
                    t.name,
                    t.last_run.as_deref().unwrap_or("never"),
                    t.next_run,
                    t.last_error
                        .as_deref()
                        .map(|e| format!("LAST ERROR: {e}"))
                        .unwrap_or_default(),
                    t.description,
                    t.last_result
                        .as_deref()
                        .map(|r| format!(" (last: {r})"))
                        .unwrap_or_default()
                )
                .map_err(w)?;
            }
            Ok(0)
        }
        Command::Tasks(TasksCmd::Run { name }) => {
            let done = crate::tasks::run(&app, &name)?;
            writeln!(out, "{name}: {done}").map_err(w)?;
            Ok(0)
        }
        Command::Admin(cmd) => {
            let tenant_of = |name: &Option<String>| -> AppResult<Option<db::Tenant>> {
                name.as_deref()
                    .map(|n| db::tenant(&app.conn, n))
                    .transpose()
            };
            match cmd {
                AdminCmd::Create {
                    username,
                    role,
                    tenant,
                    email,
                } => {
                    let t = tenant_of(&tenant)?;
                    let (a, password) = crate::admin::create(
                        &app.conn,
                        &app.actor,
                        &username,
                        email.as_deref(),
                        role,
                        t.as_ref(),
                    )?;
                    writeln!(
                        out,
                        "Created {} ({}{}). One-time password, shown only now: {password}",
                        a.username,
                        a.role,
                        a.tenant.map(|t| format!(" of {t}")).unwrap_or_default()
                    )
                    .map_err(w)?;
                }
                AdminCmd::List { json } => {
                    let all = crate::admin::list(&app.conn)?;
                    if json {
                        serde_json::to_writer_pretty(&mut *out, &all)
                            .map_err(AppError::writing_json)?;
                        writeln!(out).map_err(w)?;
                    } else {
                        for a in all {
                            writeln!(
                                out,
                                "{:<24} {:<13} {:<20} {}{}",
                                a.username,
                                a.role.as_str(),
                                a.tenant.as_deref().unwrap_or("(all tenants)"),
                                a.email.as_deref().unwrap_or("-"),
                                if a.disabled {
                                    "  [disabled]"
                                } else if a.must_change_password {
                                    "  [must change password]"
                                } else {
                                    ""
                                }
                            )
                            .map_err(w)?;
                        }
                    }
                }
                AdminCmd::SetRole {
                    username,
                    role,
                    tenant,
                } => {
                    let t = tenant_of(&tenant)?;
                    let a =
                        crate::admin::set_role(&app.conn, &app.actor, &username, role, t.as_ref())?;
                    writeln!(out, "{} is now {}.", a.username, a.role).map_err(w)?;
                }
                AdminCmd::Disable { username } => {
                    crate::admin::set_disabled(&app.conn, &app.actor, &username, true)?;
                    writeln!(out, "{username} is disabled.").map_err(w)?;
                }
                AdminCmd::Enable { username } => {
                    crate::admin::set_disabled(&app.conn, &app.actor, &username, false)?;
                    writeln!(out, "{username} is enabled.").map_err(w)?;
                }
                AdminCmd::ResetPassword { username } => {
                    let p = crate::admin::reset_password(&app.conn, &app.actor, &username)?;
                    writeln!(
                        out,
                        "New one-time password for {username}, shown only now: {p}"
                    )
                    .map_err(w)?;
                }
            }
            service::flush_audit(&app)?;
            Ok(0)
        }
        Command::Token(TokenCmd::Create { name, role, tenant }) => {
            let t = tenant
                .as_deref()
                .map(|n| db::tenant(&app.conn, n))
                .transpose()?;
            let (id, secret) =
                crate::web::auth::create_token(&app.conn, &app.actor, &name, role, t.as_ref())?;
            service::flush_audit(&app)?;
            writeln!(
                out,
                "Created API token {id} ({name}). Its secret, shown only now:\n{secret}"
            )
            .map_err(w)?;
            Ok(0)
        }
        Command::Token(TokenCmd::List) => {
            writeln!(
                out,
                "{:>4}  {:<20} {:<13} {:<12} {:<26} STATE",
                "ID", "NAME", "ROLE", "TENANT", "LAST USED"
            )
            .map_err(w)?;
            for k in crate::web::auth::list_tokens(&app.conn)? {
                writeln!(
                    out,
                    "{:>4}  {:<20} {:<13} {:<12} {:<26} {}",
                    k.id,
                    k.name,
                    k.role,
                    k.tenant.as_deref().unwrap_or("(all)"),
                    k.last_used_at.as_deref().unwrap_or("never"),
                    k.revoked_at
                        .map(|r| format!("revoked {r}"))
                        .unwrap_or_else(|| "live".into())
                )
                .map_err(w)?;
            }
            Ok(0)
        }
        Command::Token(TokenCmd::Revoke { id }) => {
            if !crate::web::auth::revoke_token(&app.conn, &app.actor, id)? {
                return Err(AppError::Usage(format!("there is no live API token {id}")));
            }
            service::flush_audit(&app)?;
            writeln!(out, "Revoked API token {id}.").map_err(w)?;
            Ok(0)
        }
        Command::Mail(MailCmd::List { state, limit, json }) => {
            let rows = crate::mail::list(&app.conn, state.as_deref(), limit)?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &rows).map_err(AppError::writing_json)?;
                writeln!(out).map_err(w)?;
            } else if rows.is_empty() {
                writeln!(out, "No messages.").map_err(w)?;
            } else {
                for m in rows {
                    writeln!(
                        out,
                        "{:>5}  {:<8} {:<16} {:<32} {} (attempts {}{}){}",
                        m.id,
                        m.state,
                        m.event,
                        m.recipient,
                        m.subject,
                        m.attempts,
                        m.sent_at
                            .as_deref()
                            .map(|t| format!(", sent {t}"))
                            .unwrap_or_else(|| if m.state == "queued" {
                                format!(", next {}", m.next_attempt_at)
                            } else {
                                String::new()
                            }),
                        m.last_error
                            .as_deref()
                            .map(|e| format!("\n       last error: {e}"))
                            .unwrap_or_default()
                    )
                    .map_err(w)?;
                }
            }
            Ok(0)
        }
        Command::Mail(MailCmd::Send) => {
            let Some(lock) = scheduler::WorkerLock::try_take(&app.data)? else {
                writeln!(out, "The job worker of this data directory (rollcall serve or jobs work) is running and sends the mail itself.").map_err(w)?;
                return Ok(0);
            };
            let s = crate::mail::send_due(&app.conn, &app.data, &service::mail_config(&app)?)?;
            drop(lock);
            service::flush_audit(&app)?;
            writeln!(
                out,
                "Sent {}, failed {}, to be retried {}.",
                s.sent, s.failed, s.retrying
            )
            .map_err(w)?;
            Ok(if s.failed > 0 { 1 } else { 0 })
        }
        Command::Mail(MailCmd::Retry { id }) => {
            if crate::mail::retry(&app.conn, id, &app.actor)? {
                service::flush_audit(&app)?;
                writeln!(out, "Message {id} is queued again.").map_err(w)?;
                Ok(0)
            } else {
                Err(AppError::Usage(format!(
                    "there is no failed message {id} (see rollcall mail list --state failed)"
                )))
            }
        }
        Command::SendTestEmail { to } => {
            match crate::mail::send_test(&app.data, &service::mail_config(&app)?, &to, &app.actor) {
                Ok(msg) => {
                    writeln!(out, "{msg}").map_err(w)?;
                    Ok(0)
                }
                Err(why) => Err(AppError::Refused(format!(
                    "The test message was not sent: {why}."
                ))),
            }
        }
        Command::Rules(RulesCmd::Check { tenant }) => {
            let tenants = match tenant {
                Some(t) => vec![db::tenant(&app.conn, &t)?],
                None => db::list_tenants(&app.conn)?,
            };
            let mut broken = 0;
            for t in &tenants {
                if !rules_check(out, &app, t)? {
                    broken += 1;
                }
            }
            // Folders that belong to no tenant are most likely misspelt.
            if let Ok(dir) = std::fs::read_dir(app.data.rules_dir()) {
                let known: Vec<String> = db::list_tenants(&app.conn)?
                    .iter()
                    .map(|t| crate::rules::folder_name(&t.name))
                    .collect();
                for e in dir.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if e.path().is_dir() && !known.contains(&name) {
                        writeln!(out, "Note: the rules folder {} belongs to no tenant (a tenant's folder is its name in lower case with hyphens, e.g. \"Example Corp\" -> example-corp).", e.path().display()).map_err(w)?;
                    }
                }
            }
            Ok(if broken == 0 { 0 } else { 1 })
        }
        Command::Rules(RulesCmd::Test {
            tenant,
            op,
            file,
            json,
        }) => {
            let t = db::tenant(&app.conn, &tenant)?;
            let name = file_name(&file);
            let mut effects = Effects::new(json.then_some(SpoolAs::Json), &app.data.tmp_dir())?;
            let mut sink = |row: u32, email: &str, e: &Effect| effects.push(row, email, e);
            let tested = service::test_rules(&app, &t, op, &file, &name, &mut sink)?;
            let (active, outcome) = match tested {
                Ok(done) => done,
                Err((origin, problems)) => {
                    writeln!(out, "The rules in {origin} do not load:").map_err(w)?;
                    for p in &problems {
                        writeln!(out, "  {p}").map_err(w)?;
                    }
                    return Ok(1);
                }
            };
            if !json {
                match &active {
                    Some(a) => writeln!(
                        out,
                        "Rules of {} from {} ({} scripts, hash {}), not yet in use unless unchanged.",
                        t.name,
                        a.origin,
                        a.scripts.len(),
                        &a.hash[..12]
                    ),
                    None => writeln!(out, "{} has no rules; only the built-in checks run.", t.name),
                }
                .map_err(w)?;
            }
            if json {
                // Submitting it would need the warnings acknowledged (--yes).
                let needs_ack = outcome.is_valid() && outcome.warnings > 0;
                print_json(out, &outcome, &mut effects, None, needs_ack)?;
            } else {
                print_outcome(out, &name, &outcome, &mut effects, false)?;
            }
            Ok(if outcome.is_valid() { 0 } else { 1 })
        }
        Command::Audit(AuditCmd::Verify { json }) => {
            let v = crate::audit::verify(&app.conn, &app.data.audit_dir())?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &v).map_err(AppError::writing_json)?;
                writeln!(out).map_err(w)?;
            } else if let Some(p) = &v.problem {
                writeln!(
                    out,
                    "BROKEN: {p}. ({} entries checked in {} files.)",
                    v.entries, v.files
                )
                .map_err(w)?;
            } else {
                writeln!(
                    out,
                    "OK: {} entries in {} files, the chain is whole.",
                    v.entries, v.files
                )
                .map_err(w)?;
            }
            Ok(if v.problem.is_none() { 0 } else { 1 })
        }
        Command::Audit(AuditCmd::Show {
            tenant,
            user,
            job,
            actor,
            since,
            until,
            format,
        }) => {
            let csv = match format.as_str() {
                "jsonl" | "json" => false,
                "csv" => true,
                other => {
                    return Err(AppError::Usage(format!(
                        "--format is jsonl or csv, not {other:?}"
                    )));
                }
            };
            let filter = crate::audit::Filter {
                tenant,
                user,
                job,
                actor,
                since,
                until,
            };
            crate::audit::show(&app.data.audit_dir(), &filter, csv, out)?;
            Ok(0)
        }
        Command::Users(UsersCmd::List { tenant, status }) => {
            let t = db::tenant(&app.conn, &tenant)?;
            if let Some(s) = &status
                && s != "active"
                && s != "deactivated"
            {
                return Err(AppError::Usage("--status is active or deactivated".into()));
            }
            db::for_each_user(&app.conn, t.id, status.as_deref(), |u| {
                writeln!(
                    out,
                    "{}\t{} {}\t{}\t{}\t{}\t{}\t{}",
                    u.email,
                    u.first_name,
                    u.last_name,
                    u.team.as_deref().unwrap_or("-"),
                    u.role,
                    u.language,
                    u.pool,
                    u.status
                )
                .map_err(w)
            })?;
            Ok(0)
        }
        Command::Users(UsersCmd::Export { tenant, output }) => {
            let t = db::tenant(&app.conn, &tenant)?;
            let custom: Vec<String> = service::active_rules(&app, &t)?
                .map(|r| r.description.columns.into_iter().map(|c| c.name).collect())
                .unwrap_or_default();
            let n = service::export_users(&app.conn, &t, &custom, output.as_deref())?;
            if let Some(p) = output {
                writeln!(out, "Exported {n} users of {} to {}.", t.name, p.display()).map_err(w)?;
            }
            Ok(0)
        }
        Command::Users(UsersCmd::Welcome {
            tenant,
            users,
            not_welcomed,
        }) => {
            let t = db::tenant(&app.conn, &tenant)?;
            if users.is_empty() && !not_welcomed {
                return Err(AppError::Usage(
                    "say whom to welcome: --user EMAIL (repeatable) or --not-welcomed".into(),
                ));
            }
            let which = if not_welcomed {
                crate::mail::Welcome::NotYetWelcomed
            } else {
                crate::mail::Welcome::Users(&users)
            };
            let tx = app.conn.unchecked_transaction()?;
            let n = crate::mail::queue_welcomes(
                &tx,
                &app.data,
                &service::mail_config(&app)?,
                &app.actor,
                &t,
                which,
            )?;
            tx.commit()?;
            service::flush_audit(&app)?;
            if !users.is_empty() && (n as usize) < users.len() {
                writeln!(
                    out,
                    "Queued {n} Getting Started messages; {} of the users given are not active users of {}.",
                    users.len() - n as usize,
                    t.name
                )
                .map_err(w)?;
            } else {
                writeln!(out, "Queued {n} Getting Started messages for {}.", t.name).map_err(w)?;
            }
            if let Some(lock) = scheduler::WorkerLock::try_take(&app.data)? {
                scheduler::send_mail(&app);
                drop(lock);
            }
            Ok(0)
        }
    }
}

/// Checks a time given on the command line (RFC 3339) and returns it in UTC.
fn parse_time(s: &str) -> AppResult<String> {
    let fmt = time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(s.trim(), &fmt)
        .map_err(|_| AppError::Usage(format!("{s:?} is not a time like 2026-12-31T17:00:00Z")))?;
    t.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .map_err(|e| AppError::internal("formatting a time", e))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.to_string_lossy().into_owned())
}

/// The row effects a command prints: the first ten, or every one (JSON, --preview).
pub(crate) struct Effects {
    /// The first rows (row, email, effect), for the summary's sample.
    rows: Vec<(u32, String, Effect)>,
    /// Every row, when all are printed: spooled to a file as they come (one line each, in
    /// the form they are printed in), so a million rows cost no memory.
    spool: Option<Spool>,
}

/// How the spooled rows are written: JSON values or the summary's text lines.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum SpoolAs {
    Json,
    Text,
}

struct Spool {
    path: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    kind: SpoolAs,
    count: u64,
    /// The first write that failed (told when the rows are printed).
    failed: Option<std::io::Error>,
}

impl Effects {
    /// `all`: every row is printed, in the form `kind`, from a file in `tmp`.
    pub(crate) fn new(all: Option<SpoolAs>, tmp: &Path) -> AppResult<Effects> {
        let spool = match all {
            None => None,
            Some(kind) => {
                let path = tmp.join(format!(
                    "preview-{}-{}.partial",
                    std::process::id(),
                    time::OffsetDateTime::now_utc().unix_timestamp_nanos()
                ));
                let file = std::fs::File::create(&path)
                    .map_err(|e| AppError::internal("keeping the preview", e))?;
                Some(Spool {
                    path,
                    file: Some(std::io::BufWriter::with_capacity(1 << 16, file)),
                    kind,
                    count: 0,
                    failed: None,
                })
            }
        };
        Ok(Effects {
            rows: Vec::new(),
            spool,
        })
    }

    pub(crate) fn push(&mut self, row: u32, email: &str, effect: &Effect) {
        if let Some(s) = &mut self.spool
            && s.failed.is_none()
            && let Some(f) = &mut s.file
        {
            let written = match s.kind {
                SpoolAs::Json => serde_json::to_writer(&mut *f, &RowEffect { row, email, effect })
                    .map_err(std::io::Error::from),
                SpoolAs::Text => f.write_all(row_line(row, email, effect).as_bytes()),
            }
            .and_then(|()| f.write_all(b"\n"));
            match written {
                Ok(()) => s.count += 1,
                Err(err) => s.failed = Some(err),
            }
        }
        if self.rows.len() < 10 {
            self.rows.push((row, email.to_string(), effect.clone()));
        }
    }

    /// Every spooled line, in order, handed to `each` (with whether it is the last).
    fn each_spooled(
        &mut self,
        mut each: impl FnMut(&str, bool) -> std::io::Result<()>,
    ) -> AppResult<()> {
        use std::io::BufRead;
        let Some(s) = &mut self.spool else {
            return Ok(());
        };
        let fail = |e: std::io::Error| AppError::internal("keeping the preview", e);
        if let Some(err) = s.failed.take() {
            return Err(fail(err));
        }
        if let Some(f) = s.file.take() {
            f.into_inner().map_err(|e| fail(e.into_error()))?;
        }
        let file = std::fs::File::open(&s.path).map_err(fail)?;
        let mut lines = std::io::BufReader::with_capacity(1 << 16, file).lines();
        let mut left = s.count;
        while left > 0 {
            let Some(line) = lines.next() else { break };
            left -= 1;
            each(&line.map_err(fail)?, left == 0).map_err(AppError::output)?;
        }
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        drop(self.file.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One row of the preview as the summary prints it.
fn row_line(row: u32, email: &str, effect: &Effect) -> String {
    let detail = match effect {
        Effect::Change { changes } => changes
            .iter()
            .map(|c| {
                format!(
                    "{}: {} -> {}",
                    c.field,
                    c.old.as_deref().unwrap_or("(empty)"),
                    c.new.as_deref().unwrap_or("(empty)")
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Effect::Unchanged { reason } => reason.clone(),
        _ => String::new(),
    };
    format!("  row {row}: {} {email} {detail}", effect.label())
}

/// One row of the preview in the JSON output.
#[derive(Serialize)]
struct RowEffect<'a> {
    row: u32,
    email: &'a str,
    #[serde(flatten)]
    effect: &'a Effect,
}

pub(crate) fn print_json(
    out: &mut impl Write,
    outcome: &Outcome,
    effects: &mut Effects,
    job_id: Option<i64>,
    needs_ack: bool,
) -> AppResult<()> {
    // The preview's rows go where the marker is, from the spool: the document is never
    // held whole (a million rows would take gigabytes as a JSON tree).
    const MARKER: &str = "\u{0}rows\u{0}";
    let v = serde_json::json!({
        "valid": outcome.is_valid(),
        "message": if outcome.is_valid() { outcome.success_message() } else { outcome.errors_message() },
        "operation": outcome.operation,
        "format": outcome.format,
        "sheet": outcome.sheet,
        "rows": outcome.rows,
        "errors": outcome.errors,
        "warnings": outcome.warnings,
        "problems": outcome.problems,
        "preview": { "totals": outcome.totals, "rows": MARKER },
        "licence_forecast": outcome.forecast,
        "normalisations": outcome.normalisations,
        "notes": outcome.notes,
        "job_id": job_id,
        "needs_acknowledgement": needs_ack,
    });
    let text = serde_json::to_string_pretty(&v).map_err(AppError::writing_json)?;
    let marker = serde_json::to_string(MARKER).map_err(AppError::writing_json)?;
    let (head, tail) = text
        .split_once(&marker)
        .ok_or_else(|| AppError::internal("writing JSON", "no place for the preview's rows"))?;
    let w = AppError::output;
    out.write_all(head.as_bytes()).map_err(w)?;
    out.write_all(b"[").map_err(w)?;
    // (Effects made for JSON spool every row as JSON: `SpoolAs::Json`.)
    effects.each_spooled(|line, last| {
        write!(out, "\n      {line}{}", if last { "\n    " } else { "," })
    })?;
    out.write_all(b"]").map_err(w)?;
    out.write_all(tail.as_bytes()).map_err(w)?;
    writeln!(out).map_err(w)
}

fn print_outcome(
    out: &mut impl Write,
    name: &str,
    o: &Outcome,
    effects: &mut Effects,
    all_rows: bool,
) -> AppResult<()> {
    let w = AppError::output;
    let format = if o.format.is_empty() {
        "unreadable"
    } else {
        &o.format
    };
    // A file refused for its sheets has no data sheet to name.
    let no_sheet = o
        .problems
        .iter()
        .any(|p| matches!(p.code, "wrong_operation" | "sheet_missing"));
    if no_sheet {
        writeln!(out, "{name}: {format} file").map_err(w)?;
    } else {
        writeln!(
            out,
            "{name}: {format} file, sheet \"{}\", {} rows",
            o.sheet, o.rows
        )
        .map_err(w)?;
    }
    for n in &o.notes {
        writeln!(out, "Note: {n}").map_err(w)?;
    }
    for n in &o.normalisations {
        writeln!(
            out,
            "Normalised: {} in column {} ({}) {} times; first in row {}: {}",
            n.kind, n.column, n.column_name, n.count, n.example_row, n.example
        )
        .map_err(w)?;
    }
    for f in &o.forecast {
        writeln!(
            out,
            "Licence pool {}: {} seats, {} used, {} freed, {} needed, {} free after",
            f.pool, f.seats, f.used, f.freed, f.needed, f.free_after
        )
        .map_err(w)?;
    }
    const SHOWN: usize = 200;
    for p in o.problems.iter().take(SHOWN) {
        writeln!(out, "{p}").map_err(w)?;
    }
    let unlisted = (o.errors + o.warnings).saturating_sub(SHOWN.min(o.problems.len()) as u64);
    if unlisted > 0 {
        writeln!(
            out,
            "... and {unlisted} more problems (see --report or --json)."
        )
        .map_err(w)?;
    }
    if o.is_valid() {
        let t = &o.totals;
        writeln!(
            out,
            "Preview: {} create, {} change, {} deactivate, {} reactivate, {} delete, {} unchanged",
            t.create, t.change, t.deactivate, t.reactivate, t.delete, t.unchanged
        )
        .map_err(w)?;
        if all_rows && effects.spool.is_some() {
            effects.each_spooled(|line, _| writeln!(out, "{line}"))?;
        } else {
            for (row, email, effect) in &effects.rows {
                writeln!(out, "{}", row_line(*row, email, effect)).map_err(w)?;
            }
        }
        if !all_rows && (o.totals.changing() + o.totals.unchanged) as usize > effects.rows.len() {
            writeln!(out, "  ... (--preview shows every row)").map_err(w)?;
        }
        writeln!(out, "OK: {}", o.success_message()).map_err(w)?;
        if o.warnings > 0 {
            writeln!(
                out,
                "{} warnings need acknowledgement before submitting.",
                o.warnings
            )
            .map_err(w)?;
        }
    } else {
        let errs = o
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count();
        let _ = errs;
        writeln!(
            out,
            "NOT VALID: {} errors, {} warnings. Nothing was changed.",
            o.errors, o.warnings
        )
        .map_err(w)?;
    }
    Ok(())
}

/// A row counter on a terminal (nothing when output is piped or JSON).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {pos} rows read ({per_sec}) {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b
        });
        Progress { bar }
    }
    fn tick(&mut self, n: u64) {
        if let Some(b) = &self.bar {
            b.set_position(n);
        }
    }
    fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::run_helper;
    use std::ffi::OsString;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_a_helpers_exact_command_line_skips_the_parser() {
        // Bad arguments: each worker says so and exits 2, reading nothing.
        for bad in ["__read-worker", "__rules-worker"] {
            assert_eq!(run_helper(&args(&["rollcall", bad, "{not json"])), Some(2));
        }
        for other in [
            &["rollcall"][..],
            &["rollcall", "tenant", "list"],
            &["rollcall", "__read-worker"],
            &["rollcall", "__read-worker", "{}", "extra"],
            &["rollcall", "__rules-worker"],
            &["rollcall", "__rules-worker", "{}", "extra"],
            &["rollcall", "--data-dir", "d", "__rules-worker", "{}"],
        ] {
            assert_eq!(run_helper(&args(other)), None, "{other:?}");
        }
    }
}
