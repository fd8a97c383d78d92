//! `rollcall serve`: the HTTP server. For now it answers `GET /api/v1/health` and shuts down
//! cleanly on Ctrl-C or SIGTERM; the web UI and API arrive with their own issue.

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
        println!(
            "rollcall is listening on http://{local} (data: {})",
            app.data
        );
        warp::serve(health)
            .incoming(listener)
            .graceful(shutdown_signal())
            .run()
            .await;
        println!("rollcall stopped.");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
