//! The parent side of file parsing: starts the worker process under limits, reads its
//! stream of rows, and turns every way it can fail (a refusal, a crash, an abort on a huge
//! allocation, a time-out) into one `ReadFailure` an administrator can act on.

use std::io::{BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::codec::{self, Frame, RawRow};
use super::worker::{Fatal, WorkbookInfo, WorkerArgs};
use crate::config::Limits;

/// The highest peak memory (KiB) of any worker this process started; for the benchmark
/// and diagnostics.
pub static MAX_WORKER_PEAK_KIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Name of the hidden subcommand that runs the worker.
pub const WORKER_SUBCOMMAND: &str = "__read-worker";

/// How to start the worker: normally this very binary.
#[derive(Debug, Clone)]
pub struct ReaderSetup {
    pub worker_exe: PathBuf,
    pub limits: Limits,
}

impl ReaderSetup {
    /// The running binary as worker.
    pub fn current(limits: &Limits) -> std::io::Result<ReaderSetup> {
        Ok(ReaderSetup {
            worker_exe: std::env::current_exe()?,
            limits: limits.clone(),
        })
    }
}

/// Why a file could not be read. `message` is for the administrator.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadFailure {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn failure(code: &str, message: impl Into<String>) -> ReadFailure {
    ReadFailure {
        code: code.to_string(),
        message: message.into(),
    }
}

/// A running worker streaming the rows of one file's data sheet.
pub struct SheetReader {
    child: Child,
    /// A paced worker's standard input, where the reader asks for each next chunk of rows
    /// (`WorkerArgs::paced`); `None` for a worker that reads ahead freely.
    asks: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    info: WorkbookInfo,
    stderr: Option<JoinHandle<String>>,
    stop_watchdog: Option<mpsc::Sender<()>>,
    watchdog: Option<JoinHandle<()>>,
    timed_out: Arc<AtomicBool>,
    limits: Limits,
    done: bool,
    worker_peak_kib: u64,
    /// Notes the worker sent after the rows (e.g. formula cells).
    notes: Vec<String>,
}

/// A worker started on a file whose first answer (the workbook information) has not been
/// read yet: the caller does other work (stores, records, starts the rules) while the
/// worker opens the file, then `open`s it. Dropped unopened, the worker is killed.
pub struct Starting {
    reader: SheetReader,
    path: std::path::PathBuf,
    declared_name: String,
    expected_sheet: String,
}

/// How a worker hands its rows over (see `WorkerArgs::paced`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// It reads ahead as far as the pipe lets it: a dry run, where reading and checking
    /// overlap.
    Ahead,
    /// It reads each next chunk when the reader asks for it: a pass that writes.
    Asked,
}

impl Starting {
    /// Whether this worker reads `path` as `declared_name`, streaming `expected_sheet`,
    /// at `pace`.
    pub fn is_for(
        &self,
        path: &Path,
        declared_name: &str,
        expected_sheet: &str,
        pace: Pace,
    ) -> bool {
        self.path == path
            && self.declared_name == declared_name
            && self.expected_sheet == expected_sheet
            && self.reader.asks.is_some() == (pace == Pace::Asked)
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.reader.pid()
    }

    /// Waits for the workbook information (or the worker's refusal of the file).
    pub fn open(self) -> Result<SheetReader, ReadFailure> {
        let mut reader = self.reader;
        let mut scratch = RawRow::default();
        let (max, max_row) = (reader.max_text(), reader.max_row());
        match codec::read_frame(&mut reader.out, &mut scratch, max, max_row) {
            Ok(Frame::Json(codec::FRAME_INFO, json)) => {
                reader.info = serde_json::from_str(&json)
                    .map_err(|e| failure("internal", format!("bad reader output: {e}")))?;
                Ok(reader)
            }
            Ok(Frame::Json(_, json)) => Err(reader.refusal(&json)),
            Ok(_) => Err(failure(
                "internal",
                "The file reader answered out of order.",
            )),
            Err(_) => Err(reader.diagnose()),
        }
    }
}

impl SheetReader {
    /// Starts the worker on `path` and reads the workbook information.
    /// `declared_name` is the name the file was uploaded under (its extension matters);
    /// `expected_sheet` is the data sheet to stream.
    pub fn open(
        setup: &ReaderSetup,
        path: &Path,
        declared_name: &str,
        expected_sheet: &str,
        pace: Pace,
    ) -> Result<SheetReader, ReadFailure> {
        Self::start(setup, path, declared_name, expected_sheet, pace)?.open()
    }

    /// Opens `path` with `started` (a worker started earlier) when that worker is for this
    /// very file, name and sheet; else with a new worker, the other one stopped first.
    pub fn open_started(
        started: Option<Starting>,
        setup: &ReaderSetup,
        path: &Path,
        declared_name: &str,
        expected_sheet: &str,
        pace: Pace,
    ) -> Result<SheetReader, ReadFailure> {
        if let Some(s) = started {
            if s.is_for(path, declared_name, expected_sheet, pace) {
                return s.open();
            }
            // Another file's worker is of no use: stopped before a new one starts.
            drop(s);
        }
        Self::open(setup, path, declared_name, expected_sheet, pace)
    }

    /// Starts the worker on `path` without waiting for it (see `Starting`).
    pub fn start(
        setup: &ReaderSetup,
        path: &Path,
        declared_name: &str,
        expected_sheet: &str,
        pace: Pace,
    ) -> Result<Starting, ReadFailure> {
        let limits = &setup.limits;
        let size = std::fs::metadata(path)
            .map_err(|e| failure("file_unreadable", format!("The file cannot be read: {e}.")))?
            .len();
        if size > limits.max_file_bytes {
            return Err(failure(
                "file_too_large",
                format!(
                    "The file has {}; the limit is {}. Split it into smaller files.",
                    human_bytes(size),
                    human_bytes(limits.max_file_bytes)
                ),
            ));
        }
        let args = WorkerArgs {
            path: path.to_path_buf(),
            declared_name: declared_name.to_string(),
            expected_sheet: expected_sheet.to_string(),
            limits: limits.clone(),
            paced: pace == Pace::Asked,
        };
        let args_json = serde_json::to_string(&args)
            .map_err(|e| failure("internal", format!("cannot start the reader: {e}")))?;
        // The worker limits itself first thing (`confine`): with nothing to run between
        // fork and exec, the process starts without copying this one (vfork-like spawn).
        let mut cmd = Command::new(&setup.worker_exe);
        cmd.arg(WORKER_SUBCOMMAND)
            .arg(args_json)
            .stdin(match pace {
                Pace::Ahead => Stdio::null(),
                Pace::Asked => Stdio::piped(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear();
        let mut child = cmd.spawn().map_err(|e| {
            failure(
                "internal",
                format!(
                    "The file reader could not be started ({}: {e}).",
                    setup.worker_exe.display()
                ),
            )
        })?;
        let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failure("internal", "The file reader has no output pipe."));
        };
        enlarge_pipe(&stdout);
        let stderr_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut buf);
            // Drain the rest so the worker never blocks on a full pipe.
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            String::from_utf8_lossy(&buf).into_owned()
        });
        let timed_out = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<()>();
        let pid = child.id() as libc::pid_t;
        let flag = timed_out.clone();
        let wall = Duration::from_secs(limits.worker_wall_seconds);
        let watchdog = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(wall) {
                flag.store(true, Ordering::SeqCst);
                // SAFETY: plain syscall on the pid of our own child, which we have not reaped.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        });
        let asks = child.stdin.take();
        let reader = SheetReader {
            child,
            asks,
            out: BufReader::with_capacity(1 << 18, stdout),
            info: WorkbookInfo {
                format: String::new(),
                sheets: vec![],
                data_sheet: None,
                meta: None,
                notes: vec![],
                estimated_rows: None,
            },
            stderr: Some(stderr_thread),
            stop_watchdog: Some(tx),
            watchdog: Some(watchdog),
            timed_out,
            limits: limits.clone(),
            done: false,
            worker_peak_kib: 0,
            notes: Vec::new(),
        };
        Ok(Starting {
            reader,
            path: path.to_path_buf(),
            declared_name: declared_name.to_string(),
            expected_sheet: expected_sheet.to_string(),
        })
    }

    pub fn info(&self) -> &WorkbookInfo {
        &self.info
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Notes the worker sent after the rows, known once all rows were read.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The worker's peak resident memory in KiB, known once all rows were read.
    pub fn worker_peak_kib(&self) -> u64 {
        self.worker_peak_kib
    }

    /// Asks a paced worker for its next chunk of rows, when this reader's buffer is empty.
    /// A chunk that arrives in pieces may be asked for early, so the worker runs at most
    /// one chunk ahead. (A worker that has ended or died ignores it; its end is read as
    /// usual.)
    fn ask(&mut self) {
        if let Some(asks) = self.asks.as_mut()
            && asks.write_all(&[1]).is_err()
        {
            self.asks = None;
        }
    }

    fn max_text(&self) -> usize {
        (self.limits.max_cell_chars as usize).saturating_mul(4) + 16
    }

    /// The longest row frame: every column filled with the longest text, with its column,
    /// kind and length (at most 16 bytes), and the row index.
    fn max_row(&self) -> usize {
        (self.max_text() + 16)
            .saturating_mul(self.limits.max_columns as usize)
            .saturating_add(16)
    }

    /// Reads the next row into `row`; `Ok(false)` at the end of the sheet.
    pub fn next_row(&mut self, row: &mut RawRow) -> Result<bool, ReadFailure> {
        if self.done {
            return Ok(false);
        }
        let (max, max_row) = (self.max_text(), self.max_row());
        if self.out.buffer().is_empty() {
            self.ask();
        }
        match codec::read_frame(&mut self.out, row, max, max_row) {
            Ok(Frame::Row) => Ok(true),
            Ok(Frame::End(peak)) => {
                self.done = true;
                self.worker_peak_kib = peak;
                MAX_WORKER_PEAK_KIB.fetch_max(peak, Ordering::Relaxed);
                self.finish_child()?;
                Ok(false)
            }
            Ok(Frame::Json(codec::FRAME_NOTES, json)) => {
                let notes: Vec<String> = serde_json::from_str(&json).unwrap_or_default();
                self.notes.extend(notes);
                self.next_row(row)
            }
            Ok(Frame::Json(_, json)) => {
                self.done = true;
                Err(self.refusal(&json))
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::InvalidData
                    && matches!(self.child.try_wait(), Ok(None)) =>
            {
                // The stream itself is wrong while the worker still runs (not cut short by
                // its end, which `diagnose` explains).
                let _ = self.stop();
                self.done = true;
                Err(failure(
                    "internal",
                    format!("The file reader's output could not be read ({e})."),
                ))
            }
            Err(_) => {
                self.done = true;
                Err(self.diagnose())
            }
        }
    }

    fn refusal(&mut self, json: &str) -> ReadFailure {
        let _ = self.stop();
        match serde_json::from_str::<Fatal>(json) {
            Ok(f) => ReadFailure {
                code: f.code,
                message: f.message,
            },
            Err(e) => failure("internal", format!("bad reader output: {e}")),
        }
    }

    fn finish_child(&mut self) -> Result<(), ReadFailure> {
        let status = self.stop();
        match status {
            Some(s) if s.success() => Ok(()),
            _ => Err(self.diagnose()),
        }
    }

    /// Waits for the worker and stops the watchdog; returns its exit status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => Some(s),
            _ => {
                if !self.done {
                    let _ = self.child.kill();
                }
                self.child.wait().ok()
            }
        };
        self.stop_watchdog.take();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        status
    }

    /// Explains why the worker's stream ended early.
    fn diagnose(&mut self) -> ReadFailure {
        self.done = true;
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        self.stop_watchdog.take();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let limits = &self.limits;
        if self.timed_out.load(Ordering::SeqCst) {
            return failure(
                "time_limit",
                format!(
                    "Reading the file took longer than the limit of {} seconds, so it was stopped. The file is very large, damaged or malicious.",
                    limits.worker_wall_seconds
                ),
            );
        }
        let signal = status.and_then(|s| s.signal());
        if signal == Some(libc::SIGXCPU) || signal == Some(libc::SIGKILL) {
            return failure(
                "time_limit",
                format!(
                    "Reading the file used more than the limit of {} seconds of processor time, so it was stopped. The file is very large, damaged or malicious.",
                    limits.worker_cpu_seconds
                ),
            );
        }
        if stderr.contains("memory allocation")
            || stderr.contains("capacity overflow")
            || signal == Some(libc::SIGABRT)
        {
            return failure(
                "memory_limit",
                format!(
                    "Reading the file needed more memory than the limit of {} MiB, so it was stopped. The file is damaged or malicious (for example it claims far more cells than it has); save the data again from your spreadsheet program.",
                    limits.worker_memory_mib
                ),
            );
        }
        let detail = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        failure(
            "file_damaged",
            format!(
                "The file could not be read: the spreadsheet reader failed ({}{}{}). Save it again from your spreadsheet program and upload the new copy.",
                match (status.and_then(|s| s.code()), signal) {
                    (Some(c), _) => format!("exit code {c}"),
                    (_, Some(s)) => format!("signal {s}"),
                    _ => "no exit status".to_string(),
                },
                if detail.is_empty() { "" } else { ": " },
                detail.chars().take(200).collect::<String>()
            ),
        )
    }
}

impl Drop for SheetReader {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.stop_watchdog.take();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

/// "12.5 MiB", "900 bytes": sizes as an administrator reads them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The limits the file's worker puts on itself before it opens the file (see `confine`):
/// its address space (`worker_memory_mib`), CPU seconds (`worker_cpu_seconds`), no file
/// written.
pub(crate) fn confinement(limits: &Limits) -> crate::confine::Confinement {
    crate::confine::Confinement {
        memory_bytes: limits.worker_memory_mib.saturating_mul(1024 * 1024),
        cpu_seconds: limits.worker_cpu_seconds,
        may_write_files: false,
    }
}

/// A 1 MiB pipe lets the worker run ahead of a briefly busy parent.
fn enlarge_pipe(stdout: &ChildStdout) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own; failure is harmless (the default size stays).
    unsafe {
        libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}
