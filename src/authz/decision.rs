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
            | ReasonCode::KeysUnavailable => 401,
            ReasonCode::PathRejected
            | ReasonCode::NoRoute
            | ReasonCode::InsufficientScope
            | ReasonCode::ResourceMismatch => 403,
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
}

impl Decision {
    pub fn new(code: ReasonCode, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            detail: detail.into(),
            route: None,
            rule: None,
            identity: None,
        }
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

    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }
}
