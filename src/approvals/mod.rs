//! Just-in-time approvals: a rule with `approval:` grants a request only after an approver
//! approved that one action (same subject, route and rule, method, host, path) for a limited
//! time and number of uses, or a pre-approval policy holds.
//!
//! This file is the pure part: compiled approval policies, the request fingerprint, the
//! record stored per request, and who may approve. No I/O, no clock (callers pass `now`).
//! `gate` (the per-request stage the engine calls after a grant) and the approve/reject/list
//! operations live in `service`, on top of the `StateStore`; the gRPC API in `api`, its CLI
//! client in `client`; webhook delivery in `webhook`.
//!
//! Keys in the state store (all under the store's own prefix):
//! - `approval:req:<fp>` -> id of the pending request for that action (dedupes retries)
//! - `approval:rec:<id>` -> the `Record` as JSON
//! - `approval:decided:<id>` -> who decided it first, with a nonce of that attempt (one
//!   decision per request)
//! - `approval:grant:<fp>` -> uses left, expiring with the approval (spent with `take_one`)
//! - `approval:grantid:<fp>` -> the id of the approval behind the grant (for the audit log)

pub mod api;
pub mod client;
pub mod service;
pub mod webhook;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::authz::RequestView;
use crate::config::schema::{ApprovalRuleConfig, RouteConfig};
use crate::identity::Identity;

pub use service::{ApprovalError, Approvals};

/// The request header carrying a justification for the approver.
pub const JUSTIFICATION_HEADER: &str = "x-portcullis-justification";
/// The response header carrying the approval id of a refused request.
pub const APPROVAL_ID_HEADER: &str = "x-portcullis-approval-id";
/// Internal pseudo-header (set by `grpc` only, from the body Envoy sent) with the hex
/// SHA-256 of the request body.
pub const BODY_SHA256_HEADER: &str = ":portcullis-body-sha256";
/// Envoy's mark on a Check whose body it cut at `max_request_bytes`
/// (`with_request_body.allow_partial_message: true`): `true` when the body is partial.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";
/// Longest justification kept (characters).
const MAX_JUSTIFICATION: usize = 500;

/// One rule's approval requirement, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalPolicy {
    pub route: Arc<str>,
    pub rule: Arc<str>,
    pub approver_roles: Vec<String>,
    pub approver_subjects: Vec<String>,
    /// Issuer names whose tokens the roles and unqualified subjects count for (`approvers.
    /// issuers`, else the rule's `issuers`); empty: any issuer.
    pub approver_issuers: Vec<String>,
    pub ttl: Duration,
    pub uses: u32,
    pub pre_approve: Vec<PreApproval>,
}

/// An automatic approval: role or subject, inside an optional time window (Unix seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct PreApproval {
    pub roles: Vec<String>,
    pub subjects: Vec<String>,
    pub from: Option<i64>,
    pub until: Option<i64>,
    /// `invalid` when a bound did not parse: such a pre-approval never holds (fail closed).
    pub invalid: bool,
}

/// Approval policies by (route id, rule id).
pub type Policies = HashMap<(String, String), Arc<ApprovalPolicy>>;

/// Compiles every rule's `approval:` of a config file.
pub fn compile(routes: &[RouteConfig]) -> Policies {
    let mut out = HashMap::new();
    for route in routes {
        for rule in &route.rules {
            if let Some(a) = &rule.approval {
                let mut p = policy(&route.id, &rule.id, a);
                if p.approver_issuers.is_empty() {
                    p.approver_issuers = rule.issuers.clone();
                }
                out.insert((route.id.clone(), rule.id.clone()), Arc::new(p));
            }
        }
    }
    out
}

fn policy(route: &str, rule: &str, a: &ApprovalRuleConfig) -> ApprovalPolicy {
    let parse = |v: &Option<String>| -> Result<Option<i64>, ()> {
        match v {
            None => Ok(None),
            Some(t) => crate::config::parse_bound(t).map(Some).ok_or(()),
        }
    };
    ApprovalPolicy {
        route: Arc::from(route),
        rule: Arc::from(rule),
        approver_roles: a.approvers.roles.clone(),
        approver_subjects: a.approvers.subjects.clone(),
        approver_issuers: a.approvers.issuers.clone(),
        ttl: a.ttl.get(),
        uses: a.uses.max(1),
        pre_approve: a
            .pre_approve
            .iter()
            .map(|p| {
                let (from, until) = (parse(&p.from), parse(&p.until));
                PreApproval {
                    roles: p.roles.clone(),
                    subjects: p.subjects.clone(),
                    invalid: from.is_err() || until.is_err(),
                    from: from.unwrap_or(None),
                    until: until.unwrap_or(None),
                }
            })
            .collect(),
    }
}

/// True when `subject` (a config entry: `sub` from any issuer, or `issuer-name:sub`) names
/// this identity. An entry with `:` is always issuer-qualified (config checks the prefix
/// names an issuer): `corp:carol` is never another issuer's subject `corp:carol`.
fn names(entry: &str, identity: &Identity) -> bool {
    if identity.subject.is_empty() {
        return false;
    }
    match entry.split_once(':') {
        Some((iss, sub)) => iss == &*identity.issuer_name && sub == identity.subject,
        None => entry == identity.subject,
    }
}

impl ApprovalPolicy {
    /// May `who` approve requests under this policy (their own excepted, see `is_self`)?
    pub fn is_approver(&self, who: &Identity) -> bool {
        // Roles and bare subjects are claims of the approver's issuer: only the issuers
        // trusted for approvers say them. `issuer-name:sub` entries name their issuer.
        let trusted = self.approver_issuers.is_empty()
            || self
                .approver_issuers
                .iter()
                .any(|i| i.as_str() == &*who.issuer_name);
        let by_claims = trusted
            && (who.roles.iter().any(|r| self.approver_roles.contains(r))
                || (self.approver_subjects.iter()).any(|s| !s.contains(':') && names(s, who)));
        let by_name = (self.approver_subjects.iter()).any(|s| s.contains(':') && names(s, who));
        !who.subject.is_empty() && (by_claims || by_name)
    }

    /// The index of the first pre-approval that holds for `who` at `now`.
    pub fn pre_approved(&self, who: &Identity, now: i64) -> Option<usize> {
        self.pre_approve.iter().position(|p| {
            !p.invalid
                && p.from.is_none_or(|f| now >= f)
                && p.until.is_none_or(|u| now < u)
                && (who.roles.iter().any(|r| p.roles.contains(r))
                    || p.subjects.iter().any(|s| names(s, who)))
        })
    }

    /// A short description of who approves, for deny details.
    pub fn approvers_text(&self) -> String {
        let mut parts: Vec<String> = self
            .approver_roles
            .iter()
            .map(|r| format!("role `{r}`"))
            .collect();
        parts.extend(self.approver_subjects.iter().map(|s| format!("`{s}`")));
        let text = parts.join(" or ");
        match self.approver_issuers.as_slice() {
            [] => text,
            issuers => format!(
                "{text} (of issuer {})",
                issuers
                    .iter()
                    .map(|i| format!("`{i}`"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        }
    }
}

/// Is `approver` the requester of `record`? Same issuer (`iss`) and same `sub`.
pub fn is_self(record: &Record, approver: &Identity) -> bool {
    record.issuer == approver.issuer && record.subject == approver.subject
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    Pending,
    Approved,
    Rejected,
    PreApproved,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Rejected => "rejected",
            ApprovalState::PreApproved => "pre_approved",
        }
    }
}

/// One request for approval, as stored (JSON) and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub state: ApprovalState,
    pub fingerprint: String,
    pub issuer_name: String,
    /// `iss`.
    pub issuer: String,
    pub subject: String,
    pub method: String,
    /// Normalized host (lower-case, no port, no trailing dot).
    pub host: String,
    /// The path without its query string (the fingerprint covers the query too).
    pub path: String,
    #[serde(default)]
    pub body_sha256: Option<String>,
    /// The query's parameter names, values hidden (`query_shape`), when it has a query.
    #[serde(default)]
    pub query: Option<String>,
    /// Hex SHA-256 of the query string as sent (after `?`), when it has one.
    #[serde(default)]
    pub query_sha256: Option<String>,
    #[serde(default)]
    pub justification: Option<String>,
    pub route: String,
    pub rule: String,
    pub requested_at: i64,
    /// A pending request expires then.
    pub expires_at: i64,
    #[serde(default)]
    pub decided_by: Option<String>,
    #[serde(default)]
    pub decided_at: Option<i64>,
    #[serde(default)]
    pub reason: Option<String>,
    pub uses: u32,
    /// An approval stops granting then; a pre-approval's window ends then (`None`: no end).
    #[serde(default)]
    pub grant_expires_at: Option<i64>,
}

impl Record {
    /// The requester's token's `iss` claim; `None` for an API key (its record carries the
    /// issuer name `api-key` in place of a claim).
    pub fn token_iss(&self) -> Option<&str> {
        (self.issuer_name != crate::identity::apikey::API_KEY_ISSUER)
            .then_some(self.issuer.as_str())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Option<Record> {
        serde_json::from_str(text).ok()
    }
}

/// The action a request asks for, as a fingerprint: SHA-256 over the requester (issuer name
/// and subject), the route and rule whose approval it needs, method, normalized host, full
/// path (query included, so an approval for `?force=false` never covers `?force=true`) and
/// the body hash when there is one. Fields are length-prefixed so no two different actions
/// share an input.
///
/// The route and rule are part of it because each rule has its own approvers: the same
/// request granted by another rule (the caller's token changed) is another request, so an
/// approval by one rule's approvers never satisfies another rule's approval.
pub fn fingerprint(
    identity: &Identity,
    policy: &ApprovalPolicy,
    req: &RequestView<'_>,
    body_sha256: Option<&str>,
) -> String {
    let host = normal_host(req.host);
    let mut input = Vec::with_capacity(256);
    for field in [
        &*identity.issuer_name,
        identity.subject.as_str(),
        &*policy.route,
        &*policy.rule,
        req.method,
        host.as_str(),
        req.path,
        body_sha256.unwrap_or(""),
    ] {
        input.extend_from_slice(&(field.len() as u64).to_be_bytes());
        input.extend_from_slice(field.as_bytes());
    }
    sha256_hex(&input)
}

/// The host as routes match it: lower-case, without port or trailing dot.
pub fn normal_host(host: &str) -> String {
    crate::authz::policy::normalize_host(host).to_ascii_lowercase()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    hex(digest.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A fresh, unguessable approval id: 128 random bits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // The system RNG failing is exceptional; uuid's v4 draws from the OS RNG as well.
        bytes = *uuid::Uuid::new_v4().as_bytes();
    }
    format!("apr_{}", hex(&bytes))
}

/// True for ids `new_id` could have made: keeps arbitrary text out of state-store keys.
pub fn valid_id(id: &str) -> bool {
    id.strip_prefix("apr_")
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether a character of client-written text (a justification, a rejection reason) is
/// shown to approvers as it is: not a control character, not a bidirectional override or
/// isolate (U+202A-202E, U+2066-2069, the marks U+200E, U+200F, U+061C: they reorder what
/// the CLI listing or a chat webhook shows), not a line or paragraph separator.
pub fn displayable(c: char) -> bool {
    !c.is_control()
        && !matches!(
            c,
            '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{061C}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

/// `text` from a token or a request (a `sub`, an approver's `issuer:sub`, a host) as approvers
/// are shown it: as it is when every character is `displayable` and it neither starts nor
/// ends with a space; else quoted, with `"`, `\` and each character that is not displayable
/// escaped (`\u{202e}`). A `sub` holding a newline could otherwise print a made-up request
/// line in `approvals list` or the webhook's summary, a bidirectional override reorder it,
/// and `"alice "` would read as `alice`. Nothing is dropped: the oddity stays visible.
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    let plain = text.chars().all(displayable)
        && !text.starts_with(char::is_whitespace)
        && !text.ends_with(char::is_whitespace);
    if plain {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if displayable(c) => out.push(c),
            c => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
        }
    }
    out.push('"');
    std::borrow::Cow::Owned(out)
}

/// The client's justification: trimmed, characters that are not `displayable` dropped, at
/// most 500 characters.
pub fn justification(req: &RequestView<'_>) -> Option<String> {
    let text: String = req
        .header(JUSTIFICATION_HEADER)?
        .chars()
        .filter(|&c| displayable(c))
        .take(MAX_JUSTIFICATION)
        .collect();
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// What records keep of a path shown to approvers: at most this many bytes. A record holds
/// one per request, and `approvals list` sends them all in one answer: one caller's requests
/// with 300 KB paths made that answer too large for the client, for every approver.
pub const DISPLAY_PATH_MAX: usize = 2048;

/// The path without query or fragment (queries may carry secrets), cut at
/// `DISPLAY_PATH_MAX` bytes with a note of its full length (the fingerprint still covers it
/// all, so an approval is for exactly the request made).
pub fn display_path(path: &str) -> std::borrow::Cow<'_, str> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path.len() <= DISPLAY_PATH_MAX {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut cut = DISPLAY_PATH_MAX;
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}… (cut: {} bytes in all)",
        &path[..cut],
        path.len()
    ))
}

/// The query string of a path (after `?`, before any `#`), when it has one.
pub fn query_of(path: &str) -> Option<&str> {
    let (_, query) = path.split_once('?')?;
    let query = query.split('#').next().unwrap_or_default();
    (!query.is_empty()).then_some(query)
}

/// What approvers are shown of a query: the parameter names with their values hidden
/// (values may carry secrets), e.g. `force=…&db=…`, characters that are not `displayable`
/// dropped, at most 500 characters. The fingerprint covers the whole query; its SHA-256
/// (`query_sha256`) lets an approver check the values a requester states.
///
/// Only a plain name is shown. A parameter without `=` is all value as far as the shape can
/// tell (`?SECRET`, a bare token), so it is `…` whole; a percent-encoded `=` (`%3D`, any
/// case) separates like `=`, and a name that still holds a `%` (it may encode anything) or a
/// `;` (a separator to some servers) is `…` too.
pub fn query_shape(query: &str) -> String {
    let shape = query
        .split('&')
        .map(|item| {
            if item.is_empty() {
                return String::new();
            }
            let Some((name, sep)) = query_separator(item) else {
                return "…".to_string();
            };
            if name.contains(['%', ';']) {
                format!("…{sep}…")
            } else {
                format!("{name}{sep}…")
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    shape
        .chars()
        .filter(|&c| displayable(c))
        .take(MAX_JUSTIFICATION)
        .collect()
}

/// The name before the first `=` or `%3D` (any case) of a query item, and that separator.
fn query_separator(item: &str) -> Option<(&str, &str)> {
    let plain = item.find('=');
    let encoded = item.to_ascii_lowercase().find("%3d");
    match (plain, encoded) {
        (Some(p), Some(e)) if e < p => Some((&item[..e], &item[e..e + 3])),
        (Some(p), _) => Some((&item[..p], "=")),
        (None, Some(e)) => Some((&item[..e], &item[e..e + 3])),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests;
