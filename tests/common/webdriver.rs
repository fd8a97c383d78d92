//! A real browser for end-to-end tests: Debian's chromium, headless, driven by chromedriver
//! over the W3C WebDriver protocol (JSON over HTTP, spoken with the plain client of
//! `web`). Screenshots of each step are kept under the target directory.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::KillOnDrop;
use super::web::raw;

pub struct Browser {
    addr: String,
    session: String,
    pub shots: PathBuf,
    step: u32,
    _profile: tempfile::TempDir,
    _driver: KillOnDrop,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    pub fn start(name: &str) -> Browser {
        let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromedriver is missing: install Debian's chromium and chromium-driver (tests/run.sh does)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let driver = KillOnDrop(child);
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--disable-quic", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let v = send(&addr, "POST", "/session", Some(&caps));
        let session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("screenshots")
            .join(name);
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            addr,
            session,
            shots,
            step: 0,
            _profile: profile,
            _driver: driver,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        send(
            &self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({"url": url})));
    }

    /// The elements matching a CSS selector now.
    pub fn all(&self, css: &str) -> Vec<String> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(&json!({"using": "css selector", "value": css})),
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (up to 30 s) for an element matching `css` whose text contains `text`.
    pub fn wait(&self, css: &str, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for e in self.all(css) {
                if self.text(&e).contains(text) {
                    return e;
                }
            }
            if Instant::now() > deadline {
                let body = self.page_text();
                let url = self.cmd("GET", "/url", None);
                let shot = self.failure_shot();
                panic!(
                    "no {css} with {text:?} on {url} after 30 s (screenshot {}); the page shows:\n{body}",
                    shot.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn text(&self, el: &str) -> String {
        self.cmd("GET", &format!("/element/{el}/text"), None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    pub fn attr(&self, el: &str, name: &str) -> Option<String> {
        self.cmd("GET", &format!("/element/{el}/property/{name}"), None)
            .as_str()
            .map(str::to_string)
    }

    pub fn page_text(&self) -> String {
        self.all("body")
            .first()
            .map(|b| self.text(b))
            .unwrap_or_default()
    }

    pub fn click(&self, el: &str) {
        self.cmd("POST", &format!("/element/{el}/click"), Some(&json!({})));
    }

    pub fn type_into(&self, el: &str, text: &str) {
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(&json!({ "text": text })),
        );
    }

    /// The control labelled `label` (by the label's `for`).
    pub fn labelled(&self, label: &str) -> String {
        let l = self.wait("label", label);
        let id = self.attr(&l, "htmlFor").expect("a label with for=");
        self.all(&format!("#{id}"))
            .into_iter()
            .next()
            .expect("the labelled control")
    }

    pub fn accept_dialog(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.cmd("POST", "/alert/accept", Some(&json!({})));
            if v.get("error").is_none() {
                return;
            }
            assert!(Instant::now() < deadline, "no dialog appeared: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The value of the session cookie, for fetching what a link points at.
    pub fn cookie(&self, name: &str) -> String {
        let v = self.cmd("GET", &format!("/cookie/{name}"), None);
        format!("{name}={}", v["value"].as_str().unwrap_or(""))
    }

    pub fn run_js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": []})),
        )
    }

    fn failure_shot(&self) -> PathBuf {
        use base64::Engine;
        let v = self.cmd("GET", "/screenshot", None);
        let path = self.shots.join("FAILED.png");
        if let Ok(png) = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or(""))
        {
            let _ = std::fs::write(&path, png);
        }
        path
    }

    /// Saves a PNG of the page as the next numbered step.
    pub fn shot(&mut self, what: &str) -> PathBuf {
        use base64::Engine;
        self.step += 1;
        let v = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .expect("a screenshot");
        let path = self.shots.join(format!("{:02}-{what}.png", self.step));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = send(
            &self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

/// One WebDriver command; returns its `value` (an `{"error": ..}` object on failure).
fn send(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Value {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let headers = vec![("Content-Type".to_string(), "application/json".to_string())];
    let r = raw(addr, method, path, &headers, bytes.as_deref());
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    v.get("value").cloned().unwrap_or(v)
}
