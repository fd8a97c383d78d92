//! Tenant rules in Lua, through the real worker process: custom columns in templates,
//! checks and normalisers in validation, storage and export, the lifecycle (last good
//! version, audit), and hostile scripts that must fail one validation and nothing else.

mod common;

use std::path::Path;

use common::*;
use rollcall::bulk::Outcome;
use rollcall::db::{self, Tenant};
use rollcall::model::Operation;
use rollcall::service;

fn tenant(env: &Env, name: &str) -> Tenant {
    let t = db::create_tenant(&env.app.conn, name).unwrap();
    db::add_team(&env.app.conn, t.id, "Research").unwrap();
    db::set_pool(&env.app.conn, t.id, "Standard", 100).unwrap();
    t
}

/// Writes `rules/<folder>/<name>` in the data directory.
fn script(env: &Env, folder: &str, name: &str, source: &str) {
    let dir = env.app.data.rules_dir().join(folder);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), source).unwrap();
}

fn csv(env: &Env, name: &str, text: &str) -> std::path::PathBuf {
    let p = env.path(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn validate(env: &Env, t: &Tenant, op: Operation, file: &Path) -> Outcome {
    service::validate(
        &env.app,
        t,
        op,
        file,
        "file.csv",
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap()
}

/// The audit log's entries whose action starts with `prefix`.
fn audit_entries(env: &Env, prefix: &str) -> Vec<serde_json::Value> {
    let mut files: Vec<_> = std::fs::read_dir(env.app.data.audit_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .filter(|e| e["action"].as_str().unwrap_or("").starts_with(prefix))
        .collect()
}

fn codes(o: &Outcome) -> Vec<&str> {
    o.problems.iter().map(|p| p.code).collect()
}

fn messages(o: &Outcome) -> String {
    o.problems
        .iter()
        .map(|p| format!("{:?} {:?} {}", p.row, p.column_name, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

const ADD_HEADER: &str = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool,Cost Centre,Employee ID,Manager Email";

#[test]
fn the_example_rules_shape_templates_checks_storage_and_exports() {
    let mut env = Env::new();
    let t = tenant(&env, "Example Corp");
    // The template carries the custom columns, their help and their drop-down list.
    let lists = service::template_lists(&env.app, &t).unwrap();
    let tpl = env.path("add.xlsx");
    rollcall::sheet::template::write_template(Operation::Add, &lists, &tpl).unwrap();
    use calamine::Reader;
    let mut wb = calamine::open_workbook_auto(&tpl).unwrap();
    let data = wb.worksheet_range("Add Users").unwrap();
    let header: Vec<String> = data
        .rows()
        .next()
        .unwrap()
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(header.join(","), ADD_HEADER);
    let readme = wb.worksheet_range("Read Me First").unwrap();
    let text: String = readme
        .cells()
        .map(|(_, _, c)| c.to_string())
        .collect::<Vec<_>>()
        .join("|");
    assert!(
        text.contains("Your HR number: two letters and six digits."),
        "{text}"
    );
    assert!(text.contains("CC-200 Engineering"), "{text}");

    // A file with every kind of finding.
    let file = csv(
        &env,
        "a.csv",
        &format!(
            "{ADD_HEADER}\n\
             ada@example.com,Ada,Lovelace,,Research,Manager,,Standard,cc-100 sales,ab123456,\n\
             bob@example.com,Bob,Smith,,,Manager,,Standard,CC-900 Board,x1,grace@example.com\n\
             carl@example.com,Carl,Jones,,Research,Learner,,Standard,CC-999,CD654321,ADA@example.com\n"
        ),
    );
    let o = validate(&env, &t, Operation::Add, &file);
    let m = messages(&o);
    assert_eq!(o.errors, 4, "{m}");
    assert_eq!(o.warnings, 1, "{m}");
    assert!(
        m.contains("Some(3) Some(\"Employee ID\") Employee ID must be two letters and six digits"),
        "{m}"
    );
    assert!(
        m.contains("Some(3) Some(\"Team\") A Manager must have a team."),
        "{m}"
    );
    assert!(m.contains("Some(3) Some(\"Manager Email\") Manager Email names grace@example.com, who is neither a user of Example Corp nor added by this file."), "{m}");
    // Carl's manager (ADA@example.com, in another case) is added by the same file: no error.
    let refs: Vec<_> = o
        .problems
        .iter()
        .filter(|p| p.code == "user_reference_unknown")
        .map(|p| (p.row, p.column.as_deref(), p.value.as_deref()))
        .collect();
    assert_eq!(
        refs,
        [(Some(3), Some("K"), Some("grace@example.com"))],
        "{m}"
    );
    assert!(
        m.contains("Some(4) Some(\"Cost Centre\") Cost Centre must be one of CC-100 Sales"),
        "{m}"
    );
    assert!(codes(&o).contains(&"rule_warning"));
    let norms: Vec<String> = o
        .normalisations
        .iter()
        .map(|n| format!("{} {} {}", n.column_name, n.kind, n.example))
        .collect();
    assert!(
        norms.contains(&"Employee ID changed by the tenant's rules \"ab123456\" -> \"AB123456\" (employee_id.lua)".to_string()),
        "{norms:?}"
    );
    assert!(
        norms.contains(
            &"Cost Centre case of value corrected \"cc-100 sales\" -> \"CC-100 Sales\"".to_string()
        ),
        "{norms:?}"
    );
    // The error workbook keeps the custom cells and puts Errors after them.
    let report = env.path("errors.xlsx");
    rollcall::sheet::report::write_error_workbook(
        &env.app.reader,
        Operation::Add,
        &lists,
        &file,
        "a.csv",
        &o,
        &report,
    )
    .unwrap();
    let rows = sheet_rows(&report, "Add Users");
    assert_eq!(rows[0][11], "Errors");
    assert_eq!(rows[2][9], "x1");
    assert_eq!(rows[2][10], "grace@example.com");
    assert!(
        rows[2][11].contains("Employee ID must be two letters"),
        "{:?}",
        rows[2]
    );

    // Valid: a manager added further down the same file is accepted.
    let file = csv(
        &env,
        "b.csv",
        &format!(
            "{ADD_HEADER}\n\
             carl@example.com,Carl,Jones,,Research,Learner,,Standard,CC-300 Operations,cd654321,ADA@example.com\n\
             ada@example.com,Ada,Lovelace,,Research,Manager,,Standard,cc-100 sales,ab123456,\n"
        ),
    );
    let r = service::import(
        &mut env.app,
        &t,
        Operation::Add,
        &file,
        "b.csv",
        service::ImportOptions::new(false),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(r.applied, "{}", messages(&r.outcome));
    let custom: String = env
        .app
        .conn
        .query_row(
            "SELECT custom FROM users WHERE email = 'carl@example.com'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&custom).unwrap();
    assert_eq!(v["Employee ID"], "CD654321");
    assert_eq!(v["Manager Email"], "ada@example.com");
    assert_eq!(v["Cost Centre"], "CC-300 Operations");

    // An update changes a custom value, clears another and shows both in the preview.
    let file = csv(
        &env,
        "u.csv",
        "Email,New Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool,Cost Centre,Employee ID,Manager Email\n\
         carl@example.com,,,,,,,,,#CLEAR,CD000001,\n",
    );
    let mut changes = Vec::new();
    service::validate(
        &env.app,
        &t,
        Operation::Update,
        &file,
        "u.csv",
        &mut |_, _, e| {
            if let rollcall::model::Effect::Change { changes: c } = e {
                changes.extend(
                    c.iter()
                        .map(|c| format!("{}: {:?} -> {:?}", c.field, c.old, c.new)),
                );
            }
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        changes,
        vec![
            "Cost Centre: Some(\"CC-300 Operations\") -> None".to_string(),
            "Employee ID: Some(\"CD654321\") -> Some(\"CD000001\")".to_string(),
        ]
    );

    // The export shows the custom columns.
    let out = env.path("users.csv");
    let custom_cols: Vec<String> = service::active_rules(&env.app, &t)
        .unwrap()
        .unwrap()
        .description
        .columns
        .into_iter()
        .map(|c| c.name)
        .collect();
    service::export_users(&env.app.conn, &t, &custom_cols, Some(&out)).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.lines()
            .next()
            .unwrap()
            .ends_with("Cost Centre,Employee ID,Manager Email"),
        "{text}"
    );
    assert!(
        text.contains("CC-300 Operations,CD654321,ada@example.com"),
        "{text}"
    );
}

fn fast_limits() -> Env {
    Env::with(|c| {
        c.limits.rules_call_ms = 300;
        c.limits.rules_memory_mib = 16;
    })
}

const SIMPLE_ADD: &str = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n\
                          ada@example.com,Ada,Lovelace,,Research,Learner,,Standard\n";

/// Validates a simple add file with one rule script; returns the outcome.
fn with_script(env: &Env, t: &Tenant, source: &str) -> Outcome {
    script(
        env,
        &rollcall::rules::folder_name(&t.name),
        "hostile.lua",
        source,
    );
    let file = csv(env, "simple.csv", SIMPLE_ADD);
    validate(env, t, Operation::Add, &file)
}

/// The process and other tenants carry on: a clean tenant still validates.
fn still_healthy(env: &Env) {
    let t = db::tenant(&env.app.conn, "Clean").unwrap_or_else(|_| tenant(env, "Clean"));
    let file = csv(env, "clean.csv", SIMPLE_ADD);
    let o = validate(env, &t, Operation::Add, &file);
    assert!(o.is_valid(), "{}", messages(&o));
}

#[test]
fn a_rule_that_loops_is_stopped_by_its_time_limit_with_script_and_line() {
    let env = fast_limits();
    let t = tenant(&env, "Loopy");
    let o = with_script(
        &env,
        &t,
        "rollcall.check(\"First Name\", function(v)\n  local n = 0\n  while true do n = n + 1 end\nend)\n",
    );
    assert_eq!(codes(&o), vec!["rule_failed"], "{}", messages(&o));
    let m = &o.problems[0].message;
    assert!(m.contains("hostile.lua, line 3"), "{m}");
    assert!(m.contains("time limit of 300 ms"), "{m}");
    assert!(m.contains("checking row 2"), "{m}");
    assert!(!o.is_valid());
    still_healthy(&env);
}

#[test]
fn a_backtracking_pattern_inside_one_c_call_is_stopped_by_ending_the_worker() {
    let env = fast_limits();
    let t = tenant(&env, "Patterns");
    let started = std::time::Instant::now();
    let o = with_script(
        &env,
        &t,
        "local long = string.rep(\"a\", 40000)\n\
         rollcall.check(\"First Name\", function(v)\n  return string.find(long, \"(.-)(.-)(.-)(.-)x\")\nend)\n",
    );
    assert_eq!(codes(&o), vec!["rule_failed"], "{}", messages(&o));
    let m = &o.problems[0].message;
    assert!(m.contains("hostile.lua, line 2"), "{m}");
    assert!(
        m.contains("time limit of 300 ms inside a library call"),
        "{m}"
    );
    // Stopped, not finished: this pattern would run for minutes.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    still_healthy(&env);
}

#[test]
fn a_memory_bomb_fails_with_the_memory_limit() {
    let env = fast_limits();
    let t = tenant(&env, "Hungry");
    let o = with_script(
        &env,
        &t,
        "rollcall.check(\"First Name\", function(v)\n  local t = {}\n  for i = 1, 1e9 do t[i] = string.rep(\"x\", 1000) .. i end\nend)\n",
    );
    assert_eq!(codes(&o), vec!["rule_failed"], "{}", messages(&o));
    let m = &o.problems[0].message;
    assert!(m.contains("hostile.lua"), "{m}");
    assert!(m.contains("memory than the limit of 16 MiB"), "{m}");
    still_healthy(&env);
}

#[test]
fn a_runtime_error_names_script_line_and_row() {
    let env = fast_limits();
    let t = tenant(&env, "Buggy");
    let o = with_script(
        &env,
        &t,
        "rollcall.check(\"First Name\", function(v, row)\n  return row.Missing.field\nend)\n",
    );
    assert_eq!(codes(&o), vec!["rule_failed"], "{}", messages(&o));
    let m = &o.problems[0].message;
    assert!(m.contains("hostile.lua, line 2 (checking row 2)"), "{m}");
    assert!(m.contains("attempt to index a nil value"), "{m}");
    still_healthy(&env);
}

#[test]
fn forbidden_functions_and_syntax_errors_stop_the_scripts_from_loading() {
    let env = fast_limits();
    let cases = [
        ("os.execute('touch /tmp/x')", "global 'os'"),
        ("io.open('/etc/passwd')", "global 'io'"),
        ("require('socket')", "global 'require'"),
        ("load('return 1')()", "global 'load'"),
        ("loadstring('return 1')()", "global 'loadstring'"),
        ("dofile('/etc/passwd')", "global 'dofile'"),
        ("loadfile('/etc/passwd')()", "global 'loadfile'"),
        ("debug.getinfo(1)", "global 'debug'"),
        ("string.dump(function() end)", "field 'dump'"),
        ("collectgarbage('stop')", "global 'collectgarbage'"),
        ("getmetatable('').__index = {}", "boolean value"),
        ("package.loaded.x = 1", "global 'package'"),
        ("local x = = 1", "unexpected symbol"),
        ("rollcall.column { name = 'Email' }", "is a built-in column"),
        (
            "rollcall.check('Nope', function() end)",
            "neither a built-in column nor declared",
        ),
        ("rollcall.loaded = true", "rollcall is read-only"),
    ];
    for (i, (code, expected)) in cases.iter().enumerate() {
        let t = tenant(&env, &format!("Forbidden {i}"));
        script(
            &env,
            &rollcall::rules::folder_name(&t.name),
            "hostile.lua",
            &format!("-- case {i}\n{code}\n"),
        );
        let file = csv(&env, "simple.csv", SIMPLE_ADD);
        let e = service::validate(
            &env.app,
            &t,
            Operation::Add,
            &file,
            "s.csv",
            &mut |_, _, _| {},
            &mut |_| {},
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("hostile.lua"), "{code}: {m}");
        assert!(m.contains(expected), "{code}: {m}");
        if !code.starts_with("rollcall.check") {
            assert!(m.contains("line 2"), "{code}: {m}");
        }
    }
    still_healthy(&env);
}

#[test]
fn a_tenant_cannot_see_another_tenants_state() {
    let env = fast_limits();
    let a = tenant(&env, "Alpha");
    let b = tenant(&env, "Beta");
    script(
        &env,
        "alpha",
        "a.lua",
        "SECRET = 'alpha'\nstring.secret = 'alpha'\nrollcall.check('First Name', function(v) SEEN = v end)\n",
    );
    script(
        &env,
        "beta",
        "b.lua",
        "rollcall.check_row(function(row)\n  if SECRET or SEEN or string.secret or rawget(_G, 'SECRET') then return 'leak' end\nend)\n",
    );
    let file = csv(&env, "s.csv", SIMPLE_ADD);
    assert!(validate(&env, &a, Operation::Add, &file).is_valid());
    let o = validate(&env, &b, Operation::Add, &file);
    assert!(o.is_valid(), "{}", messages(&o));
}

#[test]
fn a_broken_edit_keeps_the_last_good_version_and_both_are_audited() {
    let env = fast_limits();
    let t = tenant(&env, "Editors");
    let good = "rollcall.check('Last Name', function(v)\n  if v == 'Lovelace' then return 'no Lovelaces' end\nend)\n";
    let o = with_script(&env, &t, good);
    assert_eq!(codes(&o), vec!["rule_error"], "{}", messages(&o));
    // The same edit twice, broken: the good version stays in use and says so.
    for _ in 0..2 {
        let o = with_script(&env, &t, "rollcall.check('Last Name', function(v)\n");
        assert_eq!(codes(&o), vec!["rule_error"], "{}", messages(&o));
        assert!(
            o.notes
                .iter()
                .any(|n| n.contains("do not load") && n.contains("last good version")),
            "{:?}",
            o.notes
        );
    }
    // Fixed: the new version takes over.
    let o = with_script(&env, &t, "-- nothing to check\n");
    assert!(o.is_valid(), "{}", messages(&o));
    service::flush_audit(&env.app).unwrap();
    let entries = audit_entries(&env, "rules.");
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec!["rules.change", "rules.rejected", "rules.change"]
    );
    let details = entries[0]["details"].to_string();
    assert!(details.contains("\"sha256\""), "{details}");
}

#[test]
fn rules_that_never_loaded_refuse_files_with_a_clear_message() {
    let env = fast_limits();
    let t = tenant(&env, "Never");
    script(&env, "never", "x.lua", "this is not lua\n");
    let file = csv(&env, "s.csv", SIMPLE_ADD);
    let e = service::validate(
        &env.app,
        &t,
        Operation::Add,
        &file,
        "s.csv",
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("do not load, and there is no earlier version"),
        "{m}"
    );
    assert!(m.contains("x.lua, line 1"), "{m}");
}

#[test]
fn rules_check_and_rules_test_from_the_command_line_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.as_path();
    assert!(
        cli(d, &["tenant", "create", "Example Corp"])
            .status
            .success()
    );
    assert!(
        cli(
            d,
            &["pool", "set", "--tenant", "Example Corp", "Standard", "5"]
        )
        .status
        .success()
    );
    let o = cli(d, &["rules", "check"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("column \"Employee ID\" (required, at most 8 characters) in add, update: employee_id.lua"), "{out}");
    assert!(
        out.contains("row check at managers_have_team.lua:3"),
        "{out}"
    );
    assert!(out.contains("in use: not yet"), "{out}");

    let file = dir.path().join("t.csv");
    std::fs::write(
        &file,
        format!("{ADD_HEADER}\nada@example.com,Ada,Lovelace,,,Learner,,Standard,,zz,\n"),
    )
    .unwrap();
    let o = cli(
        d,
        &[
            "rules",
            "test",
            "--tenant",
            "Example Corp",
            "--op",
            "add",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("Employee ID must be two letters and six digits"),
        "{}",
        text(&o)
    );
    let conn = rusqlite::Connection::open(data.join("rollcall.db")).unwrap();
    let stored: i64 = conn
        .query_row("SELECT (SELECT count(*) FROM uploads) + (SELECT count(*) FROM rule_sets) + (SELECT count(*) FROM audit_outbox WHERE action LIKE 'rules.%')", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 0);

    // A broken script is reported with its line, and the exit code says so.
    std::fs::create_dir_all(data.join("rules/example-corp")).unwrap();
    std::fs::write(data.join("rules/example-corp/x.lua"), "rollcall.column {\n").unwrap();
    std::fs::create_dir_all(data.join("rules/exmaple-corp")).unwrap();
    let o = cli(d, &["rules", "check", "--tenant", "Example Corp"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("problem: x.lua, line 2:"), "{}", text(&o));
    assert!(
        text(&o).contains("exmaple-corp belongs to no tenant"),
        "{}",
        text(&o)
    );
}

#[test]
fn required_custom_columns_bind_add_files_only_and_rules_see_corrected_spellings() {
    let env = Env::new();
    let t = tenant(&env, "Example Corp");
    let file = csv(
        &env,
        "a.csv",
        &format!(
            "{ADD_HEADER}\n\
             ada@example.com,Ada,Lovelace,,,manager,,standard,,,\n"
        ),
    );
    let o = validate(&env, &t, Operation::Add, &file);
    let m = messages(&o);
    // One message for the empty Employee ID, and the row rule saw "Manager".
    assert_eq!(codes(&o), vec!["required_missing", "rule_error"], "{m}");
    assert!(m.contains("A Manager must have a team"), "{m}");
    let file = csv(
        &env,
        "u.csv",
        "Email,New Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool,Cost Centre,Employee ID,Manager Email\n\
         nobody@example.com,,,,,,,,,,,\n",
    );
    let o = validate(&env, &t, Operation::Update, &file);
    assert_eq!(codes(&o), vec!["user_not_found"], "{}", messages(&o));
    // A required custom column cannot be cleared.
    let file = csv(
        &env,
        "c.csv",
        "Email,New Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool,Cost Centre,Employee ID,Manager Email
         nobody@example.com,,,,,,,,,,#clear,
",
    );
    let o = validate(&env, &t, Operation::Update, &file);
    assert!(codes(&o).contains(&"cannot_clear"), "{}", messages(&o));
}

#[test]
fn a_template_of_another_operation_is_refused_naming_the_tenants_own_columns_too() {
    let env = Env::new();
    let t = tenant(&env, "Example Corp");
    let lists = service::template_lists(&env.app, &t).unwrap();
    let tpl = env.path("update.xlsx");
    rollcall::sheet::template::write_template(Operation::Update, &lists, &tpl).unwrap();
    let o = service::validate(
        &env.app,
        &t,
        Operation::Add,
        &tpl,
        "update.xlsx",
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(codes(&o), vec!["wrong_operation"], "{}", messages(&o));
    let m = &o.problems[0].message;
    // Both sets in full, the tenant's columns after the built-in ones, by letter.
    for (op, wanted) in [
        (
            Operation::Update,
            "J Cost Centre, K Employee ID, L Manager Email",
        ),
        (Operation::Add, "I Cost Centre, J Employee ID"),
    ] {
        assert!(m.contains(wanted), "{op}: {m}");
    }
    assert!(
        m.contains("an Update users file has A Email, B New Email"),
        "{m}"
    );
    assert!(
        m.contains("an Add users file has A Email, B First Name"),
        "{m}"
    );
}

#[test]
fn tenants_cannot_share_a_rules_folder() {
    let env = Env::new();
    db::create_tenant(&env.app.conn, "Acme Corp").unwrap();
    let e = db::create_tenant(&env.app.conn, "ACME-corp!").unwrap_err();
    assert!(
        e.to_string()
            .contains("both would use the folder rules/acme-corp"),
        "{e}"
    );
    let e = db::create_tenant(&env.app.conn, "!!!").unwrap_err();
    assert!(e.to_string().contains("needs a letter or digit"), "{e}");
}

#[test]
fn a_pool_chosen_for_the_file_is_seen_by_the_rules() {
    let env = Env::new();
    let t = tenant(&env, "Pooled");
    db::set_pool(&env.app.conn, t.id, "Premium", 10).unwrap();
    script(
        &env,
        "pooled",
        "pools.lua",
        r#"rollcall.check("Licence Pool", function(value, row)
  if value == "Premium" and row["Role"] ~= "Manager" then
    return "Premium seats are for managers"
  end
end)"#,
    );
    // The pool cell is empty: the pool chosen for the file is what the rule checks.
    let file = csv(
        &env,
        "empty-pool.csv",
        "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n\
         ada@example.com,Ada,Lovelace,,Research,Learner,,\n",
    );
    let o = service::validate_with(
        &env.app,
        &t,
        Operation::Add,
        &file,
        "empty-pool.csv",
        Some("premium"),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(
        messages(&o).contains("Premium seats are for managers"),
        "{}",
        messages(&o)
    );
}

/// Rules that only declare columns are checked in the checking thread, without a rules
/// worker; rules with a function go through the worker. Both must find the same: the same
/// problems (code, row, column, value, message) and the same corrections, in add and update
/// files (where `#CLEAR` is not checked).
#[test]
fn declared_columns_are_checked_alike_with_and_without_the_rules_worker() {
    let env = Env::new();
    let declared = "rollcall.column { name = \"Employee ID\", max_length = 8 }\n\
                    rollcall.column { name = \"Cost Centre\", choices = { \"CC-100\", \"CC-200\" } }\n";
    let local = tenant(&env, "Declared Only");
    let worker = tenant(&env, "With A Function");
    script(
        &env,
        &rollcall::rules::folder_name(&local.name),
        "a.lua",
        declared,
    );
    script(
        &env,
        &rollcall::rules::folder_name(&worker.name),
        "a.lua",
        &format!("{declared}rollcall.check_row(function(row) end)\n"),
    );
    let add = csv(
        &env,
        "declared-add.csv",
        "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool,Employee ID,Cost Centre\n\
         a@example.com,Ada,Lovelace,,Research,Learner,,Standard,AB123456789,cc-100\n\
         b@example.com,Bo,Brown,,Research,Learner,,Standard,AB1,CC-999\n\
         c@example.com,Cy,Cole,,Research,Learner,,Standard,ÄÖÜäöüßé,cC-200\n\
         d@example.com,Di,Dee,,Research,Learner,,Standard,,\n",
    );
    let update = csv(
        &env,
        "declared-update.csv",
        "Email,New Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool,Employee ID,Cost Centre\n\
         a@example.com,,,,,,,,,#clear,#CLEAR\n\
         b@example.com,,,,,,,,,ABCDEFGHI,Cc-100\n",
    );
    let seen = |t: &Tenant, op: Operation, file: &Path| {
        let o = validate(&env, t, op, file);
        let problems: Vec<String> = o
            .problems
            .iter()
            .filter(|p| p.code.starts_with("rule_"))
            .map(|p| {
                format!(
                    "{:?} {:?} {:?} {:?} {}",
                    p.row, p.column_name, p.value, p.code, p.message
                )
            })
            .collect();
        (problems, serde_json::to_string(&o.normalisations).unwrap())
    };
    for (op, file) in [(Operation::Add, &add), (Operation::Update, &update)] {
        let (lp, ln) = seen(&local, op, file);
        let (wp, wn) = seen(&worker, op, file);
        assert_eq!(lp, wp, "{op:?}: problems differ");
        assert_eq!(ln, wn, "{op:?}: corrections differ");
        assert!(ln.contains("case of value corrected"), "{op:?}: {ln}");
        if op == Operation::Add {
            // Too long, not a choice: the same two errors either way.
            assert_eq!(lp.len(), 2, "{lp:?}");
            assert!(
                lp[0].contains("Employee ID has 11 characters; at most 8"),
                "{lp:?}"
            );
            assert!(lp[1].contains("Cost Centre must be one of"), "{lp:?}");
        } else {
            assert_eq!(lp.len(), 1, "{lp:?}");
            assert!(lp[0].contains("Employee ID has 9 characters"), "{lp:?}");
        }
    }
}

/// Rules that loaded before, whose process cannot start when a file comes (here the worker
/// program refuses the rules subcommand, as a machine out of processes or memory would):
/// the file is refused with one message naming the tenant, code `rules_unavailable`, and
/// an import of it applies nothing. The file's own worker still reads it.
#[test]
fn a_rules_process_that_cannot_start_refuses_the_file_and_applies_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = fast_limits();
    let t = tenant(&env, "Stalled");
    script(
        &env,
        &rollcall::rules::folder_name(&t.name),
        "rows.lua",
        "rollcall.check_row(function(row) end)\n",
    );
    let file = csv(&env, "s.csv", SIMPLE_ADD);
    // Loaded and described once, with the real worker.
    let o = validate(&env, &t, Operation::Add, &file);
    assert!(o.is_valid(), "{}", messages(&o));

    let wrapper = env.path("worker.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = {} ]; then echo 'cannot start now' >&2; exit 3; fi\nexec {BIN} \"$@\"\n",
            rollcall::rules::worker::WORKER_SUBCOMMAND
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.app.reader.worker_exe = wrapper;

    let o = validate(&env, &t, Operation::Add, &file);
    assert!(o.refused, "{}", messages(&o));
    assert_eq!(codes(&o), ["rules_unavailable"], "{}", messages(&o));
    let m = &o.problems[0].message;
    assert!(
        m.contains("The rules of Stalled cannot run") && m.contains("Nothing was changed"),
        "{m}"
    );

    let r = service::import(
        &mut env.app,
        &t,
        Operation::Add,
        &file,
        "s.csv",
        service::ImportOptions::default(),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    assert!(!r.applied);
    assert_eq!(codes(&r.outcome), ["rules_unavailable"]);
    let users: i64 = env
        .app
        .conn
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .unwrap();
    assert_eq!(users, 0);
}
