---@meta

-- Type annotations of the rollcall rules API, for lua-language-server (LuaLS).
-- Editors use this file to complete and check tenant rule scripts; rollcall never loads
-- it. Do not copy it into a tenant's rules folder: it is not a rule script (loaded there,
-- it fails with "rollcall is read-only"). See docs/RULES.md.

---@alias rollcall.Operation
---| "add"
---| "update"
---| "deactivate"
---| "reactivate"
---| "delete"

---@alias rollcall.Level
---| "error"   # The default: the file is not valid.
---| "warning" # Shown to the uploader; the file stays valid.

---One message from a check. Made by `rollcall.error`/`rollcall.warning`, or written out to
---point at another column of the file.
---@class rollcall.Finding
---@field message string The text for the error report (trimmed, cut at 1000 characters).
---@field level? rollcall.Level "error" when left out.
---@field column? string A column header of this file (any case); default: the checked cell's column, or the row for `check_row`.

---What a check may return: nothing, `true`, an error message, a finding, or a list of
---messages and findings. Anything else (`false`, a number, ...) fails the validation.
---@alias rollcall.CheckResult nil|true|string|rollcall.Finding|(string|rollcall.Finding)[]

---A custom column, as declared with `rollcall.column`.
---@class rollcall.ColumnSpec
---@field name string The header: at most 60 characters, not a built-in header, declared once.
---@field help? string Shown in the template's Read Me First sheet.
---@field example? string Shown in the template's Read Me First sheet.
---@field required? boolean Must be filled in add files.
---@field choices? string[] The allowed values (a drop-down); another case is corrected to this spelling.
---@field max_length? integer Most characters allowed (at least 1).
---@field operations? rollcall.Operation[] The templates that carry the column; default `{ "add", "update" }`.
---@field user_reference? boolean The value must be the email of an existing user or of a user added by the same file.

---A row of the file: each column header (built-in and custom, spelt as in the template)
---to its text, "" when the cell is empty. Text is trimmed, numbers are written as text,
---dates as YYYY-MM-DD. Role, Language, Team and Licence Pool carry the tenant's spelling
---when they match one; custom values are normalised. A header the file does not have
---gives nil. It is read-only (writing to it is an error); `pairs(row)` lists every column.
---@class rollcall.Row
---@field Email string
---@field ["New Email"] string? update files only.
---@field ["First Name"] string? add and update files.
---@field ["Last Name"] string? add and update files.
---@field ["Job Title"] string? add and update files.
---@field Team string? add and update files.
---@field Role string? add and update files: "Learner", "Manager" or "Admin", in any case.
---@field Language string? add and update files.
---@field ["Licence Pool"] string? add, update and reactivate files.
---@field Reason string? deactivate and delete files.
---@field [string] string Custom columns, by their declared name.

---A user of the tenant as stored before the file (read-only).
---@class rollcall.User
---@field email string
---@field first_name string
---@field last_name string
---@field role string "Learner", "Manager" or "Admin".
---@field team string? nil when the user is in no team.
---@field pool string The licence pool's name.
---@field status "active"|"deactivated"
---@field custom table<string, string> Stored custom values by column name.

---What a rule sees of the tenant. Read-only: writing to it, its lists or a user is an error.
---@class rollcall.Ctx
---@field operation rollcall.Operation The operation of the file being checked.
---@field today string Today's date (UTC), YYYY-MM-DD.
---@field tenant string The tenant's name.
---@field teams string[] The tenant's team names.
---@field pools string[] The tenant's licence pool names.
---@field roles string[] The roles: Learner, Manager, Admin.
local Ctx = {}

---The user with this email (any case) as the directory was before the file, or nil.
---Users added by the file itself are not found.
---@param email string
---@return rollcall.User?
function Ctx.user(email) end

---True when a user with this email exists (active or not) before the file.
---@param email string
---@return boolean
function Ctx.user_exists(email) end

---True when a user with this email exists before the file and is active.
---@param email string
---@return boolean
function Ctx.user_active(email) end

---The rollcall rules API (read-only).
---@class rollcall
rollcall = rollcall or {}

---Declares a custom column. It is added after the built-in columns of the templates of
---`spec.operations` (default add and update), in declaration order.
---@param spec rollcall.ColumnSpec
function rollcall.column(spec) end

---Checks the filled cells of one column (a built-in header or a declared custom column,
---any case). Not called on empty cells, nor on "#CLEAR" in update files.
---@param column string
---@param fn fun(value: string, row: rollcall.Row, ctx: rollcall.Ctx): rollcall.CheckResult
function rollcall.check(column, fn) end

---Checks each row as a whole, after the cell checks.
---@param fn fun(row: rollcall.Row, ctx: rollcall.Ctx): rollcall.CheckResult
function rollcall.check_row(fn) end

---Normalises the non-empty cells of a declared custom column before any check: return the
---value to keep (trimmed by rollcall), or nil to leave it as it is. Not called on
---"#CLEAR" in update files.
---@param column string
---@param fn fun(value: string, ctx: rollcall.Ctx): string?
function rollcall.normalise(column, fn) end

---A warning, to return from a check: shown, but the file stays valid.
---@param message string
---@return rollcall.Finding
function rollcall.warning(message) end

---An error, to return from a check (the same as returning the message itself).
---@param message string
---@return rollcall.Finding
function rollcall.error(message) end
