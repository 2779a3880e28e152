//! The revocation admin API: `GET /revocations` lists, `POST /revocations` adds a runtime entry,
//! `DELETE /revocations?jti=...` (or `sid`, `sub`) removes one. OWNER: context helper.
//!
//! An entry may carry `issuer` (an `issuers[].name`, or `api-key`): it then names only that
//! issuer's tokens; without it, every issuer's.
//!
//! Runtime entries go to the shared `StateStore`'s revocation index (`revoked:index`, member
//! `RevokedKind::member`, kept until `expires_at`, default `revocation.default_ttl`), so they
//! take effect on the next request, cached tokens included. `DELETE` takes `&issuer=` for a
//! scoped entry, any name (the entry may outlive its issuer's name). File entries are listed
//! but only change by editing the file.
//!
//! Access: when `revocation.admin_token_sha256` is set, every call needs
//! `Authorization: Bearer <secret>` whose SHA-256 matches. Without it, the endpoints answer only
//! when the admin listener is bound to a loopback address; otherwise they refuse (403), so an
//! exposed admin port never lets anyone revoke (or un-revoke) tokens.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AdminState;
use crate::engine::{Engine, unix_now};
use crate::identity::strict_json::{self, StrictJsonError};
use crate::revocation::{RUNTIME_INDEX, RevokedKind, parse_time};

/// The longest a runtime entry may live: far past any sane token lifetime.
const MAX_TTL_SECS: i64 = 400 * 24 * 3600;
/// The longest revoked value: a claim is never longer than the longest token taken
/// (`tokens.max_bytes`), so any `jti`, `sid` or `sub` a token can carry can be revoked.
fn max_value_bytes(engine: &Engine) -> usize {
    engine.config.file.tokens.max_bytes
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// A 401 of this API, with the challenge RFC 9110 requires: the admin bearer secret.
fn unauthorized(message: &str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
    );
    response
}

/// `None` when the caller may use the API; else the refusal.
///
/// Without `revocation.admin_token_sha256`, only a listener bound to loopback serves the API
/// (`bound`: the address actually bound, not a reloaded config's `admin_listen`, which a
/// reload cannot apply), and only to requests whose `Host` names loopback: a web page on this
/// machine whose name is rebound to 127.0.0.1 reaches the listener from the browser with its
/// own name as `Host`.
/// A refusal is audited (`kind: "admin"`, `event: "refused"`) with its reason.
fn authorize(
    engine: &Engine,
    bound: std::net::SocketAddr,
    headers: &HeaderMap,
) -> Option<Response> {
    let (status, message) = refusal(engine, bound, headers)?;
    let mut event = crate::audit::AdminEvent::new("refused", "revocations", None);
    event.detail = Some(message.to_string());
    engine.audit.record_admin(event);
    Some(if status == StatusCode::UNAUTHORIZED {
        unauthorized(message)
    } else {
        error(status, message)
    })
}

/// Who called, as far as `authorize` established it (never the secret itself).
fn actor(engine: &Engine) -> Option<String> {
    Some(match engine.config.file.revocation.admin_token_sha256 {
        Some(_) => "admin-secret".to_string(),
        None => "loopback".to_string(),
    })
}

fn refusal(
    engine: &Engine,
    bound: std::net::SocketAddr,
    headers: &HeaderMap,
) -> Option<(StatusCode, &'static str)> {
    let cfg = &engine.config.file;
    match &cfg.revocation.admin_token_sha256 {
        Some(want) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, secret)| secret.trim());
            let Some(secret) = given else {
                return Some((
                    StatusCode::UNAUTHORIZED,
                    "this endpoint requires the revocation admin bearer secret",
                ));
            };
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            // Comparing digests leaks nothing useful about the secret through timing.
            if hex.eq_ignore_ascii_case(want) {
                None
            } else {
                Some((
                    StatusCode::UNAUTHORIZED,
                    "invalid revocation admin bearer secret",
                ))
            }
        }
        None if !bound.ip().is_loopback() => Some((
            StatusCode::FORBIDDEN,
            "the admin listener is not on loopback: set `revocation.admin_token_sha256` to use this endpoint",
        )),
        None if !headers.get(header::HOST).is_none_or(loopback_host) => Some((
            StatusCode::FORBIDDEN,
            "without `revocation.admin_token_sha256` this endpoint answers only requests addressed to loopback (`Host: localhost` or a loopback address)",
        )),
        None => None,
    }
}

/// A `Host` value naming this machine's loopback: `localhost`, `127.0.0.1`, `[::1]`... with or
/// without a port.
fn loopback_host(value: &header::HeaderValue) -> bool {
    let Ok(host) = value.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `jti`, `sid` or `sub`: exactly one. `None` is a bad request (see `bad_kind`).
fn one_kind(map: &HashMap<String, serde_json::Value>, max: usize) -> Option<(RevokedKind, String)> {
    let found: Vec<(RevokedKind, &serde_json::Value)> = RevokedKind::ALL
        .into_iter()
        .filter_map(|k| map.get(k.as_str()).map(|v| (k, v)))
        .collect();
    match found.as_slice() {
        [(k, serde_json::Value::String(v))] if !v.is_empty() && v.len() <= max => {
            Some((*k, v.clone()))
        }
        _ => None,
    }
}

fn known_issuer(engine: &Engine, name: &str) -> bool {
    engine.revocations.issuers().iter().any(|n| n == name)
}

fn bad_issuer(engine: &Engine) -> Response {
    let names: Vec<String> = engine
        .revocations
        .issuers()
        .iter()
        .map(|n| format!("`{n}`"))
        .collect();
    error(
        StatusCode::BAD_REQUEST,
        &format!(
            "`issuer` must name one of the config's issuers ({}), or be left out to revoke for every issuer",
            names.join(", ")
        ),
    )
}

fn bad_kind(max: usize) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        &format!(
            "give exactly one of `jti`, `sid` or `sub` as a non-empty string of at most \
             {max} bytes (`tokens.max_bytes`)"
        ),
    )
}

pub async fn list(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let engine = state.engine.load_full();
    if let Some(refusal) = authorize(&engine, state.bound, &headers) {
        return refusal;
    }
    let file: Vec<_> = engine
        .revocations
        .current()
        .entries()
        .into_iter()
        .map(|(k, issuer, v, e)| {
            let every_issuer = issuer.is_none();
            json!({
                "kind": k.as_str(),
                "issuer": issuer,
                "value": v,
                "expires_at": e,
                "every_issuer": every_issuer,
            })
        })
        .collect();
    let listed = |members: &[(String, i64)]| -> Vec<serde_json::Value> {
        members
            .iter()
            .filter_map(|(member, expires_at)| {
                let (kind, issuer, value) = RevokedKind::parse_member(member)?;
                // An entry scoped to an issuer this config lacks names every issuer's tokens
                // here (fail closed, see `Mirror`): the listing says so.
                let unknown = issuer.is_some_and(|name| !known_issuer(&engine, name));
                let mut entry = json!({
                    "kind": kind.as_str(),
                    "issuer": issuer,
                    "value": value,
                    "expires_at": expires_at,
                    "every_issuer": issuer.is_none() || unknown,
                });
                if unknown {
                    entry["note"] = json!(
                        "this config has no issuer of that name, so the entry applies to every \
                         issuer's tokens until it is deleted"
                    );
                }
                Some(entry)
            })
            .collect()
    };
    let file_path = engine.revocations.path().map(|p| p.display().to_string());
    match engine.state.index_list(RUNTIME_INDEX, unix_now()).await {
        Ok(members) => Json(json!({
            "file": file,
            "file_path": file_path,
            "runtime": listed(&members),
        }))
        .into_response(),
        // Still a 503 (the shared list cannot be read), but with what is in force here: the
        // file's entries and this replica's mirror of the runtime ones.
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "error": e.to_string(),
                "file": file,
                "file_path": file_path,
                "runtime": listed(&engine.runtime_revoked.snapshot()),
                "runtime_from": "this replica's mirror, as last synced (shared state unavailable)",
            })),
        )
            .into_response(),
    }
}

/// An entry is a few short fields; anything longer is not one.
const MAX_ADD_BODY_BYTES: usize = 128 * 1024;

/// `application/json`, or a `+json` type, with any parameters.
fn json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .is_some_and(|t| {
            t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
        })
}

pub async fn add(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let engine = state.engine.load_full();
    // Authorized before the body is read: a caller who may not add revocations never gets
    // to hold an admin connection with a body it sends slowly (the admin listener has 256,
    // and `/healthz` shares them).
    if let Some(refusal) = authorize(&engine, state.bound, &headers) {
        return refusal;
    }
    // `curl -d` sends a form content type: say what is missing rather than blaming a body
    // that may well be a JSON object. (Requiring the JSON content type also keeps a
    // browser's cross-site form post, which cannot set it without a preflight, out.)
    if !json_content_type(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as JSON with `content-type: application/json`",
        );
    }
    let bytes = match crate::listener::read_body(body, MAX_ADD_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.describe()),
    };
    // Duplicate members are refused, as in tokens: `{"sub":"alice","sub":"bob"}` must not
    // revoke whichever one a parser happens to keep.
    let mut ids: HashMap<String, serde_json::Value> = match strict_json::parse_object(&bytes) {
        Ok(map) => map.into_iter().collect(),
        Err(StrictJsonError::DuplicateKey(k)) => {
            let k = k.chars().take(64).collect::<String>();
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the body names `{k}` twice: give each field once"),
            );
        }
        Err(_) => return error(StatusCode::BAD_REQUEST, "the body must be a JSON object"),
    };
    let expires = ids.remove("expires_at");
    let issuer = match ids.remove("issuer") {
        None => None,
        Some(serde_json::Value::String(name)) => Some(name),
        Some(_) => return bad_issuer(&engine),
    };
    if let Some(k) = ids
        .keys()
        .find(|k| !RevokedKind::ALL.iter().any(|r| r.as_str() == k.as_str()))
    {
        let k = k.chars().take(64).collect::<String>();
        return error(
            StatusCode::BAD_REQUEST,
            &format!("unknown field `{k}`: use `jti`, `sid` or `sub`, and `issuer`, `expires_at`"),
        );
    }
    let Some((kind, value)) = one_kind(&ids, max_value_bytes(&engine)) else {
        return bad_kind(max_value_bytes(&engine));
    };
    if issuer
        .as_ref()
        .is_some_and(|name| !known_issuer(&engine, name))
    {
        return bad_issuer(&engine);
    }
    let now = unix_now();
    let expires_at = match expires {
        None => now.saturating_add(
            i64::try_from(engine.config.file.revocation.default_ttl.get().as_secs())
                .unwrap_or(MAX_TTL_SECS),
        ),
        Some(serde_json::Value::Number(n)) if n.as_i64().is_some() => n.as_i64().unwrap_or(0),
        Some(serde_json::Value::String(s)) if parse_time(&s).is_some() => {
            parse_time(&s).unwrap_or(0)
        }
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "`expires_at` must be RFC 3339 (e.g. `2026-12-01T00:00:00Z`) or seconds since the epoch",
            );
        }
    };
    let ttl = expires_at.saturating_sub(now);
    if ttl <= 0 {
        return error(StatusCode::BAD_REQUEST, "`expires_at` is in the past");
    }
    if ttl > MAX_TTL_SECS {
        return error(
            StatusCode::BAD_REQUEST,
            "`expires_at` is more than 400 days away: revoke for as long as the tokens live",
        );
    }
    let member = kind.member(issuer.as_deref(), &value);
    // An entry that is there already keeps its later expiry: a second revocation never
    // cuts a first one short (DELETE, then add, to shorten one).
    let kept = match engine
        .state
        .index_add(RUNTIME_INDEX, &member, expires_at)
        .await
    {
        Ok(kept) => kept,
        Err(e) if e.outcome_unknown() => {
            // Fail closed here at once; the next sync takes the store's word for it.
            engine.runtime_revoked.apply(&member, Some(expires_at));
            let entry = json!({
                "kind": kind.as_str(),
                "issuer": issuer,
                "value": value,
                "expires_at": expires_at,
            });
            return unconfirmed(&engine, Change::Add, entry, &e);
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    // In force on this replica at once; other replicas pick it up at their next sync.
    engine.runtime_revoked.apply(&member, Some(kept));
    // A reload that removed the issuer while this was written checked for entries naming
    // it before this one existed: take the entry back (it would name every issuer's tokens,
    // see `RuntimeRevocations::check`) and say so.
    if let Some(name) = issuer.as_deref()
        && !known_issuer(&state.engine.load(), name)
    {
        let _ = engine
            .state
            .index_remove(RUNTIME_INDEX, &member, unix_now())
            .await;
        engine.runtime_revoked.apply(&member, None);
        return error(
            StatusCode::CONFLICT,
            &format!(
                "the config was reloaded meanwhile and has no issuer `{name}` any more: \
                 nothing was revoked; revoke again with the issuer's current name"
            ),
        );
    }
    tracing::info!(
        revocation.kind = kind.as_str(),
        revocation.issuer = issuer.as_deref(),
        revocation.expires_at = kept,
        "revocation added"
    );
    let mut added = json!({
        "kind": kind.as_str(),
        "issuer": issuer,
        "value": value,
        "expires_at": kept,
    });
    let mut event =
        crate::audit::AdminEvent::new("revocation_added", "revocations", actor(&engine));
    event.revocation = Some(added.clone());
    engine.audit.record_admin(event);
    let mut notes = Vec::new();
    if kept > expires_at {
        notes.push(
            "already revoked until `expires_at`, which is kept: an entry is extended, never \
             shortened (DELETE it first to shorten it)",
        );
    }
    // Runtime entries live in the state store: in memory they are this process's alone, and
    // a restart forgets them (the revoked token is accepted again). Say so where it is done.
    if engine.config.file.state.backend == crate::config::schema::StateBackend::Memory {
        notes.push(
            "kept in this process's memory only (`state.backend: memory`): a restart forgets \
             it and other replicas never see it; for a lasting revocation add it to the \
             revocation file too, or use `state.backend: redis`",
        );
    }
    if !notes.is_empty() {
        added["note"] = json!(notes.join("; "));
    }
    (StatusCode::CREATED, Json(added)).into_response()
}

pub async fn remove(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let engine = state.engine.load_full();
    if let Some(refusal) = authorize(&engine, state.bound, &headers) {
        return refusal;
    }
    let mut ids: HashMap<String, serde_json::Value> = query
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    // Any name: an entry may name an issuer a later config renamed, and must stay removable.
    let issuer = match ids.remove("issuer") {
        Some(serde_json::Value::String(name)) if !name.is_empty() => Some(name),
        Some(_) => return bad_issuer(&engine),
        None => None,
    };
    let Some((kind, value)) = one_kind(&ids, max_value_bytes(&engine)) else {
        return bad_kind(max_value_bytes(&engine));
    };
    let member = kind.member(issuer.as_deref(), &value);
    let deleted = engine
        .state
        .index_remove(RUNTIME_INDEX, &member, unix_now())
        .await;
    if matches!(deleted, Ok(true)) {
        engine.runtime_revoked.apply(&member, None);
    }
    match deleted {
        Ok(true) => {
            tracing::info!(revocation.kind = kind.as_str(), "revocation removed");
            let mut event =
                crate::audit::AdminEvent::new("revocation_removed", "revocations", actor(&engine));
            event.revocation =
                Some(json!({"kind": kind.as_str(), "issuer": issuer, "value": value}));
            engine.audit.record_admin(event);
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => {
            // The same value revoked under another scope: say how to name that entry.
            let scopes: Vec<String> = engine
                .runtime_revoked
                .scopes_of(kind, &value)
                .into_iter()
                .map(|s| match s {
                    Some(issuer) => format!("`issuer={issuer}`"),
                    None => "no `issuer` (every issuer)".to_string(),
                })
                .collect();
            let hint = if scopes.is_empty() {
                String::new()
            } else {
                format!(
                    "; this value is revoked with {}: name that scope to delete it",
                    scopes.join(", ")
                )
            };
            error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no runtime revocation for this value{} (file entries change only in the \
                     file){hint}",
                    match &issuer {
                        Some(_) => " scoped to that issuer",
                        None => " for every issuer",
                    }
                ),
            )
        }
        // Not applied here: the entry stays in force on this replica until a sync reads
        // that the store removed it.
        Err(e) if e.outcome_unknown() => {
            let entry = json!({"kind": kind.as_str(), "issuer": issuer, "value": value});
            unconfirmed(&engine, Change::Remove, entry, &e)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// A change to the runtime revocations.
#[derive(Clone, Copy)]
enum Change {
    Add,
    Remove,
}

/// The answer to an add or remove that shared state did not confirm (a timeout: the command
/// may still run, e.g. when a paused Redis resumes): 503 saying the outcome is unknown, and
/// an audit line of the attempt (`event`: `revocation_add_unconfirmed` or
/// `revocation_remove_unconfirmed`), since it may take effect on every replica. Both calls
/// are idempotent, so repeating one is safe: an add keeps the later expiry, a remove of an
/// entry already gone answers 404.
fn unconfirmed(
    engine: &Engine,
    change: Change,
    entry: serde_json::Value,
    e: &crate::state::StateError,
) -> Response {
    let (event, what, retry) = match change {
        Change::Add => (
            "revocation_add_unconfirmed",
            "added",
            "send the same POST again (adding is idempotent: the later expiry is kept)",
        ),
        Change::Remove => (
            "revocation_remove_unconfirmed",
            "removed",
            "send the same DELETE again (removing is idempotent: a 404 then means it is gone)",
        ),
    };
    let detail = format!(
        "{e}; the entry may have been {what} (now, or once shared state answers): the outcome \
         is unknown"
    );
    tracing::warn!(
        revocation.kind = entry["kind"].as_str(),
        revocation.issuer = entry["issuer"].as_str(),
        error = %e,
        "revocation change sent to shared state but not confirmed: outcome unknown"
    );
    let mut audited = crate::audit::AdminEvent::new(event, "revocations", actor(engine));
    audited.revocation = Some(entry);
    audited.detail = Some(detail.clone());
    engine.audit.record_admin(audited);
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("{detail}; check `GET /revocations`, or {retry}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::Metrics;
    use std::sync::Arc;

    fn headers(host: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(host) = host {
            h.insert(header::HOST, host.parse().unwrap());
        }
        h
    }

    /// The admin API's state around `engine`, bound on loopback.
    fn admin_state(engine: Engine, metrics: Arc<Metrics>) -> AdminState {
        AdminState {
            engine: Arc::new(arc_swap::ArcSwap::from_pointee(engine)),
            metrics,
            leaving: Arc::default(),
            bound: "127.0.0.1:9192".parse().unwrap(),
        }
    }

    /// A loopback `Host` and the JSON content type: what a POST needs to be served.
    fn json_headers() -> HeaderMap {
        let mut json = headers(Some("localhost:9192"));
        json.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        json
    }

    /// The audit log says who changed the runtime revocations, what they changed (the
    /// value too, so a lifted revocation can be told apart), and who was turned away (a
    /// refusal was not logged at all).
    #[tokio::test]
    async fn revocations_added_removed_and_refused_are_audited() {
        let metrics = Arc::new(Metrics::new());
        let captured = crate::audit::Captured::new();
        let sink = captured.sink.clone();
        let engine = crate::engine::tests::shipped_engine("", &metrics).with_audit(sink.clone());
        let state = admin_state(engine, metrics);
        let json = json_headers();
        let added = add(
            State(state.clone()),
            json.clone(),
            axum::body::Body::from(r#"{"sub": "mallory"}"#),
        )
        .await;
        assert_eq!(added.status(), StatusCode::CREATED);
        let removed = remove(
            State(state.clone()),
            headers(Some("localhost:9192")),
            Query(HashMap::from([("sub".to_string(), "mallory".to_string())])),
        )
        .await;
        assert_eq!(removed.status(), StatusCode::NO_CONTENT);
        let refused = add(
            State(state.clone()),
            headers(Some("evil.example:9192")),
            axum::body::Body::from(r#"{"sub": "alice"}"#),
        )
        .await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let text = captured.text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines
                .iter()
                .all(|l| l["kind"] == "admin" && l["api"] == "revocations")
        );
        assert_eq!(lines[0]["event"], "revocation_added");
        assert_eq!(lines[0]["actor"], "loopback");
        assert_eq!(lines[0]["revocation"]["value"], "mallory");
        assert_eq!(lines[1]["event"], "revocation_removed");
        assert_eq!(lines[1]["revocation"]["value"], "mallory");
        assert_eq!(lines[2]["event"], "refused");
        assert!(
            lines[2]["detail"].as_str().unwrap().contains("loopback"),
            "{}",
            lines[2]
        );
    }

    /// An entry scoped to an issuer the config lacks names every issuer's tokens here: the
    /// listing says which entries apply to every issuer, and why for that one (it used to
    /// look like an entry scoped to a single issuer).
    #[tokio::test]
    async fn the_listing_marks_entries_that_apply_to_every_issuer() {
        let metrics = Arc::new(Metrics::new());
        let engine = crate::engine::tests::shipped_engine("", &metrics);
        let far = unix_now() + 3600;
        for member in [
            RevokedKind::Sub.member(None, "ann"),
            RevokedKind::Sub.member(Some("dev"), "bob"),
            RevokedKind::Sub.member(Some("corp-old"), "cy"),
        ] {
            engine
                .state
                .index_add(RUNTIME_INDEX, &member, far)
                .await
                .unwrap();
        }
        let state = admin_state(engine, metrics);
        let response = list(State(state), headers(Some("127.0.0.1:9192"))).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let runtime = body["runtime"].as_array().unwrap();
        let by_value = |v: &str| {
            runtime
                .iter()
                .find(|e| e["value"] == v)
                .unwrap_or_else(|| panic!("{v} not listed: {body}"))
        };
        assert_eq!(by_value("ann")["every_issuer"], true);
        assert!(by_value("ann").get("note").is_none());
        assert_eq!(by_value("bob")["every_issuer"], false);
        assert!(by_value("bob").get("note").is_none());
        let cy = by_value("cy");
        assert_eq!(cy["issuer"], "corp-old");
        assert_eq!(cy["every_issuer"], true);
        assert!(
            cy["note"].as_str().unwrap().contains("every issuer"),
            "{cy}"
        );
    }

    /// The shipped config says `admin_listen: 127.0.0.1:9192`; what counts is where the
    /// listener is: a reload that moved `admin_listen` to loopback (or dropped it, loopback
    /// being the default) cannot move a listener bound to every interface.
    #[test]
    fn a_listener_bound_beyond_loopback_refuses_whatever_the_reloaded_config_says() {
        let engine = crate::engine::tests::shipped_engine("", &Arc::new(Metrics::new()));
        assert!(
            engine
                .config
                .file
                .server
                .admin_listen
                .starts_with("127.0.0.1:")
        );
        let everywhere: std::net::SocketAddr = "0.0.0.0:9192".parse().unwrap();
        let refusal = authorize(&engine, everywhere, &headers(Some("127.0.0.1:9192")));
        assert_eq!(refusal.map(|r| r.status()), Some(StatusCode::FORBIDDEN));
    }

    /// A reload that renames the issuer while an entry scoped to it is being written checked
    /// for such entries before it existed: the entry is taken back and the caller told, so
    /// no entry names an issuer the config in force lacks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_whose_issuer_a_reload_removed_meanwhile_is_taken_back() {
        use crate::state::StateStore as _;
        use crate::state::testing::{Gate, TestStore};
        let metrics = Arc::new(Metrics::new());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let store = Arc::new(TestStore {
            index_add: Gate::after(0),
            ..TestStore::default()
        });
        let engine = |text: &str| {
            let config = Arc::new(crate::config::from_str(text, &path).unwrap());
            let keys = Arc::new(crate::server::key_store(&config, metrics.clone()));
            Engine::new(config, keys, store.clone(), metrics.clone())
        };
        let first = engine(&text);
        let mirror = first.runtime_revoked.clone();
        let state = admin_state(first, metrics.clone());
        let body = axum::body::Body::from(r#"{"sub": "mallory", "issuer": "dev"}"#);
        let adding = tokio::spawn(add(State(state.clone()), json_headers(), body));
        store.index_add.reached.notified().await;
        let renamed = text.replace("  - name: dev\n", "  - name: corp\n");
        assert_ne!(renamed, text);
        state.engine.store(Arc::new(
            engine(&renamed).with_runtime_revocations(mirror.clone()),
        ));
        store.index_add.release.notify_one();
        let answer = adding.await.unwrap();
        assert_eq!(answer.status(), StatusCode::CONFLICT);
        let listed = store
            .inner
            .index_list(RUNTIME_INDEX, unix_now())
            .await
            .unwrap();
        assert!(listed.is_empty(), "{listed:?}");
        assert!(mirror.scoped_issuers().is_empty());
    }

    /// A store that gets the change but answers too late (Redis paused by `CLIENT PAUSE`,
    /// which runs the queued command when it resumes): the answer says the outcome is
    /// unknown and how to find it out, and the attempt is audited. It used to answer a plain
    /// 503 and audit nothing, while the change landed on every replica.
    #[tokio::test]
    async fn a_change_the_store_does_not_confirm_is_answered_unknown_and_audited() {
        use crate::state::StateStore as _;
        use crate::state::testing::TestStore;
        let metrics = Arc::new(Metrics::new());
        let captured = crate::audit::Captured::new();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = Arc::new(crate::config::from_str(&text, &path).unwrap());
        let keys = Arc::new(crate::server::key_store(&config, metrics.clone()));
        let store = Arc::new(TestStore::default());
        store
            .index_land_then_time_out
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let engine = Engine::new(config, keys, store.clone(), metrics.clone())
            .with_audit(captured.sink.clone());
        let state = admin_state(engine, metrics);
        let json = json_headers();
        let body_of = |r: Response| async move {
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["error"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let added = add(
            State(state.clone()),
            json,
            axum::body::Body::from(r#"{"sub": "pete"}"#),
        )
        .await;
        assert_eq!(added.status(), StatusCode::SERVICE_UNAVAILABLE);
        let message = body_of(added).await;
        assert!(
            message.contains("outcome is unknown") && message.contains("GET /revocations"),
            "{message}"
        );
        // It landed (as a paused Redis runs it later), and this replica refuses at once.
        let listed = store
            .inner
            .index_list(RUNTIME_INDEX, unix_now())
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let mirror = state.engine.load().runtime_revoked.clone();
        assert_eq!(mirror.len(), 1);
        let removed = remove(
            State(state.clone()),
            headers(Some("localhost:9192")),
            Query(HashMap::from([("sub".to_string(), "pete".to_string())])),
        )
        .await;
        assert_eq!(removed.status(), StatusCode::SERVICE_UNAVAILABLE);
        let message = body_of(removed).await;
        assert!(
            message.contains("outcome is unknown") && message.contains("DELETE again"),
            "{message}"
        );
        assert!(
            !message.contains("pete"),
            "the value is in the audit line, not the answer: {message}"
        );
        let text = captured.text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["event"], "revocation_add_unconfirmed");
        assert_eq!(lines[1]["event"], "revocation_remove_unconfirmed");
        for line in &lines {
            assert_eq!(line["kind"], "admin");
            assert_eq!(line["actor"], "loopback");
            assert_eq!(line["revocation"]["value"], "pete");
            assert!(
                line["detail"].as_str().unwrap().contains("unknown"),
                "{line}"
            );
        }
    }

    #[test]
    fn on_loopback_only_requests_addressed_to_loopback_are_served() {
        let engine = crate::engine::tests::shipped_engine("", &Arc::new(Metrics::new()));
        let bound: std::net::SocketAddr = "127.0.0.1:9192".parse().unwrap();
        let status = |host| authorize(&engine, bound, &headers(host)).map(|r| r.status());
        for host in [
            None,
            Some("localhost"),
            Some("LOCALHOST:9192"),
            Some("127.0.0.1:9192"),
            Some("127.0.0.2"),
            Some("[::1]:9192"),
        ] {
            assert_eq!(status(host), None, "{host:?}");
        }
        // A name rebound to 127.0.0.1 by a web page, or any other name.
        for host in [
            "rebound.example:9192",
            "rebound.example",
            "localhost.evil:80",
            "[::2]:9192",
        ] {
            assert_eq!(status(Some(host)), Some(StatusCode::FORBIDDEN), "{host}");
        }
    }
}
