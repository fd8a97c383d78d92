//! `rollcall serve`: the HTTP server and the job worker. For now the server answers
//! `GET /api/v1/health`; the web UI and API arrive with their own issue. Ctrl-C or SIGTERM
//! stops both cleanly (a running job finishes first; a kill is safe too, see `scheduler`).

use std::net::SocketAddr;

use warp::Filter;

use crate::error::{AppError, AppResult};
use crate::service::App;

pub fn run(app: &App) -> AppResult<()> {
    let addr: SocketAddr = app.config.listen.parse().map_err(|_| {
        AppError::Usage(format!(
            "cannot listen on {:?}: give an address like 127.0.0.1:8080",
            app.config.listen
        ))
    })?;
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
    let served = serve_http(app, addr);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    crate::scheduler::nudge(&app.data);
    if worker.join().is_err() {
        eprintln!("rollcall: the job worker stopped on an internal error");
    }
    served
}

fn serve_http(app: &App, addr: SocketAddr) -> AppResult<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::internal("starting the server runtime", e))?;
    rt.block_on(async move {
        let health = warp::path!("api" / "v1" / "health")
            .and(warp::get())
            .map(|| {
                warp::reply::json(&serde_json::json!({
                    "status": "ok",
                    "version": env!("CARGO_PKG_VERSION"),
                }))
            });
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            AppError::internal(
                format!("cannot listen on {addr} (is another server using it?)"),
                e,
            )
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| AppError::internal("reading the listening address", e))?;
        // The signal handler is in place before anyone can know the address, so a
        // SIGTERM sent right after startup still stops the server cleanly.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| AppError::internal("setting up the stop signal", e))?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        say(&format!(
            "rollcall is listening on http://{local} (data: {})",
            app.data
        ));
        warp::serve(health)
            .incoming(listener)
            .graceful(shutdown)
            .run()
            .await;
        say("rollcall stopped.");
        Ok(())
    })
}

/// A line on the console; a closed or broken standard output (a service manager that
/// dropped it) never stops the server.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
