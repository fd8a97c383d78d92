//! The web UI: the files of `web-assets/`, embedded in the binary (nothing is fetched at
//! run time, so it works air-gapped). Each answer carries an ETag (the file's SHA-256) and
//! `Cache-Control: no-cache`, so browsers revalidate and an upgraded binary is seen at once.

use warp::http::{HeaderValue, StatusCode, header};

use super::Request;

#[derive(rust_embed::RustEmbed)]
#[folder = "web-assets/"]
#[exclude = "*.md"]
struct Assets;

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

pub fn serve(req: &Request) -> warp::reply::Response {
    let path = req.path.trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    let Some(file) = Assets::get(path) else {
        let mut r = warp::reply::Response::new("Not found. The rollcall web UI is at /.".into());
        *r.status_mut() = StatusCode::NOT_FOUND;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return r;
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    let mut r = if req.header("if-none-match") == Some(etag.as_str()) {
        let mut r = warp::reply::Response::new(Vec::new().into());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = warp::reply::Response::new(file.data.into_owned().into());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(path)),
        );
        r
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
