//! `rollcall serve`: the web server (`web`) and the job worker, side by side. Ctrl-C or SIGTERM
//! stops both cleanly (a running job finishes first; a kill is safe too, see `scheduler`).

use std::net::SocketAddr;

use crate::error::{AppError, AppResult};
use crate::service::App;

pub fn run(app: &App) -> AppResult<()> {
    let addr: SocketAddr = app.config.listen.parse().map_err(|_| {
        AppError::Usage(format!(
            "cannot listen on {:?}: give an address like 127.0.0.1:8080",
            app.config.listen
        ))
    })?;
    // A TLS setting that cannot work stops the start before anything else happens.
    crate::web::tls_config(&app.config.web)?;
    // First start: an operator account, its one-time password shown here only.
    if let Some((admin, password)) = crate::admin::ensure_first_operator(&app.conn)? {
        crate::service::flush_audit(app)?;
        say(&format!(
            "First start: created the operator account {:?}. Its one-time password, shown only here: {password}\nSign in with it and choose a new password. (Lost? rollcall admin reset-password {})",
            admin.username, admin.username
        ));
    }
    // The job worker runs beside the web server, on its own connection.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker_app = app.reopen()?;
    let worker_stop = stop.clone();
    let worker = std::thread::Builder::new()
        .name("job-worker".into())
        .spawn(move || crate::scheduler::serve(worker_app, worker_stop))
        .map_err(|e| AppError::internal("starting the job worker", e))?;
    let served = crate::web::serve_http(app, addr, |local, scheme| {
        say(&format!(
            "rollcall is listening on {scheme}://{local} (data: {})",
            app.data
        ))
    });
    if served.is_ok() {
        say("rollcall stopped.");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    crate::scheduler::nudge(&app.data);
    if worker.join().is_err() {
        eprintln!("rollcall: the job worker stopped on an internal error");
    }
    served
}

/// A line on the console; a closed or broken standard output (a service manager that
/// dropped it) never stops the server.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
