//! Domain types: operations, the columns of each template, row problems and row effects.
//!
//! The column definitions here are the single source for templates, the Read Me First sheet,
//! the structure check and validation.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Version of the template layout; bumped when the layout changes incompatibly.
pub const TEMPLATE_VERSION: u32 = 1;
/// Typing this in an optional cell of an update file clears the field.
pub const CLEAR_TOKEN: &str = "#CLEAR";
/// Name of the explanatory sheet in templates and error workbooks.
pub const README_SHEET: &str = "Read Me First";
/// Hidden sheet with the drop-down lists.
pub const LISTS_SHEET: &str = "Lists";
/// Hidden sheet with the template metadata.
pub const META_SHEET: &str = "rollcall_meta";
/// Header of the column the error workbook adds after the template's columns.
pub const ERRORS_HEADER: &str = "Errors";

/// The five bulk operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Add,
    Update,
    Deactivate,
    Reactivate,
    Delete,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Add,
        Operation::Update,
        Operation::Deactivate,
        Operation::Reactivate,
        Operation::Delete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Add => "add",
            Operation::Update => "update",
            Operation::Deactivate => "deactivate",
            Operation::Reactivate => "reactivate",
            Operation::Delete => "delete",
        }
    }

    /// "Add", "Update", ... as shown to administrators.
    pub fn title(self) -> &'static str {
        match self {
            Operation::Add => "Add",
            Operation::Update => "Update",
            Operation::Deactivate => "Deactivate",
            Operation::Reactivate => "Reactivate",
            Operation::Delete => "Delete",
        }
    }

    /// Name of the data sheet of this operation's template.
    pub fn sheet_name(self) -> String {
        format!("{} Users", self.title())
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Operation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Operation::ALL
            .into_iter()
            .find(|o| o.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown operation {s:?}; use one of add, update, deactivate, reactivate, delete"
                )
            })
    }
}

/// Roles a user of the platform can have.
pub const ROLES: [&str; 3] = ["Learner", "Manager", "Admin"];

/// Languages offered, as (name stored and shown, accepted code).
pub const LANGUAGES: [(&str, &str); 18] = [
    ("English", "en"),
    ("French", "fr"),
    ("German", "de"),
    ("Spanish", "es"),
    ("Italian", "it"),
    ("Dutch", "nl"),
    ("Portuguese", "pt"),
    ("Polish", "pl"),
    ("Swedish", "sv"),
    ("Danish", "da"),
    ("Norwegian", "no"),
    ("Finnish", "fi"),
    ("Czech", "cs"),
    ("Turkish", "tr"),
    ("Arabic", "ar"),
    ("Japanese", "ja"),
    ("Korean", "ko"),
    ("Chinese", "zh"),
];

/// Language given to an added user whose Language cell is empty.
pub const DEFAULT_LANGUAGE: &str = "English";

/// Which user field a column carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    Email,
    NewEmail,
    FirstName,
    LastName,
    JobTitle,
    Team,
    Role,
    Language,
    Pool,
    Reason,
    /// The n-th custom column of the operation (declared by the tenant's rules).
    Custom(u16),
}

impl Field {
    pub fn header(self) -> &'static str {
        match self {
            Field::Email => "Email",
            Field::NewEmail => "New Email",
            Field::FirstName => "First Name",
            Field::LastName => "Last Name",
            Field::JobTitle => "Job Title",
            Field::Team => "Team",
            Field::Role => "Role",
            Field::Language => "Language",
            Field::Pool => "Licence Pool",
            Field::Reason => "Reason",
            Field::Custom(_) => "",
        }
    }

    pub fn max_chars(self) -> usize {
        match self {
            Field::Email | Field::NewEmail => 254,
            Field::FirstName | Field::LastName => 100,
            Field::JobTitle => 128,
            Field::Team | Field::Pool => 100,
            Field::Role | Field::Language => 32,
            Field::Reason => 500,
            Field::Custom(_) => usize::MAX,
        }
    }
}

/// What kind of values a column accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Email,
    Text,
    /// One of a fixed list (Role, Language) or of the tenant's data (Team, Licence Pool).
    Choice,
    /// A custom column: checked by the tenant's rules.
    Custom,
}

/// One column of a template.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub field: Field,
    pub header: String,
    pub required: bool,
    pub kind: Kind,
    pub max_chars: usize,
    pub help: String,
    pub example: String,
    /// The allowed values of a custom column (a drop-down); empty for built-in columns,
    /// whose lists come from the tenant's data.
    pub choices: Vec<String>,
    /// A custom column holding a user's email (must exist or be added by the same file).
    pub user_reference: bool,
    /// A custom column an update may clear with the clear token (one not declared required).
    pub clearable: bool,
}

impl Column {
    fn new(field: Field, required: bool, help: impl Into<String>, example: &'static str) -> Self {
        let kind = match field {
            Field::Email | Field::NewEmail => Kind::Email,
            Field::Team | Field::Role | Field::Language | Field::Pool => Kind::Choice,
            _ => Kind::Text,
        };
        Column {
            field,
            header: field.header().to_string(),
            required,
            kind,
            max_chars: field.max_chars(),
            help: help.into(),
            example: example.to_string(),
            choices: Vec::new(),
            user_reference: false,
            clearable: false,
        }
    }

    /// The n-th custom column of an operation, from its declaration. `required` holds in
    /// add files only (elsewhere an empty cell leaves the value as it is).
    pub fn custom(n: u16, d: &crate::rules::ColumnDecl, op: Operation) -> Self {
        let mut help = d.help.clone();
        if d.user_reference {
            if !help.is_empty() {
                help.push(' ');
            }
            help.push_str("The email of a user who exists or is added by the same file.");
        }
        if let Some(m) = d.max_length {
            if !help.is_empty() {
                help.push(' ');
            }
            help.push_str(&format!("At most {m} characters."));
        }
        Column {
            field: Field::Custom(n),
            header: d.name.clone(),
            required: d.required && op == Operation::Add,
            kind: Kind::Custom,
            max_chars: usize::MAX,
            help,
            example: d.example.clone(),
            choices: d.choices.clone(),
            user_reference: d.user_reference,
            clearable: !d.required,
        }
    }
}

/// The columns of an operation's template for a tenant: the built-in ones, then the custom
/// columns its rules declare for the operation.
pub fn columns_with(op: Operation, rules: Option<&crate::rules::Description>) -> Vec<Column> {
    let mut cols = columns(op);
    if let Some(d) = rules {
        for (n, c) in d.columns_of(op).enumerate() {
            cols.push(Column::custom(n as u16, c, op));
        }
    }
    cols
}

/// The columns of an operation's template, in order.
pub fn columns(op: Operation) -> Vec<Column> {
    use Field::*;
    let email_key = "The user's email address; it identifies the user in your organisation (upper or lower case does not matter).";
    match op {
        Operation::Add => vec![
            Column::new(
                Email,
                true,
                "The new user's email address. It must not belong to an existing user.",
                "ada.lovelace@example.com",
            ),
            Column::new(FirstName, true, "Given name.", "Ada"),
            Column::new(LastName, true, "Family name.", "Lovelace"),
            Column::new(JobTitle, false, "Free text.", "Analyst"),
            Column::new(
                Team,
                false,
                "One of your organisation's teams (see the drop-down).",
                "Research",
            ),
            Column::new(Role, true, "Learner, Manager or Admin.", "Learner"),
            Column::new(
                Language,
                false,
                format!(
                    "Language of the user's interface; empty means {DEFAULT_LANGUAGE}. Names or two-letter codes (en, fr, ...) are accepted."
                ),
                "English",
            ),
            Column::new(
                Pool,
                true,
                "The licence pool whose seat the user takes (see the drop-down). Required, unless a pool is chosen for the whole file when it is uploaded (then an empty cell takes that pool).",
                "Standard",
            ),
        ],
        Operation::Update => vec![
            Column::new(Email, true, email_key, "ada.lovelace@example.com"),
            Column::new(
                NewEmail,
                false,
                "Fill in only to change the user's email address.",
                "ada.king@example.com",
            ),
            Column::new(FirstName, false, "Empty leaves the value unchanged.", "Ada"),
            Column::new(LastName, false, "Empty leaves the value unchanged.", "King"),
            Column::new(
                JobTitle,
                false,
                format!("Empty leaves the value unchanged; {CLEAR_TOKEN} clears it."),
                "Lead Analyst",
            ),
            Column::new(
                Team,
                false,
                format!(
                    "Empty leaves the value unchanged; {CLEAR_TOKEN} removes the user from their team."
                ),
                "Research",
            ),
            Column::new(Role, false, "Empty leaves the value unchanged.", "Manager"),
            Column::new(
                Language,
                false,
                "Empty leaves the value unchanged.",
                "French",
            ),
            Column::new(
                Pool,
                false,
                "Empty leaves the value unchanged; an active user moving pools needs a free seat in the new pool.",
                "Premium",
            ),
        ],
        Operation::Deactivate => vec![
            Column::new(Email, true, email_key, "ada.lovelace@example.com"),
            Column::new(
                Reason,
                false,
                "Optional note, kept with the change in the audit log.",
                "Left the company",
            ),
        ],
        Operation::Reactivate => vec![
            Column::new(Email, true, email_key, "ada.lovelace@example.com"),
            Column::new(
                Pool,
                false,
                "Licence pool to reactivate into; empty means the pool the user had (or the pool chosen for the whole file when it is uploaded).",
                "Standard",
            ),
        ],
        Operation::Delete => vec![
            Column::new(Email, true, email_key, "ada.lovelace@example.com"),
            Column::new(
                Reason,
                false,
                "Optional note, kept with the change in the audit log.",
                "Data erasure request",
            ),
        ],
    }
}

/// A short hash of an operation's column set, stored in templates to notice a changed layout.
pub fn column_hash(op: Operation, cols: &[Column]) -> String {
    let mut h = Sha256::new();
    h.update(op.as_str().as_bytes());
    for c in cols {
        h.update(b"\x1f");
        h.update(c.header.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

/// Keys of a recorded user image (`job_changes.before/after`), in the order of its JSON array.
pub const IMAGE_KEYS: [&str; 12] = [
    "email",
    "first_name",
    "last_name",
    "job_title",
    "team_id",
    "team",
    "role",
    "language",
    "pool_id",
    "pool",
    "status",
    "custom",
];

/// A cell for a CSV export: text that a spreadsheet would run as a formula gets a leading
/// apostrophe, so opening an export never executes anything.
pub fn csv_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}").into()
    } else {
        s.into()
    }
}

/// Spreadsheet column letters for a zero-based index: 0 -> A, 26 -> AA.
pub fn column_letter(index: usize) -> String {
    let mut n = index + 1;
    let mut out = Vec::new();
    while n > 0 {
        let rem = (n - 1) % 26;
        out.push(b'A' + rem as u8);
        n = (n - 1) / 26;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Every problem code, for documentation and for reading stored problems back.
pub const PROBLEM_CODES: &[&str] = &[
    // The file as a whole.
    "file_unreadable",
    "file_empty",
    "file_encrypted",
    "file_wrong_type",
    "file_damaged",
    "file_too_large",
    "csv_encoding",
    "zip_bomb",
    "zip_too_many_entries",
    "too_many_rows",
    "too_many_columns",
    "memory_limit",
    "time_limit",
    "internal",
    "rules_unavailable",
    "rule_failed",
    "wrong_operation",
    "template_too_new",
    "sheet_missing",
    "columns_mismatch",
    "no_rows",
    "licence_pool_full",
    "already_applied",
    // One cell or row.
    "required_missing",
    "email_invalid",
    "invalid_choice",
    "unknown_team",
    "unknown_pool",
    "too_long",
    "duplicate_in_file",
    "user_exists",
    "user_not_found",
    "cannot_clear",
    "email_taken",
    "control_character",
    "cell_error",
    "cell_too_long",
    "invalid_date",
    "value_outside_template",
    "already_deactivated",
    "already_active",
    "cell_repeated",
    "rule_error",
    "rule_warning",
    "user_reference_unknown",
];

/// The static code equal to `code` (unknown codes read back as `file_unreadable`).
pub fn intern_code(code: &str) -> &'static str {
    PROBLEM_CODES
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("file_unreadable")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in an upload: where it is, what it is, how to fix it.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub sheet: String,
    /// Row number as the spreadsheet shows it; `None` for problems of the whole file.
    pub row: Option<u32>,
    /// Column letter, e.g. "C".
    pub column: Option<String>,
    pub column_name: Option<String>,
    pub value: Option<String>,
    /// Stable code, e.g. `email_invalid`.
    pub code: &'static str,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}")?;
        if let Some(r) = self.row {
            write!(f, " row {r}")?;
        }
        if let (Some(c), Some(n)) = (&self.column, &self.column_name) {
            write!(f, " column {c} ({n})")?;
        }
        if let Some(v) = &self.value {
            write!(f, " value {v:?}")?;
        }
        write!(f, " [{}]: {}", self.code, self.message)
    }
}

/// One field's change in an update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    pub field: std::borrow::Cow<'static, str>,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// What applying a row does to the roster.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Effect {
    Create,
    Change { changes: Vec<FieldChange> },
    Unchanged { reason: String },
    Deactivate,
    Reactivate,
    Delete,
}

impl Effect {
    pub fn label(&self) -> &'static str {
        match self {
            Effect::Create => "create",
            Effect::Change { .. } => "change",
            Effect::Unchanged { .. } => "unchanged",
            Effect::Deactivate => "deactivate",
            Effect::Reactivate => "reactivate",
            Effect::Delete => "delete",
        }
    }
}

/// Rows per kind of effect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Totals {
    pub create: u64,
    pub change: u64,
    pub unchanged: u64,
    pub deactivate: u64,
    pub reactivate: u64,
    pub delete: u64,
}

impl Totals {
    pub fn count(&mut self, e: &Effect) {
        match e {
            Effect::Create => self.create += 1,
            Effect::Change { .. } => self.change += 1,
            Effect::Unchanged { .. } => self.unchanged += 1,
            Effect::Deactivate => self.deactivate += 1,
            Effect::Reactivate => self.reactivate += 1,
            Effect::Delete => self.delete += 1,
        }
    }
    /// Rows that change something.
    pub fn changing(&self) -> u64 {
        self.create + self.change + self.deactivate + self.reactivate + self.delete
    }
}

/// Seats of one licence pool before and after the file.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct PoolForecast {
    pub pool: String,
    pub seats: i64,
    pub used: i64,
    pub freed: i64,
    pub needed: i64,
    pub free_after: i64,
}

/// The folder of a tenant's own files (rules, email templates): its name in lower case,
/// with every run of other characters than letters and digits made one hyphen ("Example
/// Corp" -> "example-corp"). Tenants are created only when theirs is non-empty and unique.
pub fn folder_name(tenant: &str) -> String {
    let mut out = String::new();
    for ch in tenant.trim().chars() {
        if ch.is_alphanumeric() {
            out.extend(ch.to_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters() {
        assert_eq!(column_letter(0), "A");
        assert_eq!(column_letter(25), "Z");
        assert_eq!(column_letter(26), "AA");
        assert_eq!(column_letter(16383), "XFD");
    }

    #[test]
    fn operations_parse_and_hash_differs() {
        assert_eq!("Add".parse::<Operation>().unwrap(), Operation::Add);
        assert!("adds".parse::<Operation>().is_err());
        let a = column_hash(Operation::Deactivate, &columns(Operation::Deactivate));
        let d = column_hash(Operation::Delete, &columns(Operation::Delete));
        assert_ne!(a, d);
    }

    #[test]
    fn folder_names_are_lower_case_with_hyphens() {
        assert_eq!(folder_name("Example Corp"), "example-corp");
        assert_eq!(folder_name("  Smith & Sons Ltd. "), "smith-sons-ltd");
        assert_eq!(folder_name("Ärzte Köln"), "ärzte-köln");
        assert_eq!(folder_name("!!!"), "");
    }
}
