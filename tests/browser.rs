//! The administrator's day in a real browser (headless chromium through chromedriver)
//! against the real server: sign in, download a template, upload a file with errors, see
//! them and download the error workbook, upload the corrected file, see the preview,
//! submit, watch the job to its end, see the users, undo the job. A screenshot of each step
//! is kept in target/tmp/screenshots/administrator_day/.

mod common;

use common::web::{Server, raw};
use common::webdriver::Browser;
use common::{cli, data_sheet, sheet_rows, text, write_add_file, write_xlsx};
use rollcall::model::Operation;

/// The controls of the page that no label names (by `for`, wrapping or aria-label).
fn unlabelled(b: &Browser) -> serde_json::Value {
    b.run_js(
        "return [...document.querySelectorAll('input, select, textarea, button')]
            .filter((e) => e.offsetParent !== null || e.type === 'file')
            .filter((e) => e.tagName === 'BUTTON' ? !e.textContent.trim() && !e.getAttribute('aria-label')
                : !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
            .map((e) => e.outerHTML.slice(0, 120));",
    )
}

fn fetch(server: &Server, cookie: &str, href: &str) -> Vec<u8> {
    let path = href
        .split_once(&server.addr)
        .map(|(_, p)| p.to_string())
        .unwrap_or_else(|| href.to_string());
    let r = raw(
        &server.addr,
        "GET",
        &path,
        &[("Cookie".to_string(), cookie.to_string())],
        None,
    );
    assert_eq!(r.status, 200, "{href}: {}", r.text());
    r.body
}

#[test]
fn administrator_day() {
    let server = Server::start(
        |data| {
            for args in [
                vec!["tenant", "create", "Acme"],
                vec!["pool", "set", "--tenant", "Acme", "Standard", "100"],
            ] {
                let o = cli(data, &args);
                assert!(o.status.success(), "{}", text(&o));
            }
        },
        &[],
    );
    let files = tempfile::tempdir().unwrap();
    let mut b = Browser::start("administrator_day");
    let base = format!("http://{}/", server.addr);

    // Sign in with the first start's one-time password, then choose a password.
    b.goto(&base);
    b.wait("h1", "Sign in to rollcall");
    b.shot("sign-in");
    b.type_into(&b.labelled("User name"), "operator");
    // From the keyboard: Enter in the password field signs in.
    b.type_into(&b.labelled("Password"), "wrong password\u{E007}");
    b.wait("#banner", "not right");
    b.shot("wrong-password");
    let pw = b.labelled("Password");
    b.type_into(&pw, &server.operator_password);
    b.click(&b.wait("button", "Sign in"));
    b.wait("h1", "Choose your password");
    b.type_into(&b.labelled("One-time password"), &server.operator_password);
    b.type_into(&b.labelled("New password"), "a long new password");
    b.type_into(&b.labelled("New password again"), "a long new password");
    b.shot("choose-password");
    b.click(&b.wait("button", "Change password"));
    b.wait("h1", "Users of Acme");
    b.shot("users-empty");
    let cookie = b.cookie("rollcall_session");

    // Bulk options: the add template.
    b.goto(&format!("{base}#/bulk"));
    b.wait("h1", "Bulk options");
    let link = b.wait("a", "Download the add template");
    let href = b.attr(&link, "href").unwrap();
    let template = fetch(&server, &cookie, &href);
    assert!(template.starts_with(b"PK"));
    assert_eq!(unlabelled(&b), serde_json::json!([]), "bulk options");
    b.shot("bulk-options");

    // A file with errors: every problem on screen, and the error workbook.
    let bad = files.path().join("new-starters.xlsx");
    write_xlsx(
        &bad,
        &[data_sheet(
            Operation::Add,
            &[
                vec![
                    "ann@example.com",
                    "Ann",
                    "Lee",
                    "",
                    "",
                    "Learner",
                    "",
                    "Standard",
                ],
                vec![
                    "bob(at)example.com",
                    "Bob",
                    "Ray",
                    "",
                    "",
                    "Learner",
                    "",
                    "Standard",
                ],
                vec![
                    "cy@example.com",
                    "Cy",
                    "Po",
                    "",
                    "",
                    "Wizard",
                    "",
                    "Standard",
                ],
            ],
        )],
    );
    let input = b.all("input[type=file]").pop().expect("the file input");
    b.type_into(&input, bad.to_str().unwrap());
    b.wait("h2", "has 2 errors");
    let problems = b.page_text();
    assert!(problems.contains("bob(at)example.com"), "{problems}");
    assert!(problems.contains("Wizard"), "{problems}");
    b.shot("upload-with-errors");
    let link = b.wait("a", "Download the error workbook");
    let workbook = fetch(&server, &cookie, &b.attr(&link, "href").unwrap());
    let path = files.path().join("errors.xlsx");
    std::fs::write(&path, workbook).unwrap();
    let rows = sheet_rows(&path, &Operation::Add.sheet_name());
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0].last().unwrap(), "Errors");
    assert!(rows[2].last().unwrap().contains("email"), "{rows:?}");

    // The corrected file: the success message, the licence forecast and the preview.
    let good = files.path().join("new-starters-fixed.xlsx");
    write_add_file(&good, 0..30);
    let input = b.all("input[type=file]").pop().expect("the file input");
    b.type_into(&input, good.to_str().unwrap());
    b.wait("h2", "30 users ready to add");
    b.wait("h2", "Preview of the changes");
    assert!(b.page_text().contains("u29@example.com"));
    assert_eq!(unlabelled(&b), serde_json::json!([]), "the submit form");
    b.shot("preview");
    let submit = b.wait("button", "Add 30 users");
    b.click(&submit);
    b.wait("h1", "Job 1");
    b.wait(".badge", "succeeded");
    b.shot("job-finished");
    let link = b.wait("a", "Download the results workbook");
    assert!(fetch(&server, &cookie, &b.attr(&link, "href").unwrap()).starts_with(b"PK"));

    // The users list shows them; search narrows it.
    b.goto(&format!("{base}#/users"));
    b.wait("td a", "u0@example.com");
    assert_eq!(unlabelled(&b), serde_json::json!([]), "users");
    b.shot("users");
    b.type_into(&b.labelled("Search"), "u2");
    // u2 and u20-u29, once the search has run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while b.all("tbody tr").len() != 11 {
        assert!(std::time::Instant::now() < deadline, "{}", b.page_text());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(b.page_text().contains("u29@example.com"));
    b.shot("users-search");

    // Undo the job from its page: every user it added is gone.
    b.goto(&format!("{base}#/jobs/1"));
    b.click(&b.wait("button", "Undo this job"));
    b.accept_dialog();
    b.wait("h1", "Job 2");
    b.wait(".badge", "succeeded");
    b.shot("undo-finished");
    b.goto(&format!("{base}#/users"));
    b.wait("td", "Nothing to show.");
    b.shot("users-after-undo");
    // The link a message gives (it names the tenant) opens the job.
    b.goto(&format!("{base}#/t/Acme/jobs/1"));
    b.wait("dt", "Undone by");

    // The other pages draw without an error.
    for (page, heading, text) in [
        ("pools", "h1", "Licence pools of Acme"),
        ("audit", "td", "job.submitted"),
        ("rules", "h1", "Rules of Acme"),
        ("settings", "h2", "Administrators"),
    ] {
        b.goto(&format!("{base}#/{page}"));
        b.wait(heading, text);
        assert!(
            b.all("#banner:not([hidden])").is_empty(),
            "{page}: {}",
            b.page_text()
        );
        b.shot(page);
    }

    // Keyboard and zoom: the sign-out control is reachable, the page reflows at 200%.
    b.run_js("document.body.style.zoom = '200%'");
    b.shot("users-200-percent");
    let width = b.run_js("return document.documentElement.scrollWidth <= window.innerWidth * 1.05");
    assert_eq!(
        width,
        serde_json::json!(true),
        "no sideways scrolling at 200%"
    );
    b.click(&b.wait("button", "Sign out"));
    b.wait("h1", "Sign in to rollcall");
    assert!(b.shots.join("01-sign-in.png").exists());
}
