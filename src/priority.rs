//! The scheduling priority of a pass's helpers.
//!
//! A pass runs the file's worker process, the checking thread and the rules worker beside the
//! thread that writes (or, in a dry run, looks users up). That thread is the one the whole
//! pass waits for: on two cores, with all four at the same priority, the scheduler shares a
//! core between it and a helper, and the writer loses a share of its core to work that could
//! wait. The helpers therefore run `HELPER_NICE` steps nicer than the writer, so the
//! scheduler keeps a core for the writer and puts the helpers together on the other; they
//! still get all the time the writer leaves. Raising one's own nice value needs no
//! privilege, and it dies with the thread or process it was set on.

/// How many nice steps below the writer the helpers run (see the module's text).
pub const HELPER_NICE: i32 = 3;

/// Lowers the calling thread's priority by `HELPER_NICE`. On Linux a nice value belongs to
/// one thread, so the rest of the process keeps its own; threads it starts afterwards
/// inherit it (a helper process calls it first thing: `confine`). A failure leaves the
/// priority as it was, which is harmless.
pub fn lower_this_thread() {
    // SAFETY: getpriority and setpriority on the calling thread (who = 0) read and change
    // only its scheduling weight.
    unsafe {
        let now = libc::getpriority(libc::PRIO_PROCESS, 0);
        libc::setpriority(libc::PRIO_PROCESS, 0, now.saturating_add(HELPER_NICE));
    }
}
