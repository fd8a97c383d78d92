//! Administrator accounts: the console commands, sign-in with lock-out, password changes,
//! the first start's operator. Every change is audited.

mod common;

use common::*;
use rollcall::admin::{self, Role, SignInError};
use rollcall::db;

fn audit_actions(env: &Env) -> Vec<String> {
    rollcall::service::flush_audit(&env.app).unwrap();
    let mut v = Vec::new();
    for e in std::fs::read_dir(env.app.data.audit_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "jsonl") {
            for l in std::fs::read_to_string(p).unwrap().lines() {
                let j: serde_json::Value = serde_json::from_str(l).unwrap();
                let a = j["action"].as_str().unwrap_or("");
                if a.starts_with("admin.") {
                    v.push(a.to_string());
                }
            }
        }
    }
    v
}

#[test]
fn console_commands_manage_accounts_and_keep_one_operator() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.as_path();
    assert!(cli(d, &["tenant", "create", "Acme"]).status.success());
    let o = cli(d, &["admin", "create", "root", "--role", "operator"]);
    assert!(o.status.success(), "{}", text(&o));
    let pw = text(&o)
        .rsplit("shown only now: ")
        .next()
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(pw.len(), 20, "{pw}");
    let o = cli(
        d,
        &[
            "admin",
            "create",
            "grace",
            "--role",
            "tenant-admin",
            "--tenant",
            "acme",
            "--email",
            "grace@example.com",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Created grace (tenant_admin of Acme)"),
        "{}",
        text(&o)
    );
    // Mistakes are said plainly.
    let o = cli(d, &["admin", "create", "eve", "--role", "tenant-admin"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("belongs to one tenant"), "{}", text(&o));
    let o = cli(d, &["admin", "create", "grace", "--role", "auditor"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("exists already"), "{}", text(&o));
    let o = cli(d, &["admin", "create", "bad name", "--role", "auditor"]);
    assert_eq!(o.status.code(), Some(2));
    let o = cli(d, &["admin", "create", "x", "--role", "superuser"]);
    assert_eq!(o.status.code(), Some(2));
    // The last operator can be neither demoted nor disabled.
    let o = cli(d, &["admin", "disable", "root"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("last enabled operator"), "{}", text(&o));
    let o = cli(d, &["admin", "set-role", "root", "auditor"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        cli(d, &["admin", "set-role", "grace", "operator"])
            .status
            .success()
    );
    assert!(cli(d, &["admin", "disable", "root"]).status.success());
    let o = cli(d, &["admin", "list"]);
    let list = text(&o);
    assert!(
        list.contains("root") && list.contains("[disabled]"),
        "{list}"
    );
    assert!(
        list.contains("grace") && list.contains("operator"),
        "{list}"
    );
    assert!(cli(d, &["admin", "enable", "root"]).status.success());
    let o = cli(d, &["admin", "reset-password", "root"]);
    assert!(
        text(&o).contains("New one-time password for root"),
        "{}",
        text(&o)
    );
}

#[test]
fn sign_in_counts_failures_locks_and_is_audited() {
    let env = Env::new();
    let t = db::create_tenant(&env.app.conn, "Acme").unwrap();
    let (a, pw) = admin::create(
        &env.app.conn,
        "test",
        "grace",
        None,
        Role::TenantAdmin,
        Some(&t),
    )
    .unwrap();
    assert!(a.must_change_password);
    let ok = admin::sign_in(&env.app.conn, "GRACE", &pw, "127.0.0.1")
        .unwrap()
        .unwrap();
    assert_eq!(
        (ok.username.as_str(), ok.role, ok.tenant.as_deref()),
        ("grace", Role::TenantAdmin, Some("Acme"))
    );
    // An unknown name and a wrong password read the same.
    let unknown = admin::sign_in(&env.app.conn, "nobody", "x", "ip").unwrap();
    assert_eq!(unknown, Err(SignInError::Unknown));
    assert_eq!(
        unknown.unwrap_err().to_string(),
        SignInError::Wrong.to_string()
    );
    for _ in 0..admin::MAX_FAILURES - 1 {
        assert_eq!(
            admin::sign_in(&env.app.conn, "grace", "wrong", "ip").unwrap(),
            Err(SignInError::Wrong)
        );
    }
    let locked = admin::sign_in(&env.app.conn, "grace", "wrong", "ip").unwrap();
    assert!(
        matches!(locked, Err(SignInError::Locked { .. })),
        "{locked:?}"
    );
    // Locked: even the right password waits.
    assert!(matches!(
        admin::sign_in(&env.app.conn, "grace", &pw, "ip").unwrap(),
        Err(SignInError::Locked { .. })
    ));
    // An operator's reset lifts the lock, with a new one-time password.
    let pw2 = admin::reset_password(&env.app.conn, "console:op", "grace").unwrap();
    assert_ne!(pw, pw2);
    assert!(
        admin::sign_in(&env.app.conn, "grace", &pw, "ip")
            .unwrap()
            .is_err()
    );
    assert!(
        admin::sign_in(&env.app.conn, "grace", &pw2, "ip")
            .unwrap()
            .is_ok()
    );
    // The password change: current one right, long enough, different; then no more "must change".
    assert!(
        admin::change_password(&env.app.conn, "grace", "wrong", "a much longer one", None).is_err()
    );
    let e = admin::change_password(&env.app.conn, "grace", &pw2, "short", None).unwrap_err();
    assert!(e.to_string().contains("at least 12 characters"), "{e}");
    admin::change_password(&env.app.conn, "grace", &pw2, "correct horse battery", None).unwrap();
    let a = admin::find(&env.app.conn, "grace").unwrap().unwrap();
    assert!(!a.must_change_password);
    assert!(
        admin::sign_in(&env.app.conn, "grace", "correct horse battery", "ip")
            .unwrap()
            .is_ok()
    );
    // Disabled accounts cannot sign in.
    admin::create(&env.app.conn, "test", "root", None, Role::Operator, None).unwrap();
    admin::set_disabled(&env.app.conn, "test", "grace", true).unwrap();
    assert_eq!(
        admin::sign_in(&env.app.conn, "grace", "correct horse battery", "ip").unwrap(),
        Err(SignInError::Disabled)
    );
    // The hash is Argon2id and never the password.
    let hash: String = env
        .app
        .conn
        .query_row(
            "SELECT password_hash FROM administrators WHERE username = 'grace'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let actions = audit_actions(&env);
    for a in [
        "admin.create",
        "admin.sign_in",
        "admin.sign_in_failed",
        "admin.locked",
        "admin.password_reset",
        "admin.password_change",
        "admin.disable",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
}

#[test]
fn the_first_start_makes_one_operator_only() {
    let env = Env::new();
    let (a, pw) = admin::ensure_first_operator(&env.app.conn)
        .unwrap()
        .unwrap();
    assert_eq!((a.username.as_str(), a.role), ("operator", Role::Operator));
    assert!(
        admin::sign_in(&env.app.conn, "operator", &pw, "console")
            .unwrap()
            .is_ok()
    );
    assert!(
        admin::ensure_first_operator(&env.app.conn)
            .unwrap()
            .is_none()
    );
}
