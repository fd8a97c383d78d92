//! The HTTP API against the real server (`rollcall serve` on an ephemeral port): sign-in,
//! sessions, CSRF, lock-out, roles and tenant isolation, the bulk flow, malformed input,
//! and that every documented route is answered.

mod common;

use common::web::{Client, Server, raw};
use common::{cli, text, write_add_file, write_xlsx};
use rollcall::model::Operation;
use serde_json::{Value, json};

fn setup(data: &std::path::Path) {
    for args in [
        vec!["tenant", "create", "Acme"],
        vec!["tenant", "create", "Beta"],
        vec!["pool", "set", "--tenant", "Acme", "Standard", "1000"],
        vec!["pool", "set", "--tenant", "Beta", "Standard", "10"],
    ] {
        let o = cli(data, &args);
        assert!(o.status.success(), "{}", text(&o));
    }
}

fn upload(c: &Client, tenant: &str, op: &str, name: &str, bytes: &[u8]) -> common::web::Resp {
    c.request(
        "POST",
        &format!("/api/v1/tenants/{tenant}/uploads?operation={op}&file_name={name}"),
        &[("Content-Type", "application/octet-stream")],
        Some(bytes),
    )
}

#[test]
fn sign_in_session_csrf_password_change_and_sign_out() {
    let server = Server::start(setup, &[]);
    assert_eq!(server.operator_password.len(), 20);
    let mut c = server.client();
    // Not signed in: 401 with an error object.
    let r = c.get("/api/v1/tenants");
    assert_eq!((r.status, r.code().as_str()), (401, "unauthenticated"));
    // A wrong password says nothing about whether the name exists.
    let wrong = c.sign_in("operator", "not the password");
    let nobody = c.sign_in("nobody", "not the password");
    assert_eq!(wrong.status, 401);
    assert_eq!(
        wrong.json()["error"]["message"],
        nobody.json()["error"]["message"]
    );
    // The one-time password signs in, with a strict cookie, and must be changed first.
    let r = c.sign_in("operator", &server.operator_password);
    assert_eq!(r.status, 200, "{}", r.text());
    let cookie = r.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert_eq!(r.json()["must_change_password"], true);
    let r = c.get("/api/v1/tenants");
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "password_change_required")
    );
    // A change without the CSRF token is refused, whatever the cookie.
    let mut no_csrf = c.clone();
    no_csrf.csrf = None;
    let r = no_csrf.post(
        "/api/v1/session/password",
        &json!({"current": server.operator_password, "new": "a new long password"}),
    );
    assert_eq!((r.status, r.code().as_str()), (403, "csrf"));
    let mut bad_csrf = c.clone();
    bad_csrf.csrf = Some("0".repeat(64));
    assert_eq!(
        bad_csrf.post("/api/v1/session/password", &json!({})).code(),
        "csrf"
    );
    // Too short, then right.
    let r = c.post(
        "/api/v1/session/password",
        &json!({"current": server.operator_password, "new": "short"}),
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("at least 12 characters"), "{}", r.text());
    let r = c.post(
        "/api/v1/session/password",
        &json!({"current": server.operator_password, "new": "a new long password"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = c.get("/api/v1/tenants");
    assert_eq!(r.status, 200);
    let v = r.json();
    let names: Vec<&str> = v["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Acme", "Beta"]);
    // Security headers on the API and on the UI.
    for path in ["/api/v1/tenants", "/"] {
        let r = c.get(path);
        let csp = r.header("content-security-policy").unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }
    assert_eq!(
        c.get("/api/v1/tenants").header("cache-control"),
        Some("no-store")
    );
    // Sign out ends the session on the server: the old cookie no longer works.
    let r = c.delete("/api/v1/session");
    assert_eq!(r.status, 200);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(c.get("/api/v1/session").status, 401);
    // The audit log has the sign-ins, the failures and the password change.
    let o = cli(&server.data, &["audit", "show", "--format", "jsonl"]);
    let log = text(&o);
    for action in [
        "admin.sign_in_failed",
        "admin.sign_in",
        "admin.password_change",
        "admin.sign_out",
    ] {
        assert!(
            log.contains(&format!("\"action\":\"{action}\"")),
            "{action}"
        );
    }
}

#[test]
fn lock_out_throttling_and_session_expiry() {
    let server = Server::start(setup, &[("ROLLCALL_WEB_SIGN_IN_PER_MINUTE", "8")]);
    let op = server.operator();
    // Five failures lock the account, even with the right password afterwards.
    let mut c = server.client();
    for _ in 0..4 {
        assert_eq!(
            c.sign_in("operator", "wrong password").code(),
            "sign_in_failed"
        );
    }
    assert_eq!(c.sign_in("operator", "wrong password").code(), "locked");
    let r = c.sign_in("operator", common::web::OPERATOR_PASSWORD);
    assert_eq!(r.code(), "locked", "{}", r.text());
    assert!(r.text().contains("locked until"));
    // A name without an account locks the same way: lock-out does not tell names apart.
    for _ in 0..4 {
        assert_eq!(
            c.sign_in("ghost", "wrong password").code(),
            "sign_in_failed"
        );
    }
    let ghost = c.sign_in("ghost", "wrong password");
    assert_eq!(ghost.code(), "locked");
    let shape = |r: &common::web::Resp| {
        let m = r.json()["error"]["message"].as_str().unwrap().to_string();
        m.split("until").next().unwrap().to_string() + m.split("Z.").nth(1).unwrap_or("")
    };
    assert_eq!(shape(&ghost), shape(&r));
    // Past the per-minute limit for one name from this address: "try later", without
    // checking anything (8 a minute here).
    let mut throttled = None;
    for _ in 0..10 {
        let r = c.sign_in("someone", "x");
        if r.status == 429 {
            throttled = Some(r);
            break;
        }
    }
    let r = throttled.expect("sign-ins were never throttled");
    assert_eq!(r.code(), "too_many_attempts");
    // The session made before the lock still works until it ends: make it idle too long.
    assert_eq!(op.get("/api/v1/session").status, 200);
    let db = rusqlite::Connection::open(server.data.join("rollcall.db")).unwrap();
    db.execute(
        "UPDATE web_sessions SET last_seen_at = '2020-01-01T00:00:00Z'",
        [],
    )
    .unwrap();
    let r = op.get("/api/v1/session");
    assert_eq!((r.status, r.code().as_str()), (401, "unauthenticated"));
    let left: i64 = db
        .query_row("SELECT count(*) FROM web_sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "an expired session is removed");
}

#[test]
fn roles_and_tenant_isolation() {
    let server = Server::start(setup, &[]);
    let op = server.operator();
    let acme_admin = server.admin("ada", "tenant-admin", Some("Acme"));
    let acme_auditor = server.admin("audrey", "auditor", Some("Acme"));
    let global_auditor = server.admin("gus", "auditor", None);

    // A tenant admin sees only its tenant; the other one does not exist for it.
    let r = acme_admin.get("/api/v1/tenants");
    assert_eq!(r.json()["tenants"], json!([{"name": "Acme"}]));
    let beta_paths = [
        "/api/v1/tenants/Beta",
        "/api/v1/tenants/Beta/users",
        "/api/v1/tenants/Beta/users/x@example.com",
        "/api/v1/tenants/Beta/pools",
        "/api/v1/tenants/Beta/teams",
        "/api/v1/tenants/Beta/templates/add",
        "/api/v1/tenants/Beta/uploads",
        "/api/v1/tenants/Beta/uploads/1",
        "/api/v1/tenants/Beta/jobs",
        "/api/v1/tenants/Beta/jobs/1",
        "/api/v1/tenants/Beta/audit",
        "/api/v1/tenants/Beta/rules",
    ];
    for path in beta_paths {
        for who in [&acme_admin, &acme_auditor] {
            let r = who.get(path);
            assert_eq!(r.status, 404, "{path}: {}", r.text());
            assert!(!r.text().contains("user"), "{path} leaks: {}", r.text());
        }
        assert_ne!(global_auditor.get(path).status, 401, "{path}");
    }
    let r = upload(&acme_admin, "Beta", "add", "x.xlsx", b"PK");
    assert_eq!(r.status, 404);
    // Same answer as for a tenant that does not exist at all.
    assert_eq!(
        acme_admin.get("/api/v1/tenants/Beta").json()["error"]["message"]
            .as_str()
            .unwrap()
            .replace("Beta", "X"),
        acme_admin.get("/api/v1/tenants/Nope").json()["error"]["message"]
            .as_str()
            .unwrap()
            .replace("Nope", "X"),
    );
    // An auditor reads but changes nothing.
    assert_eq!(acme_auditor.get("/api/v1/tenants/Acme/users").status, 200);
    let r = upload(&acme_auditor, "Acme", "add", "x.xlsx", b"PK");
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    let r = acme_auditor.send_json(
        "PUT",
        "/api/v1/tenants/Acme/pools/Standard",
        &json!({"seats": 5}),
    );
    assert_eq!(r.status, 403);
    // Operator-only routes.
    for path in [
        "/api/v1/admins",
        "/api/v1/tokens",
        "/api/v1/settings",
        "/api/v1/mail",
    ] {
        assert_eq!(acme_admin.get(path).status, 403, "{path}");
        assert_eq!(global_auditor.get(path).status, 403, "{path}");
        assert_eq!(op.get(path).status, 200, "{path}");
    }
    assert_eq!(acme_admin.get("/api/v1/audit").status, 403);
    assert_eq!(global_auditor.get("/api/v1/audit").status, 200);
    assert_eq!(acme_admin.get("/api/v1/audit/verify").status, 403);
    let v = global_auditor.get("/api/v1/audit/verify").json();
    assert!(v["problem"].is_null(), "{v}");
    // Seats: operators; tenant admins only when the tenant allows it.
    let r = acme_admin.send_json(
        "PUT",
        "/api/v1/tenants/Acme/pools/Standard",
        &json!({"seats": 5}),
    );
    assert_eq!(r.status, 403);
    let r = op.send_json(
        "PATCH",
        "/api/v1/tenants/Acme/settings",
        &json!({"tenant_admins_edit_seats": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = acme_admin.send_json(
        "PUT",
        "/api/v1/tenants/Acme/pools/Standard",
        &json!({"seats": 5}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["seats"], 5);
    let r = op.send_json(
        "PATCH",
        "/api/v1/tenants/Acme/settings",
        &json!({"bogus": 1}),
    );
    assert_eq!(r.status, 400);

    // Trying a file against the rules on disk: operators only, stores nothing.
    let dir = tempfile::tempdir().unwrap();
    let file = add_file(dir.path(), "try.xlsx", 0..3);
    let path = "/api/v1/tenants/Acme/rules/test?operation=add&file_name=try.xlsx";
    let headers = [("Content-Type", "application/octet-stream")];
    let r = acme_admin.request("POST", path, &headers, Some(&file));
    assert_eq!(r.status, 403, "{}", r.text());
    let r = op.request("POST", path, &headers, Some(&file));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["loaded"], true);
    assert_eq!(r.json()["valid"], true);
    assert_eq!(r.json()["rows"], 3);
    assert_eq!(
        op.get("/api/v1/tenants/Acme/uploads").json()["uploads"],
        json!([])
    );

    // A token made at the console works like one made in Settings.
    let o = cli(
        &server.data,
        &[
            "token",
            "create",
            "reporting",
            "--role",
            "auditor",
            "--tenant",
            "Acme",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let mut reader = server.client();
    reader.bearer = Some(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string(),
    );
    assert_eq!(reader.get("/api/v1/tenants/Acme/users").status, 200);
    assert_eq!(
        reader
            .send_json(
                "PUT",
                "/api/v1/tenants/Acme/pools/Standard",
                &json!({"seats": 1})
            )
            .status,
        403
    );
    assert!(text(&cli(&server.data, &["token", "list"])).contains("reporting"));

    // API tokens: scoped to a tenant and role, stored hashed, revocable.
    let r = op.post(
        "/api/v1/tokens",
        &json!({"name": "hr-sync", "role": "tenant_admin", "tenant": "Acme"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().unwrap().to_string();
    let id = r.json()["id"].as_i64().unwrap();
    let mut bot = server.client();
    bot.bearer = Some(token.clone());
    assert_eq!(bot.get("/api/v1/tenants/Acme/pools").status, 200);
    assert_eq!(bot.get("/api/v1/tenants/Beta/pools").status, 404);
    assert_eq!(bot.get("/api/v1/admins").status, 403);
    // No CSRF token is needed with a bearer token (no cookie is involved).
    let r = bot.send_json(
        "PUT",
        "/api/v1/tenants/Acme/pools/Standard",
        &json!({"seats": 7}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = op.get("/api/v1/tokens").text();
    assert!(!listed.contains(&token), "the secret is never listed");
    assert_eq!(op.delete(&format!("/api/v1/tokens/{id}")).status, 200);
    assert_eq!(bot.get("/api/v1/tenants/Acme/pools").status, 401);

    // Administrators managed by the operator; a disabled one is signed out at once.
    let r = op.post(
        "/api/v1/admins",
        &json!({"username": "bob", "role": "tenant_admin", "tenant": "Beta"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["one_time_password"].as_str().unwrap().len(), 20);
    let r = op.send_json("PATCH", "/api/v1/admins/ada", &json!({"disabled": true}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(acme_admin.get("/api/v1/tenants").status, 401);
    let r = op.send_json(
        "PATCH",
        "/api/v1/admins/operator",
        &json!({"role": "auditor"}),
    );
    assert_eq!(r.status, 400, "the last operator stays: {}", r.text());
}

fn add_file(dir: &std::path::Path, name: &str, range: std::ops::Range<usize>) -> Vec<u8> {
    let p = dir.join(name);
    write_add_file(&p, range);
    std::fs::read(p).unwrap()
}

#[test]
fn the_bulk_flow_over_http() {
    let server = Server::start(setup, &[]);
    let op = server.operator();
    let dir = tempfile::tempdir().unwrap();

    // The template is an .xlsx download named after the tenant and operation.
    let r = op.get("/api/v1/tenants/Acme/templates/add");
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with(b"PK"));
    assert!(
        r.header("content-disposition")
            .unwrap()
            .contains("acme-add-template.xlsx")
    );
    assert_eq!(op.get("/api/v1/tenants/Acme/templates/promote").status, 400);

    // A file with errors: every problem, and the error workbook.
    let bad = dir.path().join("bad.xlsx");
    write_xlsx(
        &bad,
        &[common::data_sheet(
            Operation::Add,
            &[
                vec!["a@example.com", "A", "B", "", "", "Learner", "", "Standard"],
                vec!["not-an-email", "A", "B", "", "", "Learner", "", "Standard"],
                vec!["a@example.com", "A", "", "", "", "Wizard", "", "Standard"],
            ],
        )],
    );
    let r = upload(
        &op,
        "Acme",
        "add",
        "bad.xlsx",
        &std::fs::read(&bad).unwrap(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["valid"], false);
    assert_eq!(v["status"], "rejected");
    let codes: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_str().unwrap())
        .collect();
    assert!(codes.len() >= 4, "{codes:?}");
    let p = &v["problems"][0];
    assert!(
        p["row"].is_i64() && p["column"].is_string() && p["message"].is_string(),
        "{p}"
    );
    let id = v["id"].as_i64().unwrap();
    let r = op.get(&format!("/api/v1/tenants/Acme/uploads/{id}/error-workbook"));
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with(b"PK"));
    assert!(
        r.header("content-disposition")
            .unwrap()
            .contains("bad-errors.xlsx")
    );
    let r = op.post(
        &format!("/api/v1/tenants/Acme/uploads/{id}/submit"),
        &json!({}),
    );
    assert_eq!((r.status, r.code().as_str()), (409, "not_submittable"));
    let page = op
        .get(&format!(
            "/api/v1/tenants/Acme/uploads/{id}/problems?offset=1&limit=2"
        ))
        .json();
    assert_eq!(page["problems"].as_array().unwrap().len(), 2);
    assert_eq!(page["total"].as_i64().unwrap() as usize, codes.len());

    // The corrected file: success message, preview, the button's words, then submit.
    let good = add_file(dir.path(), "good.xlsx", 0..120);
    let r = upload(&op, "Acme", "add", "good.xlsx", &good);
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["submit_label"], "Add 120 users");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("120 users ready to add"),
        "{v}"
    );
    assert_eq!(v["preview"].as_array().unwrap().len(), 120);
    assert_eq!(v["preview"][0]["effect"]["action"], "create");
    assert_eq!(v["forecast"][0]["needed"], 120);
    let id = v["id"].as_i64().unwrap();
    // The body was hashed as it arrived and moved into place: the upload is recorded under
    // the SHA-256 of exactly the bytes sent, and those bytes are what is stored.
    {
        use sha2::Digest;
        let db = rusqlite::Connection::open(server.data.join("rollcall.db")).unwrap();
        let (sha, size, stored): (String, i64, String) = db
            .query_row(
                "SELECT file_sha256, file_size, stored_path FROM uploads WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(sha, hex::encode(sha2::Sha256::digest(&good)));
        assert_eq!(size as usize, good.len());
        assert_eq!(std::fs::read(&stored).unwrap(), good);
        assert!(stored.contains(&sha), "{stored}");
    }
    // The page can be reloaded: the same result, preview included.
    let again = op.get(&format!("/api/v1/tenants/Acme/uploads/{id}")).json();
    assert_eq!(again["preview"].as_array().unwrap().len(), 120);
    let r = op.post(
        &format!("/api/v1/tenants/Acme/uploads/{id}/submit"),
        &json!({"getting_started": false}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let job = r.json()["job"]["id"].as_i64().unwrap();
    // Live progress as server-sent events, ending with the finished job.
    let events = raw(
        &server.addr,
        "GET",
        &format!("/api/v1/tenants/Acme/jobs/{job}/events"),
        &[("Cookie".to_string(), op.cookie.clone().unwrap())],
        None,
    );
    assert_eq!(events.status, 200);
    assert!(
        events
            .header("content-type")
            .unwrap()
            .contains("text/event-stream")
    );
    let last = events
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .next_back()
        .map(|d| serde_json::from_str::<Value>(d.trim()).unwrap())
        .expect("at least one event");
    assert_eq!(last["job"]["state"], "succeeded", "{last}");
    let v = op.wait_job("Acme", job);
    assert_eq!(v["results_workbook"], true);
    let r = op.get(&format!("/api/v1/tenants/Acme/jobs/{job}/results-workbook"));
    assert!(r.body.starts_with(b"PK"));
    // Submitting twice is refused.
    let r = op.post(
        &format!("/api/v1/tenants/Acme/uploads/{id}/submit"),
        &json!({}),
    );
    assert_eq!(r.status, 409);

    // The users: pages by email (keyset), search by prefix, sort by name, filters.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/api/v1/tenants/Acme/users?limit=50&after={a}"),
            None => "/api/v1/tenants/Acme/users?limit=50".into(),
        };
        let page = op.get(&q).json();
        for u in page["users"].as_array().unwrap() {
            seen.push(u["email"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 120);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "in order, no repeats");
    let found = op.get("/api/v1/tenants/Acme/users?q=U11").json();
    let emails: Vec<&str> = found["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["email"].as_str().unwrap())
        .collect();
    // In email order ("0" sorts before "@").
    let mut expected: Vec<String> = (110..120).map(|i| format!("u{i}@example.com")).collect();
    expected.push("u11@example.com".into());
    assert_eq!(emails, expected);
    let by_name = op
        .get("/api/v1/tenants/Acme/users?sort=name&limit=500")
        .json();
    assert_eq!(by_name["users"].as_array().unwrap().len(), 120);
    assert_eq!(
        op.get("/api/v1/tenants/Acme/users?status=deactivated")
            .json()["users"],
        json!([])
    );
    assert_eq!(op.get("/api/v1/tenants/Acme/users?after=zz").status, 400);
    let pools = op.get("/api/v1/tenants/Acme/pools").json();
    assert_eq!(pools["pools"][0]["used"], 120);

    // More options for one user: deactivate, then delete with its confirmation.
    let r = op.post(
        "/api/v1/tenants/Acme/users/u5@example.com/deactivate",
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let deactivation = r.json()["job"]["id"].as_i64().unwrap();
    assert_eq!(
        op.get("/api/v1/tenants/Acme/users/U5@example.com").json()["status"],
        "deactivated"
    );
    let r = op.post(
        "/api/v1/tenants/Acme/users/u5@example.com/deactivate",
        &json!({}),
    );
    assert_eq!(r.status, 409);
    let r = op.post(
        "/api/v1/tenants/Acme/users/u6@example.com/delete",
        &json!({}),
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "confirmation_required")
    );
    let r = op.post(
        "/api/v1/tenants/Acme/users/u6@example.com/delete",
        &json!({"confirm": "u6@example.com"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        op.get("/api/v1/tenants/Acme/users/u6@example.com").status,
        404
    );
    let r = op.post(
        "/api/v1/tenants/Acme/users/u7@example.com/welcome",
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Getting Started for a selection, and for everyone who never got one.
    assert_eq!(
        op.post("/api/v1/tenants/Acme/welcome", &json!({})).status,
        400
    );
    let r = op.post(
        "/api/v1/tenants/Acme/welcome",
        &json!({"emails": ["U1@example.com", "nobody@example.com"]}),
    );
    assert_eq!(r.json()["queued"], 1, "{}", r.text());
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("1 of the users chosen are not active")
    );
    let r = op.post(
        "/api/v1/tenants/Acme/welcome",
        &json!({"not_welcomed": true}),
    );
    // 120 added, u5 deactivated, u6 deleted, u7 and u1 welcomed already.
    assert_eq!(r.json()["queued"], 116, "{}", r.text());

    // Undo the add job: refused as a whole, since two of its users changed since.
    let r = op.post(&format!("/api/v1/tenants/Acme/jobs/{job}/undo"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let undo = r.json()["job"]["id"].as_i64().unwrap();
    let v = op.wait_job("Acme", undo);
    // u5 was changed after the job and u6 deleted: the undo refuses rather than guess.
    assert_eq!(v["job"]["state"], "failed", "{v}");
    let why = v["job"]["error"].as_str().unwrap();
    assert!(
        why.contains("u5@example.com") && why.contains("deleted since"),
        "{why}"
    );
    // The one-row deactivation is undone cleanly: u5 is active again.
    let r = op.post(
        &format!("/api/v1/tenants/Acme/jobs/{deactivation}/undo"),
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = op.wait_job("Acme", r.json()["job"]["id"].as_i64().unwrap());
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert_eq!(
        op.get("/api/v1/tenants/Acme/users/u5@example.com").json()["status"],
        "active"
    );
    let jobs = op.get("/api/v1/tenants/Acme/jobs").json();
    assert!(jobs["jobs"].as_array().unwrap().len() >= 4);
    // The audit log of the tenant, newest first, filtered by job.
    let a = op
        .get(&format!("/api/v1/tenants/Acme/audit?job={job}"))
        .json();
    assert!(a["total"].as_u64().unwrap() > 0);
    let csv = op.get("/api/v1/tenants/Acme/audit?format=csv");
    assert!(csv.text().starts_with("seq,time,actor"));
}

#[test]
fn malformed_and_oversized_requests_get_clear_errors() {
    let server = Server::start(
        setup,
        &[
            ("ROLLCALL_LIMITS_MAX_FILE_BYTES", "4096"),
            ("ROLLCALL_WEB_JSON_MAX_KIB", "1"),
        ],
    );
    let op = server.operator();
    let bad_json = op.request(
        "POST",
        "/api/v1/tenants",
        &[("Content-Type", "application/json")],
        Some(b"{\"name\": "),
    );
    assert_eq!(bad_json.status, 400);
    assert!(
        bad_json.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let not_object = op.request(
        "POST",
        "/api/v1/tenants",
        &[("Content-Type", "application/json")],
        Some(b"[1]"),
    );
    assert_eq!(not_object.status, 400);
    let form = op.request(
        "POST",
        "/api/v1/tenants",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"name=x"),
    );
    assert_eq!(form.status, 415);
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(2000));
    let r = op.request(
        "POST",
        "/api/v1/tenants",
        &[("Content-Type", "application/json")],
        Some(big.as_bytes()),
    );
    assert_eq!((r.status, r.code().as_str()), (413, "too_large"));
    let r = op.post("/api/v1/tenants", &json!({}));
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("\\\"name\\\" is required") || r.text().contains("name"),
        "{}",
        r.text()
    );
    // Uploads: above the size limit, multipart, empty, unknown operation, not a spreadsheet.
    let r = upload(&op, "Acme", "add", "big.xlsx", &vec![b'x'; 5000]);
    assert_eq!((r.status, r.code().as_str()), (413, "too_large"));
    assert!(
        r.text().contains("4.0 KiB") || r.text().contains("limit"),
        "{}",
        r.text()
    );
    let r = op.request(
        "POST",
        "/api/v1/tenants/Acme/uploads?operation=add",
        &[("Content-Type", "multipart/form-data; boundary=x")],
        Some(b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nhi\r\n--x--\r\n"),
    );
    assert_eq!(r.status, 415);
    assert!(r.text().contains("--data-binary"));
    assert_eq!(upload(&op, "Acme", "add", "e.xlsx", b"").status, 400);
    assert_eq!(upload(&op, "Acme", "promote", "e.xlsx", b"PK").status, 400);
    let r = upload(
        &op,
        "Acme",
        "add",
        "junk.xlsx",
        b"this is not a spreadsheet at all",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["valid"], false);
    assert!(
        !r.json()["problems"][0]["message"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    // Unknown routes and methods, bad ids, hostile paths: clear errors, never a crash.
    assert_eq!(op.get("/api/v1/nothing").status, 404);
    assert_eq!(op.delete("/api/v1/tenants").status, 405);
    assert_eq!(op.get("/api/v1/tenants/Acme/jobs/abc").status, 400);
    assert_eq!(op.get("/api/v1/tenants/%FF%FE/users").status, 404);
    assert_eq!(op.get("/../../etc/passwd").status, 404);
    assert_eq!(op.get("/api/v1/tenants/Acme/users?sort=evil").status, 400);
    let r = raw(&server.addr, "GET", "/api/v1/health", &[], None);
    assert_eq!(r.status, 200);
    // Still alive after all of it.
    assert_eq!(op.get("/api/v1/session").status, 200);
}

#[test]
fn every_documented_route_is_answered() {
    let server = Server::start(setup, &[]);
    let doc = server.client().get("/api/v1/openapi.json").json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 30);
    let anonymous = server.client();
    for (path, methods) in paths {
        let concrete = path
            .replace("{tenant}", "Acme")
            .replace("{email}", "x@example.com")
            .replace("{action}", "cancel")
            .replace("{id}", "1")
            .replace("{operation}", "add")
            .replace("{pool}", "Standard")
            .replace("{username}", "operator");
        for (method, op) in methods.as_object().unwrap() {
            let r = anonymous.request(
                &method.to_uppercase(),
                &concrete,
                &[("Content-Type", "application/json")],
                Some(b"{}"),
            );
            let public = op["security"] == json!([]);
            if public {
                assert_ne!(r.status, 401, "{method} {path}");
            } else {
                assert_eq!(r.status, 401, "{method} {path}: {}", r.text());
            }
            assert!(!op["summary"].as_str().unwrap().is_empty());
        }
    }
    // And nothing answers that is not documented: a near miss is a 404.
    assert_eq!(anonymous.get("/api/v1/tenant").status, 404);
}

#[test]
fn https_with_a_given_certificate_and_secure_cookies() {
    let certs = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/smtp_sink.py"
        ))
        .arg("--make-certs")
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let cert = certs.path().join("server.pem");
    let key = certs.path().join("server.key");
    let server = Server::start(
        setup,
        &[
            ("ROLLCALL_WEB_TLS_CERT", cert.to_str().unwrap()),
            ("ROLLCALL_WEB_TLS_KEY", key.to_str().unwrap()),
        ],
    );
    // A real TLS client that trusts only the test CA: health, then a sign-in whose cookie
    // is marked Secure.
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let script = r#"
import http.client, json, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
c = http.client.HTTPSConnection("localhost", int(sys.argv[2]), context=ctx, timeout=10)
c.request("GET", "/api/v1/health")
r = c.getresponse()
print(r.status, r.read().decode())
c.request("POST", "/api/v1/session", body=json.dumps({"username": "operator", "password": sys.argv[3]}),
          headers={"Content-Type": "application/json"})
r = c.getresponse()
r.read()
print(r.status, r.getheader("Set-Cookie"))
"#;
    let o = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(certs.path().join("ca.pem"))
        .arg(&port)
        .arg(&server.operator_password)
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("200 {\"status\":\"ok\""), "{out}");
    assert!(
        out.contains("HttpOnly") && out.contains("; Secure"),
        "{out}"
    );
    // Plain HTTP to the HTTPS port gets no page.
    let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("\"status\":\"ok\""));
    // A key without its certificate is refused at start, with what to do.
    let o = std::process::Command::new(common::BIN)
        .arg("--data-dir")
        .arg(certs.path().join("other-data"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ROLLCALL_WEB_TLS_KEY", &key)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("tls_cert and tls_key go together"),
        "{}",
        text(&o)
    );
}

/// Every route, called by every kind of tenant-bound principal on the other tenant (or on
/// operator routes): never a success. Auditors never change anything anywhere.
#[test]
fn no_route_reaches_another_tenant_or_lets_an_auditor_write() {
    let server = Server::start(setup, &[]);
    let op = server.operator();
    // Something to find in Beta: a user, an upload, a job.
    let dir = tempfile::tempdir().unwrap();
    let file = add_file(dir.path(), "beta.xlsx", 0..2);
    let r = upload(&op, "Beta", "add", "beta.xlsx", &file);
    let up = r.json()["id"].as_i64().unwrap();
    let r = op.post(
        &format!("/api/v1/tenants/Beta/uploads/{up}/submit"),
        &json!({}),
    );
    let job = r.json()["job"]["id"].as_i64().unwrap();
    op.wait_job("Beta", job);
    let acme_admin = server.admin("ada", "tenant-admin", Some("Acme"));
    let acme_auditor = server.admin("audrey", "auditor", Some("Acme"));
    let global_auditor = server.admin("gus", "auditor", None);
    let o = cli(
        &server.data,
        &[
            "token",
            "create",
            "acme-bot",
            "--role",
            "tenant-admin",
            "--tenant",
            "Acme",
        ],
    );
    let mut bot = server.client();
    bot.bearer = Some(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string(),
    );
    let doc = op.get("/api/v1/openapi.json").json();
    let mut checked = 0;
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for (method, spec) in methods.as_object().unwrap() {
            // Routes of no tenant that answer with the caller's own (session, tenant list)
            // are not about another tenant.
            let scoped = path.contains("{tenant}")
                || path.starts_with("/api/v1/audit")
                || spec["description"] == "Operators only.";
            if spec["security"] == json!([]) || !scoped {
                continue;
            }
            for action in [
                "cancel",
                "undo",
                "approve",
                "welcome",
                "deactivate",
                "reactivate",
                "delete",
            ] {
                if !path.contains("{action}") && action != "cancel" {
                    continue;
                }
                let concrete = path
                    .replace("{tenant}", "Beta")
                    .replace("{email}", "u0@example.com")
                    .replace("{action}", action)
                    .replace(
                        "{id}",
                        &if path.contains("/uploads/") { up } else { job }.to_string(),
                    )
                    .replace("{operation}", "add")
                    .replace("{pool}", "Standard")
                    .replace("{username}", "operator");
                let body: &[u8] = if spec["requestBody"]["content"]["application/octet-stream"]
                    .is_object()
                {
                    &file
                } else {
                    b"{\"seats\": 1, \"confirm\": \"u0@example.com\", \"name\": \"x\", \"role\": \"operator\", \"username\": \"x\", \"to\": \"a@example.com\"}"
                };
                let ct = if body == file.as_slice() {
                    "application/octet-stream"
                } else {
                    "application/json"
                };
                let m = method.to_uppercase();
                let write = m != "GET";
                for (who, c) in [
                    ("tenant admin", &acme_admin),
                    ("tenant auditor", &acme_auditor),
                    ("token", &bot),
                ] {
                    let r = c.request(
                        &m,
                        &format!("{concrete}?operation=add"),
                        &[("Content-Type", ct)],
                        Some(body),
                    );
                    assert!(
                        r.status == 403 || r.status == 404,
                        "{who} {m} {concrete}: {} {}",
                        r.status,
                        r.text()
                    );
                    checked += 1;
                }
                if write && path.contains("{tenant}") {
                    let own = concrete.replace("/Beta", "/Acme");
                    for (who, c) in [
                        ("tenant auditor", &acme_auditor),
                        ("global auditor", &global_auditor),
                    ] {
                        let r = c.request(
                            &m,
                            &format!("{own}?operation=add"),
                            &[("Content-Type", ct)],
                            Some(body),
                        );
                        assert!(
                            r.status == 403 || r.status == 404,
                            "{who} {m} {own}: {} {}",
                            r.status,
                            r.text()
                        );
                    }
                }
            }
        }
    }
    assert!(checked > 100, "{checked}");
    // And Beta is as it was.
    let users = op.get("/api/v1/tenants/Beta/users").json();
    assert_eq!(users["users"].as_array().unwrap().len(), 2);
    assert_eq!(
        op.get("/api/v1/tenants/Beta/pools").json()["pools"][0]["seats"],
        10
    );
}

#[test]
fn a_licence_pool_chosen_for_the_whole_file() {
    let server = Server::start(
        |data| {
            setup(data);
            let o = cli(data, &["pool", "set", "--tenant", "Acme", "Premium", "5"]);
            assert!(o.status.success(), "{}", text(&o));
        },
        &[],
    );
    let op = server.operator();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.xlsx");
    write_xlsx(
        &path,
        &[common::data_sheet(
            Operation::Add,
            &[
                vec!["p1@example.com", "A", "B", "", "", "Learner", "", ""],
                vec!["p2@example.com", "A", "B", "", "", "Learner", "", ""],
                vec![
                    "s1@example.com",
                    "A",
                    "B",
                    "",
                    "",
                    "Learner",
                    "",
                    "Standard",
                ],
            ],
        )],
    );
    let file = std::fs::read(&path).unwrap();
    // Without a choice the empty cells are errors.
    let v = upload(&op, "Acme", "add", "mixed.xlsx", &file).json();
    assert_eq!(v["valid"], false);
    assert_eq!(v["problems"][0]["code"], "required_missing");
    // An unknown pool refuses the file, naming the pools there are.
    let v = upload(&op, "Acme", "add&default_pool=Gold", "mixed.xlsx", &file).json();
    assert_eq!(v["valid"], false);
    assert_eq!(v["problems"][0]["code"], "unknown_pool", "{v}");
    assert!(
        v["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("Premium")
    );
    // Chosen (in any case): empty cells take it, a named pool wins; the forecast counts it.
    let v = upload(&op, "Acme", "add&default_pool=premium", "mixed.xlsx", &file).json();
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["default_pool"], "Premium");
    let premium = v["forecast"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["pool"] == "Premium")
        .unwrap();
    assert_eq!(premium["needed"], 2);
    let n = &v["normalisations"][0];
    assert_eq!(
        (n["kind"].as_str(), n["count"].as_u64()),
        (Some("licence pool chosen for the file"), Some(2))
    );
    // The job applies it (the choice goes with the upload).
    let id = v["id"].as_i64().unwrap();
    let r = op.post(
        &format!("/api/v1/tenants/Acme/uploads/{id}/submit"),
        &json!({}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let j = op.wait_job("Acme", r.json()["job"]["id"].as_i64().unwrap());
    assert_eq!(j["job"]["state"], "succeeded", "{j}");
    assert_eq!(
        op.get("/api/v1/tenants/Acme/users/p1@example.com").json()["pool"],
        "Premium"
    );
    assert_eq!(
        op.get("/api/v1/tenants/Acme/users/s1@example.com").json()["pool"],
        "Standard"
    );
    // The same from the console: import --pool.
    let path2 = dir.path().join("more.xlsx");
    write_xlsx(
        &path2,
        &[common::data_sheet(
            Operation::Add,
            &[vec!["p3@example.com", "A", "B", "", "", "Learner", "", ""]],
        )],
    );
    let o = cli(
        &server.data,
        &[
            "import",
            "--tenant",
            "Acme",
            "--op",
            "add",
            "--pool",
            "Premium",
            path2.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        op.get("/api/v1/tenants/Acme/users/p3@example.com").json()["pool"],
        "Premium"
    );
}

#[test]
fn operators_change_mail_and_retention_settings_at_once() {
    let server = Server::start(setup, &[("ROLLCALL_JOBS_UNDO_DAYS", "30")]);
    let op = server.operator();
    let v = op.get("/api/v1/settings").json();
    assert_eq!(v["jobs"]["undo_days"], 30);
    assert_eq!(v["changed_here"]["jobs"], json!([]));
    let r = op.send_json(
        "PATCH",
        "/api/v1/settings",
        &json!({"jobs": {"undo_days": 7}, "mail": {"web_url": "https://rollcall.example.com", "smtp_password": "hunter2hunter2"}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["jobs"]["undo_days"], 7);
    assert_eq!(v["mail"]["web_url"], "https://rollcall.example.com");
    assert_eq!(v["mail"]["smtp_password_set"], true);
    assert!(
        !r.text().contains("hunter2"),
        "the password is never sent back"
    );
    assert_eq!(v["changed_here"]["jobs"], json!(["undo_days"]));
    // Wrong values are refused with what is allowed, and change nothing.
    for bad in [
        json!({"jobs": {"undo_days": 0}}),
        json!({"mail": {"transport": "pigeon"}}),
        json!({"mail": {"transport": "smtp", "smtp_host": ""}}),
        json!({"mail": {"from": "not an address"}}),
        json!({"mail": {"smtp_ca_file": "/etc/passwd"}}),
        json!({"web": {"listen": "0.0.0.0:1"}}),
        json!({"jobs": 5}),
        // Half right is all wrong: nothing of it is saved.
        json!({"mail": {"support_contact": "desk@example.com"}, "jobs": {"undo_days": 0}}),
        // Another SMTP server needs the password again.
        json!({"mail": {"transport": "smtp", "smtp_host": "elsewhere.example"}}),
    ] {
        let r = op.send_json("PATCH", "/api/v1/settings", &bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(op.get("/api/v1/settings").json()["jobs"]["undo_days"], 7);
    assert_eq!(
        op.get("/api/v1/settings").json()["mail"]["support_contact"],
        ""
    );
    // The undo window in effect is the new one: the CLI (another process) sees it too.
    let log = text(&cli(&server.data, &["audit", "show", "--format", "jsonl"]));
    assert!(log.contains("\"action\":\"settings.change\""));
    assert!(!log.contains("hunter2"));
    // Back to the configuration's value.
    let r = op.send_json(
        "PATCH",
        "/api/v1/settings",
        &json!({"jobs": {"undo_days": null}}),
    );
    assert_eq!(r.json()["jobs"]["undo_days"], 30);
    // A test message through the outbox transport.
    let r = op.post(
        "/api/v1/settings/test-email",
        &json!({"to": "ops@example.com"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let outbox: Vec<_> = std::fs::read_dir(server.data.join("outbox"))
        .unwrap()
        .collect();
    assert_eq!(outbox.len(), 1);
}

#[test]
fn approval_by_a_second_administrator_and_cancelling_a_scheduled_job() {
    let server = Server::start(setup, &[]);
    let op = server.operator();
    let second = server.admin("otto", "operator", None);
    let dir = tempfile::tempdir().unwrap();
    // Two users to work on.
    let r = upload(
        &op,
        "Acme",
        "add",
        "two.xlsx",
        &add_file(dir.path(), "two.xlsx", 0..2),
    );
    let id = r.json()["id"].as_i64().unwrap();
    let job = op
        .post(
            &format!("/api/v1/tenants/Acme/uploads/{id}/submit"),
            &json!({}),
        )
        .json()["job"]["id"]
        .as_i64()
        .unwrap();
    assert_eq!(op.wait_job("Acme", job)["job"]["state"], "succeeded");
    // A job held until tomorrow can be cancelled; it never runs.
    let del = dir.path().join("leavers.xlsx");
    write_xlsx(
        &del,
        &[common::data_sheet(
            Operation::Delete,
            &[vec!["u0@example.com", ""]],
        )],
    );
    let bytes = std::fs::read(&del).unwrap();
    let v = upload(&op, "Acme", "delete", "leavers.xlsx", &bytes).json();
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["needs_delete_confirmation"], true);
    let tomorrow = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let when = tomorrow
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let url = format!("/api/v1/tenants/Acme/uploads/{}/submit", v["id"]);
    let r = op.post(&url, &json!({"not_before": when}));
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "confirmation_required")
    );
    let r = op.post(
        &url,
        &json!({"not_before": when, "confirm_delete": true, "confirm": "DELETE 1 USERS"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["job"]["state"], "scheduled");
    let held = r.json()["job"]["id"].as_i64().unwrap();
    let r = op.post(
        &format!("/api/v1/tenants/Acme/jobs/{held}/cancel"),
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["job"]["state"], "cancelled");
    assert_eq!(
        op.post(
            &format!("/api/v1/tenants/Acme/jobs/{held}/cancel"),
            &json!({})
        )
        .status,
        409
    );
    // With approval required, a deletion waits for a second administrator.
    let r = op.send_json(
        "PATCH",
        "/api/v1/tenants/Acme/settings",
        &json!({"require_approval": true}),
    );
    assert_eq!(r.status, 200);
    let v = upload(&op, "Acme", "delete", "leavers.xlsx", &bytes).json();
    let url = format!("/api/v1/tenants/Acme/uploads/{}/submit", v["id"]);
    let r = op.post(
        &url,
        &json!({"confirm_delete": true, "confirm": "DELETE 1 USERS"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["job"]["state"], "awaiting_approval");
    let waiting = r.json()["job"]["id"].as_i64().unwrap();
    let r = op.post(
        &format!("/api/v1/tenants/Acme/jobs/{waiting}/approve"),
        &json!({}),
    );
    assert_eq!(r.status, 409, "the submitter cannot approve: {}", r.text());
    let r = second.post(
        &format!("/api/v1/tenants/Acme/jobs/{waiting}/approve"),
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(op.wait_job("Acme", waiting)["job"]["state"], "succeeded");
    assert_eq!(
        op.get("/api/v1/tenants/Acme/users/u0@example.com").status,
        404
    );
    assert_eq!(
        op.get("/api/v1/tenants/Acme/users/u1@example.com").status,
        200
    );
}
