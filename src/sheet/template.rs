//! Workbooks we write: the template of each operation, the error workbook (the rows as
//! uploaded with an Errors column and the faulty cells marked) and the results workbook.
//!
//! Every value taken from an upload is written as a string or number cell, never as a
//! formula, in text-formatted columns: a cell starting with `=`, `+`, `-` or `@` stays text.

use std::path::Path;

use rust_xlsxwriter::{
    Color, DataValidation, DataValidationErrorStyle, DocProperties, Format, FormatBorder, Formula,
    Workbook, Worksheet, XlsxError,
};

use crate::model::{
    self, CLEAR_TOKEN, Column, ERRORS_HEADER, Kind, LANGUAGES, LISTS_SHEET, META_SHEET, Operation,
    README_SHEET, ROLES, TEMPLATE_VERSION, column_hash, column_letter,
};

/// The tenant's data that goes into drop-downs.
#[derive(Debug, Clone, Default)]
pub struct TemplateLists {
    pub tenant: String,
    pub teams: Vec<String>,
    pub pools: Vec<String>,
    /// What the tenant's rules declare (custom columns), if it has rules.
    pub rules: Option<crate::rules::Description>,
}

/// A column's example on Read Me First: for Team and Licence Pool, the tenant's own first
/// one (an example copied as is must pass), else the column's.
fn example_of<'a>(c: &'a model::Column, lists: &'a TemplateLists) -> &'a str {
    match c.field {
        model::Field::Team => lists
            .teams
            .first()
            .map_or("(leave empty: no teams yet)", String::as_str),
        model::Field::Pool => lists
            .pools
            .first()
            .map_or(c.example.as_ref(), String::as_str),
        _ => c.example.as_ref(),
    }
}

/// Excel's limits on what one cell and one sheet can hold.
pub const EXCEL_MAX_CHARS: usize = 32_767;
pub const EXCEL_MAX_ROW: u32 = 1_048_575;

/// Index of the data sheet in workbooks made by `new_workbook`.
pub const DATA_SHEET_INDEX: usize = 1;

pub struct Formats {
    pub text: Format,
    pub header: Format,
    pub bad_cell: Format,
    pub errors: Format,
    pub title: Format,
    pub bold: Format,
    pub wrap: Format,
}

impl Formats {
    pub fn new() -> Formats {
        Formats {
            text: Format::new().set_num_format("@"),
            header: Format::new()
                .set_bold()
                .set_background_color(Color::RGB(0xDDEBF7))
                .set_border_bottom(FormatBorder::Thin)
                .set_num_format("@"),
            bad_cell: Format::new()
                .set_background_color(Color::RGB(0xFFC7CE))
                .set_font_color(Color::RGB(0x9C0006))
                .set_num_format("@"),
            errors: Format::new()
                .set_font_color(Color::RGB(0x9C0006))
                .set_num_format("@"),
            title: Format::new().set_bold().set_font_size(14),
            bold: Format::new().set_bold(),
            wrap: Format::new().set_text_wrap().set_num_format("@"),
        }
    }
}

impl Default for Formats {
    fn default() -> Self {
        Formats::new()
    }
}

/// Text safe to echo: cut to Excel's cell limit. (Strings are always written as strings.)
pub fn echo(s: &str) -> &str {
    if s.len() <= EXCEL_MAX_CHARS {
        return s;
    }
    match s.char_indices().nth(EXCEL_MAX_CHARS) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn allowed_values(col: &Column, lists: &TemplateLists) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "(none defined yet)".to_string()
        } else if v.len() <= 15 {
            v.join(", ")
        } else {
            format!(
                "{}, ... ({} in all; see the drop-down)",
                v[..15].join(", "),
                v.len()
            )
        }
    };
    match col.field {
        model::Field::Role => ROLES.join(", "),
        model::Field::Language => LANGUAGES
            .iter()
            .map(|(n, c)| format!("{n} ({c})"))
            .collect::<Vec<_>>()
            .join(", "),
        model::Field::Team => list(&lists.teams),
        model::Field::Pool => list(&lists.pools),
        model::Field::Custom(_) => {
            if col.choices.is_empty() {
                String::new()
            } else {
                list(&col.choices)
            }
        }
        _ => String::new(),
    }
}

fn format_of(col: &Column) -> String {
    match col.kind {
        Kind::Email => format!("Email address, at most {} characters", col.max_chars),
        Kind::Text => format!("Text, at most {} characters", col.max_chars),
        Kind::Choice => "One value from the list (upper/lower case does not matter)".into(),
        Kind::Custom if !col.choices.is_empty() => {
            "One value from the list (upper/lower case does not matter); your organisation's own column".into()
        }
        Kind::Custom if col.user_reference => {
            "Email address of a user; your organisation's own column".into()
        }
        Kind::Custom => "Text; your organisation's own column".into(),
    }
}

fn operation_rules(op: Operation) -> Vec<String> {
    let mut v = vec![
        format!("Fill in the sheet \"{}\": one user per row, starting in row 2. Row 1 holds the column names.", op.sheet_name()),
        "Do not add, remove, rename or move columns, and do not rename the sheets: the file is refused otherwise.".into(),
        format!("At most {EXCEL_MAX_ROW} rows per file; every cell at most {EXCEL_MAX_CHARS} characters. Spaces around values are removed; line breaks inside a value are not allowed."),
        "Each email address may appear only once in a file. Emails are matched without regard to upper or lower case.".into(),
        "Save the file as .xlsx (an .xls, .ods or a CSV UTF-8 export of the data sheet is read too) and upload it on the Bulk options page. Every problem is listed; nothing changes until the whole file is valid and you submit it.".into(),
    ];
    v.push(match op {
        Operation::Add => "Add: the email must not belong to an existing user. Every new user takes a seat in the licence pool given; the upload says how many seats are free.".into(),
        Operation::Update => format!("Update: users are found by Email. An empty cell leaves that field unchanged; {CLEAR_TOKEN} clears Job Title or Team. Fill in New Email only to change the address."),
        Operation::Deactivate => "Deactivate: users are found by Email; a deactivated user keeps their data but frees their licence seat. Users already deactivated are reported as warnings.".into(),
        Operation::Reactivate => "Reactivate: users are found by Email and take a seat again, in the pool given or else the pool they had. Users already active are reported as warnings.".into(),
        Operation::Delete => "Delete: users are found by Email and erased with their personal data. This cannot be undone after the retention window; deactivate instead if you may need the user again.".into(),
    });
    v
}

/// A workbook with the Read Me First sheet, the (empty) data sheet with its header row,
/// drop-downs and formats, and the hidden lists and metadata sheets. With `errors_column`,
/// the data sheet gets the error workbook's Errors column.
pub fn new_workbook(
    op: Operation,
    lists: &TemplateLists,
    errors_column: bool,
) -> Result<Workbook, XlsxError> {
    let cols = model::columns_with(op, lists.rules.as_ref());
    let f = Formats::new();
    let mut wb = Workbook::new();
    wb.set_properties(
        &DocProperties::new()
            .set_title(format!("{} users — {}", op.title(), lists.tenant))
            .set_company("rollcall"),
    );

    // Read Me First.
    {
        let ws = wb.add_worksheet();
        ws.set_name(README_SHEET)?;
        ws.write_string_with_format(
            0,
            0,
            format!(
                "{} users — template for {}",
                op.title(),
                echo(&lists.tenant)
            ),
            &f.title,
        )?;
        let mut r = 2u32;
        ws.write_string_with_format(r, 0, "How to use this file", &f.bold)?;
        r += 1;
        for rule in operation_rules(op) {
            ws.write_string(r, 0, format!("• {rule}"))?;
            r += 1;
        }
        r += 1;
        let headers = [
            "Column",
            "Name",
            "Required",
            "Format",
            "Allowed values",
            "Example",
            "Notes",
        ];
        for (i, h) in headers.iter().enumerate() {
            ws.write_string_with_format(r, i as u16, *h, &f.header)?;
        }
        r += 1;
        for (i, c) in cols.iter().enumerate() {
            ws.write_string(r, 0, column_letter(i))?;
            ws.write_string_with_format(r, 1, echo(&c.header), &f.bold)?;
            ws.write_string(r, 2, if c.required { "Required" } else { "Optional" })?;
            ws.write_string_with_format(r, 3, format_of(c), &f.wrap)?;
            ws.write_string_with_format(r, 4, echo(&allowed_values(c, lists)), &f.wrap)?;
            ws.write_string(r, 5, echo(example_of(c, lists)))?;
            ws.write_string_with_format(r, 6, &c.help, &f.wrap)?;
            r += 1;
        }
        for (col, width) in [
            (0u16, 8.0),
            (1, 16.0),
            (2, 10.0),
            (3, 28.0),
            (4, 40.0),
            (5, 26.0),
            (6, 60.0),
        ] {
            ws.set_column_width(col, width)?;
        }
        ws.set_active(true);
    }

    // The data sheet, streamed to disk row by row (error workbooks can have a million rows).
    {
        let ws = wb.add_worksheet_with_constant_memory()?;
        ws.set_name(op.sheet_name())?;
        for (i, c) in cols.iter().enumerate() {
            let col = i as u16;
            ws.set_column_format(col, &f.text)?;
            ws.set_column_width(col, if c.kind == Kind::Email { 30.0 } else { 18.0 })?;
            ws.write_string_with_format(0, col, echo(&c.header), &f.header)?;
        }
        if errors_column {
            let col = cols.len() as u16;
            ws.set_column_width(col, 70.0)?;
            ws.write_string_with_format(0, col, ERRORS_HEADER, &f.header)?;
        }
        ws.set_freeze_panes(1, 0)?;
        add_drop_downs(ws, &cols, lists)?;
    }

    // Lists for the drop-downs (a sheet, so long lists work), hidden.
    {
        let ws = wb.add_worksheet();
        ws.set_name(LISTS_SHEET)?;
        let mut columns: Vec<(&str, Vec<String>)> = vec![
            ("Role", ROLES.iter().map(|s| s.to_string()).collect()),
            (
                "Language",
                LANGUAGES.iter().map(|l| l.0.to_string()).collect(),
            ),
            ("Team", lists.teams.clone()),
            ("Licence Pool", lists.pools.clone()),
        ];
        // Custom columns with choices follow, in column order (see `add_drop_downs`).
        for c in cols.iter().filter(|c| !c.choices.is_empty()) {
            columns.push((c.header.as_str(), c.choices.clone()));
        }
        for (c, (name, values)) in columns.iter().enumerate() {
            ws.write_string_with_format(0, c as u16, echo(name), &f.bold)?;
            for (r, v) in values.iter().enumerate() {
                ws.write_string_with_format(r as u32 + 1, c as u16, echo(v), &f.text)?;
            }
        }
        ws.set_hidden(true);
    }

    // Metadata: what this file is, so another operation's file is caught.
    {
        let ws = wb.add_worksheet();
        ws.set_name(META_SHEET)?;
        let rows = [
            ("operation", op.as_str().to_string()),
            ("template_version", TEMPLATE_VERSION.to_string()),
            ("column_hash", column_hash(op, &cols)),
            ("tenant", lists.tenant.clone()),
            ("generated_at", crate::db::now()),
        ];
        for (r, (k, v)) in rows.iter().enumerate() {
            ws.write_string(r as u32, 0, *k)?;
            ws.write_string(r as u32, 1, echo(v))?;
        }
        ws.set_hidden(true);
    }
    Ok(wb)
}

fn add_drop_downs(
    ws: &mut Worksheet,
    cols: &[Column],
    lists: &TemplateLists,
) -> Result<(), XlsxError> {
    let mut custom_lists = 0usize;
    for (i, c) in cols.iter().enumerate() {
        let (list_col, len) = match c.field {
            model::Field::Role => ("A".to_string(), ROLES.len()),
            model::Field::Language => ("B".to_string(), LANGUAGES.len()),
            model::Field::Team => ("C".to_string(), lists.teams.len()),
            model::Field::Pool => ("D".to_string(), lists.pools.len()),
            model::Field::Custom(_) if !c.choices.is_empty() => {
                custom_lists += 1;
                (column_letter(3 + custom_lists), c.choices.len())
            }
            _ => continue,
        };
        if len == 0 {
            continue;
        }
        let formula = format!("='{LISTS_SHEET}'!${list_col}$2:${list_col}${}", len + 1);
        // A warning (not a stop) lets update files use #CLEAR and paste codes like "fr".
        let dv = DataValidation::new()
            .allow_list_formula(Formula::new(formula))
            .set_error_style(DataValidationErrorStyle::Warning)
            .set_error_title(format!("{} value", c.header))?
            .set_error_message(format!("Choose a value from the list. {}", c.help))?;
        ws.add_data_validation(1, i as u16, EXCEL_MAX_ROW, i as u16, &dv)?;
    }
    Ok(())
}

/// Writes the template of `op` to `path`.
pub fn write_template(op: Operation, lists: &TemplateLists, path: &Path) -> Result<(), XlsxError> {
    let mut wb = new_workbook(op, lists, false)?;
    wb.save(path)
}
