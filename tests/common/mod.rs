//! Test helpers: a scratch data directory with the real binary as parsing worker, and a
//! minimal .xlsx writer with other internals than rust_xlsxwriter (shared strings as Excel
//! writes them, explicit cell references), also used to build hostile files.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use rollcall::config::{Config, Loaded, Overrides};
use rollcall::service::App;

pub mod web;
pub mod webdriver;

pub const BIN: &str = env!("CARGO_BIN_EXE_rollcall");

pub struct Env {
    pub dir: tempfile::TempDir,
    pub app: App,
}

impl Env {
    pub fn new() -> Env {
        Env::with(|_| {})
    }

    pub fn with(tune: impl FnOnce(&mut Config)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let loaded = Config::load_from(
            &Overrides {
                data_dir: Some(dir.path().join("data")),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap();
        let mut config = loaded.config;
        tune(&mut config);
        let loaded = Loaded {
            config,
            file: None,
            warnings: vec![],
        };
        let app = App::open(&loaded, PathBuf::from(BIN)).unwrap();
        Env { dir, app }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A cell for the hand-made workbook.
#[derive(Clone, Debug)]
pub enum C {
    S(String),
    N(f64),
    Raw(String),
}

pub fn s(v: &str) -> C {
    C::S(v.to_string())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn col_letter(i: usize) -> String {
    rollcall::model::column_letter(i)
}

/// One sheet of the hand-made workbook.
pub struct Sheet {
    pub name: String,
    pub rows: Vec<Vec<C>>,
    pub hidden: bool,
}

/// Writes a workbook by hand: sharedStrings for text, explicit references.
pub fn write_xlsx(path: &Path, sheets: &[Sheet]) {
    write_xlsx_custom(path, sheets, None, |_, _| {})
}

/// As `write_xlsx`, with a custom sharedStrings `uniqueCount` and a hook to add raw parts.
pub fn write_xlsx_custom(
    path: &Path,
    sheets: &[Sheet],
    unique_count: Option<&str>,
    extra: impl FnOnce(&mut zip::ZipWriter<std::fs::File>, zip::write::SimpleFileOptions),
) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let o = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut strings: Vec<String> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut sheet_xml = Vec::new();
    for sh in sheets {
        let mut x = String::from(
            r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>"#,
        );
        for (r, row) in sh.rows.iter().enumerate() {
            x.push_str(&format!(r#"<row r="{}">"#, r + 1));
            for (c, cell) in row.iter().enumerate() {
                let rf = format!("{}{}", col_letter(c), r + 1);
                match cell {
                    C::S(v) if v.is_empty() => {}
                    C::S(v) => {
                        let i = *index.entry(v.clone()).or_insert_with(|| {
                            strings.push(v.clone());
                            strings.len() - 1
                        });
                        x.push_str(&format!(r#"<c r="{rf}" t="s"><v>{i}</v></c>"#));
                    }
                    C::N(n) => x.push_str(&format!(r#"<c r="{rf}"><v>{n}</v></c>"#)),
                    C::Raw(raw) => x.push_str(raw),
                }
            }
            x.push_str("</row>");
        }
        x.push_str("</sheetData></worksheet>");
        sheet_xml.push(x);
    }
    let mut ct = String::from(
        r#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/><Override PartName="/xl/sharedStrings.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/>"#,
    );
    for i in 0..sheets.len() {
        ct.push_str(&format!(r#"<Override PartName="/xl/worksheets/sheet{}.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>"#, i + 1));
    }
    ct.push_str("</Types>");
    z.start_file("[Content_Types].xml", o).unwrap();
    z.write_all(ct.as_bytes()).unwrap();
    z.start_file("_rels/.rels", o).unwrap();
    z.write_all(br#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>"#).unwrap();
    let mut wb = String::from(
        r#"<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"><sheets>"#,
    );
    let mut rels = String::from(
        r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">"#,
    );
    for (i, sh) in sheets.iter().enumerate() {
        let state = if sh.hidden { r#" state="hidden""# } else { "" };
        wb.push_str(&format!(
            r#"<sheet name="{}" sheetId="{}"{state} r:id="rId{}"/>"#,
            xml_escape(&sh.name),
            i + 1,
            i + 1
        ));
        rels.push_str(&format!(r#"<Relationship Id="rId{}" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet{}.xml"/>"#, i + 1, i + 1));
    }
    let n = sheets.len();
    rels.push_str(&format!(r#"<Relationship Id="rId{}" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/sharedStrings" Target="sharedStrings.xml"/></Relationships>"#, n + 1));
    wb.push_str("</sheets></workbook>");
    z.start_file("xl/workbook.xml", o).unwrap();
    z.write_all(wb.as_bytes()).unwrap();
    z.start_file("xl/_rels/workbook.xml.rels", o).unwrap();
    z.write_all(rels.as_bytes()).unwrap();
    for (i, x) in sheet_xml.iter().enumerate() {
        z.start_file(format!("xl/worksheets/sheet{}.xml", i + 1), o)
            .unwrap();
        z.write_all(x.as_bytes()).unwrap();
    }
    let count = unique_count
        .map(str::to_string)
        .unwrap_or_else(|| strings.len().to_string());
    let mut sst = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" count="{count}" uniqueCount="{count}">"#
    );
    for v in &strings {
        sst.push_str(&format!(
            r#"<si><t xml:space="preserve">{}</t></si>"#,
            xml_escape(v)
        ));
    }
    sst.push_str("</sst>");
    z.start_file("xl/sharedStrings.xml", o).unwrap();
    z.write_all(sst.as_bytes()).unwrap();
    extra(&mut z, o);
    z.finish().unwrap();
}

/// A data sheet for `op` with the template's header and these rows.
pub fn data_sheet(op: rollcall::model::Operation, rows: &[Vec<&str>]) -> Sheet {
    let mut all = vec![
        rollcall::model::columns(op)
            .iter()
            .map(|c| s(&c.header))
            .collect::<Vec<_>>(),
    ];
    for r in rows {
        all.push(r.iter().map(|v| s(v)).collect());
    }
    Sheet {
        name: op.sheet_name(),
        rows: all,
        hidden: false,
    }
}

/// The metadata sheet a template carries.
pub fn meta_sheet(op: rollcall::model::Operation) -> Sheet {
    Sheet {
        name: rollcall::model::META_SHEET.into(),
        rows: vec![
            vec![s("operation"), s(op.as_str())],
            vec![s("template_version"), s("1")],
        ],
        hidden: true,
    }
}

/// An add file of rows `u{i}@example.com` for each `i` in `range`, pool Standard.
pub fn write_add_file(path: &Path, range: std::ops::Range<usize>) {
    let rows: Vec<Vec<String>> = range
        .map(|i| {
            let mut r = vec![format!("u{i}@example.com"), "A".into(), "B".into()];
            r.extend(["", "", "Learner", "", "Standard"].map(String::from));
            r
        })
        .collect();
    let rows: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| r.iter().map(String::as_str).collect())
        .collect();
    write_xlsx(path, &[data_sheet(rollcall::model::Operation::Add, &rows)]);
}

/// Runs the real binary on a data directory.
pub fn cli(data: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .unwrap()
}

/// What a run printed, stdout then stderr.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Reads a server's output until the line with its address ("listening on http://ADDR"),
/// returning the address, the lines before it (a first start prints the operator's
/// one-time password first) and that line.
pub fn listen_addr(r: &mut impl std::io::BufRead) -> (String, String, String) {
    let mut before = String::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).unwrap();
        assert!(n > 0, "the server ended before it listened: {before}");
        if let Some(rest) = line
            .split("://")
            .nth(1)
            .filter(|_| line.contains("listening on"))
        {
            let addr = rest.split_whitespace().next().unwrap_or("").to_string();
            return (addr, before, line);
        }
        before.push_str(&line);
    }
}

/// A child process killed when the test ends, even by a failed assertion (a server left
/// running would hold the test's output open).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes an .ods as LibreOffice packs one: the mimetype stored first, `content.xml` with
/// `tables` (the `<table:table>` elements) in its spreadsheet body, and the manifest.
/// Every row of `sheet` in the workbook at `path`, each cell as its text.
pub fn sheet_rows(path: &Path, sheet: &str) -> Vec<Vec<String>> {
    use calamine::Reader;
    let mut wb = calamine::open_workbook_auto(path).unwrap();
    let range = wb.worksheet_range(sheet).unwrap();
    range
        .rows()
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect()
}

pub fn write_ods(path: &Path, tables: &str) {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let deflated = zip::write::SimpleFileOptions::default();
    z.start_file("mimetype", stored).unwrap();
    z.write_all(b"application/vnd.oasis.opendocument.spreadsheet")
        .unwrap();
    z.start_file("content.xml", deflated).unwrap();
    write!(
        z,
        r#"<?xml version="1.0" encoding="UTF-8"?><office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" office:version="1.2"><office:body><office:spreadsheet>{tables}</office:spreadsheet></office:body></office:document-content>"#
    )
    .unwrap();
    z.start_file("META-INF/manifest.xml", deflated).unwrap();
    z.write_all(br#"<?xml version="1.0" encoding="UTF-8"?><manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2"><manifest:file-entry manifest:full-path="/" manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/></manifest:manifest>"#).unwrap();
    z.finish().unwrap();
}

/// A text cell of an .ods table.
pub fn ods_cell(v: &str) -> String {
    format!(
        r#"<table:table-cell office:value-type="string"><text:p>{v}</text:p></table:table-cell>"#
    )
}
