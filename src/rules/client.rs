//! The parent's side of the rules worker: start it under limits, send rows in batches, read
//! the findings back. A worker that dies, or does not answer within the run's time budget,
//! becomes a `RuleFailure` naming what happened; the parent carries on.

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::engine::{EngineLimits, Finding, RuleFailure};
use super::worker::{
    self, Loaded, TAG_BATCH, TAG_END, TAG_FAILED, TAG_INIT, TAG_LOADED, TAG_REPLY, WorkerInit,
};
use super::{Context, Description, LoadProblem, Script};
use crate::config::Limits;
use crate::model::Operation;
use crate::sheet::reader::ReaderSetup;

/// CPU time (ms) and the highest peak memory (KiB) of the rules workers this process ended
/// politely; for the benchmark.
pub static RULES_WORKER_CPU_MS: AtomicU64 = AtomicU64::new(0);
pub static RULES_WORKER_PEAK_KIB: AtomicU64 = AtomicU64::new(0);

/// Address space of the rules worker beyond the Lua memory limit (code, SQLite cache,
/// buffers), in MiB.
pub const WORKER_OVERHEAD_MIB: u64 = 256;

pub fn engine_limits(l: &Limits) -> EngineLimits {
    EngineLimits {
        memory_mib: l.rules_memory_mib,
        call_ms: l.rules_call_ms,
    }
}

/// A running rules worker.
pub struct RulesProcess {
    child: Child,
    input: BufWriter<ChildStdin>,
    output: BufReader<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<String>>,
    stop_watchdog: Option<mpsc::Sender<Watch>>,
    timed_out: Arc<AtomicBool>,
    run_seconds: u64,
    /// Time spent waiting for the worker so far (the budget is for the rules' own time,
    /// not for the pass, which may be held up by slow writes).
    waited: Duration,
    memory_mib: u64,
    buf: Vec<u8>,
    batch: Vec<u8>,
    pub loaded: Loaded,
    finished: bool,
}

/// Why a rules worker could not start checking.
#[derive(Debug)]
pub enum StartError {
    /// The scripts do not load.
    Problems(Vec<LoadProblem>),
    Failed(RuleFailure),
}

/// What the parent tells its watchdog thread.
enum Watch {
    /// Waiting for the worker: end it if no `Done` comes within this time.
    Wait(Duration),
    Done,
    Stop,
}

fn internal(message: impl Into<String>) -> RuleFailure {
    RuleFailure {
        script: String::new(),
        line: None,
        row: None,
        message: message.into(),
    }
}

/// A rules worker given its scripts, still loading them: the caller does other work (opens
/// the file) meanwhile, then waits with `ready`. Dropped, the worker is stopped.
pub struct Loading(RulesProcess);

impl Loading {
    /// Waits until the scripts are loaded (or for why they are not).
    pub fn ready(self) -> Result<RulesProcess, StartError> {
        let mut p = self.0;
        let loaded = p.wait_for_frame();
        match loaded {
            Ok(Some(TAG_LOADED)) => {
                let loaded: Loaded = serde_json::from_slice(&p.buf).map_err(|e| {
                    StartError::Failed(internal(format!("bad answer from the rules process: {e}")))
                })?;
                if !loaded.problems.is_empty() {
                    return Err(StartError::Problems(loaded.problems));
                }
                p.loaded = loaded;
                Ok(p)
            }
            Ok(Some(TAG_FAILED)) => Err(StartError::Failed(p.failure_frame())),
            _ => Err(StartError::Failed(p.diagnose())),
        }
    }
}

impl RulesProcess {
    /// Starts a worker and loads the scripts for `op`.
    pub fn start(
        setup: &ReaderSetup,
        scripts: &[Script],
        context: &Context,
        op: Operation,
        database: Option<PathBuf>,
        tenant_id: i64,
    ) -> Result<RulesProcess, StartError> {
        Self::begin(setup, scripts, context, op, database, tenant_id)?.ready()
    }

    /// Starts a worker and hands it the scripts for `op`, without waiting (see `Loading`).
    pub fn begin(
        setup: &ReaderSetup,
        scripts: &[Script],
        context: &Context,
        op: Operation,
        database: Option<PathBuf>,
        tenant_id: i64,
    ) -> Result<Loading, StartError> {
        let limits = engine_limits(&setup.limits);
        let builtin: Vec<String> = crate::model::columns(op)
            .into_iter()
            .map(|c| c.header.to_string())
            .collect();
        let run_seconds = setup.limits.rules_seconds.max(1);
        // The worker confines itself first thing, before it reads the scripts (see
        // `crate::confine`).
        let confinement = crate::confine::Confinement {
            memory_bytes: (limits.memory_mib + WORKER_OVERHEAD_MIB).saturating_mul(1024 * 1024),
            cpu_seconds: run_seconds + 5,
            may_write_files: true,
        };
        let confinement = serde_json::to_string(&confinement).map_err(|e| {
            StartError::Failed(internal(format!(
                "the rules process could not be started: {e}"
            )))
        })?;
        let init = WorkerInit {
            scripts: scripts.to_vec(),
            context: context.clone(),
            op,
            builtin,
            limits,
            database,
            tenant_id,
        };
        let mut cmd = Command::new(&setup.worker_exe);
        cmd.arg(worker::WORKER_SUBCOMMAND)
            .arg(confinement)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear();
        let mut child = cmd.spawn().map_err(|e| {
            StartError::Failed(internal(format!(
                "the rules process could not be started ({}: {e})",
                setup.worker_exe.display()
            )))
        })?;
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartError::Failed(internal(
                "the rules process has no pipes",
            )));
        };
        let stderr_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(16 * 1024).read_to_end(&mut buf);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            String::from_utf8_lossy(&buf).into_owned()
        });
        let timed_out = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Watch>();
        let pid = child.id() as libc::pid_t;
        let flag = timed_out.clone();
        std::thread::spawn(move || {
            loop {
                match rx.recv() {
                    Ok(Watch::Wait(d)) => match rx.recv_timeout(d) {
                        Ok(Watch::Done) => {}
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            flag.store(true, Ordering::SeqCst);
                            // SAFETY: plain syscall on the pid of our own child, which is
                            // not reaped while the parent waits for it.
                            unsafe {
                                libc::kill(pid, libc::SIGKILL);
                            }
                            return;
                        }
                        _ => return,
                    },
                    Ok(Watch::Done) => {}
                    _ => return,
                }
            }
        });
        let mut p = RulesProcess {
            child,
            input: BufWriter::with_capacity(1 << 18, stdin),
            output: BufReader::with_capacity(1 << 16, stdout),
            stderr: Some(stderr_thread),
            stop_watchdog: Some(tx),
            timed_out,
            run_seconds,
            waited: Duration::ZERO,
            memory_mib: limits.memory_mib,
            buf: Vec::new(),
            batch: Vec::with_capacity(1 << 18),
            loaded: Loaded {
                problems: vec![],
                description: Description::default(),
                headers: vec![],
                idle: true,
            },
            finished: false,
        };
        let json = serde_json::to_vec(&init)
            .map_err(|e| StartError::Failed(internal(format!("cannot start the rules: {e}"))))?;
        if worker::write_frame(&mut p.input, TAG_INIT, &json)
            .and_then(|_| p.input.flush())
            .is_err()
        {
            return Err(StartError::Failed(p.diagnose()));
        }
        Ok(Loading(p))
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The run's columns: built-in, then custom.
    pub fn headers(&self) -> &[String] {
        &self.loaded.headers
    }

    /// Adds a row to the batch being built.
    pub fn push_row(&mut self, row: u32, values: &[String]) {
        worker::encode_row(&mut self.batch, row, values);
    }

    /// Drops the rows added since the last batch was sent.
    pub fn clear_batch(&mut self) {
        self.batch.clear();
    }

    /// Sends the batch built so far.
    pub fn send_batch(&mut self) -> Result<(), RuleFailure> {
        let r = worker::write_frame(&mut self.input, TAG_BATCH, &self.batch)
            .and_then(|_| self.input.flush());
        self.batch.clear();
        r.map_err(|_| self.diagnose())
    }

    /// Reads the worker's next frame under the time left of the run's budget.
    fn wait_for_frame(&mut self) -> std::io::Result<Option<u8>> {
        let left = Duration::from_secs(self.run_seconds).saturating_sub(self.waited);
        if left.is_zero() {
            self.timed_out.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other("out of time"));
        }
        let start = std::time::Instant::now();
        if let Some(w) = &self.stop_watchdog {
            let _ = w.send(Watch::Wait(left));
        }
        let r = worker::read_frame(&mut self.output, &mut self.buf);
        if let Some(w) = &self.stop_watchdog {
            let _ = w.send(Watch::Done);
        }
        self.waited += start.elapsed();
        r
    }

    /// The findings of the oldest batch sent and not yet answered.
    pub fn receive(&mut self) -> Result<Vec<(u32, Finding, String)>, RuleFailure> {
        match self.wait_for_frame() {
            Ok(Some(TAG_REPLY)) => worker::decode_reply(&self.buf)
                .ok_or_else(|| internal("the rules process sent a damaged answer")),
            Ok(Some(TAG_FAILED)) => Err(self.failure_frame()),
            _ => Err(self.diagnose()),
        }
    }

    fn failure_frame(&mut self) -> RuleFailure {
        let f = serde_json::from_slice(&self.buf)
            .unwrap_or_else(|e| internal(format!("bad answer from the rules process: {e}")));
        self.stop();
        f
    }

    /// Ends the worker (politely when it is idle), noting what it used.
    pub fn finish(mut self) {
        let _ = worker::write_frame(&mut self.input, TAG_END, &[]);
        let _ = self.input.flush();
        if let Ok(Some(worker::TAG_STATS)) = self.wait_for_frame()
            && let Ok(st) = serde_json::from_slice::<worker::Stats>(&self.buf)
        {
            RULES_WORKER_CPU_MS.fetch_add(st.cpu_ms, Ordering::Relaxed);
            RULES_WORKER_PEAK_KIB.fetch_max(st.peak_rss_kib, Ordering::Relaxed);
        }
        self.stop();
    }

    fn stop(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some(tx) = self.stop_watchdog.take() {
            let _ = tx.send(Watch::Stop);
        }
        // Give a worker that was told to end a moment, then make sure.
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Why the worker stopped answering.
    fn diagnose(&mut self) -> RuleFailure {
        // The watchdog first, so it can never signal a pid reused after the reaping below.
        if let Some(tx) = self.stop_watchdog.take() {
            let _ = tx.send(Watch::Stop);
        }
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        self.finished = true;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if self.timed_out.load(Ordering::SeqCst) {
            return internal(format!(
                "the rules took longer than the limit of {} s for one file (rules_seconds) and were stopped",
                self.run_seconds
            ));
        }
        let signal = status.and_then(|s| s.signal());
        if stderr.contains("memory allocation") || signal == Some(libc::SIGABRT) {
            return internal(format!(
                "the rules used more memory than the limit of {} MiB and were stopped",
                self.memory_mib
            ));
        }
        if signal == Some(libc::SIGXCPU) {
            return internal(format!(
                "the rules used more processor time than the limit of {} s and were stopped",
                self.run_seconds
            ));
        }
        let detail = stderr.lines().last().unwrap_or("").trim().to_string();
        internal(format!(
            "the rules process stopped unexpectedly ({}){}",
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown status".into()),
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        ))
    }
}

impl Drop for RulesProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Loads scripts in a worker and returns what they declare, or every problem.
pub fn describe(
    setup: &ReaderSetup,
    scripts: &[Script],
    ctx: &Context,
) -> Result<Description, Vec<LoadProblem>> {
    match RulesProcess::start(setup, scripts, ctx, Operation::Add, None, 0) {
        Ok(p) => {
            let d = p.loaded.description.clone();
            p.finish();
            Ok(d)
        }
        Err(StartError::Problems(p)) => Err(p),
        Err(StartError::Failed(f)) => Err(vec![LoadProblem {
            script: f.script,
            line: f.line,
            message: f.message,
        }]),
    }
}
