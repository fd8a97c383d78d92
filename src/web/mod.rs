//! The web server: one warp filter that hands every request to our own router (`api`), the
//! embedded UI (`assets`), sign-in and access rules (`auth`). Blocking work (SQLite, file
//! parsing, workbook writing) leaves the async runtime through `Web::blocking`, on an `App`
//! of a small pool (each with its own database connection).
//!
//! Every response carries the security headers (a strict Content-Security-Policy, no
//! sniffing, no framing, no referrer); API responses are never cached.

pub mod api;
pub mod assets;
pub mod auth;
pub mod openapi;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::error::{AppError, AppResult};
use crate::service::App;

/// A request body as it arrives (never buffered whole unless a handler asks).
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, warp::Error>> + Send>>;

/// What a handler sees of a request.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub remote: Option<SocketAddr>,
    pub body: Option<BodyStream>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn client(&self) -> String {
        self.remote
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "unknown".into())
    }
    pub fn q(&self, key: &str) -> Option<&str> {
        self.query
            .get(key)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// An error as the API answers it: `{"error": {"code", "message", "details"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }
    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }
    pub fn into_response(self) -> warp::reply::Response {
        let body = json!({"error": {
            "code": self.code, "message": self.message, "details": self.details,
        }});
        json_response(self.status, &body)
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Usage(m) if m.starts_with("there is no") => ApiError::not_found(m),
            AppError::Usage(m) => ApiError::bad_request(m),
            AppError::Refused(m) => ApiError::conflict("refused", m),
            other => {
                // The detail goes to the server's log, not to the browser.
                eprintln!("rollcall: web request failed: {other}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "The server could not complete this request; the details are in its log. Try again, and tell the operator if it keeps happening.",
                )
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Failures of a name without an account, and since when (and until when) it is locked.
type GhostFailures = (i64, Option<(Instant, String)>);

/// Shared state of the server.
pub struct Web {
    /// Idle `App`s (each with its own connection), taken by blocking work and put back.
    apps: Mutex<Vec<App>>,
    /// Opens more when all are busy.
    seed: Mutex<App>,
    pub config: crate::config::Config,
    pub data: crate::config::DataDir,
    /// Recent sign-in attempts per client address and user name.
    attempts: Mutex<HashMap<(IpAddr, String), VecDeque<Instant>>>,
    /// Failed sign-ins of names that have no account: locked like real ones.
    ghosts: Mutex<HashMap<String, GhostFailures>>,
    /// Cookies get `Secure` when the server is reached over TLS (a reverse proxy that says so).
    pub secure_cookies: bool,
}

impl Web {
    pub fn new(app: &App) -> AppResult<Arc<Web>> {
        let seed = app.reopen()?;
        // Fresh statistics for the query planner (cheap: sampled, and only where stale).
        if let Err(e) = seed
            .conn
            .execute_batch("PRAGMA analysis_limit = 400; PRAGMA optimize = 0x10002;")
        {
            eprintln!("rollcall: could not refresh the database statistics: {e}");
        }
        Ok(Arc::new(Web {
            config: app.config.clone(),
            data: app.data.clone(),
            apps: Mutex::new(Vec::new()),
            seed: Mutex::new(seed),
            attempts: Mutex::new(HashMap::new()),
            ghosts: Mutex::new(HashMap::new()),
            secure_cookies: app.config.web.secure_cookies || app.config.web.tls_cert.is_some(),
        }))
    }

    fn take_app(&self) -> AppResult<App> {
        if let Some(app) = self.apps.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(app);
        }
        let seed = self
            .seed
            .lock()
            .map_err(|_| AppError::internal("opening a connection", "lock poisoned"))?;
        Ok(seed.reopen()?)
    }

    fn give_back(&self, app: App) {
        if let Ok(mut v) = self.apps.lock()
            && v.len() < 8
        {
            v.push(app);
        }
    }

    /// Runs `f` on a blocking thread with an `App` acting as `actor`. A panic in `f` is an
    /// internal error of this request, not of the server.
    pub async fn blocking<T, F>(self: &Arc<Self>, actor: &str, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut App) -> Result<T, ApiError> + Send + 'static,
    {
        let web = self.clone();
        let actor = actor.to_string();
        let joined = tokio::task::spawn_blocking(move || {
            let mut app = web.take_app()?;
            app.actor = actor;
            let out = f(&mut app);
            web.give_back(app);
            out
        })
        .await;
        match joined {
            Ok(r) => r,
            Err(e) => {
                eprintln!("rollcall: a web request handler stopped: {e}");
                Err(ApiError::from(AppError::internal("request handler", e)))
            }
        }
    }

    /// A failed sign-in of a name without an account, answered as a real account would be:
    /// wrong, then locked for the same time after as many failures.
    pub fn ghost_failure(&self, username: &str) -> crate::admin::SignInError {
        use crate::admin::{LOCK_MINUTES, MAX_FAILURES, SignInError};
        let Ok(mut map) = self.ghosts.lock() else {
            return SignInError::Wrong;
        };
        let lock = Duration::from_secs(60 * LOCK_MINUTES as u64);
        // Bounded, without forgetting a lock that still holds (that would tell the name
        // apart from a real, still locked account).
        if map.len() > 10_000 {
            map.retain(|_, (_, locked)| locked.as_ref().is_some_and(|(s, _)| s.elapsed() < lock));
        }
        let entry = map.entry(crate::db::norm(username)).or_insert((0, None));
        if let Some((since, until)) = &entry.1 {
            if since.elapsed() < lock {
                return SignInError::Locked {
                    until: until.clone(),
                };
            }
            *entry = (0, None);
        }
        entry.0 += 1;
        if entry.0 >= MAX_FAILURES {
            let until = crate::db::now_plus(time::Duration::minutes(LOCK_MINUTES));
            *entry = (0, Some((Instant::now(), until.clone())));
            return SignInError::Locked { until };
        }
        SignInError::Wrong
    }

    /// Counts a sign-in attempt from `ip` for `username`; false when it is over the
    /// per-minute limit. Keyed on both, so that behind a reverse proxy (one address for
    /// everyone) one script cannot keep everybody else out; each account also locks itself
    /// after repeated failures (`admin::sign_in`).
    pub fn allow_attempt(&self, ip: Option<IpAddr>, username: &str) -> bool {
        let Some(ip) = ip else { return true };
        let Ok(mut map) = self.attempts.lock() else {
            return true;
        };
        let now = Instant::now();
        if map.len() > 10_000 {
            map.retain(|_, q| q.back().is_some_and(|t| now - *t < Duration::from_secs(60)));
        }
        let q = map.entry((ip, crate::db::norm(username))).or_default();
        while q
            .front()
            .is_some_and(|t| now - *t >= Duration::from_secs(60))
        {
            q.pop_front();
        }
        if q.len() >= self.config.web.sign_in_per_minute as usize {
            return false;
        }
        q.push_back(now);
        true
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::from(AppError::from(e))
    }
}

impl From<crate::error::StartupError> for ApiError {
    fn from(e: crate::error::StartupError) -> Self {
        ApiError::from(AppError::from(e))
    }
}

/// A JSON response with the API's headers.
pub fn json_response(status: StatusCode, body: &Value) -> warp::reply::Response {
    let text = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = warp::reply::Response::new(text.into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A file download (a workbook) with a safe `Content-Disposition` name.
pub fn download(bytes: Vec<u8>, content_type: &'static str, name: &str) -> warp::reply::Response {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._- ()".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
    let mut r = warp::reply::Response::new(bytes.into());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
    )) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

pub const XLSX: &str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";

/// The Content-Security-Policy of every response: only our own scripts, styles and
/// connections; no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn secure_headers(r: &mut warp::reply::Response, api: bool) {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if api && !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

fn parse_query(raw: &str) -> HashMap<String, String> {
    form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .collect()
}

/// Serves until Ctrl-C or SIGTERM (HTTPS when `[web] tls_cert` is set); `on_listening`
/// gets the bound address and the scheme.
pub fn serve_http(
    app: &App,
    addr: SocketAddr,
    on_listening: impl FnOnce(SocketAddr, &str),
) -> AppResult<()> {
    let tls = tls_config(&app.config.web)?;
    let web = Web::new(app)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::internal("starting the server runtime", e))?;
    rt.block_on(async move {
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
        match tls {
            None => {
                on_listening(local, "http");
                warp::serve(routes(web))
                    .incoming(listener)
                    .graceful(shutdown)
                    .run()
                    .await;
            }
            Some(tls) => {
                on_listening(local, "https");
                serve_tls(web, listener, tls, shutdown).await;
            }
        }
        Ok(())
    })
}

/// The client address of a request served over TLS (warp's own is private to its server).
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

/// Reads the certificate chain and key of `[web] tls_cert` / `tls_key`.
pub fn tls_config(cfg: &crate::config::WebConfig) -> AppResult<Option<Arc<rustls::ServerConfig>>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = match (&cfg.tls_cert, &cfg.tls_key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => {
            return Err(AppError::Usage(
                "[web] tls_cert and tls_key go together: give both (PEM files) or neither".into(),
            ));
        }
    };
    let bad = |what: &str, p: &std::path::Path, e: String| {
        AppError::Usage(format!("cannot use the TLS {what} {}: {e}", p.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("certificate", cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("certificate", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("certificate", cert, "no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("key", key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AppError::internal("setting up TLS", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key", cert, e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// HTTPS: each connection's TLS handshake (with a time limit), then HTTP/1.1 into the same
/// filter as plain HTTP. At `shutdown` it stops accepting and lets the requests under way
/// finish (at most 30 s), as plain HTTP does.
async fn serve_tls(
    web: Arc<Web>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let service = warp::service(routes(web));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => {
                    // Out of file descriptors and the like: wait a moment, go on.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Peer(peer));
                    let mut service = service.clone();
                    async move { tower_service::Service::call(&mut service, req).await }
                },
            );
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = watcher.watch(conn).await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
}

/// The one filter: method, path, query, headers, client address and the body stream, all
/// handed to `handle`.
pub fn routes(
    web: Arc<Web>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::addr::remote())
        .and(warp::ext::optional::<Peer>())
        .and(warp::body::stream())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: HeaderMap,
                  remote: Option<SocketAddr>,
                  peer: Option<Peer>,
                  body| {
                let web = web.clone();
                let body = boxed_body(body);
                async move {
                    let req = Request {
                        method,
                        path: path.as_str().to_string(),
                        query: parse_query(&query),
                        headers,
                        remote: remote.or(peer.map(|p| p.0)),
                        body: Some(body),
                    };
                    handle(web, req).await
                }
            },
        )
        .recover(|_rejection: warp::Rejection| async move {
            Ok::<_, std::convert::Infallible>(
                ApiError::bad_request("This request could not be read.").into_response(),
            )
        })
        .unify()
}

fn boxed_body<S, B>(s: S) -> BodyStream
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf,
{
    Box::pin(s.map(|r| r.map(|mut b| b.copy_to_bytes(b.remaining()))))
}

async fn handle(web: Arc<Web>, req: Request) -> warp::reply::Response {
    let api = req.path.starts_with("/api/");
    let mut resp = if api {
        match api::dispatch(&web, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    } else {
        assets::serve(&req)
    };
    secure_headers(&mut resp, api);
    resp
}

/// Reads a JSON body of at most `[web] json_max_kib`. An empty body reads as `{}`.
pub async fn read_json(web: &Web, req: &mut Request) -> ApiResult<Value> {
    let limit = web.config.web.json_max_kib.saturating_mul(1024) as usize;
    if let Some(ct) = req.header("content-type")
        && !ct
            .trim()
            .to_ascii_lowercase()
            .starts_with("application/json")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("This request takes JSON (Content-Type: application/json), not {ct}."),
        ));
    }
    let mut buf = Vec::new();
    if let Some(mut body) = req.body.take() {
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|_| ApiError::bad_request("The request body was cut off."))?;
            if buf.len() + chunk.len() > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("The request body is larger than {limit} bytes."),
                ));
            }
            buf.extend_from_slice(&chunk);
        }
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(&buf).map_err(|e| {
        ApiError::bad_request(format!(
            "The request body is not valid JSON (line {}, column {}).",
            e.line(),
            e.column()
        ))
    })?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
        ));
    }
    Ok(v)
}
