//! The OpenAPI 3 document served at `/api/v1/openapi.json`, made from the route table in
//! `api::ROUTES` (so every route the server answers is documented, with its parameters,
//! body and answer) and the schemas below.

use serde_json::{Map, Value, json};

use super::api::{Access, Input, Output, ROUTES};

/// The schemas the routes name. Kept short: the fields a client relies on.
fn schemas() -> Value {
    let obj = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required});
    let s = json!({"type": "string"});
    let s_null = json!({"type": ["string", "null"]});
    let i = json!({"type": "integer"});
    let b = json!({"type": "boolean"});
    let list_of =
        |key: &str, item: Value| obj(json!({ key: {"type": "array", "items": item} }), &[key]);
    let any_obj = json!({"type": "object"});
    json!({
        "Error": obj(json!({"error": obj(json!({"code": s, "message": s, "details": {}}), &["code", "message"])}), &["error"]),
        "Ok": obj(json!({"ok": b, "message": s}), &["ok"]),
        "Object": any_obj,
        "Health": obj(json!({"status": s, "version": s}), &["status", "version"]),
        "SignIn": obj(json!({"username": s, "password": s}), &["username", "password"]),
        "Me": obj(json!({"name": s, "email": s_null, "role": {"$ref": "#/components/schemas/Role"}, "tenant": s_null,
            "must_change_password": b, "csrf_token": s_null, "kind": {"enum": ["session", "token"]}}), &["name", "role"]),
        "Role": {"enum": ["operator", "tenant_admin", "auditor"]},
        "PasswordChange": obj(json!({"current": s, "new": {"type": "string", "minLength": 12}}), &["current", "new"]),
        "NewTenant": obj(json!({"name": s}), &["name"]),
        "TenantList": list_of("tenants", obj(json!({"name": s}), &["name"])),
        "Tenant": obj(json!({"name": s, "settings": {"$ref": "#/components/schemas/TenantSettings"},
            "users": obj(json!({"active": i, "deactivated": i}), &[]),
            "pools": {"type": "array", "items": {"$ref": "#/components/schemas/Pool"}},
            "teams": {"type": "array", "items": s}, "custom_columns": {"type": "array", "items": s}}), &["name"]),
        "TenantSettings": obj(json!({"large_change_percent": i, "large_change_count": {"type": ["integer", "null"]},
            "require_approval": b, "drop_folder_submit": b, "approvers": {"type": "array", "items": s},
            "tenant_admins_edit_seats": b}), &[]),
        "User": obj(json!({"email": s, "first_name": s, "last_name": s, "job_title": s_null, "team": s_null,
            "role": s, "language": s, "pool": s, "status": {"enum": ["active", "deactivated"]}, "custom": {},
            "created_at": s, "updated_at": s, "welcome_sent_at": s_null, "welcome_count": i}), &["email", "status"]),
        "UserPage": obj(json!({"users": {"type": "array", "items": {"$ref": "#/components/schemas/User"}},
            "next": {"type": ["string", "null"], "description": "Pass as `after` for the next page"}}), &["users"]),
        "UserAction": obj(json!({"confirm": {"type": "string", "description": "For delete: the user's email"}}), &[]),
        "ActionResult": any_obj,
        "TeamList": list_of("teams", obj(json!({"id": i, "name": s}), &["name"])),
        "Pool": obj(json!({"name": s, "seats": i, "used": i, "free": i}), &["name", "seats", "used", "free"]),
        "PoolList": list_of("pools", json!({"$ref": "#/components/schemas/Pool"})),
        "PoolSeats": obj(json!({"seats": {"type": "integer", "minimum": 0}}), &["seats"]),
        "Problem": obj(json!({"severity": {"enum": ["error", "warning"]}, "sheet": s, "row": {"type": ["integer", "null"]},
            "column": s_null, "column_name": s_null, "value": s_null, "code": s, "message": s}), &["severity", "code", "message"]),
        "Upload": obj(json!({"id": i, "operation": s, "file_name": s, "status": {"enum": ["validated", "rejected", "pending"]},
            "valid": b, "rows": i, "errors": i, "warnings": i, "message": s, "totals": any_obj,
            "forecast": {"type": "array", "items": any_obj},
            "problems": {"type": "array", "items": {"$ref": "#/components/schemas/Problem"}}, "problems_total": i,
            "preview": {"type": "array", "items": any_obj}, "error_workbook": b, "submit_label": s,
            "needs_acknowledgement": b, "needs_confirmation": {"type": ["object", "null"]},
            "needs_delete_confirmation": b, "job": {"type": ["object", "null"]}, "applied_before": {"type": ["object", "null"]},
            "default_pool": s_null}),
            &["id", "status", "valid", "rows", "errors", "warnings", "problems"]),
        "UploadList": list_of("uploads", any_obj.clone()),
        "ProblemPage": obj(json!({"problems": {"type": "array", "items": {"$ref": "#/components/schemas/Problem"}}, "total": i, "offset": i}), &["problems", "total"]),
        "Submit": obj(json!({"acknowledge_warnings": b, "confirm": {"type": "string", "description": "The phrase a large deactivation or deletion asks for"},
            "confirm_delete": b, "getting_started": b, "not_before": {"type": "string", "format": "date-time"}}), &[]),
        "Job": obj(json!({"job": any_obj, "progress": {"type": ["object", "null"]}, "result": {}, "rows_done": i,
            "upload": {"type": ["integer", "null"]}, "undo_of": {"type": ["integer", "null"]}, "undone_by": {"type": ["integer", "null"]},
            "results_workbook": b}), &["job"]),
        "JobList": list_of("jobs", any_obj.clone()),
        "AuditPage": obj(json!({"entries": {"type": "array", "items": any_obj}, "total": i}), &["entries", "total"]),
        "Verification": any_obj,
        "Rules": obj(json!({"folder": s, "origin": s, "hash": s, "status": {"enum": ["ok", "stale", "none", "broken"]},
            "scripts": {"type": "array", "items": obj(json!({"name": s, "source": s}), &["name", "source"])}, "active": {}}), &["status", "scripts"]),
        "RulesTest": obj(json!({"loaded": b, "load_problems": {"type": "array", "items": s}, "rules": {"type": ["object", "null"]},
            "valid": b, "rows": i, "errors": i, "warnings": i, "message": s, "problems": {"type": "array", "items": any_obj},
            "normalisations": {"type": "array", "items": any_obj}, "preview": {"type": "array", "items": any_obj}}), &["loaded"]),
        "Admin": obj(json!({"id": i, "username": s, "email": s_null, "role": {"$ref": "#/components/schemas/Role"},
            "tenant": s_null, "disabled": b, "must_change_password": b, "created_at": s}), &["username", "role"]),
        "AdminList": list_of("admins", json!({"$ref": "#/components/schemas/Admin"})),
        "NewAdmin": obj(json!({"username": s, "email": s, "role": {"$ref": "#/components/schemas/Role"}, "tenant": s}), &["username", "role"]),
        "AdminChange": obj(json!({"role": {"$ref": "#/components/schemas/Role"}, "tenant": s, "disabled": b}), &[]),
        "NewAdminResult": obj(json!({"admin": {"$ref": "#/components/schemas/Admin"}, "one_time_password": s}), &["one_time_password"]),
        "TokenList": list_of("tokens", any_obj.clone()),
        "NewToken": obj(json!({"name": s, "role": {"$ref": "#/components/schemas/Role"}, "tenant": s}), &["name", "role"]),
        "NewTokenResult": obj(json!({"id": i, "token": s}), &["id", "token"]),
        "SettingsChange": obj(json!({"mail": {"type": "object", "description": "transport, from, support_contact, sign_in_url, web_url, smtp_host, smtp_port, smtp_security, smtp_username, smtp_password, attach_max_mib, max_attempts; null returns a key to the configuration file's value"},
            "jobs": {"type": "object", "description": "undo_days, file_retention_days (1 to 3650)"}}), &[]),
        "Welcome": obj(json!({"emails": {"type": "array", "items": s}, "not_welcomed": b}), &[]),
        "TestEmail": obj(json!({"to": s}), &["to"]),
        "MailList": list_of("messages", any_obj),
    })
}

/// The path parameters of a route pattern, in order.
pub fn path_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

fn error_ref(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

pub fn document() -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for r in ROUTES {
        let mut op = Map::new();
        op.insert("summary".into(), json!(r.summary));
        op.insert("operationId".into(), json!(format!("{:?}", r.op)));
        let mut parameters: Vec<Value> = path_params(r.path)
            .into_iter()
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if r.input == Input::File {
            parameters.push(json!({"name": "operation", "in": "query", "required": true,
                "schema": {"enum": ["add", "update", "deactivate", "reactivate", "delete"]}}));
            parameters.push(json!({"name": "file_name", "in": "query", "required": false,
                "schema": {"type": "string"}, "description": "The file's name (its extension tells the format)"}));
            if r.path.ends_with("/uploads") {
                parameters.push(json!({"name": "default_pool", "in": "query", "required": false,
                    "schema": {"type": "string"}, "description": "Add and reactivate: the licence pool of rows whose Licence Pool cell is empty"}));
            }
        }
        if !parameters.is_empty() {
            op.insert("parameters".into(), Value::Array(parameters));
        }
        match r.input {
            Input::None => {}
            Input::Json(schema) => {
                op.insert(
                    "requestBody".into(),
                    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}),
                );
            }
            Input::File => {
                op.insert(
                    "requestBody".into(),
                    json!({"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}),
                );
            }
        }
        let ok = match r.output {
            Output::Json(schema) => {
                json!({"description": "Success", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
            }
            Output::Xlsx => {
                json!({"description": "A workbook", "content": {super::XLSX: {"schema": {"type": "string", "format": "binary"}}}})
            }
            Output::Events => {
                json!({"description": "Server-sent events (event: job, data: a Job)", "content": {"text/event-stream": {"schema": {"type": "string"}}}})
            }
        };
        let mut responses = Map::new();
        let ok_status = if r.method == "POST"
            && matches!(r.output, Output::Json(s) if ["Upload", "Job", "NewAdminResult", "NewTokenResult", "Tenant"].contains(&s))
        {
            "201"
        } else {
            "200"
        };
        responses.insert(ok_status.into(), ok);
        responses.insert("400".into(), error_ref("The request is malformed"));
        if r.access != Access::Public {
            responses.insert("401".into(), error_ref("Not signed in"));
            responses.insert(
                "403".into(),
                error_ref("Not allowed for this role, or the CSRF token is missing"),
            );
        }
        responses.insert("404".into(), error_ref("Not found (or another tenant's)"));
        op.insert("responses".into(), Value::Object(responses));
        if r.access == Access::Public {
            op.insert("security".into(), json!([]));
        }
        if r.access == Access::Operator {
            op.insert("description".into(), json!("Operators only."));
        }
        let entry = paths
            .entry(r.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(m) = entry.as_object_mut() {
            m.insert(r.method.to_ascii_lowercase(), Value::Object(op));
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "rollcall API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Bulk user management. Authenticate with a session (POST /api/v1/session; send the returned csrf_token as X-CSRF-Token on every change) or an API token (Authorization: Bearer TOKEN). Errors are {\"error\": {\"code\", \"message\", \"details\"}}.",
        },
        "servers": [{"url": "/"}],
        "security": [{"session": []}, {"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": super::auth::COOKIE},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route is documented once, with its path parameters, and every schema a route
    /// names exists.
    #[test]
    fn every_route_is_documented() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap().clone();
        let mut count = 0;
        for r in ROUTES {
            let op = &doc["paths"][r.path][r.method.to_ascii_lowercase()];
            assert!(op.is_object(), "{} {} missing", r.method, r.path);
            count += 1;
            let params: Vec<&str> = op["parameters"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|p| p["in"] == "path")
                        .map(|p| p["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(params, path_params(r.path), "{}", r.path);
            for name in [
                match r.input {
                    Input::Json(s) => Some(s),
                    _ => None,
                },
                match r.output {
                    Output::Json(s) => Some(s),
                    _ => None,
                },
            ]
            .into_iter()
            .flatten()
            {
                assert!(
                    schemas.contains_key(name),
                    "schema {name} of {} missing",
                    r.path
                );
            }
        }
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|m| m.as_object().unwrap().len())
            .sum();
        assert_eq!(documented, count, "a route is in the table twice");
        // Every $ref points at a schema that exists.
        let text = doc.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(schemas.contains_key(&name), "dangling $ref {name}");
        }
    }
}
