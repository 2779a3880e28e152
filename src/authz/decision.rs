//! What a decision is: outcome, HTTP status, a stable reason code, a human detail, and the
//! route and rule that decided. A deny is a value, never an error.

use std::borrow::Cow;
use std::sync::Arc;

use crate::identity::Identity;

/// Stable, machine-readable reason codes. They appear in responses, audit events and metrics,
/// so never rename one; add new ones instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// Allowed by a rule.
    Allowed,
    /// Allowed because the route is public.
    Public,
    /// The path is ambiguous (encoded slash, dot segment, `;`, `//`, backslash, ...).
    PathRejected,
    /// No route matches host + method + path: denied by default.
    NoRoute,
    /// A route needs identity and the request carries no credential.
    CredentialMissing,
    /// More than one credential in one request.
    MultipleCredentials,
    /// The credential is malformed, badly signed, expired, or otherwise invalid.
    InvalidToken,
    /// The token names an issuer Portcullis does not trust (or one not allowed where it was sent).
    UnknownIssuer,
    /// The issuer's keys are unavailable (never fetched, or stale beyond `max_stale`).
    KeysUnavailable,
    /// Valid identity, but no rule of the route grants the request.
    InsufficientScope,
    /// A resource binding failed (`{user}` is not the caller).
    ResourceMismatch,
    /// Portcullis itself failed; fail closed.
    Internal,
    /// The credential was revoked (`jti`, `sid` or `sub` on the revocation list).
    Revoked,
    /// A DPoP proof is missing, invalid or replayed (RFC 9449).
    InvalidDpopProof,
    /// A DPoP proof lacks a current server-provided nonce; the answer carries one
    /// (`DPoP-Nonce`) to retry with (RFC 9449 section 9).
    UseDpopNonce,
    /// A context condition failed: source network, time window, session age, posture.
    ContextDenied,
    /// Over a rate limit or quota.
    RateLimited,
    /// The action needs a just-in-time approval that has not been granted (or was used up).
    ApprovalRequired,
    /// Shared state (e.g. Redis) is unreachable and this decision needs it: fail closed.
    StateUnavailable,
    /// The audit log is stuck and the decision could not be recorded: fail closed.
    AuditUnavailable,
    /// The request carries more headers than Portcullis reads (`grpc::wire::MAX_REQUEST_HEADERS`).
    RequestHeadersTooLarge,
}

impl ReasonCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Allowed => "allowed",
            ReasonCode::Public => "public_route",
            ReasonCode::PathRejected => "path_rejected",
            ReasonCode::NoRoute => "no_matching_route",
            ReasonCode::CredentialMissing => "credential_missing",
            ReasonCode::MultipleCredentials => "multiple_credentials",
            ReasonCode::InvalidToken => "invalid_token",
            ReasonCode::UnknownIssuer => "unknown_issuer",
            ReasonCode::KeysUnavailable => "keys_unavailable",
            ReasonCode::InsufficientScope => "insufficient_scope",
            ReasonCode::ResourceMismatch => "resource_mismatch",
            ReasonCode::Internal => "internal_error",
            ReasonCode::Revoked => "revoked",
            ReasonCode::InvalidDpopProof => "invalid_dpop_proof",
            ReasonCode::UseDpopNonce => "use_dpop_nonce",
            ReasonCode::ContextDenied => "context_denied",
            ReasonCode::RateLimited => "rate_limited",
            ReasonCode::ApprovalRequired => "approval_required",
            ReasonCode::StateUnavailable => "state_unavailable",
            ReasonCode::AuditUnavailable => "audit_unavailable",
            ReasonCode::RequestHeadersTooLarge => "request_header_fields_too_large",
        }
    }

    /// The HTTP status a deny with this reason carries.
    pub const fn http_status(self) -> u16 {
        match self {
            ReasonCode::Allowed | ReasonCode::Public => 200,
            ReasonCode::CredentialMissing
            | ReasonCode::MultipleCredentials
            | ReasonCode::InvalidToken
            | ReasonCode::UnknownIssuer
            | ReasonCode::KeysUnavailable
            | ReasonCode::Revoked
            | ReasonCode::InvalidDpopProof
            | ReasonCode::UseDpopNonce => 401,
            ReasonCode::PathRejected
            | ReasonCode::NoRoute
            | ReasonCode::InsufficientScope
            | ReasonCode::ResourceMismatch
            | ReasonCode::ContextDenied
            | ReasonCode::ApprovalRequired => 403,
            ReasonCode::RateLimited => 429,
            ReasonCode::RequestHeadersTooLarge => 431,
            // Temporary and not the client's fault; never an allow.
            ReasonCode::StateUnavailable | ReasonCode::AuditUnavailable => 503,
            // Internal failures are still a deny, never an allow; 403 keeps Envoy from retrying
            // a request the client cannot fix either way, and never leaks what broke.
            ReasonCode::Internal => 403,
        }
    }

    pub const fn is_allow(self) -> bool {
        matches!(self, ReasonCode::Allowed | ReasonCode::Public)
    }
}

/// The result of deciding one request.
#[derive(Debug, Clone)]
pub struct Decision {
    pub code: ReasonCode,
    /// Human-readable explanation, safe to show the client (never contains a secret).
    pub detail: Cow<'static, str>,
    /// The route that matched, if any.
    pub route: Option<Arc<str>>,
    /// The rule that allowed, or the rule that came closest for a deny.
    pub rule: Option<Arc<str>>,
    /// The verified identity, when one was established.
    pub identity: Option<Arc<Identity>>,
    /// Extra headers for the client's response. On a deny: e.g. `retry-after`, `ratelimit`,
    /// an approval id, a DPoP challenge. On an allow: the `ratelimit` / `ratelimit-policy`
    /// quota left (Envoy adds them to the upstream's response). Lower-case names.
    pub response_headers: Vec<(Cow<'static, str>, String)>,
    /// Extra members of the JSON deny body (e.g. `approval_id`). Rarely set: a boxed slice
    /// keeps `Decision` (the `Err` of every decision step) small.
    pub body_fields: Box<[(&'static str, String)]>,
    /// What the `dry_run` routes would have answered, when configured. Reported, never
    /// enforced.
    pub dry_run: Option<Box<DryRun>>,
}

/// A decision of the `dry_run` routes: the grant they would have given or refused.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub code: ReasonCode,
    pub detail: Cow<'static, str>,
    pub route: Option<Arc<str>>,
    pub rule: Option<Arc<str>>,
    /// The caller the candidate established: the live decision's, or, where the live route
    /// never read the credential (public or absent), the one checked for the candidate.
    pub identity: Option<Arc<Identity>>,
}

/// Equal when they answer alike, to the same caller (issuer, subject, API key).
impl PartialEq for DryRun {
    fn eq(&self, other: &Self) -> bool {
        let caller = |d: &Self| {
            d.identity.as_deref().map(|i| {
                (
                    i.issuer.clone(),
                    i.subject.clone(),
                    i.api_key_id().map(str::to_owned),
                )
            })
        };
        (self.code, &self.detail, &self.route, &self.rule)
            == (other.code, &other.detail, &other.route, &other.rule)
            && caller(self) == caller(other)
    }
}

impl Eq for DryRun {}

impl DryRun {
    pub fn of(d: Decision) -> Self {
        Self {
            code: d.code,
            detail: d.detail,
            route: d.route,
            rule: d.rule,
            identity: d.identity,
        }
    }

    pub fn is_allow(&self) -> bool {
        self.code.is_allow()
    }
}

impl Decision {
    pub fn new(code: ReasonCode, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            detail: detail.into(),
            route: None,
            rule: None,
            identity: None,
            response_headers: Vec::new(),
            body_fields: Box::default(),
            dry_run: None,
        }
    }

    /// Attaches what the `dry_run` routes would have answered.
    pub fn with_dry_run(mut self, would: Decision) -> Self {
        self.dry_run = Some(Box::new(DryRun::of(would)));
        self
    }

    /// Adds a header to the client's response (see `response_headers`).
    pub fn with_header(mut self, name: impl Into<Cow<'static, str>>, value: String) -> Self {
        self.response_headers.push((name.into(), value));
        self
    }

    /// Adds a member to the JSON deny body.
    pub fn with_body_field(mut self, name: &'static str, value: String) -> Self {
        let mut fields = std::mem::take(&mut self.body_fields).into_vec();
        fields.push((name, value));
        self.body_fields = fields.into_boxed_slice();
        self
    }

    pub fn with_route(mut self, route: Option<Arc<str>>) -> Self {
        self.route = route;
        self
    }

    pub fn with_rule(mut self, rule: Option<Arc<str>>) -> Self {
        self.rule = rule;
        self
    }

    pub fn with_identity(mut self, identity: Option<Arc<Identity>>) -> Self {
        self.identity = identity;
        self
    }

    pub fn is_allow(&self) -> bool {
        self.code.is_allow()
    }

    /// A 429 from a configured rate limit (its answer names the limit, `rate_limit`), not
    /// from the approvals' cap on new requests.
    pub fn is_configured_rate_limit(&self) -> bool {
        self.code == ReasonCode::RateLimited
            && self.body_fields.iter().any(|(n, _)| *n == "rate_limit")
    }

    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }
}

/// Text made safe for an RFC 6750 / RFC 9449 `error_description`, which allows only
/// %x20-21 / %x23-5B / %x5D-7E: quotes and backslashes become `'`, anything else `?`.
pub fn challenge_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

/// The `realm` of every challenge.
pub const REALM: &str = "portcullis";

/// The challenge of a 401 for an API key (RFC 7235 allows any scheme; RFC 6750's Bearer
/// would tell the client to fetch a token it never used).
pub fn api_key_challenge(detail: &str) -> String {
    api_key_challenge_with("invalid_key", detail)
}

/// The `ApiKey` challenge with `error` (`invalid_key` on a 401, `insufficient_scope` on a
/// 403 for a key outside its grants, as RFC 6750 says it for a Bearer token).
pub fn api_key_challenge_with(error: &str, detail: &str) -> String {
    format!(
        "ApiKey realm=\"{REALM}\", error=\"{error}\", error_description=\"{}\"",
        challenge_text(detail)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_text_never_breaks_out_of_the_quoted_string() {
        assert_eq!(challenge_text(r#"a "b" \c"#), "a 'b' 'c");
        assert_eq!(challenge_text("tab\there\nnl é"), "tab?here?nl ?");
        assert_eq!(
            challenge_text("missing scope `orders:write`"),
            "missing scope `orders:write`"
        );
    }

    #[test]
    fn every_deny_code_has_an_error_status() {
        use ReasonCode::*;
        for code in [
            PathRejected,
            NoRoute,
            CredentialMissing,
            MultipleCredentials,
            InvalidToken,
            UnknownIssuer,
            KeysUnavailable,
            InsufficientScope,
            ResourceMismatch,
            Internal,
            Revoked,
            InvalidDpopProof,
            UseDpopNonce,
            ContextDenied,
            RateLimited,
            ApprovalRequired,
            StateUnavailable,
            AuditUnavailable,
        ] {
            assert!(!code.is_allow(), "{code:?}");
            assert!(code.http_status() >= 400, "{code:?}");
        }
        assert!(Allowed.is_allow() && Public.is_allow());
    }
}
