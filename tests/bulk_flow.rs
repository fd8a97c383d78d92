//! The bulk flow end to end through the library: templates, reading files written by other
//! writers, validation of every operation, preview, all-or-nothing apply, reports.

mod common;

use calamine::Reader;
use common::*;
use rollcall::bulk::Outcome;
use rollcall::db;
use rollcall::model::{Effect, Operation};
use rollcall::service::{self, ImportResult};

fn setup(env: &Env) -> db::Tenant {
    let c = &env.app.conn;
    let t = db::create_tenant(c, "Acme").unwrap();
    db::set_pool(c, t.id, "Standard", 5).unwrap();
    db::set_pool(c, t.id, "Premium", 1).unwrap();
    db::add_team(c, t.id, "Sales").unwrap();
    db::add_team(c, t.id, "Research").unwrap();
    // These rosters are tiny: any deactivation is a large share of them. The typed
    // confirmation has its own test (tests/jobs.rs).
    let mut s = db::tenant_settings(c, t.id).unwrap();
    s.large_change_percent = 100;
    db::set_tenant_settings(c, t.id, &s).unwrap();
    t
}

fn validate(
    env: &Env,
    t: &db::Tenant,
    op: Operation,
    path: &std::path::Path,
) -> (Outcome, Vec<(u32, String, Effect)>) {
    let mut effects = Vec::new();
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let o = service::validate(
        &env.app,
        t,
        op,
        path,
        &name,
        &mut |r, e, eff| effects.push((r, e.to_string(), eff.clone())),
        &mut |_| {},
    )
    .unwrap();
    (o, effects)
}

fn import(
    env: &mut Env,
    t: &db::Tenant,
    op: Operation,
    path: &std::path::Path,
    yes: bool,
) -> ImportResult {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    service::import(
        &mut env.app,
        t,
        op,
        path,
        &name,
        service::ImportOptions::new(yes),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap()
}

fn codes(o: &Outcome) -> Vec<(Option<u32>, &'static str)> {
    o.problems.iter().map(|p| (p.row, p.code)).collect()
}

fn user(env: &Env, t: &db::Tenant, email: &str) -> Option<db::User> {
    let mut found = None;
    db::for_each_user(&env.app.conn, t.id, None, |u| {
        if u.email.eq_ignore_ascii_case(email) {
            found = Some(u.clone());
        }
        Ok(())
    })
    .unwrap();
    found
}

fn user_count(env: &Env) -> i64 {
    env.app
        .conn
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .unwrap()
}

/// The rows of an applied job's results workbook (without its header): row, email, result,
/// details.
fn results(r: &ImportResult) -> Vec<Vec<String>> {
    let mut wb: calamine::Xlsx<_> =
        calamine::open_workbook(r.results_report.as_ref().expect("a results workbook")).unwrap();
    let res = wb.worksheet_range("Results").unwrap();
    res.rows()
        .skip(1)
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect()
}

fn add_three(env: &mut Env, t: &db::Tenant) {
    let p = env.path("add.xlsx");
    write_xlsx(
        &p,
        &[
            data_sheet(
                Operation::Add,
                &[
                    vec![
                        "ada@example.com",
                        "Ada",
                        "Lovelace",
                        "Analyst",
                        "Sales",
                        "Learner",
                        "English",
                        "Standard",
                    ],
                    vec![
                        "bob@example.com",
                        "Bob",
                        "Byron",
                        "",
                        "",
                        "Manager",
                        "fr",
                        "Standard",
                    ],
                    vec![
                        "cy@example.com",
                        "Cy",
                        "Clark",
                        "",
                        "Research",
                        "Admin",
                        "",
                        "Premium",
                    ],
                ],
            ),
            meta_sheet(Operation::Add),
        ],
    );
    let r = import(env, t, Operation::Add, &p, false);
    assert!(r.applied, "{:?}", r.outcome.problems);
}

#[test]
fn templates_of_every_operation_pass_their_own_structure_check() {
    let env = Env::new();
    let t = setup(&env);
    for op in Operation::ALL {
        let p = env.path(&format!("{op}.xlsx"));
        let lists = service::template_lists(&env.app, &t).unwrap();
        rollcall::sheet::template::write_template(op, &lists, &p).unwrap();
        // Its structure is right: sent back unfilled, the one problem is that it is empty.
        let (o, _) = validate(&env, &t, op, &p);
        assert_eq!(codes(&o), vec![(None, "no_rows")], "{op}");
        assert!(o.problems[0].message.contains(&op.sheet_name()), "{op}");
        assert_eq!(o.rows, 0);
        // Read Me First explains every column; the lists sheet carries the tenant's data.
        let mut wb: calamine::Xlsx<_> = calamine::open_workbook(&p).unwrap();
        let readme = wb.worksheet_range("Read Me First").unwrap();
        let text: String = readme
            .rows()
            .flatten()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join("|");
        for c in rollcall::model::columns(op) {
            assert!(text.contains(&c.header), "{op} readme lacks {}", c.header);
        }
        let lists = wb.worksheet_range("Lists").unwrap();
        let l: Vec<String> = lists.rows().flatten().map(|c| c.to_string()).collect();
        assert!(l.contains(&"Research".to_string()) && l.contains(&"Premium".to_string()));
        // Uploaded as another operation, it is caught by its metadata.
        let other = if op == Operation::Add {
            Operation::Delete
        } else {
            Operation::Add
        };
        let (o, _) = validate(&env, &t, other, &p);
        assert_eq!(codes(&o), vec![(None, "wrong_operation")], "{op}");
        // The message names both column sets, by letter and name.
        let msg = &o.problems[0].message;
        for o in [op, other] {
            let cols = rollcall::model::columns(o);
            let last = cols.len() - 1;
            let named = format!(
                "{} {}",
                rollcall::model::column_letter(last),
                cols[last].header
            );
            assert!(msg.contains(&named), "{msg}");
        }
    }
}

#[test]
fn add_round_trip_with_preview_and_results_workbook() {
    let mut env = Env::new();
    let t = setup(&env);
    let p = env.path("add.xlsx");
    write_xlsx(
        &p,
        &[data_sheet(
            Operation::Add,
            &[
                vec![
                    " ada@example.com ",
                    "Ada\u{a0}",
                    "Lovelace",
                    "Analyst",
                    "sales",
                    "learner",
                    "English",
                    "Standard",
                ],
                vec![
                    "bob@example.com",
                    "Bob",
                    "Byron",
                    "",
                    "",
                    "Manager",
                    "fr",
                    "standard",
                ],
            ],
        )],
    );
    let (o, effects) = validate(&env, &t, Operation::Add, &p);
    assert!(o.is_valid(), "{:?}", o.problems);
    assert_eq!(o.totals.create, 2);
    assert_eq!(effects.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3]);
    assert!(
        o.notes.iter().any(|n| n.contains("hidden information")),
        "{:?}",
        o.notes
    );
    let kinds: Vec<&str> = o.normalisations.iter().map(|n| n.kind).collect();
    for k in [
        "spaces trimmed",
        "non-breaking space replaced by a space",
        "case of value corrected",
        "language written as its name",
    ] {
        assert!(kinds.contains(&k), "{k} not in {kinds:?}");
    }
    let f = &o.forecast[0];
    assert_eq!(
        (f.pool.as_str(), f.seats, f.used, f.needed, f.free_after),
        ("Standard", 5, 0, 2, 3)
    );
    assert_eq!(
        o.success_message(),
        "2 users ready to add — pool Standard: 2 of 5 free seats"
    );
    assert_eq!(user_count(&env), 0, "validate changes nothing");

    let r = import(&mut env, &t, Operation::Add, &p, false);
    assert!(r.applied);
    let job = r.job_id;
    let ada = user(&env, &t, "ada@example.com").unwrap();
    assert_eq!(
        (
            ada.first_name.as_str(),
            ada.team.as_deref(),
            ada.role.as_str(),
            ada.status.as_str()
        ),
        ("Ada", Some("Sales"), "Learner", "active")
    );
    assert_eq!(
        user(&env, &t, "bob@example.com").unwrap().language,
        "French"
    );
    let pools = db::list_pools(&env.app.conn, t.id).unwrap();
    assert_eq!(pools.iter().find(|p| p.name == "Standard").unwrap().used, 2);
    // Results workbook, one row per row of the file.
    let mut wb: calamine::Xlsx<_> = calamine::open_workbook(r.results_report.unwrap()).unwrap();
    let res = wb.worksheet_range("Results").unwrap();
    let rows: Vec<Vec<String>> = res
        .rows()
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect();
    assert_eq!(rows[1][1], "ada@example.com");
    assert_eq!(rows[1][2], "create");
    assert_eq!(rows.len(), 3);
    let n: i64 = env
        .app
        .conn
        .query_row(
            "SELECT count(*) FROM job_changes WHERE job_id = ?1 AND before IS NULL",
            [job],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 2);
    // The same file again: the users exist now, and the file was applied before.
    let (o, _) = validate(&env, &t, Operation::Add, &p);
    let c = codes(&o);
    assert!(c.contains(&(None, "already_applied")), "{c:?}");
    assert!(c.contains(&(Some(2), "user_exists")), "{c:?}");
    // Found before the file was opened, it still names the file's data sheet.
    let applied = o.problems.iter().find(|p| p.code == "already_applied");
    assert_eq!(applied.map(|p| p.sheet.as_str()), Some(o.sheet.as_str()));
}

#[test]
fn update_round_trip_from_csv() {
    let mut env = Env::new();
    let t = setup(&env);
    add_three(&mut env, &t);
    let p = env.path("update.csv");
    std::fs::write(
        &p,
        "\u{feff}Email;New Email;First Name;Last Name;Job Title;Team;Role;Language;Licence Pool\n\
        ADA@example.com;ada.king@example.com;;King;#clear;#CLEAR;;;\n\
        bob@example.com;;Robert;;007;Research;Admin;German;\n\
        cy@example.com;;;;;;;;\n",
    )
    .unwrap();
    let (o, effects) = validate(&env, &t, Operation::Update, &p);
    assert!(o.is_valid(), "{:?}", o.problems);
    assert_eq!((o.totals.change, o.totals.unchanged), (2, 1));
    let Effect::Change { changes } = &effects[0].2 else {
        panic!("{:?}", effects[0])
    };
    let fields: Vec<&str> = changes.iter().map(|c| c.field.as_ref()).collect();
    assert_eq!(fields, vec!["Email", "Last Name", "Job Title", "Team"]);
    assert_eq!(changes[1].old.as_deref(), Some("Lovelace"));
    assert_eq!(changes[1].new.as_deref(), Some("King"));
    assert!(o.notes.iter().any(|n| n.contains("semicolon")));
    let r = import(&mut env, &t, Operation::Update, &p, false);
    assert!(r.applied, "{:?}", r.outcome.problems);
    let ada = user(&env, &t, "ada.king@example.com").unwrap();
    assert_eq!(
        (
            ada.last_name.as_str(),
            ada.job_title.as_deref(),
            ada.team.as_deref()
        ),
        ("King", None, None)
    );
    let bob = user(&env, &t, "bob@example.com").unwrap();
    assert_eq!(
        (
            bob.first_name.as_str(),
            bob.job_title.as_deref(),
            bob.team.as_deref(),
            bob.role.as_str(),
            bob.language.as_str()
        ),
        ("Robert", Some("007"), Some("Research"), "Admin", "German")
    );
    assert!(user(&env, &t, "ada@example.com").is_none());
    // The results workbook: what was done to each row, with the fields' old and new values.
    let rows = results(&r);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(
        rows[0][..3],
        ["2", "ada.king@example.com", "change"].map(String::from)
    );
    assert!(
        rows[0][3].contains("Last Name: Lovelace -> King"),
        "{rows:?}"
    );
    assert_eq!(rows[1][2], "change");
    assert!(rows[1][3].contains("Role: Manager -> Admin"), "{rows:?}");
    assert_eq!(
        rows[2][..3],
        ["4", "cy@example.com", "unchanged"].map(String::from)
    );
}

#[test]
fn deactivate_warnings_need_acknowledgement_then_reactivate_and_delete() {
    let mut env = Env::new();
    let t = setup(&env);
    add_three(&mut env, &t);
    let p = env.path("deact.xlsx");
    write_xlsx(
        &p,
        &[data_sheet(
            Operation::Deactivate,
            &[vec!["ada@example.com", "Left"]],
        )],
    );
    assert!(import(&mut env, &t, Operation::Deactivate, &p, false).applied);
    assert_eq!(
        user(&env, &t, "ada@example.com").unwrap().status,
        "deactivated"
    );
    // Again with a second user: Ada is already deactivated -> a warning to acknowledge.
    let p2 = env.path("deact2.xlsx");
    write_xlsx(
        &p2,
        &[data_sheet(
            Operation::Deactivate,
            &[vec!["ada@example.com", ""], vec!["bob@example.com", ""]],
        )],
    );
    let r = import(&mut env, &t, Operation::Deactivate, &p2, false);
    assert!(!r.applied && r.needs_acknowledgement);
    assert_eq!(codes(&r.outcome), vec![(Some(2), "already_deactivated")]);
    assert_eq!(
        user(&env, &t, "bob@example.com").unwrap().status,
        "active",
        "nothing applied"
    );
    let r = import(&mut env, &t, Operation::Deactivate, &p2, true);
    assert!(r.applied);
    assert_eq!(
        user(&env, &t, "bob@example.com").unwrap().status,
        "deactivated"
    );
    let rows = results(&r);
    assert_eq!(
        rows.iter().map(|r| r[2].as_str()).collect::<Vec<_>>(),
        ["unchanged", "deactivate"]
    );
    assert!(
        rows[1][3].starts_with("Deactivated; seat in pool Standard freed"),
        "{rows:?}"
    );

    // Reactivate Ada into Premium: Cy holds its one seat -> refused with the forecast.
    let p3 = env.path("react.xlsx");
    write_xlsx(
        &p3,
        &[data_sheet(
            Operation::Reactivate,
            &[
                vec!["ada@example.com", "Premium"],
                vec!["cy@example.com", ""],
            ],
        )],
    );
    let (o, _) = validate(&env, &t, Operation::Reactivate, &p3);
    let c = codes(&o);
    assert!(
        c.contains(&(None, "licence_pool_full")) && c.contains(&(Some(3), "already_active")),
        "{c:?}"
    );
    let f = o.forecast.iter().find(|f| f.pool == "Premium").unwrap();
    assert_eq!((f.seats, f.used, f.needed, f.free_after), (1, 1, 1, -1));
    write_xlsx(
        &p3,
        &[data_sheet(
            Operation::Reactivate,
            &[vec!["ada@example.com", ""]],
        )],
    );
    let r = import(&mut env, &t, Operation::Reactivate, &p3, false);
    assert!(r.applied, "{:?}", r.outcome.problems);
    assert_eq!(
        results(&r),
        vec![vec![
            "2".to_string(),
            "ada@example.com".into(),
            "reactivate".into(),
            "Reactivated, seat in pool Standard".into()
        ]]
    );
    let ada = user(&env, &t, "ada@example.com").unwrap();
    assert_eq!(
        (ada.status.as_str(), ada.pool.as_str()),
        ("active", "Standard")
    );

    // Delete erases the row and keeps the before image with the job.
    let p4 = env.path("del.xlsx");
    write_xlsx(
        &p4,
        &[data_sheet(
            Operation::Delete,
            &[vec!["cy@example.com", "Request"]],
        )],
    );
    let r = import(&mut env, &t, Operation::Delete, &p4, false);
    assert!(r.applied);
    assert_eq!(
        results(&r),
        vec![vec![
            "2".to_string(),
            "cy@example.com".into(),
            "delete".into(),
            "Deleted; personal data erased".into()
        ]]
    );
    let job = r.job_id;
    assert!(user(&env, &t, "cy@example.com").is_none());
    let before: String = env
        .app
        .conn
        .query_row(
            "SELECT before FROM job_changes WHERE job_id = ?1",
            [job],
            |r| r.get(0),
        )
        .unwrap();
    assert!(before.contains("cy@example.com") && before.contains("Clark"));
    let (o, _) = validate(&env, &t, Operation::Delete, &p4);
    assert!(codes(&o).contains(&(Some(2), "user_not_found")));
}

#[test]
fn every_row_error_code_and_nothing_applied() {
    let mut env = Env::with(|c| c.limits.max_cell_chars = 300);
    let t = setup(&env);
    add_three(&mut env, &t);
    let before = user_count(&env);
    let long = "x".repeat(101);
    let huge = "y".repeat(301);
    let p = env.path("bad.xlsx");
    let mut sheet = data_sheet(
        Operation::Add,
        &[
            vec!["", "No", "Email", "", "", "Learner", "", "Standard"], // 2 required_missing
            vec!["not-an-email", "A", "B", "", "", "Learner", "", "Standard"], // 3 email_invalid
            vec!["r4@example.com", "A", "B", "", "Nope", "Boss", "xx", "Gold"], // 4 unknown_team, invalid_choice x2, unknown_pool
            vec![
                "r5@example.com",
                &long,
                "B",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ], // 5 too_long
            vec![
                "dup@example.com",
                "A",
                "B",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ], // 6 duplicate
            vec![
                "DUP@example.com",
                "A",
                "B",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ], // 7 duplicate
            vec![
                "ada@example.com",
                "A",
                "B",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ], // 8 user_exists
            vec![
                "r9@example.com",
                "A",
                "#CLEAR",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ], // 9 cannot_clear
            vec![
                "r10@example.com",
                "A\nB",
                "B",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ], // 10 control_character
            vec![
                "r11@example.com",
                "A",
                "B",
                "",
                "",
                "Learner",
                "",
                "Standard",
                "",
                "stray",
            ], // 11 value_outside_template (col J)
            vec![
                "r12@example.com",
                &huge,
                "B",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ], // 12 cell_too_long
            vec![
                "r13@example.com",
                "A",
                "B",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ], // 13 cell_error (below)
        ],
    );
    sheet.rows[12][3] = C::Raw(r##"<c r="D13" t="e"><v>#N/A</v></c>"##.into());
    write_xlsx(&p, &[sheet]);
    let (o, _) = validate(&env, &t, Operation::Add, &p);
    let c = codes(&o);
    for want in [
        (Some(2), "required_missing"),
        (Some(3), "email_invalid"),
        (Some(4), "unknown_team"),
        (Some(4), "invalid_choice"),
        (Some(4), "unknown_pool"),
        (Some(5), "too_long"),
        (Some(6), "duplicate_in_file"),
        (Some(7), "duplicate_in_file"),
        (Some(8), "user_exists"),
        (Some(9), "cannot_clear"),
        (Some(10), "control_character"),
        (Some(11), "value_outside_template"),
        (Some(12), "cell_too_long"),
        (Some(13), "cell_error"),
    ] {
        assert!(c.contains(&want), "{want:?} not in {c:?}");
    }
    let p4 = o
        .problems
        .iter()
        .find(|p| p.code == "unknown_pool")
        .unwrap();
    assert_eq!(
        (
            p4.column.as_deref(),
            p4.column_name.as_deref(),
            p4.value.as_deref(),
            p4.sheet.as_str()
        ),
        (Some("H"), Some("Licence Pool"), Some("Gold"), "Add Users")
    );
    let r = import(&mut env, &t, Operation::Add, &p, true);
    assert!(!r.applied);
    assert_eq!(
        user_count(&env),
        before,
        "a file with errors applies nothing"
    );
    // The error workbook: rows as uploaded, Errors column, Read Me First kept; uploading it
    // again as is gives the same problems (the Errors column is ignored).
    let report = r.error_report.unwrap();
    let mut wb: calamine::Xlsx<_> = calamine::open_workbook(&report).unwrap();
    assert!(wb.sheet_names().contains(&"Read Me First".to_string()));
    let data = wb.worksheet_range("Add Users").unwrap();
    assert_eq!(data.get_value((0, 8)).unwrap().to_string(), "Errors");
    assert_eq!(data.get_value((3, 7)).unwrap().to_string(), "Gold");
    assert!(
        data.get_value((3, 8))
            .unwrap()
            .to_string()
            .contains("Licence Pool: There is no licence pool")
    );
    let (again, _) = validate(&env, &t, Operation::Add, &report);
    let mut a: Vec<_> = codes(&again);
    let mut b = c.clone();
    a.sort();
    b.sort();
    // The too-long cell is echoed as a note, so it turns into a different problem.
    a.retain(|x| x.0 != Some(12));
    b.retain(|x| x.0 != Some(12));
    assert_eq!(a, b);
}

#[test]
fn update_specific_errors() {
    let mut env = Env::new();
    let t = setup(&env);
    add_three(&mut env, &t);
    let p = env.path("upd.csv");
    std::fs::write(
        &p,
        "Email,New Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n\
        nobody@example.com,,,,,,,,\n\
        ada@example.com,bob@example.com,,,,,,,\n\
        cy@example.com,,#CLEAR,,,,,,\n",
    )
    .unwrap();
    let (o, _) = validate(&env, &t, Operation::Update, &p);
    let c = codes(&o);
    for want in [
        (Some(2), "user_not_found"),
        (Some(3), "email_taken"),
        (Some(4), "cannot_clear"),
    ] {
        assert!(c.contains(&want), "{want:?} not in {c:?}");
    }
}

#[test]
fn structure_errors_name_columns_and_sheets() {
    let env = Env::new();
    let t = setup(&env);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["Email", "Reason", "Extra"],
            "column C \"Extra\" is not part of the template",
        ),
        (
            vec!["Email"],
            "column \"Reason\" (column B of the template) is missing",
        ),
        (
            vec!["Reason", "Email"],
            "column \"Email\" is in column B but belongs in column A",
        ),
        (
            vec!["Email", "Why"],
            "column B is \"Why\" but should be \"Reason\"",
        ),
    ];
    for (header, want) in cases {
        let p = env.path("s.xlsx");
        write_xlsx(
            &p,
            &[Sheet {
                name: "Deactivate Users".into(),
                rows: vec![header.iter().map(|h| s(h)).collect()],
                hidden: false,
            }],
        );
        let (o, _) = validate(&env, &t, Operation::Deactivate, &p);
        assert_eq!(codes(&o), vec![(None, "columns_mismatch")]);
        assert!(
            o.problems[0].message.contains(want),
            "{}",
            o.problems[0].message
        );
    }
    let p = env.path("s.xlsx");
    write_xlsx(
        &p,
        &[Sheet {
            name: "Sheet1".into(),
            rows: vec![vec![s("Email")]],
            hidden: false,
        }],
    );
    let (o, _) = validate(&env, &t, Operation::Deactivate, &p);
    assert_eq!(codes(&o), vec![(None, "sheet_missing")]);
    assert!(o.problems[0].message.contains("\"Sheet1\""));
    write_xlsx(&p, &[data_sheet(Operation::Delete, &[])]);
    let (o, _) = validate(&env, &t, Operation::Add, &p);
    assert_eq!(codes(&o), vec![(None, "wrong_operation")]);
    assert!(
        o.problems[0].message.contains("B First Name"),
        "{}",
        o.problems[0].message
    );
    let mut meta = meta_sheet(Operation::Deactivate);
    meta.rows[1][1] = s("99");
    write_xlsx(&p, &[data_sheet(Operation::Deactivate, &[]), meta]);
    let (o, _) = validate(&env, &t, Operation::Deactivate, &p);
    assert_eq!(codes(&o), vec![(None, "template_too_new")]);
    write_xlsx(
        &p,
        &[Sheet {
            name: "Deactivate Users".into(),
            rows: vec![vec![], vec![s("a@b.co")]],
            hidden: false,
        }],
    );
    let (o, _) = validate(&env, &t, Operation::Deactivate, &p);
    assert_eq!(codes(&o), vec![(None, "columns_mismatch")]);
    assert!(o.problems[0].message.contains("Row 1"));
}

#[test]
fn a_failure_part_way_leaves_the_roster_as_it_was() {
    let mut env = Env::new();
    let t = setup(&env);
    add_three(&mut env, &t);
    // A constraint that validation cannot foresee fails the fourth insert.
    env.app.conn.execute_batch("CREATE TRIGGER boom BEFORE INSERT ON users WHEN NEW.email_norm = 'r4@example.com' BEGIN SELECT RAISE(ABORT, 'boom'); END;").unwrap();
    let p = env.path("add.xlsx");
    write_xlsx(
        &p,
        &[data_sheet(
            Operation::Add,
            &[
                vec![
                    "r2@example.com",
                    "A",
                    "B",
                    "",
                    "",
                    "Learner",
                    "",
                    "Standard",
                ],
                vec![
                    "r3@example.com",
                    "A",
                    "B",
                    "",
                    "",
                    "Learner",
                    "",
                    "Standard",
                ],
                vec![
                    "r4@example.com",
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
    let before = user_count(&env);
    let err = service::import(
        &mut env.app,
        &t,
        Operation::Add,
        &p,
        "add.xlsx",
        service::ImportOptions::new(false),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("boom"), "{err}");
    assert_eq!(user_count(&env), before);
    let jobs: i64 = env
        .app
        .conn
        .query_row(
            "SELECT count(*) FROM jobs WHERE state = 'running'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(jobs, 0, "no half-recorded job");
    let failed: String = env
        .app
        .conn
        .query_row("SELECT error FROM jobs WHERE state = 'failed'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(failed.contains("boom"), "{failed}");
    let changes: i64 = env
        .app
        .conn
        .query_row("SELECT count(*) FROM job_changes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(changes, 3, "only the first import's changes");
    // The failed job does not hold up the queue.
    env.app.conn.execute_batch("DROP TRIGGER boom;").unwrap();
    assert!(import(&mut env, &t, Operation::Add, &p, false).applied);
}

#[test]
fn ods_and_xls_files_are_read() {
    let mut env = Env::new();
    let t = setup(&env);
    add_three(&mut env, &t);
    // An OpenDocument spreadsheet as LibreOffice writes it (repeated empty cells included).
    let p = env.path("deact.ods");
    let cell = ods_cell;
    let row = |a: &str, b: &str| {
        format!(
            "<table:table-row>{}{}<table:table-cell table:number-columns-repeated=\"1022\"/></table:table-row>",
            cell(a),
            if b.is_empty() {
                "<table:table-cell/>".to_string()
            } else {
                cell(b)
            }
        )
    };
    let tables = format!(
        r#"<table:table table:name="Deactivate Users">{}{}{}<table:table-row table:number-rows-repeated="1048572"><table:table-cell table:number-columns-repeated="1024"/></table:table-row></table:table><table:table table:name="Read Me First"><table:table-row>{}</table:table-row></table:table>"#,
        row("Email", "Reason"),
        row(" Ada@Example.com", "Left"),
        row("bob@example.com", ""),
        cell("notes")
    );
    write_ods(&p, &tables);
    let r = import(&mut env, &t, Operation::Deactivate, &p, false);
    assert!(r.applied, "{:?}", r.outcome.problems);
    assert_eq!(r.outcome.format, "ods");
    assert_eq!(r.outcome.totals.deactivate, 2);
    assert_eq!(
        user(&env, &t, "ada@example.com").unwrap().status,
        "deactivated"
    );
    // A legacy .xls made by another writer (tests/fixtures/make_xls.py): both already
    // deactivated now, so two warnings and nothing else.
    let xls =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deactivate.xls");
    let (o, _) = validate(&env, &t, Operation::Deactivate, &xls);
    assert_eq!(
        codes(&o),
        vec![
            (Some(2), "already_deactivated"),
            (Some(3), "already_deactivated")
        ]
    );
}

#[test]
fn a_template_of_an_older_column_set_is_named_as_such() {
    let env = Env::new();
    let t = setup(&env);
    // An add file with one column more than the template has now, recording `hash` as the
    // column set its template was made for.
    let p = env.path("old.xlsx");
    let message = |hash: &str| {
        let row = [
            "ada@example.com",
            "Ada",
            "L",
            "",
            "",
            "Learner",
            "",
            "Standard",
            "E1",
        ];
        let mut data = data_sheet(Operation::Add, &[row.to_vec()]);
        data.rows[0].push(s("Employee ID"));
        let mut meta = meta_sheet(Operation::Add);
        meta.rows.push(vec![s("column_hash"), s(hash)]);
        write_xlsx(&p, &[data, meta]);
        let (o, _) = validate(&env, &t, Operation::Add, &p);
        assert_eq!(codes(&o), vec![(None, "columns_mismatch")]);
        o.problems[0].message.clone()
    };
    // Made while the tenant had other columns (its rules changed since).
    let m = message("0123456789abcdef");
    assert!(
        m.contains("column I \"Employee ID\" is not part of the template"),
        "{m}"
    );
    assert!(
        m.contains("template of other columns than the ones in use now"),
        "{m}"
    );
    // A file whose recorded set is the current one gets no such sentence.
    let now =
        rollcall::model::column_hash(Operation::Add, &rollcall::model::columns(Operation::Add));
    let m = message(&now);
    assert!(!m.contains("other columns"), "{m}");
}

/// A number formatted as a date (how a spreadsheet program stores a date typed into a cell)
/// is written as YYYY-MM-DD text and the change is listed; a date number outside the
/// calendar is a row error naming the cell, and a file with it applies nothing.
#[test]
fn excel_dates_become_text_and_dates_outside_the_calendar_are_errors() {
    let mut env = Env::new();
    let t = setup(&env);
    // Cell format 1 is Excel's built-in short date (number format 14).
    let styles = r#"<?xml version="1.0" encoding="UTF-8"?><styleSheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><cellXfs count="2"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/><xf numFmtId="14" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/></cellXfs></styleSheet>"#;
    let file = |env: &Env, name: &str, email: &str, serial: &str| {
        let p = env.path(name);
        let mut sheet = data_sheet(
            Operation::Add,
            &[vec![
                email, "Dana", "Dee", "", "Sales", "Learner", "", "Standard",
            ]],
        );
        sheet.rows[1][3] = C::Raw(format!(r#"<c r="D2" s="1"><v>{serial}</v></c>"#));
        write_xlsx_custom(&p, &[sheet], None, |z, o| {
            use std::io::Write;
            z.start_file("xl/styles.xml", o).unwrap();
            z.write_all(styles.as_bytes()).unwrap();
        });
        p
    };
    let good = file(&env, "dated.xlsx", "dana@example.com", "45000");
    let (o, _) = validate(&env, &t, Operation::Add, &good);
    assert!(o.is_valid(), "{:?}", o.problems);
    let listed = serde_json::to_string(&o.normalisations).unwrap();
    assert!(
        listed.contains("Excel date written as YYYY-MM-DD") && listed.contains("2023-03-15"),
        "{listed}"
    );
    let r = import(&mut env, &t, Operation::Add, &good, false);
    assert!(r.applied, "{:?}", r.outcome.problems);
    assert_eq!(
        user(&env, &t, "dana@example.com")
            .unwrap()
            .job_title
            .as_deref(),
        Some("2023-03-15")
    );

    let bad = file(&env, "undated.xlsx", "dora@example.com", "-3");
    let (o, _) = validate(&env, &t, Operation::Add, &bad);
    assert_eq!(codes(&o), [(Some(2), "invalid_date")], "{:?}", o.problems);
    let p = &o.problems[0];
    assert_eq!(
        (
            p.column.as_deref(),
            p.column_name.as_deref(),
            p.value.as_deref()
        ),
        (Some("D"), Some("Job Title"), Some("-3"))
    );
    let before = user_count(&env);
    let r = import(&mut env, &t, Operation::Add, &bad, false);
    assert!(!r.applied);
    assert_eq!(user_count(&env), before);
}

/// The error workbook is made to be fixed and uploaded again as is: read by another program,
/// its flagged cells corrected, every sheet written back (Errors column, Read Me First and the
/// hidden ones kept), it validates and applies.
#[test]
fn the_error_workbook_applies_once_its_flagged_cells_are_fixed() {
    let mut env = Env::new();
    let t = setup(&env);
    let p = env.path("fixme.xlsx");
    write_xlsx(
        &p,
        &[
            data_sheet(
                Operation::Add,
                &[
                    vec![
                        "ada@example.com",
                        "Ada",
                        "Lovelace",
                        "",
                        "Sales",
                        "Learner",
                        "",
                        "Standard",
                    ],
                    vec![
                        "not-an-email",
                        "Bob",
                        "Byron",
                        "",
                        "",
                        "Manager",
                        "",
                        "Gold",
                    ],
                ],
            ),
            meta_sheet(Operation::Add),
        ],
    );
    let r = import(&mut env, &t, Operation::Add, &p, false);
    assert!(!r.applied);
    let flagged: Vec<_> = codes(&r.outcome);
    assert!(flagged.contains(&(Some(3), "email_invalid")), "{flagged:?}");
    assert!(flagged.contains(&(Some(3), "unknown_pool")), "{flagged:?}");
    let report = r.error_report.unwrap();

    // Read back whole, then the two flagged cells of row 3 corrected.
    let fixed = env.path("fixed.xlsx");
    rewrite_workbook(&report, &fixed, |name, rows| {
        if name == Operation::Add.sheet_name() {
            assert!(
                matches!(&rows[0][8], C::S(h) if h == "Errors"),
                "{:?}",
                rows[0]
            );
            rows[2][0] = s("bob@example.com");
            rows[2][7] = s("Standard");
        }
    });
    let (o, _) = validate(&env, &t, Operation::Add, &fixed);
    assert!(o.is_valid(), "{:?}", o.problems);
    let r = import(&mut env, &t, Operation::Add, &fixed, false);
    assert!(r.applied, "{:?}", r.outcome.problems);
    assert!(user(&env, &t, "bob@example.com").is_some());
    assert!(user(&env, &t, "ada@example.com").is_some());
}

/// Reads every sheet of `from` back and writes them to `to` with the test's own xlsx
/// writer (another writer than ours; hidden sheets kept hidden), after `edit` has had each
/// sheet's cells as text.
fn rewrite_workbook(
    from: &std::path::Path,
    to: &std::path::Path,
    mut edit: impl FnMut(&str, &mut Vec<Vec<C>>),
) {
    let mut wb: calamine::Xlsx<_> = calamine::open_workbook(from).unwrap();
    let meta: Vec<(String, bool)> = wb
        .sheets_metadata()
        .iter()
        .map(|m| (m.name.clone(), m.visible != calamine::SheetVisible::Visible))
        .collect();
    let mut sheets = Vec::new();
    for (name, hidden) in meta {
        let range = wb.worksheet_range(&name).unwrap();
        let mut rows: Vec<Vec<C>> = range
            .rows()
            .map(|r| r.iter().map(|c| s(&c.to_string())).collect())
            .collect();
        edit(&name, &mut rows);
        sheets.push(Sheet { name, rows, hidden });
    }
    write_xlsx(to, &sheets);
}

/// Fills `template` (as written by us) with `rows` from row 2 in another writer.
fn fill_template(
    template: &std::path::Path,
    sheet: &str,
    rows: &[Vec<&str>],
    out: &std::path::Path,
) {
    rewrite_workbook(template, out, |name, cells| {
        if name == sheet {
            cells.truncate(1);
            cells.extend(rows.iter().map(|r| r.iter().map(|v| s(v)).collect()));
        }
    });
}

/// Each operation from its own template: downloaded, filled in by another program, checked
/// and applied; the roster and the results workbook show what each did.
#[test]
fn every_operation_round_trips_from_its_generated_template() {
    let mut env = Env::new();
    let t = setup(&env);
    let step = |env: &mut Env, op: Operation, rows: &[Vec<&str>]| -> ImportResult {
        let lists = service::template_lists(&env.app, &t).unwrap();
        let tpl = env.path(&format!("{op}-template.xlsx"));
        rollcall::sheet::template::write_template(op, &lists, &tpl).unwrap();
        let filled = env.path(&format!("{op}-filled.xlsx"));
        fill_template(&tpl, &op.sheet_name(), rows, &filled);
        let (o, _) = validate(env, &t, op, &filled);
        assert!(o.is_valid(), "{op}: {:?}", o.problems);
        assert!(
            !o.notes
                .iter()
                .any(|n| n.contains("hidden information was not")),
            "{op}: the template's metadata survived the other writer: {:?}",
            o.notes
        );
        let r = import(env, &t, op, &filled, false);
        assert!(r.applied, "{op}: {:?}", r.outcome.problems);
        r
    };
    let r = step(
        &mut env,
        Operation::Add,
        &[
            vec![
                "ada@example.com",
                "Ada",
                "Lovelace",
                "Analyst",
                "Research",
                "Learner",
                "",
                "Standard",
            ],
            vec![
                "bob@example.com",
                "Bob",
                "Byron",
                "",
                "",
                "Manager",
                "fr",
                "Premium",
            ],
        ],
    );
    assert_eq!(results(&r).len(), 2);
    assert_eq!(
        user(&env, &t, "ada@example.com").unwrap().team.as_deref(),
        Some("Research")
    );

    let update_cols = rollcall::model::columns(Operation::Update);
    let mut upd = vec![""; update_cols.len()];
    upd[0] = "ada@example.com";
    upd[3] = "King";
    assert_eq!(update_cols[3].header, "Last Name");
    let r = step(&mut env, Operation::Update, &[upd]);
    assert_eq!(results(&r)[0][2], "change");
    assert_eq!(user(&env, &t, "ada@example.com").unwrap().last_name, "King");

    let r = step(
        &mut env,
        Operation::Deactivate,
        &[vec!["bob@example.com", "Left"]],
    );
    assert_eq!(results(&r)[0][2], "deactivate");
    assert_eq!(
        user(&env, &t, "bob@example.com").unwrap().status,
        "deactivated"
    );

    let r = step(
        &mut env,
        Operation::Reactivate,
        &[vec!["bob@example.com", ""]],
    );
    assert_eq!(results(&r)[0][2], "reactivate");
    assert_eq!(user(&env, &t, "bob@example.com").unwrap().status, "active");

    let r = step(
        &mut env,
        Operation::Delete,
        &[vec!["bob@example.com", "Request"]],
    );
    assert_eq!(results(&r)[0][2], "delete");
    assert!(user(&env, &t, "bob@example.com").is_none());
}
