//! The whole decision for one request, as a pure function of (config, request, key sets, now).
//!
//! Steps, each usable alone so the shell (`engine`) can put its token cache between them:
//! 1. `match_route`: path hygiene and route matching (deny by default).
//! 2. `extract_credential`: exactly one credential, from a configured header.
//! 3. `verify_credential`: pick the issuer by `iss`, verify against its keys.
//! 4. `authorize`: an API key's own endpoint list, then `Policy::authorize` (the route's
//!    rules against the identity).
//!
//! No I/O, no clock, no async. Keys are looked up through a closure so callers decide where
//! they come from (the live `KeyStore`, or fixed sets in tests).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use crate::authz::{Decision, Policy, ReasonCode, RequestView, RouteMatch};
use crate::config::{CompiledIssuer, Config};
use crate::identity::apikey::ApiKeyError;
use crate::identity::dpop::{self, DpopError, DpopMode, ProofRequest};
use crate::identity::{Identity, KeySet, jwt};
use crate::keys::KeyError;

/// Query parameters that carry bearer tokens (RFC 6750 section 2.3). Never accepted: URLs end
/// up in logs and browser history. Their presence next to a header is "several credentials".
const QUERY_TOKEN_PARAMS: &[&str] = &["access_token"];

/// Query parameters that carry API keys, compared after lower-casing and folding `_` into
/// `-` (so `API_KEY`, `api-key` and `Api_Key` are one name). Never accepted, for the same
/// reason; the configured key header's name is refused as a parameter too.
const QUERY_API_KEY_PARAMS: &[&str] = &["api-key", "apikey", "x-api-key"];

/// The credential found in a request, with the issuers that may have sent it.
#[derive(Debug)]
pub struct Credential<'r> {
    pub token: &'r str,
    /// The header it was found in (lower-case).
    pub header: &'r str,
    /// Sent with the `DPoP` scheme (RFC 9449) rather than the issuer's own (`Bearer`).
    pub dpop: bool,
}

/// Seconds a DPoP replay record outlives the proof's acceptance window: the whole-second
/// `iat` check and some clock difference between replicas.
const DPOP_REPLAY_MARGIN_SECS: u64 = 5;

/// The DPoP authorization scheme.
pub const DPOP_SCHEME: &str = "DPoP";

/// The request header carrying a DPoP proof (lower-case, as Envoy forwards it).
pub const DPOP_HEADER: &str = "dpop";
/// The response header that hands a client a DPoP nonce (RFC 9449 section 9).
pub const DPOP_NONCE_HEADER: &str = "dpop-nonce";

/// Decides a request without a token cache, revocation lists, rate limits or approvals
/// (the engine's). Used by the corpus and as the reference the cached path in `engine` must
/// agree with; `explain` goes through the engine (`Engine::offline`).
pub fn decide(
    config: &Config,
    req: &RequestView<'_>,
    keys: &dyn Fn(&str) -> Result<Arc<KeySet>, KeyError>,
    now: i64,
) -> Decision {
    let live = decide_live(config, req, keys, now);
    match &config.dry_run {
        Some(candidate) => {
            let caller = || verified_caller(config, req, keys, now);
            live.with_dry_run(dry_run(config, candidate, req, now, caller))
        }
        None => live,
    }
}

/// The caller as the credential checks leave it: verified (token or API key, then its
/// bindings), or the deny that refused its credential.
pub type Caller = Result<Arc<Identity>, Decision>;

/// The caller of `req`, checked as `decide` checks it (the pure part of the bindings).
fn verified_caller(
    config: &Config,
    req: &RequestView<'_>,
    keys: &dyn Fn(&str) -> Result<Arc<KeySet>, KeyError>,
    now: i64,
) -> Caller {
    let cred = extract_credential(config, req)?;
    let identity = verify_credential(config, &cred, keys, now)?;
    binding_checks(config, req, &cred, &identity, now)?;
    Ok(identity)
}

/// What the `dry_run` candidate policy would answer `req`: its route, then, only when that
/// route is protected, the caller (asked of `caller`) and the same grant steps as the live
/// policy (an API key's endpoints, rules, peer grants, context conditions). Rate limits and
/// approvals are not tried: they change shared state.
pub fn dry_run(
    config: &Config,
    candidate: &Policy,
    req: &RequestView<'_>,
    now: i64,
    caller: impl FnOnce() -> Caller,
) -> Decision {
    let m = match candidate.match_route(req) {
        Ok(m) => m,
        Err(deny) => return deny,
    };
    if m.public {
        return public_allow(&m);
    }
    let principals = req.principals();
    match caller() {
        Ok(identity) => authorize(config, candidate, req, &m, &identity, &principals, now),
        Err(deny) => peer_grant(config, candidate, req, &m, deny, &principals, now)
            .with_route(Some(m.route_id.clone())),
    }
}

/// `decide` with the live routes only.
fn decide_live(
    config: &Config,
    req: &RequestView<'_>,
    keys: &dyn Fn(&str) -> Result<Arc<KeySet>, KeyError>,
    now: i64,
) -> Decision {
    let m = match config.policy.match_route(req) {
        Ok(m) => m,
        Err(deny) => return deny,
    };
    if m.public {
        return public_allow(&m);
    }
    let route = Some(m.route_id.clone());
    let principals = req.principals();
    let cred = match extract_credential(config, req) {
        Ok(c) => c,
        Err(deny) => {
            return peer_grant(config, &config.policy, req, &m, deny, &principals, now)
                .with_route(route);
        }
    };
    let identity = match verify_credential(config, &cred, keys, now) {
        Ok(id) => id,
        Err(deny) => return deny.with_route(route),
    };
    // The pure part of the binding checks; single use of a DPoP `jti` needs shared state
    // and is the engine's (this reference path accepts a replay).
    let next_nonce = match binding_checks(config, req, &cred, &identity, now) {
        Ok(guard) => guard.and_then(|g| g.next_nonce),
        Err(deny) => return deny.with_route(route).with_identity(Some(identity)),
    };
    let decision = authorize(config, &config.policy, req, &m, &identity, &principals, now);
    match next_nonce {
        Some(nonce) => decision.with_header(DPOP_NONCE_HEADER, nonce),
        None => decision,
    }
}

/// The grant step: an API key must list the endpoint, then a rule of the route must hold,
/// with its peer principals and context conditions (source network, session age, time
/// window, posture).
pub fn authorize(
    config: &Config,
    policy: &Policy,
    req: &RequestView<'_>,
    m: &RouteMatch<'_>,
    identity: &Arc<Identity>,
    principals: &[&str],
    now: i64,
) -> Decision {
    if let Err(deny) = api_key_endpoint(config, req, identity) {
        return deny
            .with_route(Some(m.route_id.clone()))
            .with_identity(Some(identity.clone()));
    }
    let ctx = crate::authz::Context::of(req, now, config.file.network.trusted_proxy_hops);
    policy.authorize_peer(m, Some(identity), principals, &ctx)
}

/// For an API-key identity: the key's own `routes` must cover the request's method and path.
/// Other identities pass.
pub fn api_key_endpoint(
    config: &Config,
    req: &RequestView<'_>,
    identity: &Identity,
) -> Result<(), Decision> {
    let Some(id) = identity.api_key_id() else {
        return Ok(());
    };
    let key = config.api_keys.as_ref().and_then(|k| k.get(id));
    // The path already passed hygiene in `match_route`; a failure here fails closed.
    let segs = crate::authz::path::clean(req.path).ok();
    match (key, segs) {
        (Some(key), Some(segs)) if key.allows(req.method, &segs) => Ok(()),
        _ => Err(Decision::new(
            ReasonCode::InsufficientScope,
            format!("API key `{id}` is not valid for this endpoint"),
        )),
    }
}

/// A request without a credential may still be granted by a service grant (a rule with
/// only `principals`) matching its peer identity. Anything else keeps the original deny,
/// except on a route of service grants only, whose answer is the grant's own 403.
pub fn peer_grant(
    config: &Config,
    policy: &Policy,
    req: &RequestView<'_>,
    m: &RouteMatch<'_>,
    deny: Decision,
    principals: &[&str],
    now: i64,
) -> Decision {
    // INVARIANT: only a missing credential falls back to the peer identity. A malformed,
    // doubled or unverifiable credential is a deny even when the peer would be granted.
    if deny.code != ReasonCode::CredentialMissing || !policy.route_has_peer_rules(m) {
        return deny;
    }
    let ctx = crate::authz::Context::of(req, now, config.file.network.trusted_proxy_hops);
    let granted = policy.authorize_peer(m, None, principals, &ctx);
    if granted.is_allow() || policy.route_is_peer_only(m) {
        granted
    } else {
        deny
    }
}

/// A DPoP proof to record as used: its key in shared state and how long to keep it.
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    pub key: String,
    pub ttl: Duration,
    /// The deny when the key was already present.
    pub replayed: Decision,
    /// A newer DPoP nonce for the client (the `DPoP-Nonce` header of the answer), when the
    /// one its proof carried is about to expire.
    pub next_nonce: Option<String>,
}

/// Checks that tie a verified token to the request carrying it: certificate binding
/// (RFC 8705 `cnf.x5t#S256`) and DPoP (RFC 9449: scheme, proof, `cnf.jkt`). Pure; returns
/// the proof's replay guard for the caller to enforce with shared state.
pub fn binding_checks(
    config: &Config,
    req: &RequestView<'_>,
    cred: &Credential<'_>,
    identity: &Identity,
    now: i64,
) -> Result<Option<ReplayGuard>, Decision> {
    // API keys are not tokens: there is nothing to bind, and no issuer to look up.
    if identity.api_key_id().is_some() {
        return Ok(None);
    }
    let Some(issuer) = config
        .issuers
        .iter()
        .find(|i| i.name == identity.issuer_name)
    else {
        return Err(Decision::new(
            ReasonCode::Internal,
            "the verifying issuer is not part of this configuration",
        ));
    };
    let cnf = confirmation(identity)?;
    cert_binding(issuer, req, cnf)?;
    dpop_binding(issuer, req, cred, cnf, now)
}

/// The token's `cnf` claim (RFC 7800), read once for both bindings. It says the token needs
/// proof of possession: one this server cannot check (`jwk`, `kid`, `jku`, a SHA-1 `x5t`,
/// ...) refuses the token rather than letting it pass as a plain bearer token.
pub fn confirmation(
    identity: &Identity,
) -> Result<Option<&serde_json::Map<String, Value>>, Decision> {
    let Some(cnf) = identity.claims.get("cnf") else {
        return Ok(None);
    };
    match cnf.as_object() {
        // An empty `cnf` names no confirmation method (RFC 7800 requires one): a token
        // that claims a binding it does not describe is refused, not taken as a bearer one.
        Some(c) if !c.is_empty() && c.keys().all(|k| k == "jkt" || k == "x5t#S256") => Ok(Some(c)),
        _ => Err(Decision::new(
            ReasonCode::InvalidToken,
            "the token's `cnf` asks for a proof of possession this server cannot check \
             (only `jkt` and `x5t#S256`)",
        )),
    }
}

fn cert_binding(
    issuer: &CompiledIssuer,
    req: &RequestView<'_>,
    cnf: Option<&serde_json::Map<String, Value>>,
) -> Result<(), Decision> {
    let invalid = |detail: &'static str| Decision::new(ReasonCode::InvalidToken, detail);
    // A token that carries a certificate binding is always held to it, configured or not.
    match cnf.and_then(|c| c.get("x5t#S256")) {
        None if issuer.cert_bound => Err(invalid(
            "this issuer's tokens must be certificate-bound (`cnf.x5t#S256`)",
        )),
        None => Ok(()),
        Some(Value::String(bound)) => match req.peer_certificate {
            Some(cert) if constant_time_eq(cert.thumbprint_s256.as_bytes(), bound.as_bytes()) => {
                Ok(())
            }
            Some(_) => Err(invalid(
                "the token is bound to a different client certificate",
            )),
            None => Err(invalid(
                "the token is certificate-bound and the request has no client certificate",
            )),
        },
        Some(_) => Err(invalid("the token's `cnf.x5t#S256` is not a string")),
    }
}

fn dpop_binding(
    issuer: &CompiledIssuer,
    req: &RequestView<'_>,
    cred: &Credential<'_>,
    cnf: Option<&serde_json::Map<String, Value>>,
    now: i64,
) -> Result<Option<ReplayGuard>, Decision> {
    let jkt = cnf.and_then(|c| c.get("jkt"));
    if !cred.dpop {
        if jkt.is_some() && issuer.dpop.mode == DpopMode::Disabled {
            // No DPoP challenge: sent with the DPoP scheme it would be refused as well.
            return Err(Decision::new(
                ReasonCode::InvalidToken,
                "the token is DPoP-bound (`cnf.jkt`) and this issuer does not accept DPoP \
                 (`dpop: disabled`), so it cannot be used here",
            ));
        }
        if jkt.is_some() {
            return Err(dpop_deny(
                issuer,
                ReasonCode::InvalidToken,
                "a DPoP-bound token must be sent with the DPoP scheme, not as a bearer token",
            ));
        }
        if issuer.dpop.mode == DpopMode::Required {
            return Err(dpop_deny(
                issuer,
                ReasonCode::InvalidToken,
                "this issuer's tokens must be sent with DPoP",
            ));
        }
        return Ok(None);
    }
    if issuer.dpop.mode == DpopMode::Disabled {
        return Err(Decision::new(
            ReasonCode::InvalidToken,
            "this issuer does not accept the DPoP scheme",
        ));
    }
    let Some(Value::String(jkt)) = jkt else {
        return Err(dpop_deny(
            issuer,
            ReasonCode::InvalidToken,
            "the token is not DPoP-bound (no string `cnf.jkt`)",
        ));
    };
    let proof = match req.header(DPOP_HEADER) {
        None => Err(DpopError::Missing),
        // Repeated headers arrive joined with `,`, which a compact JWS never contains.
        Some(p) if p.contains(',') => Err(DpopError::Multiple),
        Some(p) => Ok(p.trim()),
    };
    let proof_req = ProofRequest {
        method: req.method,
        scheme: req.scheme,
        host: req.host,
        path: req.path,
    };
    let verified = proof
        .and_then(|p| dpop::verify_proof(p, cred.token, jkt, &issuer.dpop, &proof_req, now))
        .map_err(|e| match &issuer.dpop.nonce {
            Some(nonces) if e.wants_nonce() => {
                dpop_deny(issuer, ReasonCode::UseDpopNonce, e.to_string())
                    .with_header(DPOP_NONCE_HEADER, nonces.issue(now))
            }
            _ => invalid_proof(issuer, &e),
        })?;
    let jti_hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verified.jti.as_bytes());
    Ok(Some(ReplayGuard {
        key: format!(
            "dpop:jti:{}:{}:{}",
            issuer.name,
            verified.jkt,
            URL_SAFE_NO_PAD.encode(jti_hash.as_ref())
        ),
        // A proof is acceptable from `iat - window` to `iat + window`, checked in whole seconds
        // (up to 1 s late) on each replica's clock: the record outlives that by a margin.
        ttl: Duration::from_secs(
            issuer
                .dpop
                .window_secs
                .saturating_mul(2)
                .saturating_add(DPOP_REPLAY_MARGIN_SECS),
        ),
        replayed: invalid_proof(issuer, &DpopError::Replayed),
        next_nonce: verified.next_nonce,
    }))
}

/// An `invalid_dpop_proof` deny with its DPoP challenge.
pub fn invalid_proof(issuer: &CompiledIssuer, e: &DpopError) -> Decision {
    dpop_deny(issuer, ReasonCode::InvalidDpopProof, e.to_string())
}

/// A 401 carrying a `DPoP` challenge (RFC 9449 7.1) instead of the Bearer one.
fn dpop_deny(
    issuer: &CompiledIssuer,
    code: ReasonCode,
    detail: impl Into<std::borrow::Cow<'static, str>>,
) -> Decision {
    let d = Decision::new(code, detail);
    let error = match code {
        ReasonCode::InvalidDpopProof => "invalid_dpop_proof",
        ReasonCode::UseDpopNonce => "use_dpop_nonce",
        _ => "invalid_token",
    };
    let challenge = dpop_challenge(issuer, error, &d.detail);
    d.with_header("www-authenticate", challenge)
}

/// `issuer`'s DPoP proof algorithms as a challenge's `algs` names them (`ES256`).
fn dpop_alg_names(issuer: &CompiledIssuer) -> impl Iterator<Item = String> + '_ {
    issuer.dpop.algorithms.iter().map(|a| format!("{a:?}"))
}

/// The `DPoP` challenge (RFC 9449 7.1) with `issuer`'s proof algorithms.
fn dpop_challenge(issuer: &CompiledIssuer, error: &str, detail: &str) -> String {
    let algs: Vec<String> = dpop_alg_names(issuer).collect();
    format!(
        "DPoP algs=\"{}\", error=\"{error}\", error_description=\"{}\"",
        algs.join(" "),
        crate::authz::decision::challenge_text(detail)
    )
}

/// A deny of a request whose token came with the `DPoP` scheme, challenged in that scheme
/// (RFC 9449 7.1) rather than as `Bearer`, which the client did not use: an invalid or
/// expired token is `invalid_token`, a grant it lacks `insufficient_scope`. Denies that carry
/// their own challenge (a proof's, a binding's) keep it; others (429, 503) get none. The
/// algorithms are those of the verifying issuer, else of the first issuer taking DPoP on
/// the credential's header.
pub fn dpop_scheme_challenge(config: &Config, cred: &Credential<'_>, d: Decision) -> Decision {
    if !cred.dpop
        || d.is_allow()
        || d.response_headers
            .iter()
            .any(|(name, _)| name == "www-authenticate")
    {
        return d;
    }
    let error = match d.code {
        _ if d.http_status() == 401 => "invalid_token",
        ReasonCode::InsufficientScope | ReasonCode::ResourceMismatch => "insufficient_scope",
        _ => return d,
    };
    let verifying = d
        .identity
        .as_deref()
        .and_then(|id| config.issuers.iter().find(|i| i.name == id.issuer_name));
    let issuer = verifying
        .or_else(|| {
            config
                .issuers
                .iter()
                .find(|i| i.header == cred.header && i.dpop.mode != DpopMode::Disabled)
        })
        .filter(|i| i.dpop.mode != DpopMode::Disabled);
    let Some(issuer) = issuer else {
        return d;
    };
    let challenge = dpop_challenge(issuer, error, &d.detail);
    d.with_header("www-authenticate", challenge)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The allow decision for a public route.
pub fn public_allow(m: &RouteMatch<'_>) -> Decision {
    Decision::new(ReasonCode::Public, "route is public").with_route(Some(m.route_id.clone()))
}

/// Finds exactly one credential. None is `CredentialMissing`; several (repeated headers joined
/// with `,`, two configured headers, or a header plus a query token) is `MultipleCredentials`.
pub fn extract_credential<'r>(
    config: &Config,
    req: &RequestView<'r>,
) -> Result<Credential<'r>, Decision> {
    let mut found: Option<Credential<'r>> = None;
    let mut count = 0usize;
    // How many of them are API keys (header or query).
    let mut keys = 0usize;
    let mut scheme_mismatch = false;

    // Each distinct header once, even when several issuers share it.
    let mut seen: Vec<&str> = Vec::with_capacity(config.issuers.len());
    for issuer in &config.issuers {
        let name = issuer.header.as_str();
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let Some((header, value)) = req.headers.entry(name) else {
            continue;
        };
        if value.contains(',') {
            return Err(multiple());
        }
        count += 1;
        match strip_scheme(config, name, value) {
            Some((token, dpop)) => {
                found = Some(Credential {
                    token,
                    header,
                    dpop,
                })
            }
            None => scheme_mismatch = true,
        }
    }

    // The API key header counts as one more credential header.
    if let Some(ak) = &config.api_keys
        && let Some((header, value)) = req.headers.entry(ak.header.as_str())
    {
        if value.contains(',') {
            // Two keys and no token: the client uses API keys, so is answered as one.
            return Err(if count == 0 && !query_has_token(req.path) {
                with_api_key_challenge(multiple())
            } else {
                multiple()
            });
        }
        count += 1;
        keys += 1;
        found = Some(Credential {
            token: value.trim(),
            header,
            dpop: false,
        });
    }

    let query_token = query_has_token(req.path);
    if query_token {
        count += 1;
    }
    let query_key = config
        .api_keys
        .as_ref()
        .is_some_and(|ak| query_has_api_key(req.path, &ak.header));
    if query_key {
        count += 1;
        keys += 1;
    }
    if count > 1 {
        // Only API keys (in the header and the query): an `ApiKey` challenge.
        return Err(if count == keys {
            with_api_key_challenge(multiple())
        } else {
            multiple()
        });
    }
    if query_key {
        let header = config.api_keys.as_ref().map_or("", |ak| ak.header.as_str());
        return Err(with_api_key_challenge(Decision::new(
            ReasonCode::InvalidToken,
            format!(
                "API keys in the URL query are not accepted; send them in the `{header}` header"
            ),
        )));
    }
    if query_token {
        return Err(Decision::new(
            ReasonCode::InvalidToken,
            "access tokens in the URL query are not accepted; send them in the Authorization header",
        ));
    }
    if scheme_mismatch {
        return Err(Decision::new(
            ReasonCode::InvalidToken,
            "unsupported authorization scheme",
        ));
    }
    match found {
        Some(c) if c.token.is_empty() => {
            let d = Decision::new(ReasonCode::InvalidToken, "the credential is empty");
            let is_key = config
                .api_keys
                .as_ref()
                .is_some_and(|k| k.header == c.header);
            Err(if is_key { with_api_key_challenge(d) } else { d })
        }
        Some(c) => Ok(c),
        // Both schemes are offered, bare (RFC 6750 3.1: no error without a credential).
        None if config.api_keys.is_some() => Err(Decision::new(
            ReasonCode::CredentialMissing,
            "this route requires a bearer token or an API key",
        )
        .with_header(
            "www-authenticate",
            format!(
                "Bearer realm=\"{REALM}\", ApiKey realm=\"{REALM}\"",
                REALM = crate::authz::decision::REALM
            ),
        )),
        None => Err(Decision::new(
            ReasonCode::CredentialMissing,
            "this route requires a bearer token",
        )),
    }
}

/// The `credential_missing` deny for the route `m`, offering the schemes its rules take
/// (RFC 6750 3.1, RFC 9449 7.1: bare, no error code): `Bearer` for an issuer that takes
/// bearer tokens, `DPoP algs="..."` for one that takes DPoP (only that for `dpop: required`),
/// `ApiKey` where a rule takes keys. It was `Bearer`, plus `ApiKey` whenever keys were
/// configured, whatever the route took. Other denies, and a route whose rules take only
/// peer identities, keep theirs.
pub fn missing_credential(config: &Config, m: &RouteMatch<'_>, deny: Decision) -> Decision {
    if deny.code != ReasonCode::CredentialMissing {
        return deny;
    }
    let Some(route) = config.policy.routes().get(m.route_index) else {
        return deny;
    };
    let (mut bearer, mut keys) = (false, false);
    let mut dpop_algs: Vec<String> = Vec::new();
    for rule in &route.rules {
        if !rule.api_keys.is_empty() {
            keys = true;
            continue;
        }
        if rule.is_peer_only() {
            continue;
        }
        let taken = config
            .issuers
            .iter()
            .filter(|i| rule.issuers.is_empty() || rule.issuers.contains(&i.name));
        for issuer in taken {
            bearer |= issuer.dpop.mode != DpopMode::Required;
            if issuer.dpop.mode == DpopMode::Disabled {
                continue;
            }
            for alg in dpop_alg_names(issuer) {
                if !dpop_algs.contains(&alg) {
                    dpop_algs.push(alg);
                }
            }
        }
    }
    let realm = crate::authz::decision::REALM;
    let mut schemes = Vec::new();
    if bearer {
        schemes.push(format!("Bearer realm=\"{realm}\""));
    }
    if !dpop_algs.is_empty() {
        schemes.push(format!("DPoP algs=\"{}\"", dpop_algs.join(" ")));
    }
    if keys {
        schemes.push(format!("ApiKey realm=\"{realm}\""));
    }
    let token = match (bearer, !dpop_algs.is_empty()) {
        (true, true) => Some("a bearer or DPoP-bound token"),
        (true, false) => Some("a bearer token"),
        (false, true) => Some("a DPoP-bound token"),
        (false, false) => None,
    };
    let wanted: Vec<&str> = token
        .into_iter()
        .chain(keys.then_some("an API key"))
        .collect();
    if wanted.is_empty() {
        return deny;
    }
    Decision::new(
        ReasonCode::CredentialMissing,
        format!("this route requires {}", wanted.join(" or ")),
    )
    .with_header("www-authenticate", schemes.join(", "))
}

/// `d` with the `ApiKey` challenge: for a client that presented API keys only, which a
/// Bearer challenge would tell to fetch a token it never used.
fn with_api_key_challenge(d: Decision) -> Decision {
    let challenge = crate::authz::decision::api_key_challenge(&d.detail);
    d.with_header("www-authenticate", challenge)
}

fn multiple() -> Decision {
    Decision::new(
        ReasonCode::MultipleCredentials,
        "the request carries more than one credential",
    )
}

/// Strips the scheme of any issuer using this header: its own scheme, or `DPoP` when it
/// accepts DPoP (then the flag is true). `None` when no scheme fits.
fn strip_scheme<'r>(config: &Config, header: &str, value: &'r str) -> Option<(&'r str, bool)> {
    let value = value.trim();
    for issuer in config.issuers.iter().filter(|i| i.header == header) {
        if issuer.dpop.mode != DpopMode::Disabled
            && let Some(token) = after_scheme(value, DPOP_SCHEME)
        {
            return Some((token, true));
        }
        if issuer.scheme.is_empty() {
            return Some((value, false));
        }
        if let Some(token) = after_scheme(value, &issuer.scheme) {
            return Some((token, false));
        }
    }
    None
}

/// The rest of `value` after `scheme` and whitespace, compared case-insensitively. The
/// scheme alone (`value` is trimmed: `Bearer ` with an empty variable) is that scheme with
/// an empty credential, refused as such rather than as an unknown scheme.
fn after_scheme<'r>(value: &'r str, scheme: &str) -> Option<&'r str> {
    let n = scheme.len();
    (value.len() >= n
        && value.is_char_boundary(n)
        && value[..n].eq_ignore_ascii_case(scheme)
        && value.as_bytes().get(n).is_none_or(u8::is_ascii_whitespace))
    .then(|| value[n..].trim_start())
}

/// True when the query string carries a token parameter (any case of its name, encoded or not).
fn query_has_token(path: &str) -> bool {
    crate::authz::path::any_query_name(path, |name| {
        QUERY_TOKEN_PARAMS
            .iter()
            .any(|p| name.eq_ignore_ascii_case(p))
    })
}

/// True when the query string carries an API key parameter (any case, `_` or `-`, encoded or
/// not), including one named like the key header.
fn query_has_api_key(path: &str, header: &str) -> bool {
    // Compared folded (ASCII case, `_` as `-`) in place: nothing is allocated per Check.
    let fold = |b: u8| match b.to_ascii_lowercase() {
        b'_' => b'-',
        b => b,
    };
    let same = |a: &str, b: &str| {
        a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
    };
    crate::authz::path::any_query_name(path, |name| {
        same(name, header) || QUERY_API_KEY_PARAMS.iter().any(|p| same(name, p))
    })
}

/// Verifies a credential found in the API key header. `None` when the credential came from
/// another header (it is a token).
pub fn verify_api_key(
    config: &Config,
    cred: &Credential<'_>,
    now: i64,
) -> Option<Result<Arc<Identity>, Decision>> {
    let keys = config
        .api_keys
        .as_ref()
        .filter(|k| k.header == cred.header)?;
    Some(
        keys.verify(cred.token, now)
            .map(|k| k.identity.clone())
            .map_err(api_key_refused),
    )
}

/// The 401 for an API key the server does not accept (unknown, expired, too long).
pub fn api_key_refused(e: ApiKeyError) -> Decision {
    let d = Decision::new(ReasonCode::InvalidToken, e.to_string());
    let challenge = crate::authz::decision::api_key_challenge(&d.detail);
    d.with_header("www-authenticate", challenge)
}

/// Picks the issuer by the token's `iss` and the header it came in, then verifies it.
pub fn verify_credential(
    config: &Config,
    cred: &Credential<'_>,
    keys: &dyn Fn(&str) -> Result<Arc<KeySet>, KeyError>,
    now: i64,
) -> Result<Arc<Identity>, Decision> {
    if let Some(result) = verify_api_key(config, cred, now) {
        return result;
    }
    let (issuer, token) = select_issuer(config, cred)?;
    let set = keys(&issuer.name).map_err(keys_unavailable)?;
    let verified = token
        .verify(&issuer.rules, &set, now)
        .map_err(invalid_token)?;
    Ok(Arc::new(Identity::from_verified(
        issuer.name.clone(),
        verified,
        &issuer.claims,
    )))
}

/// The issuer a credential claims to come from, checked against where it was found, with
/// the token parsed (once) for that issuer to verify.
pub fn select_issuer<'c, 't>(
    config: &'c Config,
    cred: &Credential<'t>,
) -> Result<(&'c Arc<CompiledIssuer>, jwt::Unverified<'t>), Decision> {
    let max = config.file.tokens.max_bytes;
    let token = jwt::Unverified::parse(cred.token, max).map_err(invalid_token)?;
    let iss = token.issuer().map_err(invalid_token)?;
    let issuer = config
        .issuers
        .iter()
        .find(|i| i.rules.issuer == iss && i.header == cred.header)
        .ok_or_else(|| {
            Decision::new(
                ReasonCode::UnknownIssuer,
                "the token's issuer is not trusted",
            )
        })?;
    Ok((issuer, token))
}

/// A JWT rejection as a 401 decision.
pub fn invalid_token(e: jwt::JwtError) -> Decision {
    Decision::new(ReasonCode::InvalidToken, e.to_string())
}

/// Unusable keys as a 401 decision (fail closed). The detail goes to the client: it names
/// the issuer and the state of its keys, not why the last fetch failed (an address, a TLS
/// or DNS error of our network): operators read that in `/readyz` and the logs.
pub fn keys_unavailable(e: KeyError) -> Decision {
    let detail = match e {
        KeyError::UnknownIssuer(_) => e.to_string(),
        KeyError::NotLoaded { issuer, .. } => {
            format!("keys for issuer `{issuer}` are not loaded yet")
        }
        KeyError::Stale {
            issuer, age_secs, ..
        } => format!("keys for issuer `{issuer}` are stale (last good fetch {age_secs}s ago)"),
        KeyError::NoUsableKeys { issuer, .. } => {
            format!("issuer `{issuer}` publishes no usable key")
        }
    };
    Decision::new(ReasonCode::KeysUnavailable, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_unavailable_answer_names_the_issuer_not_the_fetch_error() {
        let why = "GET https://idp.internal:8443/jwks: connection refused (10.0.0.9:8443)";
        for e in [
            KeyError::NotLoaded {
                issuer: "corp".into(),
                reason: why.into(),
            },
            KeyError::Stale {
                issuer: "corp".into(),
                age_secs: 301,
                reason: why.into(),
            },
            KeyError::NoUsableKeys {
                issuer: "corp".into(),
                reason: why.into(),
            },
        ] {
            let full = e.to_string();
            assert!(full.contains("10.0.0.9"), "{full}");
            let d = keys_unavailable(e);
            assert_eq!(d.code, ReasonCode::KeysUnavailable);
            assert!(d.detail.contains("`corp`"), "{}", d.detail);
            for leak in ["10.0.0.9", "idp.internal", "refused"] {
                assert!(!d.detail.contains(leak), "{leak} in {}", d.detail);
            }
        }
    }
}
