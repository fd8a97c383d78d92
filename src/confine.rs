//! How a helper process (the file's worker, the rules worker) limits itself.
//!
//! A helper is the same binary started again with an internal subcommand. It confines itself
//! first thing, before it reads the untrusted input (the uploaded file, the tenant's scripts):
//! hard limits on its address space and CPU seconds, no core dump, optionally no file
//! written, and a priority `priority::HELPER_NICE` steps below the pass's writer. Being done
//! by the helper rather than between fork and exec, nothing runs in a forked copy of the
//! parent, so the standard library can start the helper with a vfork-like spawn: the parent,
//! which may be a server holding hundreds of MiB, is not copied for each pass.

use serde::{Deserialize, Serialize};

/// The limits a helper puts on itself (see the module's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// RLIMIT_AS: an allocation beyond it fails inside the helper.
    pub memory_bytes: u64,
    /// RLIMIT_CPU: the kernel stops the helper after this many CPU seconds.
    pub cpu_seconds: u64,
    /// Whether the helper may write files (RLIMIT_FSIZE 0 when not).
    pub may_write_files: bool,
}

impl Confinement {
    /// Applies the limits to the calling process and lowers the calling thread's priority
    /// (threads started afterwards inherit it). Hard limits: what runs next cannot raise them.
    pub fn apply(&self) -> std::io::Result<()> {
        set_limit(libc::RLIMIT_AS, self.memory_bytes)?;
        set_limit(libc::RLIMIT_CPU, self.cpu_seconds)?;
        set_limit(libc::RLIMIT_CORE, 0)?;
        if !self.may_write_files {
            set_limit(libc::RLIMIT_FSIZE, 0)?;
        }
        crate::priority::lower_this_thread();
        Ok(())
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
