//! The Lua side of tenant rules: the sandbox, the `rollcall` API the scripts call, and the
//! per-row evaluation. An `Engine` lives only inside the rules worker process
//! (`rules::worker`), so a rule that runs away can be stopped by ending that process.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use mlua::chunk::ChunkMode;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

use super::{
    ColumnDecl, Context, Description, LoadProblem, RuleInfo, Script, UserInfo, UserLookup,
};

type LookupResult = Result<Option<UserInfo>, String>;
use crate::model::{CLEAR_TOKEN, Operation};

/// Where a check's messages go.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    Error {
        col: Option<usize>,
        message: String,
    },
    Warning {
        col: Option<usize>,
        message: String,
    },
    /// A rule's normaliser changed the value of custom column `col` from `from`.
    Normalised {
        col: usize,
        value: String,
        from: String,
    },
    /// A choice was written in another case; `value` is the declared spelling.
    CaseCorrected {
        col: usize,
        value: String,
        from: String,
    },
}

/// A rule that broke: an error, a loop or memory past its limit. It fails the whole run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuleFailure {
    pub script: String,
    pub line: Option<u32>,
    /// The Excel row being checked, when it happened during a row.
    pub row: Option<u32>,
    pub message: String,
}

impl std::fmt::Display for RuleFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.script)?;
        if let Some(l) = self.line {
            write!(f, ", line {l}")?;
        }
        if let Some(r) = self.row {
            write!(f, " (checking row {r})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The limits a run is held to.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct EngineLimits {
    /// Memory the tenant's Lua state may hold.
    pub memory_mib: u64,
    /// Time one rule call (or loading one script) may take.
    pub call_ms: u64,
}

/// The rule being run, shared with the worker's watchdog thread. A call costs no clock
/// reading: the watchdog notices a call that stays the same (same `seq`) across its ticks,
/// raises `overdue` (the instruction hook then stops a Lua loop with its line), and ends
/// the process when the call still runs after a grace period (it is inside a C function).
pub struct CallState {
    seq: AtomicU64,
    running: AtomicBool,
    /// Set by the watchdog: the running call is past its time limit.
    pub overdue: AtomicBool,
    /// Index into `Engine::rule_locations` (u64::MAX while loading a script: see `script`).
    pub rule: AtomicU64,
    pub row: AtomicU64,
    pub script: std::sync::Mutex<String>,
}

/// What the watchdog remembers between ticks.
pub struct Observer {
    seq: u64,
    since: Instant,
}

impl Default for Observer {
    fn default() -> Self {
        Observer {
            seq: u64::MAX,
            since: Instant::now(),
        }
    }
}

impl CallState {
    pub fn new() -> Arc<CallState> {
        Arc::new(CallState {
            seq: AtomicU64::new(0),
            running: AtomicBool::new(false),
            overdue: AtomicBool::new(false),
            rule: AtomicU64::new(u64::MAX),
            row: AtomicU64::new(0),
            script: std::sync::Mutex::new(String::new()),
        })
    }

    fn begin(&self, rule: usize, row: u32) {
        self.rule.store(rule as u64, Ordering::Relaxed);
        self.row.store(row as u64, Ordering::Relaxed);
        self.overdue.store(false, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
        self.running.store(true, Ordering::Release);
    }

    fn end(&self) {
        self.running.store(false, Ordering::Release);
    }

    /// Milliseconds the current call has been seen running (at the watchdog's ticks), if a
    /// call runs.
    pub fn observe(&self, o: &mut Observer) -> Option<u64> {
        if !self.running.load(Ordering::Acquire) {
            return None;
        }
        let seq = self.seq.load(Ordering::Acquire);
        if seq != o.seq {
            o.seq = seq;
            o.since = Instant::now();
        }
        Some(o.since.elapsed().as_millis() as u64)
    }
}

struct Rule {
    script: Arc<str>,
    line: Option<u32>,
    /// Index into the run's columns (`None`: a row check).
    col: Option<usize>,
    column_name: Option<String>,
    func: Function,
}

#[derive(Default)]
struct Registry {
    script: Arc<str>,
    columns: Vec<ColumnDecl>,
    checks: Vec<(String, Rule)>,
    row_checks: Vec<Rule>,
    normalisers: Vec<(String, Rule)>,
}

/// What one checked row gave.
pub type Findings = Vec<Finding>;

/// A loaded rule set, ready to check rows of one operation.
pub struct Engine {
    lua: Lua,
    ctx: Table,
    /// The `row` scripts see: a read-only view of `row_data`, read on demand.
    row: Table,
    row_data: Rc<RefCell<Vec<String>>>,
    /// The run's columns (built-in headers then the operation's custom columns).
    headers: Vec<String>,
    /// Lua strings of `headers`, made once.
    /// Custom columns by index in `headers`.
    custom: Vec<(usize, ColumnDecl)>,
    checks: Vec<Rule>,
    row_checks: Vec<Rule>,
    normalisers: Vec<Rule>,
    op: Operation,
    state: Arc<CallState>,
    limits: EngineLimits,
    description: Description,
}

/// Functions and libraries a script may not reach.
const REMOVED_GLOBALS: [&str; 8] = [
    "dofile",
    "loadfile",
    "load",
    "loadstring",
    "require",
    "collectgarbage",
    "print",
    "module",
];

fn lua_err(e: mlua::Error) -> String {
    e.to_string()
}

/// A new sandboxed state: only `string`, `table`, `math` and `utf8`; no loading of code, no
/// bytecode, no garbage-collector control, no access to the string metatable.
fn sandbox(limits: &EngineLimits) -> mlua::Result<Lua> {
    let lua = Lua::new_with(
        StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8,
        LuaOptions::default(),
    )?;
    let g = lua.globals();
    for name in REMOVED_GLOBALS {
        g.set(name, Value::Nil)?;
    }
    let string: Table = g.get("string")?;
    string.set("dump", Value::Nil)?;
    // `getmetatable("")` gives `false` and the metatable cannot be replaced.
    lua.load("local mt = getmetatable('') mt.__metatable = false")
        .set_name("=sandbox")
        .set_mode(ChunkMode::Text)
        .exec()?;
    lua.set_memory_limit((limits.memory_mib as usize).saturating_mul(1024 * 1024))?;
    Ok(lua)
}

/// A read-only view of `t`: reading, `#`, `pairs` and `ipairs` work; writing raises an
/// error that points at the script's line.
fn read_only(lua: &Lua, t: Table, what: &'static str) -> mlua::Result<Table> {
    let make: Function = match lua.named_registry_value::<Option<Function>>("rollcall.read_only")? {
        Some(f) => f,
        None => {
            let f: Function = lua
                .load(
                    "return function(t, what)
                       return setmetatable({}, {
                         __index = t,
                         __newindex = function() error(what .. ' is read-only', 2) end,
                         __len = function() return #t end,
                         __pairs = function() return next, t, nil end,
                         __metatable = false,
                       })
                     end",
                )
                .set_name("=sandbox")
                .set_mode(ChunkMode::Text)
                .eval()?;
            lua.set_named_registry_value("rollcall.read_only", &f)?;
            f
        }
    };
    make.call((t, what))
}

fn strings_table(lua: &Lua, items: &[String]) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(items.len(), 0)?;
    for (i, s) in items.iter().enumerate() {
        t.raw_set(i + 1, s.as_str())?;
    }
    read_only(lua, t, "this list")
}

/// The line a Lua error message points at (`name.lua:12: ...`), and the message without it.
pub fn split_location(script: &str, msg: &str) -> (Option<u32>, String) {
    let msg = msg
        .trim_start_matches("runtime error: ")
        .trim_start_matches("syntax error: ");
    // The first line holds the message; a traceback may follow.
    let first = msg.lines().next().unwrap_or("").trim();
    for (i, _) in first.match_indices(script) {
        let rest = &first[i + script.len()..];
        if let Some(rest) = rest.strip_prefix(':') {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(line) = digits.parse::<u32>() {
                let text = rest[digits.len()..].trim_start_matches(':').trim();
                return (Some(line), text.to_string());
            }
        }
    }
    (None, first.to_string())
}

fn op_list(v: Option<Table>) -> mlua::Result<Result<Vec<Operation>, String>> {
    let Some(t) = v else {
        return Ok(Ok(vec![Operation::Add, Operation::Update]));
    };
    let mut ops = Vec::new();
    for item in t.sequence_values::<String>() {
        let s = item?;
        match s.parse::<Operation>() {
            Ok(op) => ops.push(op),
            Err(_) => {
                return Ok(Err(format!(
                    "operations: {s:?} is not an operation (add, update, deactivate, reactivate, delete)"
                )));
            }
        }
    }
    Ok(Ok(ops))
}

fn register_api(lua: &Lua, reg: &Rc<RefCell<Registry>>) -> mlua::Result<()> {
    let api = lua.create_table()?;
    let r = reg.clone();
    api.set(
        "column",
        lua.create_function(move |lua, spec: Table| {
            let mut reg = r.borrow_mut();
            let line = caller_line(lua);
            let script = reg.script.to_string();
            let name: Option<String> = spec.get("name")?;
            let located =
                |m: String| mlua::Error::runtime(format!("{script}:{}: {m}", line.unwrap_or(0)));
            let Some(name) = name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty()) else {
                return Err(located("rollcall.column needs a name".into()));
            };
            let choices: Option<Table> = spec.get("choices")?;
            let mut choice_list = Vec::new();
            if let Some(t) = choices {
                for c in t.sequence_values::<String>() {
                    choice_list.push(c?);
                }
            }
            let operations = match op_list(spec.get("operations")?)? {
                Ok(o) => o,
                Err(m) => return Err(located(m)),
            };
            let max_length: Option<i64> = spec.get("max_length")?;
            let decl = ColumnDecl {
                name,
                help: spec.get::<Option<String>>("help")?.unwrap_or_default(),
                example: spec.get::<Option<String>>("example")?.unwrap_or_default(),
                required: spec.get::<Option<bool>>("required")?.unwrap_or(false),
                choices: choice_list,
                max_length: max_length.map(|m| m.clamp(0, 100_000) as usize),
                operations,
                user_reference: spec.get::<Option<bool>>("user_reference")?.unwrap_or(false),
                script,
                line,
            };
            reg.columns.push(decl);
            Ok(())
        })?,
    )?;
    // rollcall.check(column, fn), rollcall.check_row(fn), rollcall.normalise(column, fn).
    for kind in [Kind::Check, Kind::Row, Kind::Normaliser] {
        let r = reg.clone();
        let name = match kind {
            Kind::Check => "check",
            Kind::Row => "check_row",
            Kind::Normaliser => "normalise",
        };
        api.set(
            name,
            lua.create_function(move |lua, args: mlua::MultiValue| {
                let (column, func): (Option<String>, Function) = if matches!(kind, Kind::Row) {
                    (None, lua.unpack_multi(args)?)
                } else {
                    let (c, f): (String, Function) = lua.unpack_multi(args)?;
                    (Some(c), f)
                };
                let mut reg = r.borrow_mut();
                let rule = Rule {
                    script: reg.script.clone(),
                    line: line_of(&func).or(caller_line(lua)),
                    col: None,
                    column_name: column.clone(),
                    func,
                };
                match (kind, column) {
                    (Kind::Check, Some(c)) => reg.checks.push((c, rule)),
                    (Kind::Normaliser, Some(c)) => reg.normalisers.push((c, rule)),
                    _ => reg.row_checks.push(rule),
                }
                Ok(())
            })?,
        )?;
    }
    api.set(
        "warning",
        lua.create_function(|lua, message: String| {
            let t = lua.create_table()?;
            t.set("level", "warning")?;
            t.set("message", message)?;
            Ok(t)
        })?,
    )?;
    api.set(
        "error",
        lua.create_function(|lua, message: String| {
            let t = lua.create_table()?;
            t.set("level", "error")?;
            t.set("message", message)?;
            Ok(t)
        })?,
    )?;
    lua.globals()
        .set("rollcall", read_only(lua, api, "rollcall")?)?;
    Ok(())
}

fn caller_line(lua: &Lua) -> Option<u32> {
    lua.inspect_stack(1, |d| d.current_line())
        .flatten()
        .map(|l| l as u32)
}

fn line_of(f: &Function) -> Option<u32> {
    f.info().line_defined.map(|l| l as u32)
}

impl Engine {
    /// Loads `scripts` (in name order) into a fresh sandbox and prepares the checks of
    /// `op`, whose built-in column headers are `builtin`. Problems in the scripts (they do not
    /// compile, fail, or declare something wrong) are returned all at once.
    pub fn load(
        scripts: &[Script],
        context: &Context,
        op: Operation,
        builtin: &[String],
        limits: EngineLimits,
        state: Arc<CallState>,
        lookup: Option<UserLookup>,
    ) -> Result<Engine, Vec<LoadProblem>> {
        let fail = |m: String| {
            vec![LoadProblem {
                script: String::new(),
                line: None,
                message: m,
            }]
        };
        let lua = sandbox(&limits).map_err(|e| fail(lua_err(e)))?;
        let reg = Rc::new(RefCell::new(Registry::default()));
        register_api(&lua, &reg).map_err(|e| fail(lua_err(e)))?;
        let ctx = make_context(&lua, context, op, lookup).map_err(|e| fail(lua_err(e)))?;
        install_hook(&lua, &state, limits);

        let mut problems = Vec::new();
        let mut names: Vec<&Script> = scripts.iter().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        for s in names {
            reg.borrow_mut().script = Arc::from(s.name.as_str());
            if let Ok(mut cur) = state.script.lock() {
                cur.clone_from(&s.name);
            }
            state.begin(usize::MAX, 0);
            let res = lua
                .load(s.source.as_str())
                .set_name(format!("@{}", s.name))
                .set_mode(ChunkMode::Text)
                .exec();
            state.end();
            if let Err(e) = res {
                let (line, message) = split_location(&s.name, &failure_text(&e, &limits));
                problems.push(LoadProblem {
                    script: s.name.clone(),
                    line,
                    message,
                });
            }
        }
        let reg = Rc::try_unwrap(reg)
            .map(RefCell::into_inner)
            .unwrap_or_else(|rc| std::mem::take(&mut *rc.borrow_mut()));
        let mut engine = Engine {
            row: lua.create_table().map_err(|e| fail(lua_err(e)))?,
            row_data: Rc::new(RefCell::new(Vec::new())),
            lua,
            ctx,
            headers: Vec::new(),
            custom: Vec::new(),
            checks: Vec::new(),
            row_checks: Vec::new(),
            normalisers: Vec::new(),
            op,
            state,
            limits,
            description: Description::default(),
        };
        problems.extend(engine.prepare(reg, builtin));
        if problems.is_empty() {
            Ok(engine)
        } else {
            Err(problems)
        }
    }

    /// Checks the declarations and resolves every rule's column.
    fn prepare(&mut self, reg: Registry, builtin: &[String]) -> Vec<LoadProblem> {
        let mut problems = Vec::new();
        let mut p = |script: &str, line: Option<u32>, m: String| {
            problems.push(LoadProblem {
                script: script.to_string(),
                line,
                message: m,
            })
        };
        let all_builtin = all_builtin_headers();
        let mut seen: Vec<String> = Vec::new();
        for c in &reg.columns {
            let key = c.name.to_lowercase();
            if all_builtin.iter().any(|b| b.to_lowercase() == key) {
                p(
                    &c.script,
                    c.line,
                    format!(
                        "the column {:?} is a built-in column; give the custom column another name",
                        c.name
                    ),
                );
            } else if seen.contains(&key) {
                p(
                    &c.script,
                    c.line,
                    format!("the column {:?} is declared twice", c.name),
                );
            } else if c.name.chars().count() > 60 || c.name.chars().any(char::is_control) {
                p(
                    &c.script,
                    c.line,
                    format!(
                        "the column name {:?} is too long or has a control character (at most 60 characters)",
                        c.name
                    ),
                );
            }
            if c.max_length == Some(0) {
                p(
                    &c.script,
                    c.line,
                    format!("max_length of {:?} must be at least 1", c.name),
                );
            }
            if c.choices.iter().any(|s| s.trim().is_empty()) {
                p(
                    &c.script,
                    c.line,
                    format!("the choices of {:?} include an empty one", c.name),
                );
            }
            seen.push(key);
        }
        self.headers = builtin.to_vec();
        for c in &reg.columns {
            if c.operations.contains(&self.op) {
                self.custom.push((self.headers.len(), c.clone()));
                self.headers.push(c.name.clone());
            }
        }
        let declared = |name: &str| {
            all_builtin.iter().any(|b| b.eq_ignore_ascii_case(name))
                || reg
                    .columns
                    .iter()
                    .any(|c| c.name.eq_ignore_ascii_case(name))
        };
        let index_of = |headers: &[String], name: &str| {
            headers.iter().position(|h| h.eq_ignore_ascii_case(name))
        };
        let mut info = Description {
            columns: reg.columns.clone(),
            ..Description::default()
        };
        for (name, mut rule) in reg.checks {
            if !declared(&name) {
                p(
                    &rule.script,
                    rule.line,
                    format!(
                        "rollcall.check names the column {name:?}, which is neither a built-in column nor declared with rollcall.column"
                    ),
                );
                continue;
            }
            info.checks.push(rule_info(&rule));
            if let Some(i) = index_of(&self.headers, &name) {
                rule.col = Some(i);
                self.checks.push(rule);
            }
        }
        for (name, mut rule) in reg.normalisers {
            if !reg
                .columns
                .iter()
                .any(|c| c.name.eq_ignore_ascii_case(&name))
            {
                p(
                    &rule.script,
                    rule.line,
                    format!(
                        "rollcall.normalise names {name:?}, which is not a column declared with rollcall.column (built-in columns are normalised by rollcall itself)"
                    ),
                );
                continue;
            }
            info.normalisers.push(rule_info(&rule));
            if let Some(i) = index_of(&self.headers, &name) {
                rule.col = Some(i);
                self.normalisers.push(rule);
            }
        }
        for rule in reg.row_checks {
            info.row_checks.push(rule_info(&rule));
            self.row_checks.push(rule);
        }
        match row_view(&self.lua, &self.headers, &self.row_data) {
            Ok(t) => self.row = t,
            Err(e) => p("", None, lua_err(e)),
        }
        self.description = info;
        problems
    }

    /// What the scripts declare.
    pub fn description(&self) -> &Description {
        &self.description
    }

    /// The run's columns: the built-in ones, then the operation's custom ones.
    pub fn headers(&self) -> &[String] {
        &self.headers
    }

    /// True when the rules do nothing for this operation.
    pub fn is_idle(&self) -> bool {
        self.custom.is_empty() && self.checks.is_empty() && self.row_checks.is_empty()
    }

    /// Runs every rule on one row. `values` are the row's cells by column of `headers`
    /// (normalised text, empty when the cell is empty); normalisers may change custom ones.
    pub fn check_row(
        &mut self,
        row: u32,
        values: &mut Vec<String>,
        out: &mut Findings,
    ) -> Result<(), RuleFailure> {
        let update = self.op == Operation::Update;
        // 1. Normalisers, then the declared checks of custom columns.
        for i in 0..self.normalisers.len() {
            let Some(c) = self.normalisers[i].col else {
                continue;
            };
            let v = &values[c];
            if v.is_empty() || (update && v.eq_ignore_ascii_case(CLEAR_TOKEN)) {
                continue;
            }
            let r: Value = self.call(i, Kind::Normaliser, row, (v.as_str(), &self.ctx))?;
            match r {
                Value::Nil => {}
                Value::String(s) => {
                    let s = s.to_string_lossy().trim().to_string();
                    if s != values[c] {
                        let from = std::mem::replace(&mut values[c], s.clone());
                        out.push(Finding::Normalised {
                            col: c,
                            value: s,
                            from,
                        });
                    }
                }
                other => {
                    let rule = &self.normalisers[i];
                    return Err(RuleFailure {
                        script: rule.script.to_string(),
                        line: rule.line,
                        row: Some(row),
                        message: format!(
                            "the normaliser of {:?} returned a value of type {}; it must return a string or nil",
                            rule.column_name.as_deref().unwrap_or(""),
                            other.type_name()
                        ),
                    });
                }
            }
        }
        declared_checks(&self.custom, update, values, out);
        if self.checks.is_empty() && self.row_checks.is_empty() {
            return Ok(());
        }
        // 2. The row's values move into the view the scripts read (and back after).
        let data = self.row_data.clone();
        std::mem::swap(&mut *data.borrow_mut(), values);
        let result = self.run_checks(row, &data, out);
        std::mem::swap(&mut *data.borrow_mut(), values);
        result
    }

    /// Cell checks (on filled cells), then row checks.
    fn run_checks(
        &self,
        row: u32,
        data: &RefCell<Vec<String>>,
        out: &mut Findings,
    ) -> Result<(), RuleFailure> {
        let update = self.op == Operation::Update;
        for i in 0..self.checks.len() {
            let Some(c) = self.checks[i].col else {
                continue;
            };
            let values = data.borrow();
            let v = values.get(c).map_or("", String::as_str);
            if v.is_empty() || (update && v.eq_ignore_ascii_case(CLEAR_TOKEN)) {
                continue;
            }
            let r: Value = self.call(i, Kind::Check, row, (v, &self.row, &self.ctx))?;
            drop(values);
            self.collect(r, Some(c), i, Kind::Check, row, out)?;
        }
        for i in 0..self.row_checks.len() {
            let r: Value = self.call(i, Kind::Row, row, (&self.row, &self.ctx))?;
            self.collect(r, None, i, Kind::Row, row, out)?;
        }
        Ok(())
    }

    fn rule(&self, i: usize, kind: Kind) -> &Rule {
        match kind {
            Kind::Check => &self.checks[i],
            Kind::Row => &self.row_checks[i],
            Kind::Normaliser => &self.normalisers[i],
        }
    }

    /// Index of a rule across all kinds, for the watchdog.
    fn global_index(&self, i: usize, kind: Kind) -> usize {
        match kind {
            Kind::Normaliser => i,
            Kind::Check => self.normalisers.len() + i,
            Kind::Row => self.normalisers.len() + self.checks.len() + i,
        }
    }

    /// Script and line of every rule, by the index the watchdog sees.
    pub fn rule_locations(&self) -> Vec<(String, Option<u32>)> {
        self.normalisers
            .iter()
            .chain(&self.checks)
            .chain(&self.row_checks)
            .map(|r| (r.script.to_string(), r.line))
            .collect()
    }

    fn call(
        &self,
        i: usize,
        kind: Kind,
        row: u32,
        args: impl mlua::IntoLuaMulti,
    ) -> Result<Value, RuleFailure> {
        let rule = self.rule(i, kind);
        self.state.begin(self.global_index(i, kind), row);
        let r = rule.func.call::<Value>(args);
        self.state.end();
        r.map_err(|e| {
            let (line, message) = split_location(&rule.script, &failure_text(&e, &self.limits));
            RuleFailure {
                script: rule.script.to_string(),
                line: line.or(rule.line),
                row: Some(row),
                message,
            }
        })
    }

    /// Turns what a check returned into findings.
    fn collect(
        &self,
        r: Value,
        col: Option<usize>,
        i: usize,
        kind: Kind,
        row: u32,
        out: &mut Findings,
    ) -> Result<(), RuleFailure> {
        let bad = |what: String| {
            let rule = self.rule(i, kind);
            RuleFailure {
                script: rule.script.to_string(),
                line: rule.line,
                row: Some(row),
                message: what,
            }
        };
        match r {
            Value::Nil | Value::Boolean(true) => Ok(()),
            Value::String(s) => {
                out.push(Finding::Error {
                    col,
                    message: clip(&s.to_string_lossy()),
                });
                Ok(())
            }
            Value::Table(t) => {
                if t.contains_key("message").unwrap_or(false) {
                    return self.one_finding(&t, col, out).map_err(bad);
                }
                for item in t.sequence_values::<Value>() {
                    match item {
                        Ok(Value::String(s)) => out.push(Finding::Error {
                            col,
                            message: clip(&s.to_string_lossy()),
                        }),
                        Ok(Value::Table(t)) => self.one_finding(&t, col, out).map_err(&bad)?,
                        Ok(other) => {
                            return Err(bad(format!(
                                "a check returned a list holding a value of type {}; a list may hold only messages",
                                other.type_name()
                            )));
                        }
                        Err(e) => return Err(bad(e.to_string())),
                    }
                }
                Ok(())
            }
            other => Err(bad(format!(
                "a check returned a value of type {}; it must return nothing, a message or a list of messages",
                other.type_name()
            ))),
        }
    }

    fn one_finding(&self, t: &Table, col: Option<usize>, out: &mut Findings) -> Result<(), String> {
        let message: String = t
            .get::<Option<String>>("message")
            .map_err(|e| e.to_string())?
            .ok_or("a finding needs a message")?;
        let level: Option<String> = t.get("level").map_err(|e| e.to_string())?;
        let column: Option<String> = t.get("column").map_err(|e| e.to_string())?;
        let col = match column {
            Some(name) => Some(
                self.headers
                    .iter()
                    .position(|h| h.eq_ignore_ascii_case(&name))
                    .ok_or_else(|| {
                        format!(
                            "a finding names the column {name:?}, which this file does not have"
                        )
                    })?,
            ),
            None => col,
        };
        let message = clip(&message);
        out.push(match level.as_deref() {
            Some("warning") => Finding::Warning { col, message },
            None | Some("error") => Finding::Error { col, message },
            Some(other) => {
                return Err(format!(
                    "level {other:?} is neither \"error\" nor \"warning\""
                ));
            }
        });
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Normaliser,
    Check,
    Row,
}

/// The read-only `row` table: a header gives the cell's text from `data` (looked up when
/// read, so a row costs nothing for the columns no rule reads); `pairs` lists them all.
fn row_view(lua: &Lua, headers: &[String], data: &Rc<RefCell<Vec<String>>>) -> mlua::Result<Table> {
    let index: Rc<std::collections::HashMap<String, usize>> = Rc::new(
        headers
            .iter()
            .enumerate()
            .map(|(i, h)| (h.clone(), i))
            .collect(),
    );
    let (d, ix) = (data.clone(), index.clone());
    let get = lua.create_function(move |lua, (_, key): (Value, Value)| {
        let Value::String(k) = key else {
            return Ok(Value::Nil);
        };
        let Some(&i) = k.to_str().ok().and_then(|k| ix.get(&*k)) else {
            return Ok(Value::Nil);
        };
        match d.borrow().get(i) {
            Some(v) => lua.create_string(v).map(Value::String),
            None => Ok(Value::Nil),
        }
    })?;
    let (d, names) = (data.clone(), headers.to_vec());
    let all = lua.create_function(move |lua, _: Value| {
        let t = lua.create_table()?;
        for (h, v) in names.iter().zip(d.borrow().iter()) {
            t.raw_set(h.as_str(), v.as_str())?;
        }
        let next: Function = lua.globals().get("next")?;
        Ok((next, t, Value::Nil))
    })?;
    let view: Table = lua
        .load(
            "local get, all = ...
             return setmetatable({}, {
               __index = get,
               __newindex = function() error('row is read-only', 2) end,
               __pairs = all,
               __metatable = false,
             })",
        )
        .set_name("=sandbox")
        .set_mode(ChunkMode::Text)
        .call((get, all))?;
    Ok(view)
}

fn rule_info(r: &Rule) -> RuleInfo {
    RuleInfo {
        script: r.script.to_string(),
        line: r.line,
        column: r.column_name.clone(),
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 1000 {
        let mut t: String = s.chars().take(1000).collect();
        t.push('…');
        t
    } else {
        s.to_string()
    }
}

fn list_choices(choices: &[String]) -> String {
    if choices.len() <= 12 {
        choices.join(", ")
    } else {
        format!("{}, ... (see the drop-down)", choices[..12].join(", "))
    }
}

/// Step 2 of the order of evaluation (docs/RULES.md): the declared checks of custom columns
/// (`max_length`, then `choices`, whose case is corrected in `values`) on one row. `custom`
/// holds each custom column's index in `values`. Plain Rust: the engine runs it after the
/// normalisers, and the checking thread itself when the rules register no functions
/// (`Description::has_functions`), so that no rules worker has to start.
pub fn declared_checks(
    custom: &[(usize, ColumnDecl)],
    update: bool,
    values: &mut [String],
    out: &mut Findings,
) {
    for (c, decl) in custom {
        let Some(v) = values.get(*c) else {
            continue;
        };
        // (An empty required cell is reported by rollcall's own checks.)
        if v.is_empty() {
            continue;
        }
        if update && v.eq_ignore_ascii_case(CLEAR_TOKEN) {
            continue;
        }
        if let Some(max) = decl.max_length {
            let n = v.chars().count();
            if n > max {
                out.push(Finding::Error {
                    col: Some(*c),
                    message: format!(
                        "{} has {n} characters; at most {max} are allowed.",
                        decl.name
                    ),
                });
                continue;
            }
        }
        if !decl.choices.is_empty() {
            match decl.choices.iter().find(|ch| ch.eq_ignore_ascii_case(v)) {
                Some(ch) if ch == v => {}
                Some(ch) => {
                    let Some(slot) = values.get_mut(*c) else {
                        continue;
                    };
                    let from = std::mem::replace(slot, ch.clone());
                    out.push(Finding::CaseCorrected {
                        col: *c,
                        value: ch.clone(),
                        from,
                    });
                }
                None => out.push(Finding::Error {
                    col: Some(*c),
                    message: format!(
                        "{} must be one of {}.",
                        decl.name,
                        list_choices(&decl.choices)
                    ),
                }),
            }
        }
    }
}

/// Every built-in header of every operation (custom columns may not reuse one).
fn all_builtin_headers() -> Vec<String> {
    let mut v: Vec<String> = Operation::ALL
        .iter()
        .flat_map(|op| crate::model::columns(*op))
        .map(|c| c.header.to_string())
        .collect();
    v.push(crate::model::ERRORS_HEADER.to_string());
    v.sort();
    v.dedup();
    v
}

/// A readable message for a failed call; memory and time limits are named with their value.
fn failure_text(e: &mlua::Error, limits: &EngineLimits) -> String {
    match e {
        mlua::Error::MemoryError(_) => format!(
            "the rule used more memory than the limit of {} MiB",
            limits.memory_mib
        ),
        mlua::Error::CallbackError { cause, .. } => failure_text(cause, limits),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::RuntimeError(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Every 4096 instructions: a rule the watchdog found past its time limit is stopped with an
/// error that names the line it was on.
fn install_hook(lua: &Lua, state: &Arc<CallState>, limits: EngineLimits) {
    let state = state.clone();
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(4096),
        move |_lua, debug| {
            if state.overdue.load(Ordering::Relaxed) {
                let line = debug.current_line();
                let src = debug.source();
                let script = src.short_src.map(|s| s.into_owned()).unwrap_or_default();
                return Err(mlua::Error::runtime(format!(
                    "{script}:{}: the rule ran past its time limit of {} ms",
                    line.unwrap_or(0),
                    limits.call_ms
                )));
            }
            Ok(VmState::Continue)
        },
    )
    .ok();
}

fn make_context(
    lua: &Lua,
    c: &Context,
    op: Operation,
    lookup: Option<UserLookup>,
) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("operation", op.as_str())?;
    t.set("today", c.today.as_str())?;
    t.set("tenant", c.tenant.as_str())?;
    t.set("teams", strings_table(lua, &c.teams)?)?;
    t.set("pools", strings_table(lua, &c.pools)?)?;
    t.set("roles", strings_table(lua, &c.roles)?)?;
    let lookup: Rc<dyn Fn(&str) -> LookupResult> = match lookup {
        Some(f) => Rc::from(f),
        None => Rc::new(|_: &str| Ok(None)),
    };
    let l = lookup.clone();
    t.set(
        "user",
        lua.create_function(move |lua, email: String| {
            match l(&email).map_err(mlua::Error::runtime)? {
                None => Ok(Value::Nil),
                Some(u) => {
                    let t = lua.create_table()?;
                    t.set("email", u.email)?;
                    t.set("first_name", u.first_name)?;
                    t.set("last_name", u.last_name)?;
                    t.set("role", u.role)?;
                    t.set("team", u.team)?;
                    t.set("pool", u.pool)?;
                    t.set("status", u.status)?;
                    let custom = lua.create_table()?;
                    for (k, v) in u.custom {
                        custom.set(k, v)?;
                    }
                    t.set("custom", read_only(lua, custom, "a user's custom values")?)?;
                    Ok(Value::Table(read_only(lua, t, "a user")?))
                }
            }
        })?,
    )?;
    let l = lookup.clone();
    t.set(
        "user_exists",
        lua.create_function(move |_, email: String| {
            Ok(l(&email).map_err(mlua::Error::runtime)?.is_some())
        })?,
    )?;
    let l = lookup;
    t.set(
        "user_active",
        lua.create_function(move |_, email: String| {
            Ok(l(&email)
                .map_err(mlua::Error::runtime)?
                .is_some_and(|u| u.status == "active"))
        })?,
    )?;
    read_only(lua, t, "ctx")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            tenant: "Acme".into(),
            today: "2026-11-25".into(),
            teams: vec!["Research".into(), "Sales".into()],
            pools: vec!["Standard".into()],
            roles: vec!["Learner".into(), "Manager".into(), "Admin".into()],
        }
    }

    fn builtin(op: Operation) -> Vec<String> {
        crate::model::columns(op)
            .into_iter()
            .map(|c| c.header)
            .collect()
    }

    fn load(op: Operation, src: &str) -> Result<Engine, Vec<LoadProblem>> {
        Engine::load(
            &[Script {
                name: "t.lua".into(),
                source: src.into(),
            }],
            &ctx(),
            op,
            &builtin(op),
            EngineLimits {
                memory_mib: 16,
                call_ms: 500,
            },
            CallState::new(),
            None,
        )
    }

    /// Runs one add row: the built-in values in order, then the custom ones.
    fn run(e: &mut Engine, values: &[&str]) -> Result<(Vec<String>, Findings), RuleFailure> {
        let mut v: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        v.resize(e.headers().len(), String::new());
        let mut out = Vec::new();
        e.check_row(2, &mut v, &mut out)?;
        Ok((v, out))
    }

    const ADA: [&str; 8] = [
        "ada@example.com",
        "Ada",
        "Lovelace",
        "",
        "Research",
        "Manager",
        "",
        "Standard",
    ];

    fn with(extra: &[&str]) -> Vec<&'static str> {
        let mut v: Vec<&str> = ADA.to_vec();
        v.extend(extra.iter().map(|s| &*s.to_string().leak()));
        v
    }

    #[test]
    fn column_declares_a_custom_column_for_add_and_update_by_default() {
        let src = r#"rollcall.column { name = "Badge", help = "h", example = "B1", required = true,
            choices = { "B1", "B2" }, max_length = 2, user_reference = false }
            rollcall.column { name = "Note", operations = { "delete" } }"#;
        let e = load(Operation::Add, src).unwrap();
        let d = e.description();
        assert_eq!(d.columns.len(), 2);
        let b = &d.columns[0];
        assert_eq!(
            (
                b.name.as_str(),
                b.help.as_str(),
                b.example.as_str(),
                b.required
            ),
            ("Badge", "h", "B1", true)
        );
        assert_eq!(b.choices, vec!["B1", "B2"]);
        assert_eq!(b.max_length, Some(2));
        assert_eq!(b.operations, vec![Operation::Add, Operation::Update]);
        assert_eq!((b.script.as_str(), b.line), ("t.lua", Some(1)));
        assert_eq!(e.headers().last().map(String::as_str), Some("Badge"));
        let del = load(Operation::Delete, src).unwrap();
        assert_eq!(del.headers().last().map(String::as_str), Some("Note"));
        let p = load(
            Operation::Add,
            "rollcall.column { name = 'X', operations = { 'nope' } }",
        )
        .err()
        .unwrap();
        assert!(
            p[0].message.contains("\"nope\" is not an operation"),
            "{p:?}"
        );
        let p = load(
            Operation::Add,
            "rollcall.column { name = 'X' }\nrollcall.column { name = 'x' }",
        )
        .err()
        .unwrap();
        assert!(p[0].message.contains("declared twice"), "{p:?}");
    }

    #[test]
    fn declared_checks_length_and_choices() {
        let src = r#"rollcall.column { name = "Badge", required = true, max_length = 3, choices = { "Abc", "Xy" } }"#;
        let mut e = load(Operation::Add, src).unwrap();
        // An empty required cell is left to rollcall's own checks (one message, not two).
        assert_eq!(run(&mut e, &with(&[""])).unwrap().1, vec![]);
        let (v, f) = run(&mut e, &with(&["abc"])).unwrap();
        assert_eq!(v[8], "Abc");
        assert!(
            matches!(&f[0], Finding::CaseCorrected { value, from, .. } if value == "Abc" && from == "abc")
        );
        let (_, f) = run(&mut e, &with(&["abcd"])).unwrap();
        assert!(
            matches!(&f[0], Finding::Error { message, .. } if message.contains("has 4 characters; at most 3"))
        );
        let (_, f) = run(&mut e, &with(&["Q"])).unwrap();
        assert!(
            matches!(&f[0], Finding::Error { message, .. } if message == "Badge must be one of Abc, Xy.")
        );
        // Required applies to add files only; #CLEAR in an update is left to rollcall.
        let mut u = load(Operation::Update, src).unwrap();
        let mut v = vec![String::new(); u.headers().len()];
        v[0] = "ada@example.com".into();
        let mut out = Vec::new();
        u.check_row(2, &mut v, &mut out).unwrap();
        let last = v.len() - 1;
        v[last] = "#CLEAR".into();
        u.check_row(2, &mut v, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn check_results_nil_string_list_warning_error_and_column() {
        let src = r#"
            rollcall.check("First Name", function(v)
              if v == "ok" then return nil end
              if v == "one" then return "bad name" end
              if v == "two" then return { "first", rollcall.warning("second") } end
              if v == "err" then return rollcall.error("explicit") end
              if v == "col" then return { column = "Team", message = "about the team", level = "warning" } end
              if v == "num" then return 42 end
            end)"#;
        let mut e = load(Operation::Add, src).unwrap();
        let mut row = ADA.to_vec();
        let mut go = |name: &'static str| {
            row[1] = name;
            run(&mut e, &row)
        };
        assert_eq!(go("ok").unwrap().1, vec![]);
        assert_eq!(
            go("one").unwrap().1,
            vec![Finding::Error {
                col: Some(1),
                message: "bad name".into()
            }]
        );
        assert_eq!(
            go("two").unwrap().1,
            vec![
                Finding::Error {
                    col: Some(1),
                    message: "first".into()
                },
                Finding::Warning {
                    col: Some(1),
                    message: "second".into()
                }
            ]
        );
        assert_eq!(
            go("err").unwrap().1,
            vec![Finding::Error {
                col: Some(1),
                message: "explicit".into()
            }]
        );
        assert_eq!(
            go("col").unwrap().1,
            vec![Finding::Warning {
                col: Some(4),
                message: "about the team".into()
            }]
        );
        let f = go("num").unwrap_err();
        assert_eq!(
            (f.script.as_str(), f.line, f.row),
            ("t.lua", Some(2), Some(2))
        );
        assert!(
            f.message.contains("returned a value of type integer"),
            "{f}"
        );
    }

    #[test]
    fn checks_skip_empty_cells_and_row_checks_see_the_row_and_ctx() {
        let src = r#"
            rollcall.check("Job Title", function(v) return "called" end)
            rollcall.check_row(function(row, ctx)
              return string.format("%s|%s|%s|%s|%s|%d|%s", row["Email"], row["Job Title"],
                ctx.operation, ctx.today, ctx.tenant, #ctx.teams, ctx.roles[2])
            end)"#;
        let mut e = load(Operation::Add, src).unwrap();
        let (_, f) = run(&mut e, &ADA).unwrap();
        assert_eq!(
            f,
            vec![Finding::Error {
                col: None,
                message: "ada@example.com||add|2026-11-25|Acme|2|Manager".into()
            }]
        );
    }

    #[test]
    fn normalisers_change_custom_values_only() {
        let src = r#"rollcall.column { name = "Code" }
            rollcall.normalise("Code", function(v) return v:upper() end)"#;
        let mut e = load(Operation::Add, src).unwrap();
        let (v, f) = run(&mut e, &with(&["ab1"])).unwrap();
        assert_eq!(v[8], "AB1");
        assert_eq!(
            f,
            vec![Finding::Normalised {
                col: 8,
                value: "AB1".into(),
                from: "ab1".into()
            }]
        );
        assert_eq!(run(&mut e, &with(&["AB1"])).unwrap().1, vec![]);
        let p = load(
            Operation::Add,
            "rollcall.normalise('Job Title', function(v) return v end)",
        )
        .err()
        .unwrap();
        assert!(
            p[0].message
                .contains("built-in columns are normalised by rollcall"),
            "{p:?}"
        );
    }

    #[test]
    fn ctx_row_and_lists_are_read_only_and_lookups_answer_nothing_without_a_directory() {
        let src = r#"rollcall.check_row(function(row, ctx)
              if ctx.user_exists("a@b.c") or ctx.user_active("a@b.c") or ctx.user("a@b.c") then return "found" end
              local ok1 = pcall(function() ctx.tenant = "x" end)
              local ok2 = pcall(function() ctx.teams[1] = "x" end)
              local ok3 = pcall(function() row.Email = "x" end)
              return tostring(ok1) .. tostring(ok2) .. tostring(ok3)
            end)"#;
        let mut e = load(Operation::Add, src).unwrap();
        assert_eq!(
            run(&mut e, &ADA).unwrap().1,
            vec![Finding::Error {
                col: None,
                message: "falsefalsefalse".into()
            }]
        );
    }

    #[test]
    fn error_locations_are_split_from_messages() {
        assert_eq!(
            split_location(
                "a.lua",
                "runtime error: a.lua:12: boom\nstack traceback: ..."
            ),
            (Some(12), "boom".to_string())
        );
        assert_eq!(
            split_location("a.lua", "something else"),
            (None, "something else".to_string())
        );
    }
}
