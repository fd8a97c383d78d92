//! The public error types and their mapping to exit codes.
//!
//! Each variant's text is what the operator or administrator reads: one sentence saying what
//! is wrong and what to do. Internal detail (SQL text, library messages) goes in `reason`.

use std::path::PathBuf;

use thiserror::Error;

/// Problems that stop rollcall from starting at all.
#[derive(Debug, Error)]
pub enum StartupError {
    #[error(
        "Cannot use the data directory {path} ({reason}); point rollcall at a writable directory with --data-dir DIR or ROLLCALL_DATA_DIR."
    )]
    DataDirUnwritable { path: PathBuf, reason: String },
    #[error(
        "Cannot tell where the binary lives, so there is no default data directory; give one with --data-dir DIR or ROLLCALL_DATA_DIR."
    )]
    NoDataDir,
    #[error("The configuration file {path} cannot be used: {reason}.")]
    BadConfig { path: PathBuf, reason: String },
    #[error("The environment variable {key} has the value {value:?}, which is not a number.")]
    BadEnv { key: String, value: String },
    #[error(
        "The database {path} was written by a newer rollcall (schema {found}, this binary knows up to {known}); run the newer rollcall or restore a backup made for this version."
    )]
    DatabaseTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(
        "Cannot open the database {path}: {reason}. If the file is damaged or not a rollcall database, restore it from a backup, or move it away to start with an empty one."
    )]
    Database { path: PathBuf, reason: String },
}

/// Errors of a command, mapped to the CLI's exit codes.
#[derive(Debug, Error)]
pub enum AppError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The request names something that does not exist or is malformed (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The uploaded file was refused or has errors (exit code 1); details were printed.
    #[error("{0}")]
    Refused(String),
    /// An internal failure: database, disk. The message says what was being done.
    #[error("{context}: {reason}")]
    Internal { context: String, reason: String },
    /// Standard output was closed by its reader (`rollcall … | head`): nothing to report;
    /// the process ends as a program stopped by SIGPIPE does (exit code 141).
    #[error("the output was closed by its reader")]
    OutputClosed,
}

impl AppError {
    pub fn internal(context: impl Into<String>, reason: impl std::fmt::Display) -> AppError {
        AppError::Internal {
            context: context.into(),
            reason: reason.to_string(),
        }
    }

    /// A failure to write the command's output: `OutputClosed` when the reader went away.
    pub fn output(e: std::io::Error) -> AppError {
        Self::writing("writing output", e)
    }

    /// A failure to write (`context` says what): `OutputClosed` when it was a pipe whose
    /// reader went away.
    pub fn writing(context: &str, e: std::io::Error) -> AppError {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            AppError::OutputClosed
        } else {
            AppError::internal(context, e)
        }
    }

    /// `writing` for the JSON writer's errors.
    pub fn writing_json(e: serde_json::Error) -> AppError {
        if e.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe) {
            AppError::OutputClosed
        } else {
            AppError::internal("writing JSON", e)
        }
    }

    /// `writing` for the CSV writer's errors.
    pub fn writing_csv(context: &str, e: csv::Error) -> AppError {
        match e.kind() {
            csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
                AppError::OutputClosed
            }
            _ => AppError::internal(context, e),
        }
    }

    /// The process exit code for this error: 1 refused file, 2 usage, 3 environment, 141
    /// output closed by its reader.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Refused(_) => 1,
            AppError::Usage(_) => 2,
            AppError::Startup(_) | AppError::Internal { .. } => 3,
            AppError::OutputClosed => 141,
        }
    }

    /// Prints the error for the command line (nothing when the output was closed: the
    /// reader stopped reading on purpose) and gives the exit code.
    pub fn report(&self) -> i32 {
        if !matches!(self, AppError::OutputClosed) {
            eprintln!("rollcall: {self}");
        }
        self.exit_code()
    }
}

impl From<rusqlite::Error> for AppError {
    fn from(e: rusqlite::Error) -> Self {
        AppError::internal("database error", e)
    }
}

pub type AppResult<T> = Result<T, AppError>;
