//! The error workbook (the administrator's rows as uploaded, an Errors column, the faulty
//! cells marked, the Read Me First sheet kept: fix and upload again as is) and the results
//! workbook of an applied job.

use std::path::Path;

use rusqlite::Connection;
use rust_xlsxwriter::{Format, Workbook, XlsxError};
use serde_json::Value;

use super::codec::{CellKind, RawRow};
use super::reader::{Pace, ReaderSetup, SheetReader};
use super::template::{self, DATA_SHEET_INDEX, Formats, TemplateLists, echo};
use crate::bulk::Outcome;
use crate::error::{AppError, AppResult};
use crate::model::{self, Operation, Problem, Severity};

fn xlsx_err(e: XlsxError) -> AppError {
    AppError::internal("writing a workbook", e)
}

/// Writes the problems to their own sheet: every problem with sheet, row, column, value.
fn problems_sheet(wb: &mut Workbook, outcome: &Outcome) -> Result<(), XlsxError> {
    let f = Formats::new();
    let ws = wb.add_worksheet();
    ws.set_name("Problems")?;
    let headers = [
        "Severity",
        "Sheet",
        "Row",
        "Column",
        "Column name",
        "Value",
        "Code",
        "Message",
    ];
    for (i, h) in headers.iter().enumerate() {
        ws.write_string_with_format(0, i as u16, *h, &f.header)?;
    }
    for (i, p) in outcome.problems.iter().enumerate() {
        let r = i as u32 + 1;
        ws.write_string(
            r,
            0,
            if p.severity == Severity::Error {
                "Error"
            } else {
                "Warning"
            },
        )?;
        ws.write_string_with_format(r, 1, echo(&p.sheet), &f.text)?;
        if let Some(row) = p.row {
            ws.write_number(r, 2, f64::from(row))?;
        }
        ws.write_string(r, 3, p.column.as_deref().unwrap_or(""))?;
        ws.write_string(r, 4, p.column_name.as_deref().unwrap_or(""))?;
        ws.write_string_with_format(r, 5, echo(p.value.as_deref().unwrap_or("")), &f.text)?;
        ws.write_string(r, 6, p.code)?;
        ws.write_string_with_format(r, 7, echo(&p.message), &f.text)?;
    }
    let hidden = outcome.errors + outcome.warnings - outcome.problems.len() as u64;
    if hidden > 0 {
        let r = outcome.problems.len() as u32 + 2;
        ws.write_string(
            r,
            0,
            format!(
                "{hidden} further problems are not listed; fix these and upload again to see them."
            ),
        )?;
    }
    for (c, w) in [
        (0u16, 9.0),
        (1, 14.0),
        (2, 7.0),
        (3, 8.0),
        (4, 14.0),
        (5, 30.0),
        (6, 22.0),
        (7, 90.0),
    ] {
        ws.set_column_width(c, w)?;
    }
    ws.set_freeze_panes(1, 0)?;
    Ok(())
}

/// Writes the error workbook for an upload, re-reading the file through the worker.
pub fn write_error_workbook(
    setup: &ReaderSetup,
    op: Operation,
    lists: &TemplateLists,
    file: &Path,
    file_name: &str,
    outcome: &Outcome,
    out: &Path,
) -> AppResult<()> {
    let mut wb = template::new_workbook(op, lists, true).map_err(xlsx_err)?;
    if !outcome.refused {
        let ws = wb
            .worksheet_from_index(DATA_SHEET_INDEX)
            .map_err(xlsx_err)?;
        let f = Formats::new();
        let date = Format::new().set_num_format("yyyy-mm-dd");
        // The Errors column follows the template's columns, the tenant's custom ones included.
        let n = model::columns_with(op, lists.rules.as_ref()).len() as u32;
        let mut reader = SheetReader::open(setup, file, file_name, &op.sheet_name(), Pace::Ahead)
            .map_err(|e| {
            AppError::internal("re-reading the upload for its error workbook", e)
        })?;
        let mut row = RawRow::default();
        // Problems of rows, in row order (file-level problems go to the Problems sheet).
        let mut pending = outcome
            .problems
            .iter()
            .filter(|p| p.row.is_some())
            .peekable();
        let mut first = true;
        while reader
            .next_row(&mut row)
            .map_err(|e| AppError::internal("re-reading the upload for its error workbook", e))?
        {
            if first {
                first = false;
                if row.index == 0 {
                    continue; // Our header replaces theirs.
                }
            }
            let excel_row = row.index + 1;
            let mut mine: Vec<&Problem> = Vec::new();
            while let Some(p) = pending.peek() {
                match p.row {
                    Some(r) if r < excel_row => {
                        pending.next();
                    }
                    Some(r) if r == excel_row => {
                        mine.push(p);
                        pending.next();
                    }
                    _ => break,
                }
            }
            let bad_col = |c: u32| {
                let letter = model::column_letter(c as usize);
                mine.iter()
                    .any(|p| p.column.as_deref() == Some(letter.as_str()))
            };
            for cell in row.cells() {
                if cell.col == n {
                    continue; // An Errors column from an earlier error workbook.
                }
                let (r, c) = (row.index, cell.col as u16);
                let fmt = if bad_col(cell.col) {
                    &f.bad_cell
                } else {
                    &f.text
                };
                let res = match cell.kind {
                    CellKind::Text | CellKind::DateIso | CellKind::Error => {
                        ws.write_string_with_format(r, c, echo(&cell.text), fmt)
                    }
                    CellKind::Int | CellKind::Float => {
                        ws.write_number_with_format(r, c, cell.num, fmt)
                    }
                    CellKind::Bool => ws.write_boolean_with_format(r, c, cell.num != 0.0, fmt),
                    CellKind::Date => ws.write_number_with_format(r, c, cell.num, &date),
                    CellKind::TooLong => ws.write_string_with_format(
                        r,
                        c,
                        format!(
                            "(a text of {} characters, too long to keep)",
                            cell.num as u64
                        ),
                        fmt,
                    ),
                };
                res.map_err(xlsx_err)?;
            }
            if !mine.is_empty() {
                let text: Vec<String> = mine
                    .iter()
                    .map(|p| {
                        let what = p.column_name.clone().unwrap_or_else(|| "Row".into());
                        let sev = if p.severity == Severity::Warning {
                            "Warning — "
                        } else {
                            ""
                        };
                        format!("{sev}{what}: {}", p.message)
                    })
                    .collect();
                ws.write_string_with_format(row.index, n as u16, echo(&text.join("\n")), &f.errors)
                    .map_err(xlsx_err)?;
            }
        }
    }
    problems_sheet(&mut wb, outcome).map_err(xlsx_err)?;
    save_atomically(&mut wb, out)
}

/// Saves beside the target and renames, so a reader never sees half a workbook.
pub fn save_atomically(wb: &mut Workbook, out: &Path) -> AppResult<()> {
    let tmp = out.with_extension("xlsx.partial");
    wb.save(&tmp).map_err(xlsx_err)?;
    std::fs::rename(&tmp, out)
        .map_err(|e| AppError::internal(format!("saving {}", out.display()), e))
}

const IMAGE_FIELDS: [(&str, &str); 9] = [
    ("email", "Email"),
    ("first_name", "First Name"),
    ("last_name", "Last Name"),
    ("job_title", "Job Title"),
    ("team", "Team"),
    ("role", "Role"),
    ("language", "Language"),
    ("pool", "Licence Pool"),
    ("status", "Status"),
];

fn show(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "(empty)".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// One field of a recorded image (a JSON array in the order of `model::IMAGE_KEYS`).
pub fn image_field<'a>(img: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    let i = model::IMAGE_KEYS.iter().position(|k| *k == key)?;
    img?.get(i)
}

/// Words for one recorded change.
pub fn describe_change(action: &str, before: Option<&Value>, after: Option<&Value>) -> String {
    let get = |img: Option<&Value>, k: &str| image_field(img, k).cloned();
    match action {
        "create" => format!(
            "Created, seat in pool {}",
            show(get(after, "pool").as_ref())
        ),
        "delete" => "Deleted; personal data erased".into(),
        "deactivate" => format!(
            "Deactivated; seat in pool {} freed",
            show(get(before, "pool").as_ref())
        ),
        "reactivate" => format!(
            "Reactivated, seat in pool {}",
            show(get(after, "pool").as_ref())
        ),
        "unchanged" => "Nothing to change (already in that state)".into(),
        _ => {
            let parts: Vec<String> = IMAGE_FIELDS
                .iter()
                .filter_map(|(k, label)| {
                    let (b, a) = (get(before, k), get(after, k));
                    (b != a)
                        .then(|| format!("{label}: {} -> {}", show(b.as_ref()), show(a.as_ref())))
                })
                .collect();
            if parts.is_empty() {
                "Changed".into()
            } else {
                parts.join("; ")
            }
        }
    }
}

/// Writes the results workbook of a job from its recorded changes.
/// `title` names the job, e.g. "Add users" or "Undo of job 12".
pub fn write_results_workbook(
    conn: &Connection,
    job_id: i64,
    title: &str,
    out: &Path,
) -> AppResult<()> {
    let f = Formats::new();
    let mut wb = Workbook::new();
    let ws = wb.add_worksheet_with_constant_memory().map_err(xlsx_err)?;
    ws.set_name("Results").map_err(xlsx_err)?;
    for (i, h) in ["Row", "Email", "Result", "Details"].iter().enumerate() {
        ws.write_string_with_format(0, i as u16, *h, &f.header)
            .map_err(xlsx_err)?;
    }
    for (c, w) in [(0u16, 8.0), (1, 32.0), (2, 12.0), (3, 80.0)] {
        ws.set_column_width(c, w).map_err(xlsx_err)?;
    }
    let mut st = conn.prepare("SELECT row_number, action, before, after FROM job_changes WHERE job_id = ?1 ORDER BY row_number")?;
    let mut rows = st.query([job_id])?;
    let mut r = 1u32;
    while let Some(row) = rows.next()? {
        let row_number: i64 = row.get(0)?;
        let action: String = row.get(1)?;
        let parse = |s: Option<String>| s.and_then(|s| serde_json::from_str::<Value>(&s).ok());
        let before = parse(row.get(2)?);
        let after = parse(row.get(3)?);
        let email = show(image_field(after.as_ref().or(before.as_ref()), "email"));
        ws.write_number(r, 0, row_number as f64).map_err(xlsx_err)?;
        ws.write_string_with_format(r, 1, echo(&email), &f.text)
            .map_err(xlsx_err)?;
        ws.write_string(r, 2, action.as_str()).map_err(xlsx_err)?;
        ws.write_string_with_format(
            r,
            3,
            echo(&describe_change(&action, before.as_ref(), after.as_ref())),
            &f.text,
        )
        .map_err(xlsx_err)?;
        r += 1;
        if r > template::EXCEL_MAX_ROW {
            break;
        }
    }
    ws.set_freeze_panes(1, 0).map_err(xlsx_err)?;
    wb.set_properties(
        &rust_xlsxwriter::DocProperties::new()
            .set_title(format!("{title} — results of job {job_id}")),
    );
    save_atomically(&mut wb, out)
}
