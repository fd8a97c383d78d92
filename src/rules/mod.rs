//! Tenant rules: Lua scripts in `rules/<tenant folder>/` that declare custom columns, check
//! cells and rows, and normalise values (see docs/RULES.md).
//!
//! - `engine`: the sandbox and the `rollcall` API; it runs only inside the rules worker.
//! - `worker`: the worker process (`rollcall __rules-worker`), with its watchdog.
//! - `client`: the parent's side of that process: start it, feed it rows, read findings.
//! - this module: where scripts are found (the data directory's `rules/` before the built-in
//!   ones), which version is active (the last one that loaded; kept in `rule_sets`), and
//!   the audit of every change.

pub mod client;
pub mod engine;
pub mod worker;

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::DataDir;
use crate::db::{self, Tenant};
use crate::error::{AppError, AppResult};
use crate::model::Operation;
use crate::sheet::reader::ReaderSetup;

/// One script: its file name and text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Script {
    pub name: String,
    pub source: String,
}

/// What a rule sees of the tenant (read-only, copied into the worker).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Context {
    pub tenant: String,
    pub today: String,
    pub teams: Vec<String>,
    pub pools: Vec<String>,
    pub roles: Vec<String>,
}

/// A user as `ctx.user(email)` gives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfo {
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub role: String,
    pub team: Option<String>,
    pub pool: String,
    pub status: String,
    pub custom: Vec<(String, String)>,
}

/// How rules look a user up by email (`ctx.user`): read-only, inside the rules worker.
pub type UserLookup = Box<dyn Fn(&str) -> Result<Option<UserInfo>, String>>;

/// Script and line of each rule, by the index the worker's watchdog sees.
pub type RuleLocations = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<u32>)>>>;

/// A custom column, as a script declared it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ColumnDecl {
    pub name: String,
    pub help: String,
    pub example: String,
    /// Must be filled in add files.
    pub required: bool,
    /// The allowed values (a drop-down in the template); empty: any text.
    pub choices: Vec<String>,
    pub max_length: Option<usize>,
    /// The operations whose templates carry the column.
    pub operations: Vec<Operation>,
    /// The value is the email of a user who exists or is added by the same file.
    pub user_reference: bool,
    pub script: String,
    pub line: Option<u32>,
}

/// Where a rule is defined.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuleInfo {
    pub script: String,
    pub line: Option<u32>,
    pub column: Option<String>,
}

/// What a set of scripts declares.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Description {
    pub columns: Vec<ColumnDecl>,
    pub checks: Vec<RuleInfo>,
    pub row_checks: Vec<RuleInfo>,
    pub normalisers: Vec<RuleInfo>,
}

impl Description {
    /// Whether the scripts register functions (normalisers, cell or row checks). Without
    /// any, the rules are their declared columns alone, whose checks need no Lua
    /// (`engine::declared_checks`): a pass then starts no rules worker.
    pub fn has_functions(&self) -> bool {
        !(self.checks.is_empty() && self.row_checks.is_empty() && self.normalisers.is_empty())
    }

    /// The custom columns of `op`, in declaration order.
    pub fn columns_of(&self, op: Operation) -> impl Iterator<Item = &ColumnDecl> {
        self.columns
            .iter()
            .filter(move |c| c.operations.contains(&op))
    }

    /// The normaliser's script for a column, for the preview's wording.
    pub fn normaliser_script(&self, column: &str) -> Option<&str> {
        self.normalisers
            .iter()
            .find(|n| {
                n.column
                    .as_deref()
                    .is_some_and(|c| c.eq_ignore_ascii_case(column))
            })
            .map(|n| n.script.as_str())
    }
}

/// A problem found while loading scripts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoadProblem {
    pub script: String,
    pub line: Option<u32>,
    pub message: String,
}

impl std::fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.script.is_empty(), self.line) {
            (true, _) => write!(f, "{}", self.message),
            (false, Some(l)) => write!(f, "{}, line {l}: {}", self.script, self.message),
            (false, None) => write!(f, "{}: {}", self.script, self.message),
        }
    }
}

/// The rules files of one tenant, as found on disk or built in.
#[derive(Debug, Clone)]
pub struct RuleFiles {
    pub folder: String,
    /// A path, or "built in".
    pub origin: String,
    pub scripts: Vec<Script>,
}

impl RuleFiles {
    pub fn hash(&self) -> String {
        hash_scripts(&self.scripts)
    }
}

/// The rules a tenant's validations use.
#[derive(Debug, Clone)]
pub struct ActiveRules {
    pub folder: String,
    pub origin: String,
    pub hash: String,
    pub scripts: Vec<Script>,
    pub description: Description,
    pub loaded_at: String,
    /// Said with every validation while it holds, e.g. that a newer version did not load.
    pub notes: Vec<String>,
}

/// Built-in rules: the repository's `rules/` folder.
#[derive(rust_embed::RustEmbed)]
#[folder = "rules/"]
#[include = "*/*.lua"]
struct BuiltIn;

pub use crate::model::folder_name;

/// Largest script accepted, and most scripts per tenant.
const MAX_SCRIPT_BYTES: u64 = 1024 * 1024;
const MAX_SCRIPTS: usize = 200;

/// The scripts of a tenant: `<data>/rules/<folder>/*.lua` when that folder exists (even
/// empty: it then switches the built-in rules off), else the built-in ones.
pub fn find_files(data: &DataDir, tenant: &str) -> AppResult<RuleFiles> {
    let folder = folder_name(tenant);
    let dir = data.rules_dir().join(&folder);
    if dir.is_dir() {
        return read_dir_scripts(&dir, &folder);
    }
    let prefix = format!("{folder}/");
    let mut scripts: Vec<Script> = BuiltIn::iter()
        .filter(|p| p.starts_with(&prefix))
        .filter_map(|p| {
            let f = BuiltIn::get(&p)?;
            Some(Script {
                name: p[prefix.len()..].to_string(),
                source: String::from_utf8_lossy(&f.data).into_owned(),
            })
        })
        .collect();
    scripts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(RuleFiles {
        folder,
        origin: "built in".into(),
        scripts,
    })
}

/// Reads the `*.lua` files of one folder (not its subfolders).
pub fn read_dir_scripts(dir: &Path, folder: &str) -> AppResult<RuleFiles> {
    let err = |e: std::io::Error| {
        AppError::Usage(format!(
            "The rules folder {} cannot be read: {e}.",
            dir.display()
        ))
    };
    let mut scripts = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".lua") || !path.is_file() {
            continue;
        }
        let len = entry.metadata().map_err(err)?.len();
        if len > MAX_SCRIPT_BYTES {
            return Err(AppError::Usage(format!(
                "The rule script {} has {len} bytes; the limit is {MAX_SCRIPT_BYTES}.",
                path.display()
            )));
        }
        let bytes = std::fs::read(&path).map_err(err)?;
        let source = String::from_utf8(bytes).map_err(|_| {
            AppError::Usage(format!(
                "The rule script {} is not UTF-8 text.",
                path.display()
            ))
        })?;
        scripts.push(Script { name, source });
    }
    if scripts.len() > MAX_SCRIPTS {
        return Err(AppError::Usage(format!(
            "The rules folder {} has {} scripts; the limit is {MAX_SCRIPTS}.",
            dir.display(),
            scripts.len()
        )));
    }
    scripts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(RuleFiles {
        folder: folder.to_string(),
        origin: dir.display().to_string(),
        scripts,
    })
}

/// A hash of a set of scripts (names and texts), the identity of a rules version.
pub fn hash_scripts(scripts: &[Script]) -> String {
    let mut h = Sha256::new();
    for s in scripts {
        h.update(s.name.as_bytes());
        h.update([0]);
        h.update((s.source.len() as u64).to_le_bytes());
        h.update(s.source.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The context rules see for a tenant.
pub fn context(conn: &Connection, tenant: &Tenant) -> AppResult<Context> {
    Ok(Context {
        tenant: tenant.name.clone(),
        today: db::now().get(..10).unwrap_or_default().to_string(),
        teams: db::list_teams(conn, tenant.id)?
            .into_iter()
            .map(|t| t.name)
            .collect(),
        pools: db::list_pools(conn, tenant.id)?
            .into_iter()
            .map(|p| p.name)
            .collect(),
        roles: crate::model::ROLES.iter().map(|r| r.to_string()).collect(),
    })
}

/// Loads `files` in a worker and returns what they declare, or every problem.
pub fn describe(
    setup: &ReaderSetup,
    files: &RuleFiles,
    ctx: &Context,
) -> Result<Description, Vec<LoadProblem>> {
    client::describe(setup, &files.scripts, ctx)
}

struct Stored {
    hash: String,
    origin: String,
    scripts: Vec<Script>,
    description: Description,
    loaded_at: String,
    rejected_hash: Option<String>,
    rejected_reason: Option<String>,
}

fn stored(conn: &Connection, tenant_id: i64) -> AppResult<Option<Stored>> {
    let row = conn
        .query_row(
            "SELECT hash, origin, scripts, description, loaded_at, rejected_hash, rejected_reason FROM rule_sets WHERE tenant_id = ?1",
            [tenant_id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            },
        )
        .optional()?;
    let Some((hash, origin, scripts, description, loaded_at, rejected_hash, rejected_reason)) = row
    else {
        return Ok(None);
    };
    let bad = |e: serde_json::Error| AppError::internal("reading the stored rules", e);
    Ok(Some(Stored {
        hash,
        origin,
        scripts: serde_json::from_str(&scripts).map_err(bad)?,
        description: serde_json::from_str(&description).map_err(bad)?,
        loaded_at,
        rejected_hash,
        rejected_reason,
    }))
}

fn active_from(s: Stored, folder: String) -> ActiveRules {
    ActiveRules {
        folder,
        origin: s.origin,
        hash: s.hash,
        scripts: s.scripts,
        description: s.description,
        loaded_at: s.loaded_at,
        notes: Vec::new(),
    }
}

fn problems_text(problems: &[LoadProblem]) -> String {
    let mut v: Vec<String> = problems.iter().take(10).map(|p| p.to_string()).collect();
    if problems.len() > 10 {
        v.push(format!("and {} more", problems.len() - 10));
    }
    v.join("; ")
}

/// The rules a tenant's files are checked with now. Reads the scripts (so an edited script
/// is picked up at the next use, without a restart); a new version that loads becomes the
/// active one and is audited with its hash; one that does not load leaves the last good
/// version active, with a note saying so (and is audited once). A tenant whose only version
/// does not load gets an error: its files cannot be checked.
pub fn active(
    conn: &Connection,
    data: &DataDir,
    setup: &ReaderSetup,
    tenant: &Tenant,
    actor: &str,
) -> AppResult<Option<ActiveRules>> {
    let files = find_files(data, &tenant.name)?;
    let hash = files.hash();
    let prev = stored(conn, tenant.id)?;
    if let Some(p) = &prev
        && p.hash == hash
    {
        return Ok(prev.map(|p| active_from(p, files.folder)));
    }
    if files.scripts.is_empty() {
        if let Some(p) = prev {
            conn.execute("DELETE FROM rule_sets WHERE tenant_id = ?1", [tenant.id])?;
            crate::audit::record(
                conn,
                &crate::audit::Event {
                    actor: actor.to_string(),
                    tenant: Some(tenant.name.clone()),
                    action: "rules.change",
                    target: files.folder.clone(),
                    details: serde_json::json!({"from": p.hash, "to": null, "origin": files.origin, "scripts": []}),
                },
            )?;
        }
        return Ok(None);
    }
    if let Some(p) = &prev
        && p.rejected_hash.as_deref() == Some(hash.as_str())
    {
        // Known not to load: keep the last good version without starting a worker.
        let reason = p.rejected_reason.clone().unwrap_or_default();
        let mut a = active_from(
            stored(conn, tenant.id)?
                .ok_or_else(|| AppError::internal("reading the stored rules", "they vanished"))?,
            files.folder.clone(),
        );
        a.notes.push(kept_note(&files, &reason, &a));
        return Ok(Some(a));
    }
    let ctx = context(conn, tenant)?;
    match describe(setup, &files, &ctx) {
        Ok(description) => {
            let now = db::now();
            let scripts_json = serde_json::to_string(&files.scripts)
                .map_err(|e| AppError::internal("storing the rules", e))?;
            let desc_json = serde_json::to_string(&description)
                .map_err(|e| AppError::internal("storing the rules", e))?;
            conn.execute(
                "INSERT INTO rule_sets (tenant_id, hash, origin, scripts, description, loaded_at, rejected_hash, rejected_reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, NULL)
                 ON CONFLICT (tenant_id) DO UPDATE SET hash = ?2, origin = ?3, scripts = ?4, description = ?5, loaded_at = ?6, rejected_hash = NULL, rejected_reason = NULL",
                params![tenant.id, hash, files.origin, scripts_json, desc_json, now],
            )?;
            crate::audit::record(
                conn,
                &crate::audit::Event {
                    actor: actor.to_string(),
                    tenant: Some(tenant.name.clone()),
                    action: "rules.change",
                    target: files.folder.clone(),
                    details: serde_json::json!({
                        "from": prev.as_ref().map(|p| p.hash.clone()),
                        "to": hash,
                        "origin": files.origin,
                        "scripts": files.scripts.iter().map(|s| serde_json::json!({
                            "name": s.name,
                            "sha256": hex::encode(Sha256::digest(s.source.as_bytes())),
                        })).collect::<Vec<_>>(),
                        "columns": description.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                    }),
                },
            )?;
            Ok(Some(ActiveRules {
                folder: files.folder,
                origin: files.origin,
                hash,
                scripts: files.scripts,
                description,
                loaded_at: now,
                notes: Vec::new(),
            }))
        }
        Err(problems) => {
            let reason = problems_text(&problems);
            crate::audit::record(
                conn,
                &crate::audit::Event {
                    actor: actor.to_string(),
                    tenant: Some(tenant.name.clone()),
                    action: "rules.rejected",
                    target: files.folder.clone(),
                    details: serde_json::json!({"hash": hash, "origin": files.origin, "problems": reason}),
                },
            )?;
            match prev {
                Some(p) => {
                    conn.execute(
                        "UPDATE rule_sets SET rejected_hash = ?2, rejected_reason = ?3 WHERE tenant_id = ?1",
                        params![tenant.id, hash, reason],
                    )?;
                    let mut a = active_from(p, files.folder.clone());
                    a.notes.push(kept_note(&files, &reason, &a));
                    Ok(Some(a))
                }
                None => Err(AppError::Refused(format!(
                    "The rules of {} ({}) do not load, and there is no earlier version to use: {reason}. Files of this tenant cannot be checked until the scripts are fixed (`rollcall rules check --tenant {:?}` shows the problems).",
                    tenant.name, files.origin, tenant.name
                ))),
            }
        }
    }
}

fn kept_note(files: &RuleFiles, reason: &str, a: &ActiveRules) -> String {
    format!(
        "The rules in {} were changed but do not load ({reason}); the last good version (loaded {}, hash {}) is still in use.",
        files.origin,
        a.loaded_at,
        a.hash.get(..12).unwrap_or(&a.hash)
    )
}
