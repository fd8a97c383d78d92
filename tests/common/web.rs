//! The real server for HTTP tests: `rollcall serve` started as an administrator would, on
//! an ephemeral port, and a minimal HTTP/1.1 client over a plain socket (so the tests see
//! exactly the bytes the server sends: status, headers, cookies).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::{BIN, KillOnDrop, cli, listen_addr};

pub struct Server {
    pub addr: String,
    pub data: PathBuf,
    /// The first operator's one-time password, as printed at first start.
    pub operator_password: String,
    pub child: KillOnDrop,
    pub _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// A new data directory prepared by `setup` (CLI calls), then the server on it.
    pub fn start(setup: impl FnOnce(&Path), env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        setup(&data);
        let mut s = Server::on(&data, env);
        s._dir = Some(dir);
        s
    }

    pub fn on(data: &Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.arg("--data-dir")
            .arg(data)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let child = KillOnDrop(child);
        let (addr, before, _) = listen_addr(&mut lines);
        let operator_password = before
            .split("shown only here: ")
            .nth(1)
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default();
        // Keep reading the server's output so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while lines.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        Server {
            addr,
            data: data.to_path_buf(),
            operator_password,
            child,
            _dir: None,
        }
    }

    pub fn client(&self) -> Client {
        Client {
            addr: self.addr.clone(),
            cookie: None,
            csrf: None,
            bearer: None,
        }
    }

    /// The operator, signed in with a chosen password (the first start's one-time
    /// password changed).
    pub fn operator(&self) -> Client {
        let mut c = self.client();
        let r = c.sign_in("operator", &self.operator_password);
        assert_eq!(r.status, 200, "{}", r.text());
        let r = c.post(
            "/api/v1/session/password",
            &serde_json::json!({"current": self.operator_password, "new": OPERATOR_PASSWORD}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        c
    }

    /// A new administrator made at the console, signed in with a new password.
    pub fn admin(&self, username: &str, role: &str, tenant: Option<&str>) -> Client {
        let mut args = vec!["admin", "create", username, "--role", role];
        if let Some(t) = tenant {
            args.extend(["--tenant", t]);
        }
        let o = cli(&self.data, &args);
        assert!(o.status.success(), "{}", super::text(&o));
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let pw = one_time_password(&out);
        let mut c = self.client();
        assert_eq!(c.sign_in(username, &pw).status, 200);
        let r = c.post(
            "/api/v1/session/password",
            &serde_json::json!({"current": pw, "new": "a long enough password"}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        c
    }
}

pub const OPERATOR_PASSWORD: &str = "operator password 2026";

/// The one-time password in the console output of `admin create` or `reset-password`.
pub fn one_time_password(out: &str) -> String {
    out.split_whitespace()
        .find(|w| w.len() == 20 && w.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| panic!("no password in {out}"))
        .to_string()
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text()))
    }
    /// The error code of an error answer.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// A browser-like client: keeps the session cookie and sends the CSRF token back.
#[derive(Clone)]
pub struct Client {
    pub addr: String,
    pub cookie: Option<String>,
    pub csrf: Option<String>,
    pub bearer: Option<String>,
}

impl Client {
    pub fn sign_in(&mut self, username: &str, password: &str) -> Resp {
        let r = self.post(
            "/api/v1/session",
            &serde_json::json!({"username": username, "password": password}),
        );
        if r.status == 200 {
            let set = r
                .header("set-cookie")
                .expect("a session cookie")
                .to_string();
            self.cookie = Some(set.split(';').next().unwrap().to_string());
            self.csrf = r.json()["csrf_token"].as_str().map(str::to_string);
        }
        r
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], None)
    }
    pub fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path, &[], None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.send_json("POST", path, body)
    }
    pub fn send_json(&self, method: &str, path: &str, body: &Value) -> Resp {
        self.request(
            method,
            path,
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
    }

    /// Any request; adds the cookie, the CSRF token (on changes) and the bearer token.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        let mut all: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(c) = &self.cookie {
            all.push(("Cookie".into(), c.clone()));
        }
        if let (Some(t), true) = (&self.csrf, method != "GET") {
            all.push(("X-CSRF-Token".into(), t.clone()));
        }
        if let Some(b) = &self.bearer {
            all.push(("Authorization".into(), format!("Bearer {b}")));
        }
        raw(&self.addr, method, path, &all, body)
    }

    /// Polls a job until it ends; returns its last JSON.
    pub fn wait_job(&self, tenant: &str, job: i64) -> Value {
        for _ in 0..600 {
            let v = self
                .get(&format!("/api/v1/tenants/{tenant}/jobs/{job}"))
                .json();
            let state = v["job"]["state"].as_str().unwrap_or("").to_string();
            if ["succeeded", "failed", "cancelled"].contains(&state.as_str()) {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("job {job} did not end");
    }
}

/// One request on a new connection (`Connection: close`), the answer read to its end.
pub fn raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // A server may answer (and close) before reading a body it refuses.
        let _ = s.write_all(b);
    }
    let mut r = BufReader::new(s);
    read_response(&mut r)
}

/// Reads status line, headers and the body (by length, chunks or to the end).
pub fn read_response(r: &mut impl BufRead) -> Resp {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut chunk = vec![0u8; n];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk);
            let mut crlf = String::new();
            r.read_line(&mut crlf).unwrap();
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body).unwrap();
    } else {
        let _ = r.read_to_end(&mut body);
    }
    Resp {
        status,
        headers,
        body,
    }
}
