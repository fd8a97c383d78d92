//! The HTTP JSON API under `/api/v1`: the route table (which `openapi` also documents),
//! authentication and CSRF checks in one place (`dispatch`), and one handler per route.
//! Handlers do their database work through `Web::blocking` and reuse the same service
//! functions as the CLI, so both behave alike.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::{Value, json};
use warp::http::{HeaderValue, Method, StatusCode, header};

use super::auth::{self, Principal};
use super::{ApiError, ApiResult, Request, Web, download, json_response, read_json};
use crate::admin::{self, Role};
use crate::db::{self, Tenant};
use crate::error::AppError;
use crate::model::{Effect, Operation};
use crate::service::{self, App};
use crate::{scheduler, undo};

/// Who may call a route (tenant-level checks happen in the handler).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Access {
    Public,
    SignedIn,
    Operator,
}

/// What a route takes as its body.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input {
    None,
    /// A JSON object of this schema (in `openapi`).
    Json(&'static str),
    /// The raw bytes of a spreadsheet.
    File,
}

/// What a route answers with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Output {
    Json(&'static str),
    Xlsx,
    Events,
}

/// The handlers, one per route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Health,
    OpenApi,
    SignIn,
    SessionGet,
    SignOut,
    ChangePassword,
    Tenants,
    CreateTenant,
    TenantGet,
    TenantSettings,
    Users,
    UserGet,
    UserAction,
    Welcome,
    Teams,
    Pools,
    SetPool,
    Template,
    Upload,
    Uploads,
    UploadGet,
    UploadProblems,
    ErrorWorkbook,
    Submit,
    Jobs,
    JobGet,
    JobEvents,
    ResultsWorkbook,
    JobAction,
    Audit,
    AuditAll,
    AuditVerify,
    Rules,
    RulesTest,
    Admins,
    CreateAdmin,
    UpdateAdmin,
    ResetAdminPassword,
    Tokens,
    CreateToken,
    RevokeToken,
    Settings,
    UpdateSettings,
    TestEmail,
    Mail,
    RetryMail,
}

pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub op: Op,
    pub access: Access,
    pub summary: &'static str,
    pub input: Input,
    pub output: Output,
}

const fn r(
    method: &'static str,
    path: &'static str,
    op: Op,
    access: Access,
    summary: &'static str,
    input: Input,
    output: Output,
) -> Route {
    Route {
        method,
        path,
        op,
        access,
        summary,
        input,
        output,
    }
}

use Access::{Operator, Public, SignedIn};
use Input::{File, Json as JsonIn};
use Output::{Events, Json as JsonOut, Xlsx};

/// Every route of the API. `openapi::document` is made from this table.
#[rustfmt::skip]
pub const ROUTES: &[Route] = &[
    r("GET", "/api/v1/health", Op::Health, Public, "Whether the server answers", Input::None, JsonOut("Health")),
    r("GET", "/api/v1/openapi.json", Op::OpenApi, Public, "This API's OpenAPI 3 document", Input::None, JsonOut("Object")),
    r("POST", "/api/v1/session", Op::SignIn, Public, "Sign in: sets the session cookie and returns the CSRF token", JsonIn("SignIn"), JsonOut("Me")),
    r("GET", "/api/v1/session", Op::SessionGet, SignedIn, "The signed-in administrator (or token) and its CSRF token", Input::None, JsonOut("Me")),
    r("DELETE", "/api/v1/session", Op::SignOut, SignedIn, "Sign out", Input::None, JsonOut("Ok")),
    r("POST", "/api/v1/session/password", Op::ChangePassword, SignedIn, "Change one's own password", JsonIn("PasswordChange"), JsonOut("Ok")),
    r("GET", "/api/v1/tenants", Op::Tenants, SignedIn, "The tenants the caller may see", Input::None, JsonOut("TenantList")),
    r("POST", "/api/v1/tenants", Op::CreateTenant, Operator, "Create a tenant", JsonIn("NewTenant"), JsonOut("Tenant")),
    r("GET", "/api/v1/tenants/{tenant}", Op::TenantGet, SignedIn, "A tenant: settings, user counts, pools and teams", Input::None, JsonOut("Tenant")),
    r("PATCH", "/api/v1/tenants/{tenant}/settings", Op::TenantSettings, Operator, "Change a tenant's safeguards and settings", JsonIn("TenantSettings"), JsonOut("Tenant")),
    r("GET", "/api/v1/tenants/{tenant}/users", Op::Users, SignedIn, "Users: search (prefix of email, first or last name), filter, sort, keyset pages", Input::None, JsonOut("UserPage")),
    r("GET", "/api/v1/tenants/{tenant}/users/{email}", Op::UserGet, SignedIn, "One user", Input::None, JsonOut("User")),
    r("POST", "/api/v1/tenants/{tenant}/users/{email}/{action}", Op::UserAction, SignedIn, "More options for one user: welcome, deactivate, reactivate or delete (delete needs confirm = the email)", JsonIn("UserAction"), JsonOut("ActionResult")),
    r("POST", "/api/v1/tenants/{tenant}/welcome", Op::Welcome, SignedIn, "Send a Getting Started email to chosen active users (emails) or to every active user who never got one (not_welcomed)", JsonIn("Welcome"), JsonOut("Ok")),
    r("GET", "/api/v1/tenants/{tenant}/teams", Op::Teams, SignedIn, "The tenant's teams", Input::None, JsonOut("TeamList")),
    r("GET", "/api/v1/tenants/{tenant}/pools", Op::Pools, SignedIn, "Licence pools: seats, used, free", Input::None, JsonOut("PoolList")),
    r("PUT", "/api/v1/tenants/{tenant}/pools/{pool}", Op::SetPool, SignedIn, "Set a pool's seats (operators; tenant admins when the tenant allows it)", JsonIn("PoolSeats"), JsonOut("Pool")),
    r("GET", "/api/v1/tenants/{tenant}/templates/{operation}", Op::Template, SignedIn, "Download the template of an operation", Input::None, Xlsx),
    r("POST", "/api/v1/tenants/{tenant}/uploads", Op::Upload, SignedIn, "Upload a filled-in file (the body is the file; query: operation, file_name): stored and validated at once", File, JsonOut("Upload")),
    r("GET", "/api/v1/tenants/{tenant}/uploads", Op::Uploads, SignedIn, "Recent uploads", Input::None, JsonOut("UploadList")),
    r("GET", "/api/v1/tenants/{tenant}/uploads/{id}", Op::UploadGet, SignedIn, "An upload's validation result and preview", Input::None, JsonOut("Upload")),
    r("GET", "/api/v1/tenants/{tenant}/uploads/{id}/problems", Op::UploadProblems, SignedIn, "An upload's problems, a page at a time (offset, limit)", Input::None, JsonOut("ProblemPage")),
    r("GET", "/api/v1/tenants/{tenant}/uploads/{id}/error-workbook", Op::ErrorWorkbook, SignedIn, "The error workbook: the rows as uploaded plus an Errors column", Input::None, Xlsx),
    r("POST", "/api/v1/tenants/{tenant}/uploads/{id}/submit", Op::Submit, SignedIn, "Submit a valid upload as a job", JsonIn("Submit"), JsonOut("Job")),
    r("GET", "/api/v1/tenants/{tenant}/jobs", Op::Jobs, SignedIn, "Jobs, newest first, with queue positions and progress", Input::None, JsonOut("JobList")),
    r("GET", "/api/v1/tenants/{tenant}/jobs/{id}", Op::JobGet, SignedIn, "One job with its progress and result", Input::None, JsonOut("Job")),
    r("GET", "/api/v1/tenants/{tenant}/jobs/{id}/events", Op::JobEvents, SignedIn, "Server-sent events: the job's state and progress until it ends", Input::None, Events),
    r("GET", "/api/v1/tenants/{tenant}/jobs/{id}/results-workbook", Op::ResultsWorkbook, SignedIn, "The results workbook of a finished job", Input::None, Xlsx),
    r("POST", "/api/v1/tenants/{tenant}/jobs/{id}/{action}", Op::JobAction, SignedIn, "cancel, undo or approve a job", Input::None, JsonOut("Job")),
    r("GET", "/api/v1/tenants/{tenant}/audit", Op::Audit, SignedIn, "The tenant's audit entries, newest first (user, job, actor, since, until, limit; format=csv to export)", Input::None, JsonOut("AuditPage")),
    r("GET", "/api/v1/audit", Op::AuditAll, SignedIn, "Audit entries of every tenant the caller may see (operators and auditors of all tenants)", Input::None, JsonOut("AuditPage")),
    r("GET", "/api/v1/audit/verify", Op::AuditVerify, SignedIn, "Verify the audit log's hash chain (operators and auditors)", Input::None, JsonOut("Verification")),
    r("GET", "/api/v1/tenants/{tenant}/rules", Op::Rules, SignedIn, "The tenant's rule scripts (read-only) and their status", Input::None, JsonOut("Rules")),
    r("POST", "/api/v1/tenants/{tenant}/rules/test", Op::RulesTest, Operator, "Try a file (the body; query: operation, file_name) against the tenant's rules as they are on disk now; stores nothing", File, JsonOut("RulesTest")),
    r("GET", "/api/v1/admins", Op::Admins, Operator, "Administrator accounts", Input::None, JsonOut("AdminList")),
    r("POST", "/api/v1/admins", Op::CreateAdmin, Operator, "Create an administrator; answers its one-time password", JsonIn("NewAdmin"), JsonOut("NewAdminResult")),
    r("PATCH", "/api/v1/admins/{username}", Op::UpdateAdmin, Operator, "Change an administrator's role, tenant or disabled state", JsonIn("AdminChange"), JsonOut("Admin")),
    r("POST", "/api/v1/admins/{username}/reset-password", Op::ResetAdminPassword, Operator, "A new one-time password for an administrator", Input::None, JsonOut("NewAdminResult")),
    r("GET", "/api/v1/tokens", Op::Tokens, Operator, "API tokens (never their secrets)", Input::None, JsonOut("TokenList")),
    r("POST", "/api/v1/tokens", Op::CreateToken, Operator, "Create an API token; answers its secret once", JsonIn("NewToken"), JsonOut("NewTokenResult")),
    r("DELETE", "/api/v1/tokens/{id}", Op::RevokeToken, Operator, "Revoke an API token", Input::None, JsonOut("Ok")),
    r("GET", "/api/v1/settings", Op::Settings, Operator, "The server's settings (mail, retention, limits, sessions; no secrets) and its scheduled tasks", Input::None, JsonOut("Object")),
    r("PATCH", "/api/v1/settings", Op::UpdateSettings, Operator, "Change mail and retention settings (a key set to null returns to the configuration file's value)", JsonIn("SettingsChange"), JsonOut("Object")),
    r("POST", "/api/v1/settings/test-email", Op::TestEmail, Operator, "Send a test message with the mail settings", JsonIn("TestEmail"), JsonOut("Ok")),
    r("GET", "/api/v1/mail", Op::Mail, Operator, "The mail outbox (state: queued, sending, sent, failed)", Input::None, JsonOut("MailList")),
    r("POST", "/api/v1/mail/{id}/retry", Op::RetryMail, Operator, "Send a failed message again", Input::None, JsonOut("Ok")),
];

/// Path parameters, percent-decoded.
pub type Params = HashMap<&'static str, String>;

/// Matches a path against a route pattern.
pub fn match_path(pattern: &'static str, path: &str) -> Option<Params> {
    let mut params = Params::new();
    let mut pat = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (pat.next(), got.next()) {
            (None, None) => return Some(params),
            (Some(p), Some(g)) => {
                if let Some(name) = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    let v = percent_encoding::percent_decode_str(g)
                        .decode_utf8()
                        .ok()?
                        .into_owned();
                    if v.is_empty() {
                        return None;
                    }
                    params.insert(name, v);
                } else if p != g {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

fn unauthenticated() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "Sign in first (your session may have ended).",
    )
}

/// Finds the route, checks who is asking and the CSRF token, and calls the handler.
pub async fn dispatch(web: &Arc<Web>, req: Request) -> ApiResult<warp::reply::Response> {
    let path = req.path.trim_end_matches('/').to_string();
    let mut allowed = Vec::new();
    let mut found = None;
    for route in ROUTES {
        if let Some(params) = match_path(route.path, &path) {
            if route.method == req.method.as_str() {
                found = Some((route, params));
                break;
            }
            allowed.push(route.method);
        }
    }
    let Some((route, params)) = found else {
        if allowed.is_empty() {
            return Err(ApiError::not_found(format!(
                "There is no API endpoint {path}; see /api/v1/openapi.json."
            )));
        }
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} takes {}, not {}.", allowed.join(", "), req.method),
        ));
    };
    if route.access == Access::Public {
        return call(web, route.op, req, None, params).await;
    }
    let authorization = req.header("authorization").map(str::to_string);
    let cookie = auth::cookie(req.header("cookie"), auth::COOKIE).map(str::to_string);
    let principal = authenticate(web, authorization, cookie)
        .await?
        .ok_or_else(unauthenticated)?;
    if let Some((csrf, _)) = &principal.session
        && !matches!(req.method, Method::GET | Method::HEAD)
    {
        let sent = req.header("x-csrf-token").unwrap_or("");
        if !auth::same_secret(sent, csrf) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "This request lacks the page's security token; reload the page and try again.",
            ));
        }
    }
    if principal.must_change_password
        && !matches!(route.op, Op::SessionGet | Op::SignOut | Op::ChangePassword)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "password_change_required",
            "Choose a new password first.",
        ));
    }
    if route.access == Access::Operator {
        principal.need_operator()?;
    }
    call(web, route.op, req, Some(principal), params).await
}

/// The principal of a bearer token or a session cookie.
async fn authenticate(
    web: &Arc<Web>,
    authorization: Option<String>,
    cookie: Option<String>,
) -> ApiResult<Option<Principal>> {
    if let Some(h) = authorization {
        let token = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "The Authorization header takes: Bearer TOKEN.",
                )
            })?
            .trim()
            .to_string();
        let p = web
            .blocking("web", move |app| Ok(auth::bearer(&app.conn, &token)?))
            .await?;
        return p.map(Some).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "This API token is not known or was revoked.",
            )
        });
    }
    let Some(token) = cookie else {
        return Ok(None);
    };
    let cfg = web.config.web.clone();
    web.blocking("web", move |app| {
        Ok(auth::session(&app.conn, &token, &cfg)?)
    })
    .await
}

fn ok() -> warp::reply::Response {
    json_response(StatusCode::OK, &json!({"ok": true}))
}

fn reply(v: Value) -> warp::reply::Response {
    json_response(StatusCode::OK, &v)
}

/// A string field of a JSON body.
fn field<'a>(body: &'a Value, key: &str) -> Option<&'a str> {
    body.get(key).and_then(Value::as_str)
}

fn need_field<'a>(body: &'a Value, key: &str) -> ApiResult<&'a str> {
    field(body, key)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("The field {key:?} is required.")))
}

fn flag(body: &Value, key: &str) -> bool {
    body.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn param(params: &Params, key: &str) -> String {
    params.get(key).cloned().unwrap_or_default()
}

fn id_param(params: &Params, key: &str) -> ApiResult<i64> {
    param(params, key)
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{key} must be a number")))
}

fn op_param(s: &str) -> ApiResult<Operation> {
    s.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{s:?} is not an operation; use add, update, deactivate, reactivate or delete"
        ))
    })
}

async fn call(
    web: &Arc<Web>,
    op: Op,
    mut req: Request,
    p: Option<Principal>,
    params: Params,
) -> ApiResult<warp::reply::Response> {
    let Some(p) = p else {
        return match op {
            Op::Health => Ok(reply(
                json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
            )),
            Op::OpenApi => Ok(reply(super::openapi::document())),
            Op::SignIn => sign_in(web, &mut req).await,
            _ => Err(unauthenticated()),
        };
    };
    let actor = p.actor.clone();
    let tenant = param(&params, "tenant");
    match op {
        Op::Health | Op::OpenApi | Op::SignIn => Err(ApiError::bad_request("signed in already")),
        Op::SessionGet => Ok(reply(p.to_json())),
        Op::SignOut => {
            web.blocking(&actor, move |app| {
                if let Some((_, hash)) = &p.session {
                    auth::end_session(&app.conn, hash)?;
                    service::audit_now(
                        app,
                        &crate::audit::Event {
                            actor: p.actor.clone(),
                            tenant: p.tenant.clone(),
                            action: "admin.sign_out",
                            target: p.name.clone(),
                            details: json!({}),
                        },
                    )?;
                }
                Ok(())
            })
            .await?;
            let mut r = ok();
            set_cookie(&mut r, &auth::session_cookie("", web.secure_cookies, 0));
            Ok(r)
        }
        Op::ChangePassword => {
            let body = read_json(web, &mut req).await?;
            let current = need_field(&body, "current")?.to_string();
            let new = need_field(&body, "new")?.to_string();
            web.blocking(&actor, move |app| {
                let keep = p.session.as_ref().map(|s| s.1.clone());
                if p.admin_id.is_none() {
                    return Err(ApiError::bad_request(
                        "An API token has no password to change.",
                    ));
                }
                admin::change_password(&app.conn, &p.name, &current, &new, keep.as_deref())
                    .map_err(|e| match e {
                        AppError::Refused(m) => ApiError::new(
                            StatusCode::FORBIDDEN,
                            "wrong_password",
                            capitalise(&m),
                        ),
                        AppError::Usage(m) => ApiError::bad_request(capitalise(&m)),
                        other => other.into(),
                    })?;
                service::flush_audit(app)?;
                Ok(ok())
            })
            .await
        }
        Op::Tenants => {
            web.blocking(&actor, move |app| {
                let mut out = Vec::new();
                for t in db::list_tenants(&app.conn)? {
                    if p.sees(&t) {
                        out.push(json!({"name": t.name}));
                    }
                }
                Ok(reply(json!({ "tenants": out })))
            })
            .await
        }
        Op::CreateTenant => {
            let body = read_json(web, &mut req).await?;
            let name = need_field(&body, "name")?.to_string();
            web.blocking(&actor, move |app| {
                let t = service::change_audited(app, "tenant.create", |c| {
                    let t = db::create_tenant(c, &name)?;
                    let (tn, id) = (t.name.clone(), t.id);
                    Ok((t, Some(tn.clone()), tn, json!({ "id": id })))
                })?;
                Ok(json_response(
                    StatusCode::CREATED,
                    &json!({"name": t.name}),
                ))
            })
            .await
        }
        Op::TenantGet => {
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                Ok(reply(tenant_json(app, &t)?))
            })
            .await
        }
        Op::TenantSettings => {
            let body = read_json(web, &mut req).await?;
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, true)?;
                let before = db::tenant_settings(&app.conn, t.id)?;
                let mut merged = serde_json::to_value(&before)
                    .map_err(|e| AppError::internal("settings", e))?;
                if let (Some(m), Some(b)) = (merged.as_object_mut(), body.as_object()) {
                    for (k, v) in b {
                        if !m.contains_key(k) {
                            return Err(ApiError::bad_request(format!(
                                "{k:?} is not a tenant setting"
                            )));
                        }
                        m.insert(k.clone(), v.clone());
                    }
                }
                let after: db::TenantSettings = serde_json::from_value(merged)
                    .map_err(|e| ApiError::bad_request(format!("Bad settings: {e}.")))?;
                service::change_audited(app, "tenant.settings", |c| {
                    db::set_tenant_settings(c, t.id, &after)?;
                    Ok((
                        (),
                        Some(t.name.clone()),
                        t.name.clone(),
                        json!({"before": before, "after": after}),
                    ))
                })?;
                Ok(reply(tenant_json(app, &t)?))
            })
            .await
        }
        Op::Users => {
            let q = req.query.clone();
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                Ok(reply(users_page(&app.conn, &t, &q)?))
            })
            .await
        }
        Op::UserGet => {
            let email = param(&params, "email");
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                Ok(reply(user_json(&app.conn, &t, &email)?))
            })
            .await
        }
        Op::UserAction => {
            let body = read_json(web, &mut req).await?;
            let email = param(&params, "email");
            let action = param(&params, "action");
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, true)?;
                user_action(app, &p, &t, &email, &action, &body)
            })
            .await
        }
        Op::Welcome => {
            let body = read_json(web, &mut req).await?;
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, true)?;
                let emails: Vec<String> = body
                    .get("emails")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                    .unwrap_or_default();
                // Each user once, whatever the case or repetitions of the list.
                let mut seen = std::collections::HashSet::new();
                let emails: Vec<String> =
                    emails.into_iter().filter(|e| seen.insert(db::norm(e))).collect();
                let everyone = flag(&body, "not_welcomed");
                if emails.is_empty() != everyone {
                    return Err(ApiError::bad_request(
                        "Say whom to welcome: \"emails\" (a list) or \"not_welcomed\": true.",
                    ));
                }
                if emails.len() > 10_000 {
                    return Err(ApiError::bad_request("At most 10,000 emails at a time."));
                }
                let which = if everyone {
                    crate::mail::Welcome::NotYetWelcomed
                } else {
                    crate::mail::Welcome::Users(&emails)
                };
                let tx = app.conn.unchecked_transaction()?;
                let n = crate::mail::queue_welcomes(
                    &tx,
                    &app.data,
                    &service::mail_config(app)?,
                    &app.actor,
                    &t,
                    which,
                )?;
                tx.commit()?;
                service::flush_audit(app)?;
                scheduler::wake(&app.data);
                let skipped = emails.len().saturating_sub(n as usize);
                Ok(reply(json!({
                    "ok": true,
                    "queued": n,
                    "message": if skipped > 0 {
                        format!("{n} Getting Started emails are on their way; {skipped} of the users chosen are not active users of {}.", t.name)
                    } else {
                        format!("{n} Getting Started emails are on their way.")
                    },
                })))
            })
            .await
        }
        Op::Teams => {
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                Ok(reply(json!({"teams": db::list_teams(&app.conn, t.id)?})))
            })
            .await
        }
        Op::Pools => {
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                Ok(reply(json!({"pools": pools_json(&app.conn, &t)?})))
            })
            .await
        }
        Op::SetPool => {
            let body = read_json(web, &mut req).await?;
            let pool = param(&params, "pool");
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, true)?;
                let settings = db::tenant_settings(&app.conn, t.id)?;
                if !p.is_operator() && !settings.tenant_admins_edit_seats {
                    return Err(ApiError::forbidden(
                        "Only an operator can change seats for this tenant.",
                    ));
                }
                let seats = body
                    .get("seats")
                    .and_then(Value::as_i64)
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| {
                        ApiError::bad_request("\"seats\" must be a whole number, 0 or more.")
                    })?;
                let exists = db::list_pools(&app.conn, t.id)?
                    .into_iter()
                    .find(|x| db::norm(&x.name) == db::norm(&pool));
                if exists.is_none() && !p.is_operator() {
                    return Err(ApiError::not_found(format!("There is no pool {pool:?}.")));
                }
                let pl = service::change_audited(app, "pool.set", |c| {
                    let pl = db::set_pool(c, t.id, &pool, seats)?;
                    let details = json!({ "id": pl.id, "seats_before": exists.map(|e| e.seats), "seats": pl.seats });
                    let n = pl.name.clone();
                    Ok((pl, Some(t.name.clone()), n, details))
                })?;
                Ok(reply(pool_json(&pl)))
            })
            .await
        }
        Op::Template => {
            let operation = op_param(&param(&params, "operation"))?;
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                let lists = service::template_lists(app, &t)?;
                let tmp = temp_path(app, "template.xlsx");
                crate::sheet::template::write_template(operation, &lists, &tmp)
                    .map_err(|e| AppError::internal("writing the template", e))?;
                let bytes = read_and_remove(&tmp)?;
                let name = format!(
                    "{}-{}-template.xlsx",
                    crate::model::folder_name(&t.name),
                    operation.as_str()
                );
                Ok(download(bytes, super::XLSX, &name))
            })
            .await
        }
        Op::Upload => upload(web, &mut req, p, tenant).await,
        Op::Uploads => {
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                let mut st = app.conn.prepare(
                    "SELECT u.id, u.operation, u.file_name, u.status, u.rows_total, u.error_count, u.warning_count, u.uploaded_by, u.uploaded_at,
                            (SELECT max(j.id) FROM jobs j WHERE j.upload_id = u.id)
                     FROM uploads u WHERE u.tenant_id = ?1 ORDER BY u.id DESC LIMIT 50",
                )?;
                let rows: Vec<Value> = st
                    .query_map([t.id], |r| {
                        Ok(json!({
                            "id": r.get::<_, i64>(0)?, "operation": r.get::<_, String>(1)?,
                            "file_name": r.get::<_, String>(2)?, "status": r.get::<_, String>(3)?,
                            "rows": r.get::<_, i64>(4)?, "errors": r.get::<_, i64>(5)?,
                            "warnings": r.get::<_, i64>(6)?, "uploaded_by": r.get::<_, String>(7)?,
                            "uploaded_at": r.get::<_, String>(8)?, "job": r.get::<_, Option<i64>>(9)?,
                        }))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(reply(json!({ "uploads": rows })))
            })
            .await
        }
        Op::UploadGet => {
            let id = id_param(&params, "id")?;
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                Ok(reply(upload_json(app, &t, id, None)?))
            })
            .await
        }
        Op::UploadProblems => {
            let id = id_param(&params, "id")?;
            let offset: i64 = req.q("offset").and_then(|s| s.parse().ok()).unwrap_or(0);
            let limit: i64 = req
                .q("limit")
                .and_then(|s| s.parse().ok())
                .unwrap_or(100)
                .clamp(1, 1000);
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                upload_row(&app.conn, &t, id)?;
                let mut st = app.conn.prepare(
                    "SELECT severity, sheet, row_number, col_letter, col_name, value, code, message FROM upload_problems
                     WHERE upload_id = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3",
                )?;
                let rows: Vec<Value> = st
                    .query_map(rusqlite::params![id, limit, offset.max(0)], problem_json)?
                    .collect::<Result<_, _>>()?;
                let total: i64 = app.conn.query_row(
                    "SELECT count(*) FROM upload_problems WHERE upload_id = ?1",
                    [id],
                    |r| r.get(0),
                )?;
                Ok(reply(json!({"problems": rows, "total": total, "offset": offset})))
            })
            .await
        }
        Op::ErrorWorkbook => {
            let id = id_param(&params, "id")?;
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                let row = upload_row(&app.conn, &t, id)?;
                let path = app.data.error_report(id);
                let bytes = std::fs::read(&path).map_err(|_| {
                    ApiError::not_found("This upload has no error workbook (it had no problems, or it was removed by the retention policy).")
                })?;
                let name = format!("{}-errors.xlsx", scheduler::file_stem(&row.file_name));
                Ok(download(bytes, super::XLSX, &name))
            })
            .await
        }
        Op::Submit => {
            let id = id_param(&params, "id")?;
            let body = read_json(web, &mut req).await?;
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, true)?;
                let row = upload_row(&app.conn, &t, id)?;
                if row.operation == "delete" && !flag(&body, "confirm_delete") {
                    return Err(ApiError::conflict(
                        "confirmation_required",
                        "Deleting users erases them: confirm it (confirm_delete: true).",
                    ));
                }
                let not_before = match field(&body, "not_before").filter(|s| !s.trim().is_empty()) {
                    Some(s) => Some(parse_time(s)?),
                    None => None,
                };
                let opts = scheduler::JobOptions {
                    acknowledge_warnings: flag(&body, "acknowledge_warnings"),
                    confirm: field(&body, "confirm").map(str::to_string),
                    notify: p.email.clone(),
                    getting_started: flag(&body, "getting_started"),
                    default_pool: None,
                };
                let job = scheduler::submit_upload(app, id, &opts, not_before.as_deref())
                    .map_err(|e| match e {
                        AppError::Refused(m) => ApiError::conflict("not_submittable", capitalise(&m)),
                        AppError::Usage(m) => ApiError::conflict("not_submittable", capitalise(&m)),
                        other => other.into(),
                    })?;
                Ok(json_response(StatusCode::CREATED, &job_json(app, &t, job)?))
            })
            .await
        }
        Op::Jobs => {
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                let jobs: Vec<Value> = scheduler::list(&app.conn, Some(t.id), 100)?
                    .into_iter()
                    .map(|j| {
                        let progress = (j.state == "running")
                            .then(|| scheduler::progress(&app.data, j.id))
                            .flatten();
                        json!({"job": j, "progress": progress})
                    })
                    .collect();
                Ok(reply(json!({ "jobs": jobs })))
            })
            .await
        }
        Op::JobGet => {
            let id = id_param(&params, "id")?;
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                Ok(reply(job_json(app, &t, id)?))
            })
            .await
        }
        Op::JobEvents => job_events(web, p, tenant, id_param(&params, "id")?).await,
        Op::ResultsWorkbook => {
            let id = id_param(&params, "id")?;
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                let j = job_json(app, &t, id)?;
                let bytes = std::fs::read(app.data.results_report(id)).map_err(|_| {
                    ApiError::not_found("This job has no results workbook (it has not finished, or the file was removed by the retention policy).")
                })?;
                let stem = j["job"]["file_name"].as_str().map(scheduler::file_stem).unwrap_or_else(|| format!("job-{id}"));
                Ok(download(bytes, super::XLSX, &format!("{stem}-results.xlsx")))
            })
            .await
        }
        Op::JobAction => {
            let id = id_param(&params, "id")?;
            let action = param(&params, "action");
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, true)?;
                job_json(app, &t, id)?;
                let refused = |e: AppError| match e {
                    AppError::Usage(m) | AppError::Refused(m) => {
                        ApiError::conflict("refused", capitalise(&m))
                    }
                    other => other.into(),
                };
                let shown = match action.as_str() {
                    "cancel" => {
                        scheduler::cancel(app, id).map_err(refused)?;
                        id
                    }
                    "approve" => {
                        scheduler::approve(app, id).map_err(refused)?;
                        id
                    }
                    "undo" => undo::submit(app, id).map_err(refused)?,
                    other => {
                        return Err(ApiError::not_found(format!(
                            "{other:?} is not a job action; use cancel, undo or approve"
                        )));
                    }
                };
                Ok(reply(job_json(app, &t, shown)?))
            })
            .await
        }
        Op::Audit | Op::AuditAll => {
            let q = req.query.clone();
            let all = op == Op::AuditAll;
            web.blocking(&actor, move |app| {
                let tenant_filter = if all {
                    if p.role == Role::TenantAdmin || (p.role == Role::Auditor && p.tenant_id.is_some()) {
                        return Err(ApiError::forbidden(
                            "Your account reads the audit log of its own tenant: /api/v1/tenants/{tenant}/audit.",
                        ));
                    }
                    q.get("tenant").filter(|s| !s.is_empty()).cloned()
                } else {
                    Some(p.tenant(&app.conn, &tenant, false)?.name)
                };
                audit_page(app, tenant_filter, &q)
            })
            .await
        }
        Op::AuditVerify => {
            web.blocking(&actor, move |app| {
                // The chain covers every tenant: operators and auditors of all tenants.
                if !(p.is_operator() || (p.role == Role::Auditor && p.tenant_id.is_none())) {
                    return Err(ApiError::forbidden(
                        "Operators and auditors of all tenants verify the audit log.",
                    ));
                }
                let v = crate::audit::verify(&app.conn, &app.data.audit_dir())?;
                Ok(reply(serde_json::to_value(v).map_err(|e| AppError::internal("verification", e))?))
            })
            .await
        }
        Op::Rules => {
            web.blocking(&actor, move |app| {
                let t = p.tenant(&app.conn, &tenant, false)?;
                let files = crate::rules::find_files(&app.data, &t.name)?;
                let active = service::active_rules(app, &t);
                let (status, active) = match active {
                    Ok(Some(a)) => (
                        if a.notes.is_empty() { "ok" } else { "stale" },
                        json!({"hash": a.hash, "loaded_at": a.loaded_at, "notes": a.notes, "columns": a.description.columns, "checks": a.description.checks.len() + a.description.row_checks.len()}),
                    ),
                    Ok(None) => ("none", Value::Null),
                    Err(e) => ("broken", json!({"problem": e.to_string()})),
                };
                // Where the scripts live on the server is the operator's business.
                let origin = if p.is_operator() || files.origin == "built in" {
                    files.origin.clone()
                } else {
                    "the tenant's rules folder".into()
                };
                Ok(reply(json!({
                    "folder": files.folder, "origin": origin, "hash": files.hash(),
                    "scripts": files.scripts, "status": status, "active": active,
                })))
            })
            .await
        }
        Op::RulesTest => rules_test(web, &mut req, p, tenant).await,
        Op::Admins => {
            web.blocking(&actor, move |app| {
                Ok(reply(json!({"admins": admin::list(&app.conn)?})))
            })
            .await
        }
        Op::CreateAdmin => {
            let body = read_json(web, &mut req).await?;
            web.blocking(&actor, move |app| {
                let username = need_field(&body, "username")?;
                let role = parse_role(need_field(&body, "role")?)?;
                let t = optional_tenant(app, &body)?;
                let email = field(&body, "email").filter(|s| !s.trim().is_empty());
                let (a, password) = admin::create(&app.conn, &app.actor, username, email, role, t.as_ref())?;
                service::flush_audit(app)?;
                Ok(json_response(StatusCode::CREATED, &json!({"admin": a, "one_time_password": password})))
            })
            .await
        }
        Op::UpdateAdmin => {
            let body = read_json(web, &mut req).await?;
            let username = param(&params, "username");
            web.blocking(&actor, move |app| {
                let mut a = admin::find(&app.conn, &username)?
                    .ok_or_else(|| ApiError::not_found(format!("There is no administrator {username:?}.")))?;
                if let Some(role) = field(&body, "role") {
                    let role = parse_role(role)?;
                    let t = optional_tenant(app, &body)?;
                    a = admin::set_role(&app.conn, &app.actor, &username, role, t.as_ref())?;
                }
                if let Some(d) = body.get("disabled").and_then(Value::as_bool) {
                    a = admin::set_disabled(&app.conn, &app.actor, &username, d)?;
                }
                service::flush_audit(app)?;
                Ok(reply(serde_json::to_value(a).map_err(|e| AppError::internal("admin", e))?))
            })
            .await
        }
        Op::ResetAdminPassword => {
            let username = param(&params, "username");
            web.blocking(&actor, move |app| {
                let password = admin::reset_password(&app.conn, &app.actor, &username)?;
                service::flush_audit(app)?;
                let a = admin::find(&app.conn, &username)?;
                Ok(reply(json!({"admin": a, "one_time_password": password})))
            })
            .await
        }
        Op::Tokens => {
            web.blocking(&actor, move |app| {
                Ok(reply(json!({"tokens": auth::list_tokens(&app.conn)?})))
            })
            .await
        }
        Op::CreateToken => {
            let body = read_json(web, &mut req).await?;
            web.blocking(&actor, move |app| {
                let name = need_field(&body, "name")?;
                let role = parse_role(need_field(&body, "role")?)?;
                let t = optional_tenant(app, &body)?;
                let (id, secret) = auth::create_token(&app.conn, &app.actor, name, role, t.as_ref())?;
                service::flush_audit(app)?;
                Ok(json_response(StatusCode::CREATED, &json!({"id": id, "token": secret})))
            })
            .await
        }
        Op::RevokeToken => {
            let id = id_param(&params, "id")?;
            web.blocking(&actor, move |app| {
                if !auth::revoke_token(&app.conn, &app.actor, id)? {
                    return Err(ApiError::not_found(format!("There is no live API token {id}.")));
                }
                service::flush_audit(app)?;
                Ok(ok())
            })
            .await
        }
        Op::UpdateSettings => {
            let body = read_json(web, &mut req).await?;
            web.blocking(&actor, move |app| {
                let changes = body.as_object().cloned().unwrap_or_default();
                crate::settings::update(
                    &app.conn,
                    &app.actor,
                    &changes,
                    &app.config.mail,
                    &app.config.jobs,
                )
                .map_err(|e| match e {
                    AppError::Usage(m) => ApiError::bad_request(capitalise(&m)),
                    other => other.into(),
                })?;
                service::flush_audit(app)?;
                Ok(reply(settings_json(app)?))
            })
            .await
        }
        Op::Settings => {
            web.blocking(&actor, move |app| Ok(reply(settings_json(app)?)))
                .await
        }
        Op::TestEmail => {
            let body = read_json(web, &mut req).await?;
            let to = need_field(&body, "to")?.to_string();
            web.blocking(&actor, move |app| {
                crate::mail::send_test(&app.data, &service::mail_config(app)?, &to, &app.actor)
                    .map(|how| reply(json!({"ok": true, "message": how})))
                    .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "mail_failed", e))
            })
            .await
        }
        Op::Mail => {
            let state = req.q("state").map(str::to_string);
            web.blocking(&actor, move |app| {
                Ok(reply(json!({"messages": crate::mail::list(&app.conn, state.as_deref(), 200)?})))
            })
            .await
        }
        Op::RetryMail => {
            let id = id_param(&params, "id")?;
            web.blocking(&actor, move |app| {
                if !crate::mail::retry(&app.conn, id, &app.actor)? {
                    return Err(ApiError::conflict("refused", format!("Message {id} is not a failed message.")));
                }
                service::flush_audit(app)?;
                scheduler::wake(&app.data);
                Ok(ok())
            })
            .await
        }
    }
}

/// The settings in effect (no secrets), which of them the web UI changed, and the tasks.
fn settings_json(app: &App) -> ApiResult<Value> {
    let c = &app.config;
    let m = service::mail_config(app)?;
    let jobs = service::jobs_config(app)?;
    let changed = |section: &str| -> ApiResult<Vec<String>> {
        Ok(crate::settings::overrides(&app.conn, section)?
            .keys()
            .cloned()
            .collect())
    };
    Ok(json!({
        "data_dir": app.data.to_string(),
        "listen": c.listen,
        "mail": {
            "transport": m.transport, "from": m.from, "support_contact": m.support_contact,
            "sign_in_url": m.sign_in_url, "web_url": m.web_url, "smtp_host": m.smtp_host,
            "smtp_port": m.smtp_port, "smtp_security": m.smtp_security,
            "smtp_username": m.smtp_username, "smtp_password_set": !m.smtp_password.is_empty(),
            "attach_max_mib": m.attach_max_mib, "max_attempts": m.max_attempts,
        },
        "jobs": {"undo_days": jobs.undo_days, "file_retention_days": jobs.file_retention_days},
        "changed_here": {"mail": changed("mail")?, "jobs": changed("jobs")?},
        "limits": c.limits,
        "web": {
            "session_idle_minutes": c.web.session_idle_minutes,
            "session_max_hours": c.web.session_max_hours,
            "sign_in_per_minute": c.web.sign_in_per_minute,
            "json_max_kib": c.web.json_max_kib,
            "https": c.web.tls_cert.is_some(),
        },
        "tasks": crate::tasks::list(app)?,
        "note": "Mail and retention changed here take effect at once and take precedence over rollcall.toml; the other settings are changed in rollcall.toml (or ROLLCALL_* variables) and take effect at the next start. The SMTP password, when set here, is kept in the database (and its backups).",
    }))
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    let mut out = match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    };
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

fn set_cookie(r: &mut warp::reply::Response, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
}

fn parse_role(s: &str) -> ApiResult<Role> {
    s.parse().map_err(ApiError::bad_request)
}

fn optional_tenant(app: &App, body: &Value) -> ApiResult<Option<Tenant>> {
    match field(body, "tenant").filter(|s| !s.trim().is_empty()) {
        Some(name) => Ok(Some(db::find_tenant(&app.conn, name)?.ok_or_else(
            || ApiError::not_found(format!("There is no tenant {name:?}.")),
        )?)),
        None => Ok(None),
    }
}

fn parse_time(s: &str) -> ApiResult<String> {
    let fmt = time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(s.trim(), &fmt).map_err(|_| {
        ApiError::bad_request(format!("{s:?} is not a time like 2026-12-31T17:00:00Z."))
    })?;
    t.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .map_err(|e| AppError::internal("formatting a time", e).into())
}

async fn sign_in(web: &Arc<Web>, req: &mut Request) -> ApiResult<warp::reply::Response> {
    let body = read_json(web, req).await?;
    let username = need_field(&body, "username")?.to_string();
    let password = field(&body, "password").unwrap_or("").to_string();
    if !web.allow_attempt(req.remote.map(|a| a.ip()), &username) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "Too many sign-in attempts from this computer; wait a minute and try again.",
        ));
    }
    let client = req.client();
    let cfg = web.config.web.clone();
    let shared = web.clone();
    let (token, me) = web
        .blocking("web", move |app| {
            let result = admin::sign_in(&app.conn, &username, &password, &client)?;
            service::flush_audit(app)?;
            let a = match result {
                Ok(a) => a,
                Err(e) => {
                    let e = match e {
                        admin::SignInError::Unknown => shared.ghost_failure(&username),
                        other => other,
                    };
                    let code = match e {
                        admin::SignInError::Wrong | admin::SignInError::Unknown => "sign_in_failed",
                        admin::SignInError::Locked { .. } => "locked",
                        admin::SignInError::Disabled => "disabled",
                    };
                    return Err(ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string()));
                }
            };
            let (token, _) = auth::create_session(&app.conn, &a, &client, &cfg)?;
            let p = auth::session(&app.conn, &token, &cfg)?
                .ok_or_else(|| AppError::internal("starting a session", "not found"))?;
            Ok((token, p.to_json()))
        })
        .await?;
    let mut r = reply(me);
    let max_age = web.config.web.session_max_hours.max(1) * 3600;
    set_cookie(
        &mut r,
        &auth::session_cookie(&token, web.secure_cookies, max_age),
    );
    Ok(r)
}

fn tenant_json(app: &App, t: &Tenant) -> ApiResult<Value> {
    let counts = db::user_counts(&app.conn, t.id)?;
    let rules = crate::rules::find_files(&app.data, &t.name)?;
    Ok(json!({
        "name": t.name,
        "settings": db::tenant_settings(&app.conn, t.id)?,
        "users": {"active": counts.get("active").copied().unwrap_or(0), "deactivated": counts.get("deactivated").copied().unwrap_or(0)},
        "pools": pools_json(&app.conn, t)?,
        "teams": db::list_teams(&app.conn, t.id)?.into_iter().map(|t| t.name).collect::<Vec<_>>(),
        "rules_folder": rules.folder,
        "custom_columns": service::active_rules(app, t).ok().flatten().map(|r| r.description.columns.into_iter().map(|c| c.name).collect::<Vec<_>>()).unwrap_or_default(),
    }))
}

fn pool_json(p: &db::Pool) -> Value {
    json!({"name": p.name, "seats": p.seats, "used": p.used, "free": p.free()})
}

fn pools_json(conn: &rusqlite::Connection, t: &Tenant) -> ApiResult<Vec<Value>> {
    Ok(db::list_pools(conn, t.id)?.iter().map(pool_json).collect())
}

fn user_to_json(u: &db::User) -> Value {
    json!({
        "email": u.email, "first_name": u.first_name, "last_name": u.last_name,
        "job_title": u.job_title, "team": u.team, "role": u.role, "language": u.language,
        "pool": u.pool, "status": u.status,
        "custom": u.custom.as_deref().and_then(|c| serde_json::from_str::<Value>(c).ok()),
        "created_at": u.created_at, "updated_at": u.updated_at,
    })
}

/// Upper bound of the strings that start with `prefix` (in SQLite's binary order).
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

/// The orders the users page reads in, each along an index.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    Email,
    /// Last name, first name, id.
    Name,
    /// First name, last name, id.
    First,
}

impl Order {
    fn key_sql(self) -> &'static str {
        match self {
            Order::Email => "u.email_norm",
            Order::Name => "lower(u.last_name), lower(u.first_name), u.id",
            Order::First => "lower(u.first_name), lower(u.last_name), u.id",
        }
    }
    fn key(self, u: &db::User) -> Value {
        match self {
            Order::Email => json!([db::norm(&u.email)]),
            Order::Name => json!([
                u.last_name.to_ascii_lowercase(),
                u.first_name.to_ascii_lowercase(),
                u.id
            ]),
            Order::First => json!([
                u.first_name.to_ascii_lowercase(),
                u.last_name.to_ascii_lowercase(),
                u.id
            ]),
        }
    }
}

/// A page of users. Every query walks one index range in its order with a LIMIT, so the
/// hundredth page is as quick as the first with a million users. A search (`q`, the start
/// of an email, last name or first name) lists email matches in email order, then
/// last-name matches by name, then first-name matches; the cursor (`after`, from the
/// previous page's `next`) says which of these and where.
fn users_page(
    conn: &rusqlite::Connection,
    t: &Tenant,
    q: &HashMap<String, String>,
) -> ApiResult<Value> {
    use rusqlite::types::Value as Sql;
    let get = |k: &str| q.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
    let limit: usize = get("limit")
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
        .clamp(1, 500);
    let sort = match get("sort").unwrap_or("email") {
        "email" => Order::Email,
        "name" => Order::Name,
        _ => return Err(ApiError::bad_request("sort is email or name")),
    };
    // Filters shared by every phase. Status is written as a constant so that SQLite can use
    // the small deactivated-users indexes.
    let mut filter = String::new();
    let mut filter_args: Vec<Sql> = Vec::new();
    match get("status") {
        None => {}
        Some("active") => filter.push_str(" AND u.status = 'active'"),
        Some("deactivated") => filter.push_str(" AND u.status = 'deactivated'"),
        Some(_) => return Err(ApiError::bad_request("status is active or deactivated")),
    }
    // Names to ids with one indexed look-up each (listing the pools would count their
    // seats, a walk over every user). The pool term is written `+u.pool_id` so that SQLite
    // keeps walking the order's index instead of sorting a whole pool; a team has its own
    // index (team, email), preferred over the tenant's (`+u.tenant_id`). An unknown name
    // matches nobody.
    let id_of = |sql: &str, name: &str| -> ApiResult<i64> {
        use rusqlite::OptionalExtension;
        Ok(conn
            .query_row(sql, rusqlite::params![t.id, db::norm(name)], |r| r.get(0))
            .optional()?
            .unwrap_or(-1))
    };
    let mut by_team = false;
    let mut unknown = false;
    if let Some(team) = get("team") {
        let id = id_of(
            "SELECT id FROM teams WHERE tenant_id = ?1 AND name_norm = ?2",
            team,
        )?;
        unknown |= id < 0;
        filter.push_str(" AND u.team_id = ?");
        filter_args.push(Sql::Integer(id));
        by_team = true;
    }
    if let Some(pool) = get("pool") {
        let id = id_of(
            "SELECT id FROM licence_pools WHERE tenant_id = ?1 AND name_norm = ?2",
            pool,
        )?;
        unknown |= id < 0;
        filter.push_str(" AND +u.pool_id = ?");
        filter_args.push(Sql::Integer(id));
    }
    let search = get("q").map(|s| (db::norm(s), s.to_ascii_lowercase()));
    // The phases of this listing: (order, the range condition, its arguments).
    let mut phases: Vec<(Order, String, Vec<Sql>)> = Vec::new();
    match &search {
        None => phases.push((sort, String::new(), Vec::new())),
        Some((email, name)) => {
            let email_range = "u.email_norm >= ? AND u.email_norm < ?";
            let last_range = "lower(u.last_name) >= ? AND lower(u.last_name) < ?";
            let first_range = "lower(u.first_name) >= ? AND lower(u.first_name) < ?";
            let e = || vec![Sql::Text(email.clone()), Sql::Text(prefix_end(email))];
            let n = || vec![Sql::Text(name.clone()), Sql::Text(prefix_end(name))];
            phases.push((Order::Email, format!(" AND {email_range}"), e()));
            phases.push((
                Order::Name,
                format!(" AND {last_range} AND NOT ({email_range})"),
                [n(), e()].concat(),
            ));
            phases.push((
                Order::First,
                format!(" AND {first_range} AND NOT ({email_range}) AND NOT ({last_range})"),
                [n(), e(), n()].concat(),
            ));
        }
    }
    let bad_cursor = || ApiError::bad_request("after is not a cursor of this API");
    let (mut phase, mut after): (usize, Option<Vec<Value>>) = match get("after") {
        Some(c) => {
            let v: Value = hex::decode(c)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(bad_cursor)?;
            let p = v.get("p").and_then(Value::as_u64).unwrap_or(0) as usize;
            let k = v
                .get("k")
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(bad_cursor)?;
            if p >= phases.len() {
                return Err(bad_cursor());
            }
            (p, Some(k))
        }
        None => (0, None),
    };
    let mut users: Vec<(usize, db::User)> = Vec::new();
    if unknown {
        phase = phases.len();
    }
    let tenant_term = if by_team {
        "+u.tenant_id"
    } else {
        "u.tenant_id"
    };
    while phase < phases.len() && users.len() <= limit {
        let (order, range, range_args) = &phases[phase];
        let mut sql = format!(
            "SELECT {} FROM {} WHERE {tenant_term} = ?{range}{filter}",
            db::USER_COLUMNS,
            db::USER_FROM
        );
        let mut args: Vec<Sql> = vec![Sql::Integer(t.id)];
        args.extend(range_args.iter().cloned());
        args.extend(filter_args.iter().cloned());
        if let Some(k) = after.take() {
            let text = |i: usize| Sql::Text(k.get(i).and_then(Value::as_str).unwrap_or("").into());
            match order {
                Order::Email => {
                    sql.push_str(" AND u.email_norm > ?");
                    args.push(text(0));
                }
                Order::Name | Order::First => {
                    // The first term bounds the index range; the row value is exact.
                    let lead = if *order == Order::Name {
                        "lower(u.last_name)"
                    } else {
                        "lower(u.first_name)"
                    };
                    sql.push_str(&format!(
                        " AND {lead} >= ? AND ({}) > (?, ?, ?)",
                        order.key_sql()
                    ));
                    args.extend([
                        text(0),
                        text(0),
                        text(1),
                        Sql::Integer(k.get(2).and_then(Value::as_i64).unwrap_or(0)),
                    ]);
                }
            }
        }
        sql.push_str(&format!(" ORDER BY {} LIMIT ?", order.key_sql()));
        args.push(Sql::Integer((limit + 1 - users.len()) as i64));
        let mut st = conn.prepare_cached(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args), db::user_from_row)?;
        for r in rows {
            users.push((phase, r?));
        }
        phase += 1;
    }
    let more = users.len() > limit;
    users.truncate(limit);
    let next = match users.last() {
        Some((p, u)) if more => {
            let order = phases[*p].0;
            Some(hex::encode(json!({"p": p, "k": order.key(u)}).to_string()))
        }
        _ => None,
    };
    Ok(json!({
        "users": users.iter().map(|(_, u)| user_to_json(u)).collect::<Vec<_>>(),
        "next": next,
    }))
}

fn find_user(conn: &rusqlite::Connection, t: &Tenant, email: &str) -> ApiResult<db::User> {
    let sql = format!(
        "SELECT {} FROM {} WHERE u.tenant_id = ?1 AND u.email_norm = ?2",
        db::USER_COLUMNS,
        db::USER_FROM
    );
    use rusqlite::OptionalExtension;
    conn.query_row(
        &sql,
        rusqlite::params![t.id, db::norm(email)],
        db::user_from_row,
    )
    .optional()?
    .ok_or_else(|| ApiError::not_found(format!("There is no user {email:?} in {}.", t.name)))
}

fn user_json(conn: &rusqlite::Connection, t: &Tenant, email: &str) -> ApiResult<Value> {
    let u = find_user(conn, t, email)?;
    let (sent, count): (Option<String>, i64) = conn.query_row(
        "SELECT welcome_sent_at, welcome_count FROM users WHERE id = ?1",
        [u.id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut v = user_to_json(&u);
    v["welcome_sent_at"] = json!(sent);
    v["welcome_count"] = json!(count);
    Ok(v)
}

/// "More options" of one user. Deactivate, reactivate and delete run as a one-row job, so
/// they are audited, recorded and undoable like any bulk change.
fn user_action(
    app: &mut App,
    p: &Principal,
    t: &Tenant,
    email: &str,
    action: &str,
    body: &Value,
) -> ApiResult<warp::reply::Response> {
    let u = find_user(&app.conn, t, email)?;
    let op = match action {
        "welcome" => {
            if u.status != "active" {
                return Err(ApiError::conflict(
                    "refused",
                    "Only active users get a Getting Started email.",
                ));
            }
            let tx = app.conn.unchecked_transaction()?;
            let n = crate::mail::queue_welcomes(
                &tx,
                &app.data,
                &service::mail_config(app)?,
                &app.actor,
                t,
                crate::mail::Welcome::Users(std::slice::from_ref(&u.email)),
            )?;
            tx.commit()?;
            service::flush_audit(app)?;
            scheduler::wake(&app.data);
            return Ok(reply(
                json!({"ok": n == 1, "message": format!("A Getting Started email to {} is on its way.", u.email)}),
            ));
        }
        "deactivate" => Operation::Deactivate,
        "reactivate" => Operation::Reactivate,
        "delete" => Operation::Delete,
        other => {
            return Err(ApiError::not_found(format!(
                "{other:?} is not a user action; use welcome, deactivate, reactivate or delete"
            )));
        }
    };
    match op {
        Operation::Deactivate if u.status != "active" => {
            return Err(ApiError::conflict(
                "refused",
                format!("{} is already deactivated.", u.email),
            ));
        }
        Operation::Reactivate if u.status == "active" => {
            return Err(ApiError::conflict(
                "refused",
                format!("{} is already active.", u.email),
            ));
        }
        Operation::Delete
            if !field(body, "confirm").is_some_and(|c| c.trim().eq_ignore_ascii_case(&u.email)) =>
        {
            return Err(ApiError::conflict(
                "confirmation_required",
                format!(
                    "Deleting erases {} for good: confirm by sending \"confirm\": the user's email.",
                    u.email
                ),
            ));
        }
        _ => {}
    }
    // A one-row file of the operation's template columns, checked and applied as a job.
    let rules = service::active_rules(app, t)?;
    let cols = crate::model::columns_with(op, rules.as_ref().map(|r| &r.description));
    let path = temp_path(app, "user-action.csv");
    let mut w = csv::Writer::from_path(&path)
        .map_err(|e| AppError::internal("writing a one-row file", e))?;
    let row: Vec<&str> = cols
        .iter()
        .map(|c| {
            if c.field == crate::model::Field::Email {
                u.email.as_str()
            } else if c.header.eq_ignore_ascii_case("Reason") {
                "More options in the web UI"
            } else {
                ""
            }
        })
        .collect();
    let written = w
        .write_record(cols.iter().map(|c| c.header.as_str()))
        .and_then(|_| w.write_record(&row))
        .and_then(|_| w.flush().map_err(csv::Error::from));
    drop(w);
    written.map_err(|e| AppError::internal("writing a one-row file", e))?;
    let name = format!(
        "{}-{}.csv",
        op.as_str(),
        crate::model::folder_name(&u.email)
    );
    let stored = service::store_upload(&app.data, &path, &name);
    let _ = std::fs::remove_file(&path);
    let stored = stored?;
    let opts = scheduler::JobOptions {
        acknowledge_warnings: true,
        confirm: None,
        notify: None,
        getting_started: false,
        default_pool: None,
    };
    let (_, job) = scheduler::submit(app, t, op, &stored, &name, &opts, None)?;
    // The worker runs it at once unless a large job is ahead: wait a little for the result
    // (not for an approval or a queue that is busy for long).
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < until {
        let state: String =
            app.conn
                .query_row("SELECT state FROM jobs WHERE id = ?1", [job], |r| r.get(0))?;
        if state != "queued" && state != "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let v = job_json(app, t, job)?;
    let state = v["job"]["state"].as_str().unwrap_or("").to_string();
    let status = match state.as_str() {
        "succeeded" => StatusCode::OK,
        "failed" | "cancelled" => {
            return Err(ApiError::conflict(
                "job_failed",
                format!(
                    "Nothing was changed: {}",
                    v["job"]["error"]
                        .as_str()
                        .unwrap_or("the job did not succeed")
                ),
            )
            .with_details(v));
        }
        _ => StatusCode::ACCEPTED,
    };
    let _ = p;
    let mut v = v;
    v["message"] = json!(match state.as_str() {
        "succeeded" => format!(
            "Done: {} is {}.",
            u.email,
            match op {
                Operation::Deactivate => "deactivated",
                Operation::Reactivate => "active again",
                _ => "deleted",
            }
        ),
        "awaiting_approval" => format!("Job {job} waits for a second administrator's approval."),
        _ => format!("Job {job} is in the queue; it runs after the jobs ahead of it."),
    });
    Ok(json_response(status, &v))
}

/// An upload's row, if it belongs to the tenant.
struct UploadRow {
    operation: String,
    file_name: String,
}

fn upload_row(conn: &rusqlite::Connection, t: &Tenant, id: i64) -> ApiResult<UploadRow> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT operation, file_name FROM uploads WHERE id = ?1 AND tenant_id = ?2",
        rusqlite::params![id, t.id],
        |r| {
            Ok(UploadRow {
                operation: r.get(0)?,
                file_name: r.get(1)?,
            })
        },
    )
    .optional()?
    .ok_or_else(|| ApiError::not_found(format!("There is no upload {id}.")))
}

fn problem_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    Ok(json!({
        "severity": r.get::<_, String>(0)?, "sheet": r.get::<_, String>(1)?,
        "row": r.get::<_, Option<i64>>(2)?, "column": r.get::<_, Option<String>>(3)?,
        "column_name": r.get::<_, Option<String>>(4)?, "value": r.get::<_, Option<String>>(5)?,
        "code": r.get::<_, String>(6)?, "message": r.get::<_, String>(7)?,
    }))
}

/// What the UI shows of an upload: the verdict, counts, forecast, first problems, preview,
/// and what submitting needs (warnings to acknowledge, a phrase to type, the button's words).
fn upload_json(app: &App, t: &Tenant, id: i64, preview: Option<Vec<Value>>) -> ApiResult<Value> {
    let row = upload_row(&app.conn, t, id)?;
    let op: Operation = row
        .operation
        .parse()
        .map_err(|e: String| AppError::internal("reading an upload", e))?;
    let (status, uploaded_by, uploaded_at, sha, result): (
        String,
        String,
        String,
        String,
        Option<String>,
    ) = app.conn.query_row(
        "SELECT status, uploaded_by, uploaded_at, file_sha256, result FROM uploads WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    let outcome = service::load_outcome(&app.conn, id, op)?;
    let stored: Value = result
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let preview = preview.unwrap_or_else(|| {
        stored
            .get("preview")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    });
    let mut st = app.conn.prepare(
        "SELECT severity, sheet, row_number, col_letter, col_name, value, code, message FROM upload_problems WHERE upload_id = ?1 ORDER BY seq LIMIT 100",
    )?;
    let problems: Vec<Value> = st
        .query_map([id], problem_json)?
        .collect::<Result<_, _>>()?;
    let total_problems: i64 = app.conn.query_row(
        "SELECT count(*) FROM upload_problems WHERE upload_id = ?1",
        [id],
        |r| r.get(0),
    )?;
    let job: Option<(i64, String)> = {
        use rusqlite::OptionalExtension;
        app.conn
            .query_row(
                "SELECT id, state FROM jobs WHERE upload_id = ?1 ORDER BY id DESC LIMIT 1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
    };
    // The same file applied before: say when and by whom.
    let applied_before: Option<(i64, String, String)> = {
        use rusqlite::OptionalExtension;
        app.conn
            .query_row(
                "SELECT j.id, j.submitted_by, coalesce(j.finished_at, j.submitted_at) FROM jobs j JOIN uploads u ON u.id = j.upload_id
                 WHERE u.tenant_id = ?1 AND u.file_sha256 = ?2 AND u.id <> ?3 AND j.state = 'succeeded' ORDER BY j.id DESC LIMIT 1",
                rusqlite::params![t.id, sha, id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
    };
    let valid = status == "validated";
    let confirmation = if valid {
        let users: i64 = app.conn.query_row(
            "SELECT count(*) FROM users WHERE tenant_id = ?1",
            [t.id],
            |r| r.get(0),
        )?;
        scheduler::large_change_phrase(&app.conn, t, op, &outcome, users)?
    } else {
        None
    };
    let n = outcome.totals.changing();
    let submit_label = format!(
        "{} {n} {}",
        op.title(),
        if n == 1 { "user" } else { "users" }
    );
    Ok(json!({
        "id": id,
        "operation": op.as_str(),
        "file_name": row.file_name,
        "status": status,
        "valid": valid,
        "uploaded_by": uploaded_by,
        "uploaded_at": uploaded_at,
        "rows": outcome.rows,
        "errors": outcome.errors,
        "warnings": outcome.warnings,
        "message": if valid { outcome.success_message() } else { format!("{}: nothing can be submitted until they are fixed.", outcome.errors_message()) },
        "totals": outcome.totals,
        "forecast": outcome.forecast,
        // As recorded with the upload (the outcome read back keeps counts and forecast).
        "normalisations": stored.get("normalisations").cloned().unwrap_or_else(|| json!([])),
        "notes": stored.get("notes").cloned().unwrap_or_else(|| json!([])),
        "problems": problems,
        "problems_total": total_problems,
        "preview": preview,
        "error_workbook": app.data.error_report(id).exists(),
        "submit_label": submit_label,
        "needs_acknowledgement": valid && outcome.warnings > 0,
        "needs_confirmation": confirmation.map(|(phrase, why)| json!({"phrase": phrase, "why": why})),
        "needs_delete_confirmation": op == Operation::Delete,
        "job": job.map(|(id, state)| json!({"id": id, "state": state})),
        "applied_before": applied_before.map(|(job, by, at)| json!({"job": job, "by": by, "at": at})),
        "default_pool": stored.get("default_pool").cloned().unwrap_or(Value::Null),
    }))
}

fn job_json(app: &App, t: &Tenant, id: i64) -> ApiResult<Value> {
    let j = scheduler::get(&app.conn, Some(t.id), id)?
        .ok_or_else(|| ApiError::not_found(format!("There is no job {id}.")))?;
    let (result, upload, undo_of, undone_by, done): (
        Option<String>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        i64,
    ) = app.conn.query_row(
        "SELECT result, upload_id, undo_of, undone_by, rows_done FROM jobs WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    let progress = scheduler::progress(&app.data, id);
    Ok(json!({
        "job": j,
        "progress": progress,
        "rows_done": done,
        "result": result.as_deref().and_then(|s| serde_json::from_str::<Value>(s).ok()),
        "upload": upload,
        "undo_of": undo_of,
        "undone_by": undone_by,
        "results_workbook": app.data.results_report(id).exists(),
    }))
}

fn temp_path(app: &App, name: &str) -> PathBuf {
    app.data.tmp_dir().join(format!(
        "web-{}-{}",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos(),
        name
    ))
}

fn read_and_remove(path: &std::path::Path) -> ApiResult<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| AppError::internal("reading a file", e));
    let _ = std::fs::remove_file(path);
    Ok(bytes?)
}

/// Receives a file (the raw body, streamed to disk within the size limit), then stores and
/// validates it like `rollcall upload`.
async fn upload(
    web: &Arc<Web>,
    req: &mut Request,
    p: Principal,
    tenant: String,
) -> ApiResult<warp::reply::Response> {
    let (op, file_name) = upload_query(req)?;
    let default_pool = req.q("default_pool").map(str::to_string);
    // Who may upload is checked before the body is read.
    {
        let p = p.clone();
        let tenant = tenant.clone();
        web.blocking(&p.actor.clone(), move |app| {
            p.tenant(&app.conn, &tenant, true).map(|_| ())
        })
        .await?;
    }
    let limit = web.config.limits.max_file_bytes;
    if let Some(len) = req
        .header("content-length")
        .and_then(|s| s.parse::<u64>().ok())
        && len > limit
    {
        return Err(too_large(limit));
    }
    let tmp = TempFile::new(&web.data);
    let hashed = receive(req, &tmp.0, limit).await?;
    let actor = p.actor.clone();
    let result = web
        .blocking(&actor, move |app| {
            let tmp = tmp;
            let t = p.tenant(&app.conn, &tenant, true)?;
            let mut preview: Vec<Value> = Vec::new();
            let mut sink = |row: u32, email: &str, e: &Effect| {
                if preview.len() < 200 {
                    preview.push(json!({"row": row, "email": email, "effect": e}));
                }
            };
            // The body is in the data directory already, hashed as it arrived: it is
            // moved into place, not copied or read again.
            let stored = service::store_received(&app.data, &tmp.0, hashed, &file_name)?;
            let up = service::upload_stored(
                app,
                &t,
                op,
                stored,
                &file_name,
                p.email.as_deref(),
                default_pool.as_deref(),
                &mut sink,
                &mut |_| {},
            )?;
            // The preview is kept with the upload, for the page to show after a reload.
            app.conn.execute(
                "UPDATE uploads SET result = json_set(coalesce(result, '{}'), '$.preview', json(?2)) WHERE id = ?1",
                rusqlite::params![up.upload_id, Value::Array(preview.clone()).to_string()],
            )?;
            scheduler::wake(&app.data);
            upload_json(app, &t, up.upload_id, Some(preview))
        })
        .await?;
    Ok(json_response(StatusCode::CREATED, &result))
}

/// A received file in the data directory's tmp/, removed when dropped (whatever happens to
/// the request: a refusal, an error, the client going away) unless it was moved into
/// `uploads/` (`service::store_received`).
struct TempFile(PathBuf);

impl TempFile {
    fn new(data: &crate::config::DataDir) -> TempFile {
        TempFile(data.tmp_dir().join(format!(
            "web-upload-{}.partial",
            time::OffsetDateTime::now_utc().unix_timestamp_nanos()
        )))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The upload's operation and file name from the query.
fn upload_query(req: &Request) -> ApiResult<(Operation, String)> {
    if req
        .header("content-type")
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("multipart/"))
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the spreadsheet itself as the request body (for example curl --data-binary @file.xlsx), not a multipart form.",
        ));
    }
    let op = op_param(req.q("operation").unwrap_or(""))?;
    let file_name = req
        .q("file_name")
        .map(|s| {
            s.chars()
                .filter(|c| !c.is_control() && *c != '/' && *c != '\\')
                .take(200)
                .collect::<String>()
        })
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "upload.xlsx".into());
    Ok((op, file_name))
}

/// Receives a file to try against the rules on disk (operators), like `rollcall rules test`.
async fn rules_test(
    web: &Arc<Web>,
    req: &mut Request,
    p: Principal,
    tenant: String,
) -> ApiResult<warp::reply::Response> {
    let (op, file_name) = upload_query(req)?;
    let limit = web.config.limits.max_file_bytes;
    let tmp = TempFile::new(&web.data);
    receive(req, &tmp.0, limit).await?;
    web.blocking(&p.actor.clone(), move |app| {
        let tmp = tmp;
        let t = p.tenant(&app.conn, &tenant, false)?;
        let mut preview: Vec<Value> = Vec::new();
        let mut sink = |row: u32, email: &str, e: &Effect| {
            if preview.len() < 50 {
                preview.push(json!({"row": row, "email": email, "effect": e}));
            }
        };
        let tested = service::test_rules(app, &t, op, &tmp.0, &file_name, &mut sink)?;
        let v = match tested {
            Err((_, problems)) => json!({"loaded": false, "load_problems": problems}),
            Ok((active, outcome)) => json!({
                "loaded": true,
                "rules": active.map(|a| json!({"hash": a.hash, "scripts": a.scripts.len(), "columns": a.description.columns.len()})),
                "valid": outcome.is_valid(),
                "rows": outcome.rows,
                "errors": outcome.errors,
                "warnings": outcome.warnings,
                "message": if outcome.is_valid() { outcome.success_message() } else { outcome.errors_message() },
                "problems": outcome.problems.iter().take(200).collect::<Vec<_>>(),
                "normalisations": outcome.normalisations,
                "preview": preview,
            }),
        };
        Ok(reply(v))
    })
    .await
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!(
            "The file is larger than the limit of {}; split it into smaller files.",
            crate::sheet::reader::human_bytes(limit)
        ),
    )
}

async fn receive(
    req: &mut Request,
    path: &std::path::Path,
    limit: u64,
) -> ApiResult<service::Hashed> {
    use tokio::io::AsyncWriteExt;
    let internal = |e: std::io::Error| ApiError::from(AppError::internal("receiving a file", e));
    let mut f = tokio::fs::File::create(path).await.map_err(internal)?;
    let mut hash = service::ContentHash::default();
    let mut body = req
        .body
        .take()
        .ok_or_else(|| ApiError::bad_request("The request has no body."))?;
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::bad_request("The upload was cut off; try again."))?;
        hash.update(&chunk);
        if hash.size() > limit {
            return Err(too_large(limit));
        }
        f.write_all(&chunk).await.map_err(internal)?;
    }
    // On disk before it is moved into `uploads/` and recorded.
    f.flush().await.map_err(internal)?;
    f.sync_all().await.map_err(internal)?;
    let hashed = hash.finish();
    if hashed.size == 0 {
        return Err(ApiError::bad_request(
            "The file is empty: send the spreadsheet as the request body.",
        ));
    }
    Ok(hashed)
}

/// Server-sent events for one job: a `job` event whenever its state or progress changes,
/// until it ends (then one last event and the stream closes).
async fn job_events(
    web: &Arc<Web>,
    p: Principal,
    tenant: String,
    id: i64,
) -> ApiResult<warp::reply::Response> {
    let t = {
        let p = p.clone();
        web.blocking(&p.actor.clone(), move |app| {
            let t = p.tenant(&app.conn, &tenant, false)?;
            job_json(app, &t, id)?;
            Ok(t)
        })
        .await?
    };
    let web = web.clone();
    let actor = p.actor.clone();
    let p = p.clone();
    let stream = futures_util::stream::unfold(
        (web, t, actor, String::new(), false),
        move |(web, t, actor, last, done)| {
            let p = p.clone();
            async move {
                if done {
                    return None;
                }
                let mut waited = 0u32;
                loop {
                    let t2 = t.clone();
                    let p2 = p.clone();
                    let v = web
                        .blocking(&actor, move |app| {
                            // The stream ends with the session or token it was opened with.
                            if !auth::still_valid(&app.conn, &p2)? {
                                return Err(unauthenticated());
                            }
                            job_json(app, &t2, id)
                        })
                        .await
                        .ok()?;
                    let text = v.to_string();
                    let state = v["job"]["state"].as_str().unwrap_or("").to_string();
                    // A succeeded job's results workbook is written just after its commit: the
                    // last event waits for it (a few seconds at most).
                    let finished = matches!(state.as_str(), "failed" | "cancelled")
                        || (state == "succeeded"
                            && (v["results_workbook"] == true || waited >= 10));
                    if state == "succeeded" && !finished {
                        waited += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        continue;
                    }
                    if text != last || waited >= 30 {
                        let ev = warp::sse::Event::default().event("job").data(text.clone());
                        return Some((
                            Ok::<_, std::convert::Infallible>(ev),
                            (web, t, actor, text, finished),
                        ));
                    }
                    waited += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        },
    );
    use warp::Reply;
    let mut r = warp::sse::reply(warp::sse::keep_alive().stream(stream)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// Audit entries, newest first, filtered; `format=csv` downloads them.
fn audit_page(
    app: &App,
    tenant: Option<String>,
    q: &HashMap<String, String>,
) -> ApiResult<warp::reply::Response> {
    let get = |k: &str| {
        q.get(k)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let filter = crate::audit::Filter {
        tenant,
        user: get("user"),
        job: match get("job") {
            Some(j) => Some(
                j.parse()
                    .map_err(|_| ApiError::bad_request("job must be a number"))?,
            ),
            None => None,
        },
        actor: get("actor"),
        since: get("since"),
        until: get("until"),
    };
    if get("format").as_deref() == Some("csv") {
        let mut out = Vec::new();
        crate::audit::show(&app.data.audit_dir(), &filter, true, &mut out)?;
        return Ok(download(
            out,
            "text/csv; charset=utf-8",
            "rollcall-audit.csv",
        ));
    }
    let limit: usize = get("limit")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
        .clamp(1, 5000);
    let (entries, total) = crate::audit::newest(
        &app.data.audit_dir(),
        &filter,
        get("action").as_deref(),
        limit,
    )?;
    Ok(reply(json!({"entries": entries, "total": total})))
}
