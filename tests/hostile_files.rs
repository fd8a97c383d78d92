//! Bad and hostile files: each gets one clear refusal (or row errors), nothing is stored,
//! and the process that asked carries on.

mod common;

use std::io::{Read, Write};

use common::*;
use rollcall::bulk::Outcome;
use rollcall::db;
use rollcall::model::Operation;
use rollcall::service;

fn tenant(env: &Env) -> db::Tenant {
    let t = db::create_tenant(&env.app.conn, "Acme").unwrap();
    db::set_pool(&env.app.conn, t.id, "Standard", 10).unwrap();
    t
}

fn check(env: &Env, t: &db::Tenant, name: &str, bytes: &[u8]) -> Outcome {
    let p = env.path(name);
    std::fs::write(&p, bytes).unwrap();
    check_path(env, t, &p)
}

fn check_path(env: &Env, t: &db::Tenant, p: &std::path::Path) -> Outcome {
    let name = p.file_name().unwrap().to_string_lossy().to_string();
    service::validate(
        &env.app,
        t,
        Operation::Deactivate,
        p,
        &name,
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap()
}

fn refused(o: &Outcome) -> (&'static str, String) {
    assert!(o.refused, "not refused: {:?}", o.problems);
    assert_eq!(o.problems.len(), 1, "{:?}", o.problems);
    let p = &o.problems[0];
    assert!(
        !p.message.contains('\n') && p.message.len() > 20,
        "{}",
        p.message
    );
    // Shown with --nocapture: the outcome table of the issue note.
    eprintln!("outcome: {} | {}", p.code, p.message);
    (p.code, p.message.clone())
}

fn deactivate_sheet(rows: usize) -> Sheet {
    let mut sheet = data_sheet(Operation::Deactivate, &[]);
    for i in 0..rows {
        sheet
            .rows
            .push(vec![s(&format!("u{i}@example.com")), s("")]);
    }
    sheet
}

#[test]
fn unreadable_and_wrong_type_files() {
    let env = Env::new();
    let t = tenant(&env);
    assert_eq!(refused(&check(&env, &t, "empty.xlsx", b"")).0, "file_empty");
    let (code, msg) = refused(&check(
        &env,
        &t,
        "image.xlsx",
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
    ));
    assert_eq!(code, "file_wrong_type");
    assert!(msg.contains("PNG"), "{msg}");
    let (code, msg) = refused(&check(
        &env,
        &t,
        "renamed.xlsx",
        b"Email,Reason\na@b.co,x\n",
    ));
    assert_eq!(code, "file_wrong_type");
    assert!(msg.contains(".csv"), "{msg}");
    assert_eq!(
        refused(&check(&env, &t, "u16.csv", b"\xff\xfeE\0m\0")).0,
        "csv_encoding"
    );
    assert_eq!(
        refused(&check(
            &env,
            &t,
            "latin1.csv",
            b"Email,Reason\nj\xf6rg@b.co,x\n"
        ))
        .0,
        "file_wrong_type"
    );
    // A real workbook cut in half.
    let p = env.path("whole.xlsx");
    write_xlsx(&p, &[deactivate_sheet(50)]);
    let bytes = std::fs::read(&p).unwrap();
    let (code, msg) = refused(&check(
        &env,
        &t,
        "truncated.xlsx",
        &bytes[..bytes.len() / 2],
    ));
    assert_eq!(code, "file_damaged", "{msg}");
    // An OLE container holding an encrypted package (how Excel saves a password-protected file).
    let mut ole = vec![0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];
    ole.extend(vec![0u8; 500]);
    ole.extend(
        "EncryptedPackage"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes()),
    );
    let (code, msg) = refused(&check(&env, &t, "secret.xlsx", &ole));
    assert_eq!(code, "file_encrypted");
    assert!(msg.contains("password"), "{msg}");
    // An OLE container that is not a workbook.
    let mut junk_ole = vec![0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];
    junk_ole.extend(vec![7u8; 4000]);
    assert_eq!(
        refused(&check(&env, &t, "junk.xls", &junk_ole)).0,
        "file_damaged"
    );
    // A zip that is not a spreadsheet.
    let p = env.path("notes.zip.xlsx");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
    z.start_file("notes.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    z.write_all(b"hello").unwrap();
    z.finish().unwrap();
    assert_eq!(refused(&check_path(&env, &t, &p)).0, "file_wrong_type");
}

#[test]
fn zip_bombs_are_refused_while_inflating() {
    let env = Env::new();
    let t = tenant(&env);
    // 64 MiB of zeros compress about 1000:1.
    let p = env.path("bomb.xlsx");
    write_xlsx_custom(&p, &[deactivate_sheet(1)], None, |z, o| {
        z.start_file("xl/media/padding.xml", o).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            z.write_all(&zeros).unwrap();
        }
    });
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "zip_bomb");
    assert!(msg.contains("xl/media/padding.xml"), "{msg}");
    // Over the per-part size limit, whatever the ratio.
    let env = Env::with(|c| c.limits.max_zip_entry_mib = 1);
    let t = tenant(&env);
    let p = env.path("big.xlsx");
    write_xlsx(&p, &[deactivate_sheet(40_000)]);
    assert_eq!(refused(&check_path(&env, &t, &p)).0, "zip_bomb");
}

#[test]
fn lying_shared_strings_counts_are_refused() {
    let env = Env::new();
    let t = tenant(&env);
    let p = env.path("sst.xlsx");
    write_xlsx_custom(&p, &[deactivate_sheet(3)], Some("4000000000"), |_, _| {});
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "file_damaged");
    assert!(msg.contains("4000000000"), "{msg}");
    // The same table where the package's relationships put the workbook elsewhere (calamine
    // reads the table beside the workbook they name), behind an honest copy in xl/: found
    // by its root element, not by its name.
    let honest = env.path("sst-honest.xlsx");
    write_xlsx_custom(&honest, &[deactivate_sheet(3)], None, |_, _| {});
    let moved = env.path("sst-moved.xlsx");
    {
        let mut to = zip::ZipWriter::new(std::fs::File::create(&moved).unwrap());
        let o = zip::write::SimpleFileOptions::default();
        let mut copy = |path: &std::path::Path, keep: &dyn Fn(&str) -> Option<String>| {
            let mut from = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
            for i in 0..from.len() {
                let mut e = from.by_index(i).unwrap();
                let mut text = String::new();
                e.read_to_string(&mut text).unwrap();
                if let Some(name) = keep(&e.name().unwrap()) {
                    let text = if name == "_rels/.rels" {
                        text.replace("xl/workbook.xml", "data/workbook.xml")
                    } else {
                        text
                    };
                    to.start_file(name, o).unwrap();
                    to.write_all(text.as_bytes()).unwrap();
                }
            }
        };
        copy(&honest, &|n| Some(n.to_string()));
        copy(&p, &|n| {
            n.strip_prefix("xl/").map(|rest| format!("data/{rest}"))
        });
        to.finish().unwrap();
    }
    let (code, msg) = refused(&check_path(&env, &t, &moved));
    assert_eq!(code, "file_damaged");
    assert!(msg.contains("4000000000"), "{msg}");
}

#[test]
fn cells_far_outside_and_limits() {
    let env = Env::with(|c| c.limits.max_rows = 5);
    let t = tenant(&env);
    let p = env.path("far.xlsx");
    let mut sheet = deactivate_sheet(1);
    sheet.rows.push(vec![C::Raw(
        r#"<c r="A99999999" t="inlineStr"><is><t>x@y.co</t></is></c>"#.into(),
    )]);
    write_xlsx(&p, &[sheet]);
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "too_many_rows", "{msg}");
    write_xlsx(&p, &[deactivate_sheet(6)]);
    assert_eq!(refused(&check_path(&env, &t, &p)).0, "too_many_rows");
    let mut sheet = deactivate_sheet(1);
    sheet.rows[1].push(C::Raw(
        r#"<c r="XFD2" t="inlineStr"><is><t>far</t></is></c>"#.into(),
    ));
    write_xlsx(&p, &[sheet]);
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "too_many_columns");
    assert!(msg.contains("XFD"), "{msg}");
    let env = Env::with(|c| c.limits.max_file_bytes = 100);
    let t = tenant(&env);
    write_xlsx(&p, &[deactivate_sheet(1)]);
    assert_eq!(refused(&check_path(&env, &t, &p)).0, "file_too_large");
}

#[test]
fn worker_time_and_memory_limits_become_one_message() {
    let env = Env::with(|c| c.limits.worker_wall_seconds = 0);
    let t = tenant(&env);
    let p = env.path("slow.xlsx");
    write_xlsx(&p, &[deactivate_sheet(20_000)]);
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "time_limit", "{msg}");
    // An .ods whose rows repeat a million times a thousand columns: the reader's dense
    // range would need gigabytes; the worker dies at its memory limit instead of us.
    let env = Env::with(|c| c.limits.worker_memory_mib = 256);
    let t = tenant(&env);
    let p = env.path("repeat.ods");
    write_ods(
        &p,
        r#"<table:table table:name="Deactivate Users"><table:table-row><table:table-cell office:value-type="string"><text:p>Email</text:p></table:table-cell><table:table-cell office:value-type="string"><text:p>Reason</text:p></table:table-cell></table:table-row><table:table-row table:number-rows-repeated="1000000"><table:table-cell table:number-columns-repeated="1000" office:value-type="string"><text:p>x</text:p></table:table-cell></table:table-row></table:table>"#,
    );
    let o = check_path(&env, &t, &p);
    let (code, msg) = refused(&o);
    assert!(
        [
            "memory_limit",
            "file_damaged",
            "too_many_columns",
            "too_many_rows"
        ]
        .contains(&code),
        "{code}: {msg}"
    );
    // And the process that asked is fine: a sound file right after is read, row by row.
    let good = env.path("good.xlsx");
    write_xlsx(&good, &[deactivate_sheet(1)]);
    let o = check_path(&env, &t, &good);
    assert!(!o.refused, "{:?}", o.problems);
    assert_eq!(o.rows, 1);
}

#[test]
fn formulas_in_cells_are_echoed_as_text_never_as_formulas() {
    let mut env = Env::new();
    let t = tenant(&env);
    let p = env.path("f.xlsx");
    let mut sheet = data_sheet(
        Operation::Deactivate,
        &[
            vec!["nobody@example.com", "=HYPERLINK(\"http://evil\",\"x\")"],
            vec!["x@example.com", "+1+2"],
            vec!["y@example.com", "@SUM(A1)"],
        ],
    );
    sheet.rows.push(vec![
        s("z@example.com"),
        C::Raw(r#"<c r="B5"><f>1+1</f><v>2</v></c>"#.into()),
    ]);
    write_xlsx(&p, &[sheet]);
    let r = service::import(
        &mut env.app,
        &t,
        Operation::Deactivate,
        &p,
        "f.xlsx",
        service::ImportOptions::new(true),
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap();
    let report = r.error_report.expect("user_not_found errors");
    let dir = env.path("unz");
    std::fs::create_dir_all(&dir).unwrap();
    let mut z = zip::ZipArchive::new(std::fs::File::open(&report).unwrap()).unwrap();
    for i in 0..z.len() {
        let mut e = z.by_index(i).unwrap();
        let name = e.name().unwrap().to_string();
        let mut text = String::new();
        if std::io::Read::read_to_string(&mut e, &mut text).is_ok()
            && name.starts_with("xl/worksheets/")
        {
            assert!(!text.contains("<f>"), "{name} has a formula");
            if text.contains("HYPERLINK") {
                assert!(text.contains("t=\"inlineStr\"") || text.contains("t=\"s\""));
            }
        }
    }
}

#[test]
fn xls_whose_dimensions_claim_four_billion_rows() {
    // tests/fixtures/make_xls.py made it: a valid .xls with a lying DIMENSIONS record.
    let env = Env::new();
    let t = tenant(&env);
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dimensions-lie.xls");
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert!(
        ["memory_limit", "too_many_rows", "file_damaged"].contains(&code),
        "{code}: {msg}"
    );
    // The same file with an honest record reads fine.
    let good =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deactivate.xls");
    let o = check_path(&env, &t, &good);
    assert!(!o.refused, "{:?}", o.problems);
    assert_eq!((o.format.as_str(), o.rows), ("xls", 2));
}

/// Rewrites the declared uncompressed size of a zip entry in its local and central headers.
fn lie_about_size(bytes: &mut [u8], entry: &str, size: u32) {
    let name = entry.as_bytes();
    let mut patched = 0;
    for i in 0..bytes.len().saturating_sub(46) {
        if bytes[i..].starts_with(b"PK\x03\x04") {
            let n = u16::from_le_bytes([bytes[i + 26], bytes[i + 27]]) as usize;
            if bytes.get(i + 30..i + 30 + n) == Some(name) {
                bytes[i + 22..i + 26].copy_from_slice(&size.to_le_bytes());
                patched += 1;
            }
        }
        if bytes[i..].starts_with(b"PK\x01\x02") {
            let n = u16::from_le_bytes([bytes[i + 28], bytes[i + 29]]) as usize;
            if bytes.get(i + 46..i + 46 + n) == Some(name) {
                bytes[i + 24..i + 28].copy_from_slice(&size.to_le_bytes());
                patched += 1;
            }
        }
    }
    assert_eq!(patched, 2, "entry {entry} not found twice");
}

#[test]
fn zip_entries_that_lie_about_their_size() {
    let env = Env::with(|c| c.limits.max_zip_entry_mib = 1);
    let t = tenant(&env);
    let p = env.path("liar.xlsx");
    write_xlsx(&p, &[deactivate_sheet(40_000)]);
    let mut bytes = std::fs::read(&p).unwrap();
    lie_about_size(&mut bytes, "xl/worksheets/sheet1.xml", 1000);
    std::fs::write(&p, &bytes).unwrap();
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert!(
        ["zip_bomb", "file_damaged"].contains(&code),
        "{code}: {msg}"
    );

    // Under the default limits only the worksheet's claim is wrong. Claiming less, it is cut
    // at its claim (never inflated further) and the file is damaged; claiming more than the
    // limit, it is refused from the directory before anything is inflated.
    let env = Env::new();
    let t = tenant(&env);
    let base = std::fs::read(&p).unwrap();
    let mut bytes = base.clone();
    lie_about_size(&mut bytes, "xl/worksheets/sheet1.xml", 4000);
    std::fs::write(&p, &bytes).unwrap();
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "file_damaged", "{msg}");
    assert!(msg.contains("does not match its checksum"), "{msg}");
    let mut bytes = base;
    lie_about_size(&mut bytes, "xl/worksheets/sheet1.xml", 3_000_000_000);
    std::fs::write(&p, &bytes).unwrap();
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "zip_bomb", "{msg}");
    assert!(msg.contains("xl/worksheets/sheet1.xml"), "{msg}");
}

#[test]
fn merged_cells_hidden_rows_and_formulas_are_read_as_saved() {
    let env = Env::new();
    let t = tenant(&env);
    db::add_team(&env.app.conn, t.id, "Sales").unwrap();
    let p = env.path("merged.xlsx");
    let mut sheet = data_sheet(
        Operation::Add,
        &[
            vec![
                "a@example.com",
                "Ann",
                "Lee",
                "",
                "Sales",
                "Learner",
                "",
                "Standard",
            ],
            vec![
                "b@example.com",
                "",
                "Lee",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ],
            vec![
                "c@example.com",
                "Cy",
                "Lee",
                "",
                "",
                "Learner",
                "",
                "Standard",
            ],
        ],
    );
    // Row 4 is hidden; its first-name cell holds a formula whose saved value is used.
    sheet.rows[3][1] = C::Raw(r#"<c r="B4" t="str"><f>"C"&amp;"y"</f><v>Cy</v></c>"#.into());
    write_xlsx(&p, &[sheet]);
    // Merge B2:B3 (as a spreadsheet program saves it: the value only in B2) and hide row 4.
    let mut bytes = Vec::new();
    {
        let mut src = zip::ZipArchive::new(std::fs::File::open(&p).unwrap()).unwrap();
        let mut out = zip::ZipWriter::new(std::io::Cursor::new(&mut bytes));
        for i in 0..src.len() {
            let mut e = src.by_index(i).unwrap();
            let name = e.name().unwrap().to_string();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            if name == "xl/worksheets/sheet1.xml" {
                text = text
                    .replace("</sheetData>", "</sheetData><mergeCells count=\"1\"><mergeCell ref=\"B2:B3\"/></mergeCells>")
                    .replace("<row r=\"4\">", "<row r=\"4\" hidden=\"1\">");
            }
            out.start_file(name, zip::write::SimpleFileOptions::default())
                .unwrap();
            out.write_all(text.as_bytes()).unwrap();
        }
        out.finish().unwrap();
    }
    std::fs::write(&p, &bytes).unwrap();
    let o = check_add(&env, &t, &p);
    let c: Vec<_> = o.problems.iter().map(|p| (p.row, p.code)).collect();
    // The merged cell's second row has no value of its own: a row error, not a refusal.
    assert_eq!(c, vec![(Some(3), "required_missing")], "{:?}", o.problems);
    assert_eq!(o.rows, 3, "the hidden row is read");
    // The merged range is named, with what it means.
    assert!(
        o.notes.iter().any(|n| n.starts_with(
            "1 merged cell range (B2:B3): only the first cell of each holds the value"
        )),
        "{:?}",
        o.notes
    );
    // The formula cell's saved value was used, and the administrator is told so.
    assert!(
        o.notes
            .iter()
            .any(|n| n.starts_with("1 cells hold formulas (the first in row 4, column B)")),
        "{:?}",
        o.notes
    );
}

fn check_add(env: &Env, t: &db::Tenant, p: &std::path::Path) -> Outcome {
    service::validate(
        &env.app,
        t,
        Operation::Add,
        p,
        "merged.xlsx",
        &mut |_, _, _| {},
        &mut |_| {},
    )
    .unwrap()
}

#[test]
fn two_values_for_one_cell_are_refused_not_joined() {
    let env = Env::new();
    let t = tenant(&env);
    let p = env.path("twice.xlsx");
    let mut sheet = deactivate_sheet(0);
    sheet.rows.push(vec![C::Raw(r#"<c r="A2" t="inlineStr"><is><t>ada@exam</t></is></c><c r="A2" t="inlineStr"><is><t>ple.com</t></is></c>"#.into())]);
    write_xlsx(&p, &[sheet]);
    let o = check_path(&env, &t, &p);
    let codes: Vec<_> = o.problems.iter().map(|p| p.code).collect();
    assert!(codes.contains(&"cell_repeated"), "{codes:?}");
    // A flood of one cell (more cells in a row than it may have columns) is refused whole,
    // naming the row, however long each text is.
    let p = env.path("flood.xlsx");
    let mut sheet = deactivate_sheet(0);
    // Varied letters, so that the sheet does not compress like a bomb.
    let mut seed = 7u32;
    let cells: String = (0..65)
        .map(|_| {
            let text: String = (0..30_000)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    char::from(b'a' + (seed >> 16) as u8 % 26)
                })
                .collect();
            format!(r#"<c r="A2" t="inlineStr"><is><t>{text}</t></is></c>"#)
        })
        .collect();
    sheet.rows.push(vec![C::Raw(cells)]);
    write_xlsx(&p, &[sheet]);
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "file_damaged", "{msg}");
    assert!(msg.contains("row 2 holds more than 64 cells"), "{msg}");
}

#[test]
fn a_worksheet_bomb_is_refused_while_it_is_read() {
    // The data sheet itself is the bomb: one cell of 48 MiB of the same letter (about
    // 1000:1). Worksheets are checked on their own thread while calamine streams them; the
    // check ends the worker with its refusal, whatever the reading thread was doing.
    let env = Env::new();
    let t = tenant(&env);
    let p = env.path("sheet-bomb.xlsx");
    let mut sheet = deactivate_sheet(2);
    sheet.rows[1][1] = C::Raw(format!(
        r#"<c r="B2" t="inlineStr"><is><t>{}</t></is></c>"#,
        "A".repeat(48 << 20)
    ));
    write_xlsx(&p, &[sheet]);
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "zip_bomb", "{msg}");
    assert!(msg.contains("xl/worksheets/sheet1.xml"), "{msg}");
    assert!(msg.contains("above the limit of 400:1"), "{msg}");
    // The same in the shared strings, which calamine reads as it opens the file while they
    // are checked beside it.
    let p = env.path("strings-bomb.xlsx");
    let mut sheet = deactivate_sheet(2);
    sheet.rows[1][1] = s(&"A".repeat(48 << 20));
    write_xlsx(&p, &[sheet]);
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "zip_bomb", "{msg}");
    assert!(msg.contains("xl/sharedStrings.xml"), "{msg}");
}

#[test]
fn merged_cells_of_xls_and_ods_files_are_named() {
    let env = Env::new();
    let t = tenant(&env);
    let note = "1 merged cell range (B2:B3): only the first cell of each holds the value";
    // A legacy .xls (tests/fixtures/make_xls.py): Reason B2:B3 merged.
    let xls = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merged.xls");
    let o = check_path(&env, &t, &xls);
    assert_eq!(o.format, "xls");
    assert!(!o.refused, "{:?}", o.problems);
    assert!(o.notes.iter().any(|n| n.starts_with(note)), "{:?}", o.notes);
    // An .ods as LibreOffice saves a merge: the first cell spans two rows, the one below is
    // covered; a merge within the header row is not reported, nor one on another sheet.
    let p = env.path("merged.ods");
    let cell = ods_cell;
    let tables = format!(
        r#"<table:table table:name="Read Me First"><table:table-row><table:table-cell table:number-rows-spanned="3" office:value-type="string"><text:p>x</text:p></table:table-cell></table:table-row><table:table-row table:number-rows-repeated="2"><table:covered-table-cell/></table:table-row></table:table><table:table table:name="Deactivate Users"><table:table-row>{}{}</table:table-row><table:table-row>{}<table:table-cell table:number-rows-spanned="2" office:value-type="string"><text:p>Left</text:p></table:table-cell></table:table-row><table:table-row>{}<table:covered-table-cell/></table:table-row><table:table-row table:number-rows-repeated="3"><table:table-cell table:number-columns-repeated="2"/></table:table-row><table:table-row><table:table-cell table:number-columns-repeated="2"/><table:table-cell table:number-columns-spanned="2" office:value-type="string"><text:p>aside</text:p></table:table-cell><table:covered-table-cell/></table:table-row></table:table>"#,
        cell("Email"),
        cell("Reason"),
        cell("ada@example.com"),
        cell("bob@example.com"),
    );
    write_ods(&p, &tables);
    let o = check_path(&env, &t, &p);
    assert_eq!(o.format, "ods", "{:?}", o.problems);
    assert!(!o.refused, "{:?}", o.problems);
    assert!(
        o.notes
            .iter()
            .any(|n| n
                .starts_with("2 merged cell ranges (B2:B3, C7:D7): only the first cell of each")),
        "{:?}",
        o.notes
    );
}

/// Copies the workbook at `path`, rewriting the text of its part `part` with `f`.
fn rewrite_part(path: &std::path::Path, part: &str, f: impl Fn(&str) -> String) {
    let bytes = std::fs::read(path).unwrap();
    let mut from = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut to = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let o = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut found = false;
    for i in 0..from.len() {
        let mut e = from.by_index(i).unwrap();
        let name = e.name().unwrap().to_string();
        let mut text = String::new();
        e.read_to_string(&mut text).unwrap();
        if name == part {
            found = true;
            text = f(&text);
        }
        to.start_file(name, o).unwrap();
        to.write_all(text.as_bytes()).unwrap();
    }
    to.finish().unwrap();
    assert!(found, "no part {part}");
}

/// The billion-laughs declarations: `&lol9;` would expand to 10^9 "lol"s.
fn laughs_doctype(root: &str) -> String {
    let mut d = format!(r#"<!DOCTYPE {root} [<!ENTITY lol "lol">"#);
    for i in 1..=9 {
        let prev = if i == 1 {
            "lol".to_string()
        } else {
            format!("lol{}", i - 1)
        };
        d.push_str(&format!(
            r#"<!ENTITY lol{i} "{}">"#,
            format!("&{prev};").repeat(10)
        ));
    }
    d.push_str("]>");
    d
}

/// Inserts `doctype` after the XML declaration.
fn with_doctype(xml: &str, doctype: &str) -> String {
    let at = xml.find("?>").map(|i| i + 2).unwrap_or(0);
    format!("{}{doctype}{}", &xml[..at], &xml[at..])
}

/// An XML entity bomb (entities declared in a DOCTYPE, nested ten deep), in the worksheet
/// and in the shared-string table: no entity is ever expanded. A file that uses one is
/// refused with one message naming it; declarations nobody uses change nothing.
#[test]
fn xml_entity_bombs_are_never_expanded() {
    let env = Env::new();
    let t = tenant(&env);
    let refused_for_the_entity = |p: &std::path::Path| {
        let (code, msg) = refused(&check_path(&env, &t, p));
        assert_eq!(code, "file_damaged");
        assert!(msg.contains("entity `&lol9;`"), "{msg}");
        // The parser's offsets in its own buffer mean nothing to an administrator.
        assert!(
            msg.contains("(Xml error: unrecognized entity `&lol9;`)"),
            "{msg}"
        );
    };
    let p = env.path("laughs-sheet.xlsx");
    let mut sheet = deactivate_sheet(1);
    sheet.rows.push(vec![C::Raw(
        r#"<c r="A3" t="inlineStr"><is><t>&lol9;</t></is></c>"#.into(),
    )]);
    write_xlsx(&p, &[sheet]);
    rewrite_part(&p, "xl/worksheets/sheet1.xml", |x| {
        with_doctype(x, &laughs_doctype("worksheet"))
    });
    refused_for_the_entity(&p);

    let p = env.path("laughs-sst.xlsx");
    write_xlsx(&p, &[deactivate_sheet(2)]);
    rewrite_part(&p, "xl/sharedStrings.xml", |x| {
        with_doctype(x, &laughs_doctype("sst")).replacen(
            r#"<t xml:space="preserve">"#,
            r#"<t xml:space="preserve">&lol9;"#,
            1,
        )
    });
    refused_for_the_entity(&p);

    // Declared and never used: the rows are read as written (and checked: these users do
    // not exist).
    let p = env.path("declared-only.xlsx");
    write_xlsx(&p, &[deactivate_sheet(2)]);
    rewrite_part(&p, "xl/sharedStrings.xml", |x| {
        with_doctype(x, &laughs_doctype("sst"))
    });
    let o = check_path(&env, &t, &p);
    assert!(!o.refused, "{:?}", o.problems);
    let values: Vec<_> = o.problems.iter().map(|p| p.value.clone()).collect();
    assert_eq!(
        values,
        [
            Some("u0@example.com".to_string()),
            Some("u1@example.com".to_string())
        ]
    );
}

/// Cell references past Excel's last row (1,048,576) or column (XFD) with the default
/// limits, and references too large for any integer: one clear message each, none a crash
/// report.
#[test]
fn references_beyond_excels_limits() {
    let env = Env::new();
    let t = tenant(&env);
    let outcome = |name: &str, reference: &str| {
        let p = env.path(&format!("beyond-{name}.xlsx"));
        let mut sheet = deactivate_sheet(1);
        sheet.rows.push(vec![C::Raw(format!(
            r#"<c r="{reference}" t="inlineStr"><is><t>x@y.co</t></is></c>"#
        ))]);
        write_xlsx(&p, &[sheet]);
        refused(&check_path(&env, &t, &p))
    };
    let (code, msg) = outcome("row", "A1048577");
    assert_eq!(code, "too_many_rows");
    assert!(msg.contains("row 1048577"), "{msg}");
    let (code, msg) = outcome("col", "XFE2");
    assert_eq!(code, "too_many_columns");
    assert!(msg.contains("column XFE"), "{msg}");
    for (name, reference) in [
        ("huge-row", "A99999999999999999999"),
        ("huge-col", "ZZZZZZZZZZZZ2"),
        // 2^32 + 2: without overflow checks this wraps around to row 2, silently.
        ("wrapping-row", "A4294967298"),
    ] {
        let (code, msg) = outcome(name, reference);
        assert_eq!(code, "file_damaged", "{reference}");
        assert!(msg.contains("cell reference beyond any sheet"), "{msg}");
        assert!(
            !msg.contains("panicked") && !msg.contains(".rs:"),
            "{reference}: {msg}"
        );
    }
}

/// An archive of more parts than any spreadsheet has; a folder where the file should be,
/// and a file that is gone, both for the command (a usage error naming the path) and for
/// the file's worker (`file_unreadable`).
#[test]
fn too_many_parts_and_files_that_cannot_be_read() {
    let env = Env::new();
    let t = tenant(&env);
    let p = env.path("parts.xlsx");
    write_xlsx_custom(&p, &[deactivate_sheet(1)], None, |z, o| {
        for i in 0..10_001 {
            z.start_file(format!("xl/media/p{i}.bin"), o).unwrap();
        }
    });
    let (code, msg) = refused(&check_path(&env, &t, &p));
    assert_eq!(code, "zip_too_many_entries");
    assert!(msg.contains("10007 parts"), "{msg}");

    let dir = env.path("folder.xlsx");
    std::fs::create_dir(&dir).unwrap();
    let gone = env.path("gone.xlsx");
    for (path, why) in [(&dir, "Is a directory"), (&gone, "No such file")] {
        let e = service::validate(
            &env.app,
            &t,
            Operation::Deactivate,
            path,
            "upload.xlsx",
            &mut |_, _, _| {},
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot read") && e.contains(&path.display().to_string()) && e.contains(why),
            "{e}"
        );
        let f = rollcall::sheet::reader::SheetReader::open(
            &env.app.reader,
            path,
            "upload.xlsx",
            "Deactivate Users",
            rollcall::sheet::reader::Pace::Ahead,
        )
        .err()
        .expect("not readable");
        assert_eq!(f.code, "file_unreadable", "{}", f.message);
        assert!(f.message.contains("cannot be read"), "{}", f.message);
    }
}

/// A quote opened in a CSV cell and not closed at its end swallows the lines after it (up
/// to the next quote) into that cell, as a spreadsheet program would read them: the cell is
/// refused, and the message says what happened and how to fix it.
#[test]
fn a_csv_quote_left_open_is_named_with_the_lines_it_swallowed() {
    let env = Env::new();
    let t = tenant(&env);
    let o = check(
        &env,
        &t,
        "open-quote.csv",
        b"Email,Reason\na@b.co,\"5 inch\nb@b.co,left\nc@b.co,\"moved\"\n",
    );
    assert!(!o.refused && o.errors > 0, "{:?}", o.problems);
    let p = o
        .problems
        .iter()
        .find(|p| p.code == "control_character")
        .unwrap_or_else(|| panic!("{:?}", o.problems));
    assert_eq!((p.row, p.column.as_deref()), (Some(2), Some("B")));
    assert_eq!(
        p.value.as_deref(),
        Some("5 inch\nb@b.co,left\nc@b.co,moved\"")
    );
    assert!(p.message.contains("opens a quote"), "{}", p.message);
    // Outside CSV files a line break is told as before.
    assert!(!p.message.contains("U+000A"), "{}", p.message);
}
