//! Configuration and the data directory.
//!
//! Layers, each overriding the one before: built-in defaults, then `rollcall.toml`, then
//! `ROLLCALL_*` environment variables, then command-line flags. `DataDir` is the one type
//! that knows where things live on disk; nothing else builds paths.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::StartupError;

/// Name of the directory created beside the binary when nothing else is configured.
pub const DEFAULT_DATA_DIR_NAME: &str = "rollcall-data";
/// Name of the configuration file looked for beside the binary and in the data directory.
pub const CONFIG_FILE_NAME: &str = "rollcall.toml";

/// Limits applied to every uploaded file. All are configurable under `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest file accepted, in bytes.
    pub max_file_bytes: u64,
    /// Most data rows (below the header) in one file. Excel's own limit is 1,048,575.
    pub max_rows: u32,
    /// Most columns a data row may use.
    pub max_columns: u32,
    /// Longest cell text, in characters (Excel's own limit is 32,767).
    pub max_cell_chars: u32,
    /// Address-space limit of the worker process that parses a file, in MiB.
    pub worker_memory_mib: u64,
    /// CPU-time limit of that worker, in seconds.
    pub worker_cpu_seconds: u64,
    /// Wall-clock limit of that worker, in seconds.
    pub worker_wall_seconds: u64,
    /// Largest inflated size of one entry of an .xlsx/.ods archive, in MiB.
    pub max_zip_entry_mib: u64,
    /// Largest inflated size of all entries together, in MiB.
    pub max_zip_total_mib: u64,
    /// Largest compression ratio accepted for an entry above 1 MiB.
    pub max_zip_ratio: u64,
    /// Most problems kept and shown for one upload; the rest are counted.
    pub max_reported_problems: u32,
    /// Memory a tenant's Lua rules may hold, in MiB.
    pub rules_memory_mib: u64,
    /// Time one rule call (one check of one row) may take, in milliseconds.
    pub rules_call_ms: u64,
    /// Time all rules together may take on one file, in seconds.
    pub rules_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 256 * 1024 * 1024,
            max_rows: 1_048_575,
            max_columns: 64,
            max_cell_chars: 32_767,
            worker_memory_mib: 2048,
            worker_cpu_seconds: 600,
            worker_wall_seconds: 900,
            max_zip_entry_mib: 2048,
            max_zip_total_mib: 4096,
            max_zip_ratio: 400,
            max_reported_problems: 100_000,
            rules_memory_mib: 64,
            rules_call_ms: 2000,
            rules_seconds: 600,
        }
    }
}

/// SQLite tuning.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Page cache of each connection, in MiB (large imports are much faster with 64).
    pub cache_mib: u32,
    /// How long a connection waits for a lock before giving up, in milliseconds.
    pub busy_timeout_ms: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            cache_mib: 64,
            busy_timeout_ms: 10_000,
        }
    }
}

/// The audit log.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// A log file is closed and the next one started past this size, in MiB.
    pub max_file_mib: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { max_file_mib: 64 }
    }
}

/// Jobs, undo and retention.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// A succeeded job can be undone this many days after it finished; its before/after
    /// images are purged after that.
    pub undo_days: u32,
    /// Uploaded files and reports are deleted this many days after upload.
    pub file_retention_days: u32,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            undo_days: 30,
            file_retention_days: 90,
        }
    }
}

/// Email: where messages go and how they are sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    /// `outbox` (the default: every message is written as an .eml file in the data
    /// directory's `outbox/`, for air-gapped sites) or `smtp`.
    pub transport: String,
    /// The sender, e.g. `rollcall <rollcall@example.com>`.
    pub from: String,
    /// Shown in every message as whom to ask (an address, a phone number, a web page).
    pub support_contact: String,
    /// Where users sign in (shown in Getting Started messages), e.g. https://learn.example.com.
    pub sign_in_url: String,
    /// Where administrators open rollcall's web UI, e.g. https://rollcall.example.com:
    /// messages to them link to the upload or job (a workbook too large to attach).
    pub web_url: String,
    pub smtp_host: String,
    /// Default: 587 with STARTTLS, 465 with implicit TLS, 25 without TLS.
    pub smtp_port: Option<u16>,
    /// `starttls` (default), `tls` (implicit, port 465) or `none` (a trusted local relay).
    pub smtp_security: String,
    /// Sign in with these when set.
    pub smtp_username: String,
    pub smtp_password: String,
    /// A PEM file of certificate authorities to trust besides the public ones (an
    /// organisation's own CA).
    pub smtp_ca_file: Option<PathBuf>,
    pub smtp_timeout_seconds: u64,
    /// Workbooks larger than this are not attached; the message says where to get them.
    pub attach_max_mib: u64,
    /// Tries before a message is marked failed (with back-off from 30 s to 1 h between).
    pub max_attempts: u32,
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            transport: "outbox".into(),
            from: "rollcall <rollcall@localhost>".into(),
            support_contact: String::new(),
            sign_in_url: String::new(),
            web_url: String::new(),
            smtp_host: String::new(),
            smtp_port: None,
            smtp_security: "starttls".into(),
            smtp_username: String::new(),
            smtp_password: String::new(),
            smtp_ca_file: None,
            smtp_timeout_seconds: 30,
            attach_max_mib: 10,
            max_attempts: 8,
        }
    }
}

/// The web server: sessions and request limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// A session not used for this long ends (the administrator signs in again).
    pub session_idle_minutes: u64,
    /// A session ends this long after sign-in, used or not.
    pub session_max_hours: u64,
    /// Sign-in attempts one client address may make per minute (more get "try later").
    pub sign_in_per_minute: u32,
    /// Largest JSON request body, in KiB (uploads are limited by `[limits] max_file_bytes`).
    pub json_max_kib: u64,
    /// Serve HTTPS with this certificate chain (PEM) and key, for sites without a reverse
    /// proxy. Both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Mark the session cookie Secure (always so with `tls_cert`; set it when a reverse
    /// proxy serves HTTPS in front of rollcall).
    pub secure_cookies: bool,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            session_idle_minutes: 30,
            session_max_hours: 12,
            sign_in_per_minute: 10,
            json_max_kib: 256,
            tls_cert: None,
            tls_key: None,
            secure_cookies: false,
        }
    }
}

/// The whole configuration after all layers were applied.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The data directory; relative paths are taken from the configuration file's folder.
    pub data_dir: Option<PathBuf>,
    /// Address the web server listens on.
    pub listen: String,
    pub limits: Limits,
    pub database: DatabaseConfig,
    pub audit: AuditConfig,
    pub jobs: JobsConfig,
    pub mail: MailConfig,
    pub web: WebConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: None,
            listen: "127.0.0.1:8080".to_string(),
            limits: Limits::default(),
            database: DatabaseConfig::default(),
            audit: AuditConfig::default(),
            jobs: JobsConfig::default(),
            mail: MailConfig::default(),
            web: WebConfig::default(),
        }
    }
}

/// Values given on the command line; `None` means "not given".
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
}

/// Environment variables that rollcall understands, with the setting each one sets.
const ENV_KEYS: &[&str] = &[
    "ROLLCALL_CONFIG",
    "ROLLCALL_DATA_DIR",
    "ROLLCALL_LISTEN",
    "ROLLCALL_LIMITS_MAX_FILE_BYTES",
    "ROLLCALL_LIMITS_MAX_ROWS",
    "ROLLCALL_LIMITS_MAX_COLUMNS",
    "ROLLCALL_LIMITS_MAX_CELL_CHARS",
    "ROLLCALL_LIMITS_WORKER_MEMORY_MIB",
    "ROLLCALL_LIMITS_WORKER_CPU_SECONDS",
    "ROLLCALL_LIMITS_WORKER_WALL_SECONDS",
    "ROLLCALL_LIMITS_MAX_ZIP_ENTRY_MIB",
    "ROLLCALL_LIMITS_MAX_ZIP_TOTAL_MIB",
    "ROLLCALL_LIMITS_MAX_ZIP_RATIO",
    "ROLLCALL_LIMITS_MAX_REPORTED_PROBLEMS",
    "ROLLCALL_LIMITS_RULES_MEMORY_MIB",
    "ROLLCALL_LIMITS_RULES_CALL_MS",
    "ROLLCALL_LIMITS_RULES_SECONDS",
    "ROLLCALL_DATABASE_CACHE_MIB",
    "ROLLCALL_DATABASE_BUSY_TIMEOUT_MS",
    "ROLLCALL_AUDIT_MAX_FILE_MIB",
    "ROLLCALL_JOBS_UNDO_DAYS",
    "ROLLCALL_JOBS_FILE_RETENTION_DAYS",
    "ROLLCALL_MAIL_TRANSPORT",
    "ROLLCALL_MAIL_FROM",
    "ROLLCALL_MAIL_SUPPORT_CONTACT",
    "ROLLCALL_MAIL_SIGN_IN_URL",
    "ROLLCALL_MAIL_WEB_URL",
    "ROLLCALL_MAIL_SMTP_HOST",
    "ROLLCALL_MAIL_SMTP_PORT",
    "ROLLCALL_MAIL_SMTP_SECURITY",
    "ROLLCALL_MAIL_SMTP_USERNAME",
    "ROLLCALL_MAIL_SMTP_PASSWORD",
    "ROLLCALL_MAIL_SMTP_CA_FILE",
    "ROLLCALL_MAIL_SMTP_TIMEOUT_SECONDS",
    "ROLLCALL_MAIL_ATTACH_MAX_MIB",
    "ROLLCALL_MAIL_MAX_ATTEMPTS",
    "ROLLCALL_WEB_SESSION_IDLE_MINUTES",
    "ROLLCALL_WEB_SESSION_MAX_HOURS",
    "ROLLCALL_WEB_SIGN_IN_PER_MINUTE",
    "ROLLCALL_WEB_JSON_MAX_KIB",
    "ROLLCALL_WEB_TLS_CERT",
    "ROLLCALL_WEB_TLS_KEY",
    "ROLLCALL_WEB_SECURE_COOKIES",
];

/// A loaded configuration together with where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The configuration file that was read, if any.
    pub file: Option<PathBuf>,
    /// Warnings to show the operator (unknown environment variables and the like).
    pub warnings: Vec<String>,
}

impl Config {
    /// Applies every layer: defaults, configuration file, environment, flags.
    pub fn load(overrides: &Overrides) -> Result<Loaded, StartupError> {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("ROLLCALL_"))
            .collect();
        Self::load_from(overrides, &env, exe_dir())
    }

    /// `load` with the environment and binary folder passed in, so tests need not touch the
    /// process environment.
    pub fn load_from(
        overrides: &Overrides,
        env: &[(String, String)],
        exe_dir: Option<PathBuf>,
    ) -> Result<Loaded, StartupError> {
        let mut warnings = Vec::new();
        let env_get = |key: &str| {
            env.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        for (key, _) in env {
            if !ENV_KEYS.contains(&key.as_str()) {
                warnings.push(format!(
                    "ignoring unknown environment variable {key} (the variables rollcall reads are listed in the README under Configuration)"
                ));
            }
        }

        // The configuration file: given explicitly, or beside the binary, or in the data
        // directory named by flag/env.
        let explicit = overrides
            .config_file
            .clone()
            .or_else(|| env_get("ROLLCALL_CONFIG").map(PathBuf::from));
        let early_data_dir = overrides
            .data_dir
            .clone()
            .or_else(|| env_get("ROLLCALL_DATA_DIR").map(PathBuf::from));
        let candidates: Vec<PathBuf> = match &explicit {
            Some(p) => vec![p.clone()],
            None => {
                let mut c = Vec::new();
                if let Some(d) = &early_data_dir {
                    c.push(d.join(CONFIG_FILE_NAME));
                }
                if let Some(d) = &exe_dir {
                    c.push(d.join(CONFIG_FILE_NAME));
                    if early_data_dir.is_none() {
                        c.push(d.join(DEFAULT_DATA_DIR_NAME).join(CONFIG_FILE_NAME));
                    }
                }
                c
            }
        };
        let mut config = Config::default();
        let mut file = None;
        for path in candidates {
            match fs::read_to_string(&path) {
                Ok(text) => {
                    config = toml::from_str(&text).map_err(|e| StartupError::BadConfig {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                    if let Some(d) = &config.data_dir
                        && d.is_relative()
                        && let Some(parent) = path.parent()
                    {
                        config.data_dir = Some(parent.join(d));
                    }
                    // So are the TLS files'.
                    if let Some(parent) = path.parent() {
                        for p in [&mut config.web.tls_cert, &mut config.web.tls_key] {
                            if let Some(rel) = p.as_ref().filter(|p| p.is_relative()) {
                                *p = Some(parent.join(rel));
                            }
                        }
                    }
                    file = Some(path);
                    break;
                }
                Err(e)
                    if explicit.is_none()
                        && (e.kind() == io::ErrorKind::NotFound
                            || e.raw_os_error() == Some(libc::ENOTDIR)) =>
                {
                    continue;
                }
                Err(e) => {
                    return Err(StartupError::BadConfig {
                        path,
                        reason: e.to_string(),
                    });
                }
            }
        }

        // Environment.
        macro_rules! env_num {
            ($key:literal, $field:expr) => {
                if let Some(v) = env_get($key) {
                    $field = v.trim().parse().map_err(|_| StartupError::BadEnv {
                        key: $key.to_string(),
                        value: v.clone(),
                    })?;
                }
            };
        }
        if let Some(v) = env_get("ROLLCALL_DATA_DIR") {
            config.data_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = env_get("ROLLCALL_LISTEN") {
            config.listen = v;
        }
        env_num!(
            "ROLLCALL_LIMITS_MAX_FILE_BYTES",
            config.limits.max_file_bytes
        );
        env_num!("ROLLCALL_LIMITS_MAX_ROWS", config.limits.max_rows);
        env_num!("ROLLCALL_LIMITS_MAX_COLUMNS", config.limits.max_columns);
        env_num!(
            "ROLLCALL_LIMITS_MAX_CELL_CHARS",
            config.limits.max_cell_chars
        );
        env_num!(
            "ROLLCALL_LIMITS_WORKER_MEMORY_MIB",
            config.limits.worker_memory_mib
        );
        env_num!(
            "ROLLCALL_LIMITS_WORKER_CPU_SECONDS",
            config.limits.worker_cpu_seconds
        );
        env_num!(
            "ROLLCALL_LIMITS_WORKER_WALL_SECONDS",
            config.limits.worker_wall_seconds
        );
        env_num!(
            "ROLLCALL_LIMITS_MAX_ZIP_ENTRY_MIB",
            config.limits.max_zip_entry_mib
        );
        env_num!(
            "ROLLCALL_LIMITS_MAX_ZIP_TOTAL_MIB",
            config.limits.max_zip_total_mib
        );
        env_num!("ROLLCALL_LIMITS_MAX_ZIP_RATIO", config.limits.max_zip_ratio);
        env_num!(
            "ROLLCALL_LIMITS_MAX_REPORTED_PROBLEMS",
            config.limits.max_reported_problems
        );
        env_num!(
            "ROLLCALL_LIMITS_RULES_MEMORY_MIB",
            config.limits.rules_memory_mib
        );
        env_num!("ROLLCALL_LIMITS_RULES_CALL_MS", config.limits.rules_call_ms);
        env_num!("ROLLCALL_LIMITS_RULES_SECONDS", config.limits.rules_seconds);
        env_num!("ROLLCALL_DATABASE_CACHE_MIB", config.database.cache_mib);
        env_num!(
            "ROLLCALL_DATABASE_BUSY_TIMEOUT_MS",
            config.database.busy_timeout_ms
        );
        env_num!("ROLLCALL_AUDIT_MAX_FILE_MIB", config.audit.max_file_mib);
        env_num!("ROLLCALL_JOBS_UNDO_DAYS", config.jobs.undo_days);
        env_num!(
            "ROLLCALL_JOBS_FILE_RETENTION_DAYS",
            config.jobs.file_retention_days
        );

        for (name, slot) in [
            ("ROLLCALL_MAIL_TRANSPORT", &mut config.mail.transport),
            ("ROLLCALL_MAIL_FROM", &mut config.mail.from),
            (
                "ROLLCALL_MAIL_SUPPORT_CONTACT",
                &mut config.mail.support_contact,
            ),
            ("ROLLCALL_MAIL_SIGN_IN_URL", &mut config.mail.sign_in_url),
            ("ROLLCALL_MAIL_WEB_URL", &mut config.mail.web_url),
            ("ROLLCALL_MAIL_SMTP_HOST", &mut config.mail.smtp_host),
            (
                "ROLLCALL_MAIL_SMTP_SECURITY",
                &mut config.mail.smtp_security,
            ),
            (
                "ROLLCALL_MAIL_SMTP_USERNAME",
                &mut config.mail.smtp_username,
            ),
            (
                "ROLLCALL_MAIL_SMTP_PASSWORD",
                &mut config.mail.smtp_password,
            ),
        ] {
            if let Some(v) = env_get(name) {
                *slot = v;
            }
        }
        if let Some(v) = env_get("ROLLCALL_MAIL_SMTP_CA_FILE") {
            config.mail.smtp_ca_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env_get("ROLLCALL_MAIL_SMTP_PORT") {
            config.mail.smtp_port = Some(v.trim().parse().map_err(|_| StartupError::BadEnv {
                key: "ROLLCALL_MAIL_SMTP_PORT".to_string(),
                value: v.clone(),
            })?);
        }
        env_num!(
            "ROLLCALL_MAIL_SMTP_TIMEOUT_SECONDS",
            config.mail.smtp_timeout_seconds
        );
        env_num!("ROLLCALL_MAIL_ATTACH_MAX_MIB", config.mail.attach_max_mib);
        env_num!("ROLLCALL_MAIL_MAX_ATTEMPTS", config.mail.max_attempts);
        env_num!(
            "ROLLCALL_WEB_SESSION_IDLE_MINUTES",
            config.web.session_idle_minutes
        );
        env_num!(
            "ROLLCALL_WEB_SESSION_MAX_HOURS",
            config.web.session_max_hours
        );
        env_num!(
            "ROLLCALL_WEB_SIGN_IN_PER_MINUTE",
            config.web.sign_in_per_minute
        );
        env_num!("ROLLCALL_WEB_JSON_MAX_KIB", config.web.json_max_kib);
        env_num!("ROLLCALL_WEB_SECURE_COOKIES", config.web.secure_cookies);
        if let Some(v) = env_get("ROLLCALL_WEB_TLS_CERT") {
            config.web.tls_cert = Some(PathBuf::from(v));
        }
        if let Some(v) = env_get("ROLLCALL_WEB_TLS_KEY") {
            config.web.tls_key = Some(PathBuf::from(v));
        }

        // Flags.
        if let Some(d) = &overrides.data_dir {
            config.data_dir = Some(d.clone());
        }
        if let Some(l) = &overrides.listen {
            config.listen = l.clone();
        }
        if config.data_dir.is_none() {
            let dir = exe_dir.ok_or(StartupError::NoDataDir)?;
            config.data_dir = Some(dir.join(DEFAULT_DATA_DIR_NAME));
        }
        Ok(Loaded {
            config,
            file,
            warnings,
        })
    }
}

fn exe_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let exe = exe.canonicalize().unwrap_or(exe);
    exe.parent().map(Path::to_path_buf)
}

/// Every path rollcall uses, derived from the one data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl fmt::Display for DataDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.root.display())
    }
}

impl DataDir {
    /// Creates the directory tree if needed and proves it is writable.
    pub fn open(root: &Path) -> Result<DataDir, StartupError> {
        let dd = DataDir {
            root: root.to_path_buf(),
        };
        let unwritable = |e: io::Error| StartupError::DataDirUnwritable {
            path: root.to_path_buf(),
            reason: describe_io(&e),
        };
        for dir in [
            dd.root.clone(),
            dd.uploads_dir(),
            dd.reports_dir(),
            dd.tmp_dir(),
            dd.audit_dir(),
            dd.run_dir(),
            dd.inbox_dir(),
            dd.outbox_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(unwritable)?;
        }
        let probe = dd.tmp_dir().join(".write-probe");
        fs::write(&probe, b"ok").map_err(unwritable)?;
        let _ = fs::remove_file(&probe);
        // One spelling of every path, whatever the working directory or the way the data
        // directory was named (stored paths and drop-folder claims compare as text).
        Ok(DataDir {
            root: dd.root.canonicalize().unwrap_or(dd.root),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn database(&self) -> PathBuf {
        self.root.join("rollcall.db")
    }
    pub fn config_file(&self) -> PathBuf {
        self.root.join(CONFIG_FILE_NAME)
    }
    /// Uploaded files, stored once per content hash.
    pub fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }
    pub fn upload_file(&self, sha256_hex: &str, extension: &str) -> PathBuf {
        let shard = sha256_hex.get(..2).unwrap_or("xx");
        self.uploads_dir()
            .join(shard)
            .join(format!("{sha256_hex}.{extension}"))
    }
    /// Error and results workbooks.
    pub fn reports_dir(&self) -> PathBuf {
        self.root.join("reports")
    }
    pub fn error_report(&self, upload_id: i64) -> PathBuf {
        self.reports_dir()
            .join(format!("upload-{upload_id}-errors.xlsx"))
    }
    pub fn results_report(&self, job_id: i64) -> PathBuf {
        self.reports_dir()
            .join(format!("job-{job_id}-results.xlsx"))
    }
    /// Scratch space for files being written; renamed into place when complete.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    /// Run-time files: the scheduler's lock and wake-up socket, job progress.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    /// Messages written as .eml files (the `outbox` mail transport).
    pub fn outbox_dir(&self) -> PathBuf {
        self.root.join("outbox")
    }
    pub fn scheduler_lock(&self) -> PathBuf {
        self.run_dir().join("scheduler.lock")
    }
    pub fn wake_socket(&self) -> PathBuf {
        self.run_dir().join("wake.sock")
    }
    pub fn progress_file(&self, job_id: i64) -> PathBuf {
        self.run_dir().join(format!("job-{job_id}.progress.json"))
    }
    /// The drop folder: `inbox/<tenant>/<operation>/`.
    pub fn inbox_dir(&self) -> PathBuf {
        self.root.join("inbox")
    }
    /// The hash-chained audit log files.
    pub fn audit_dir(&self) -> PathBuf {
        self.root.join("audit")
    }
    /// A tenant's rule scripts on an installed appliance.
    pub fn rules_dir(&self) -> PathBuf {
        self.root.join("rules")
    }
}

/// Words for an I/O error that an operator can act on.
pub fn describe_io(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EROFS) => "the medium is read-only".to_string(),
        Some(libc::EACCES) | Some(libc::EPERM) => "permission denied".to_string(),
        Some(libc::ENOSPC) => "the disk is full".to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_data_dir_is_beside_the_binary() {
        let l = Config::load_from(&Overrides::default(), &[], Some("/opt/key".into())).unwrap();
        assert_eq!(
            l.config.data_dir,
            Some(PathBuf::from("/opt/key/rollcall-data"))
        );
        assert_eq!(l.config.limits, Limits::default());
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        fs::write(
            &cfg,
            "data_dir = \"data\"\nlisten = \"0.0.0.0:1\"\n[limits]\nmax_rows = 10\nmax_columns = 5\n",
        )
        .unwrap();
        let o = Overrides {
            config_file: Some(cfg.clone()),
            data_dir: None,
            listen: Some("127.0.0.1:9".into()),
        };
        let l = Config::load_from(
            &o,
            &env(&[("ROLLCALL_LIMITS_MAX_ROWS", "20"), ("ROLLCALL_BOGUS", "1")]),
            None,
        )
        .unwrap();
        assert_eq!(l.config.data_dir, Some(dir.path().join("data")));
        assert_eq!(l.config.listen, "127.0.0.1:9");
        assert_eq!(l.config.limits.max_rows, 20);
        assert_eq!(l.config.limits.max_columns, 5);
        assert_eq!(l.warnings.len(), 1);
        assert!(l.warnings[0].contains("ROLLCALL_BOGUS"));
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::load_from(
            &Overrides::default(),
            &env(&[("ROLLCALL_LIMITS_MAX_ROWS", "many")]),
            Some("/x".into()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ROLLCALL_LIMITS_MAX_ROWS"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        fs::write(&cfg, "[limits]\nmax_rowz = 1\n").unwrap();
        let o = Overrides {
            config_file: Some(cfg),
            ..Default::default()
        };
        let e = Config::load_from(&o, &[], None).unwrap_err();
        assert!(e.to_string().contains("max_rowz"), "{e}");
    }

    #[test]
    fn read_only_data_dir_is_one_sentence() {
        // Running as root makes permission bits meaningless, so use a path under a file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let e = DataDir::open(&file.join("data")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--data-dir"), "{msg}");
        assert!(!msg.contains('\n'));
    }
}
