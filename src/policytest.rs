//! `portcullis test`: policy tests a user writes beside their config and runs before it goes
//! live (in CI, say). Each case is a request, who sends it, and the decision expected.
//!
//! What a case tests is the policy: route matching and path hygiene, rules (scopes, roles,
//! claims, resource bindings, API keys, service principals), context conditions, and what
//! a first request meets from rate limits and approvals. The caller is given as already
//! verified (an issuer and its claims, or an API key id, or nobody), so no token or key is
//! needed and the issuers' key sources are never contacted: proving that tokens verify is
//! the job of `check` and of the running server, not of a policy test. Its claims are held
//! to the server's checks (`jwt::check_claims`, the `cnf` it can check) and an API key to
//! its expiry: a caller the server refuses gets the server's 401 (`invalid_token`), so a
//! case can expect it. It stands for the request's credential (a second one in the request
//! is refused, as by the server), and the config's revocation file applies to it. Every
//! case starts from empty state (no earlier request counted, no approval granted).
//!
//! # File format
//!
//! ```yaml
//! config: portcullis.yaml            # optional, relative to this file (default: --config)
//! now: 2026-12-01T09:00:00Z          # optional, for every case (default: the current time)
//! cases:
//!   - name: readers read orders        # required, unique
//!     request:
//!       method: GET                    # default GET
//!       path: /orders/42               # required: the raw path, query included
//!       host: api.example.com          # default localhost
//!       headers: {x-device: managed}   # optional, lower-case names
//!       source_ip: 10.1.2.3            # optional: the client address Envoy reports
//!       principal: spiffe://example.org/ns/shop/sa/checkout   # optional: mTLS peer
//!     as:                              # optional: who is calling (absent: no credential;
//!                                      # then a credential header is an error)
//!       issuer: corp                   # an issuer's `name` (default: the only issuer)
//!       claims: {sub: alice, scope: orders:read}   # `iss`, `aud`, `iat`, `exp` default sensibly
//!       proven: true                   # optional: the request proves the token's binding
//!                                      # (DPoP proof, client certificate); default: a plain
//!                                      # bearer request, so a bound token gets the 401
//!     # or: as: {api_key: reporting-e0dd28}       # a configured API key, by id
//!     now: 2026-12-01T20:00:00Z        # optional, this case only
//!     expect:                          # at least one of:
//!       decision: allow                # allow | deny
//!       status: 200
//!       reason: allowed                # the reason code (`error` of a deny's body)
//!       route: orders-read
//!       rule: orders-reader
//!       dry_run: {decision: deny, reason: insufficient_scope}   # what the config's
//!                                      # `dry_run` routes would answer (same fields)
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::authz::{Decision, DryRun, RequestView};
use crate::config::Config;
use crate::engine::{Engine, GivenCaller};
use crate::identity::Identity;
use crate::identity::jwt::VerifiedJwt;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    #[serde(default)]
    pub config: Option<PathBuf>,
    #[serde(default)]
    pub now: Option<Moment>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub request: CaseRequest,
    #[serde(default, rename = "as")]
    pub caller: Option<Caller>,
    #[serde(default)]
    pub now: Option<Moment>,
    pub expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    #[serde(default = "default_method")]
    pub method: String,
    pub path: String,
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub source_ip: Option<IpAddr>,
    #[serde(default)]
    pub principal: Option<String>,
}

fn default_method() -> String {
    "GET".to_string()
}
fn default_host() -> String {
    "localhost".to_string()
}

/// Who sends a case's request, taken as verified.
#[derive(Debug)]
pub enum Caller {
    /// A configured API key, by id.
    ApiKey { api_key: String },
    /// A token of `issuer` (its `name`; default: the only issuer) with these claims.
    /// `proven`: the request also proves possession of the key the token is bound to (its
    /// DPoP proof, its client certificate), which a test cannot send; without it the caller
    /// is a plain bearer request without a client certificate, as the server would see one.
    Token {
        issuer: Option<String>,
        claims: Map<String, Value>,
        proven: bool,
    },
}

impl<'de> Deserialize<'de> for Caller {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = Map::deserialize(d)?;
        if let Some(key) = map.remove("api_key") {
            if let Some(other) = map.keys().next() {
                return Err(D::Error::custom(format!(
                    "`as` takes either `api_key` or `issuer`/`claims`, not `api_key` and `{other}`"
                )));
            }
            return match key {
                Value::String(api_key) => Ok(Caller::ApiKey { api_key }),
                _ => Err(D::Error::custom("`as.api_key` must be a key id")),
            };
        }
        let issuer = match map.remove("issuer") {
            None => None,
            Some(Value::String(name)) => Some(name),
            Some(_) => return Err(D::Error::custom("`as.issuer` must be an issuer's name")),
        };
        let claims = match map.remove("claims") {
            None => Map::new(),
            Some(Value::Object(claims)) => claims,
            Some(_) => return Err(D::Error::custom("`as.claims` must be a mapping")),
        };
        let proven = match map.remove("proven") {
            None => false,
            Some(Value::Bool(b)) => b,
            Some(_) => return Err(D::Error::custom("`as.proven` must be true or false")),
        };
        if let Some(other) = map.keys().next() {
            return Err(D::Error::custom(format!(
                "unknown field `{other}` in `as`, expected `issuer`, `claims`, `proven` or \
                 `api_key`"
            )));
        }
        Ok(Caller::Token {
            issuer,
            claims,
            proven,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(default)]
    pub decision: Option<Verdict>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
    /// What the config's `dry_run` routes must answer (same fields).
    #[serde(default)]
    pub dry_run: Option<Box<Expect>>,
}

impl Expect {
    fn is_empty(&self) -> bool {
        self.decision.is_none()
            && self.status.is_none()
            && self.reason.is_none()
            && self.route.is_none()
            && self.rule.is_none()
            && self.dry_run.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// A point in time: RFC 3339 (`2026-12-01T09:00:00Z`) or seconds since the epoch.
#[derive(Debug, Clone, Copy)]
pub struct Moment(pub i64);

impl<'de> Deserialize<'de> for Moment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n
                .as_i64()
                .map(Moment)
                .ok_or_else(|| serde::de::Error::custom("`now` must be whole seconds")),
            Value::String(s) => humantime::parse_rfc3339(s.trim())
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "`now: {s}`: {e} (use e.g. `2026-12-01T09:00:00Z`)"
                    ))
                })
                .and_then(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map(|d| Moment(d.as_secs() as i64))
                        .map_err(|_| serde::de::Error::custom("`now` is before 1970"))
                }),
            other => Err(serde::de::Error::custom(format!(
                "`now` must be a time, got {other}"
            ))),
        }
    }
}

/// One case's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub decision: Decision,
    /// What differs from `expect`, one line each; empty when the case passes.
    pub mismatches: Vec<String>,
}

/// All cases of a file, in order.
#[derive(Debug)]
pub struct Report {
    pub file: PathBuf,
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| !o.mismatches.is_empty())
            .count()
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for o in &self.outcomes {
            let mark = if o.mismatches.is_empty() {
                "ok  "
            } else {
                "FAIL"
            };
            let _ = writeln!(out, "{mark} {}: {}", o.name, summary(&o.decision));
            for m in &o.mismatches {
                let _ = writeln!(out, "       {m}");
            }
        }
        let _ = writeln!(
            out,
            "{}: {} cases, {} passed, {} failed",
            self.file.display(),
            self.outcomes.len(),
            self.outcomes.len() - self.failed(),
            self.failed()
        );
        out
    }
}

/// `allow 200 allowed (route orders-read, rule orders-reader)`, and the reason's detail for
/// a deny.
fn summary(d: &Decision) -> String {
    let verdict = if d.is_allow() { "allow" } else { "deny" };
    let mut s = format!("{verdict} {} {}", d.http_status(), d.code.as_str());
    let at: Vec<String> = [("route", &d.route), ("rule", &d.rule)]
        .iter()
        .filter_map(|(what, v)| v.as_deref().map(|v| format!("{what} {v}")))
        .collect();
    if !at.is_empty() {
        let _ = write!(s, " ({})", at.join(", "));
    }
    if !d.is_allow() {
        let _ = write!(s, ": {}", d.detail);
    }
    if let Some(would) = &d.dry_run {
        let would = as_decision(would);
        let _ = write!(s, "; dry run: {}", summary(&would));
    }
    s
}

/// A dry-run answer as a decision, to summarize and compare it like one.
fn as_decision(would: &DryRun) -> Decision {
    Decision::new(would.code, would.detail.clone())
        .with_route(would.route.clone())
        .with_rule(would.rule.clone())
}

/// Why a test file cannot be run (a case that fails is not an error).
#[derive(Debug, thiserror::Error)]
pub enum TestFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Reads a test file, and the config it names (resolved against the file's folder), if any.
pub fn load(path: &Path) -> Result<(TestFile, Option<PathBuf>), TestFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TestFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| TestFileError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let file: TestFile = serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if file.cases.is_empty() {
        return Err(invalid("no `cases`".to_string()));
    }
    let mut names = HashSet::new();
    for (i, case) in file.cases.iter().enumerate() {
        if case.name.trim().is_empty() {
            return Err(invalid(format!("cases[{i}]: `name` is empty")));
        }
        if !names.insert(case.name.as_str()) {
            return Err(invalid(format!(
                "cases[{i}]: the name `{}` is used twice",
                case.name
            )));
        }
        let e = &case.expect;
        if e.is_empty() {
            return Err(invalid(format!(
                "cases[{i}] `{}`: `expect` names nothing to check (decision, status, reason, route, rule or dry_run)",
                case.name
            )));
        }
        if let Some(dry) = &e.dry_run
            && (dry.is_empty() || dry.dry_run.is_some())
        {
            return Err(invalid(format!(
                "cases[{i}] `{}`: `expect.dry_run` names decision, status, reason, route or rule, and nothing else",
                case.name
            )));
        }
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    let config = file
        .config
        .as_ref()
        .map(|c| crate::keys::resolve_path(dir, c));
    Ok((file, config))
}

/// Runs every case of `file` against `config`. `now` is the time for cases that set none.
/// A case whose caller names an API key or issuer the config lacks, or whose request carries
/// a credential without `as:`, makes the file unusable.
pub async fn run(
    config: &Arc<Config>,
    file: &TestFile,
    path: &Path,
    now: i64,
) -> Result<Report, TestFileError> {
    let mut outcomes = Vec::with_capacity(file.cases.len());
    for (i, case) in file.cases.iter().enumerate() {
        let at = case.now.or(file.now).map_or(now, |m| m.0);
        let decision = match decide_case(config, case, at).await {
            Ok(d) => d,
            // The test file names what the config lacks (an API key or issuer), or puts a
            // credential in the request: a mistake in the file, not a policy failure.
            Err(problem) => {
                return Err(TestFileError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "cases[{i}] `{}`: {problem} (`{}`)",
                        case.name,
                        config.source.display()
                    ),
                });
            }
        };
        outcomes.push(Outcome {
            name: case.name.clone(),
            mismatches: mismatches(&case.expect, &decision),
            decision,
        });
    }
    Ok(Report {
        file: path.to_path_buf(),
        outcomes,
    })
}

/// The server's decision for the case's request from the case's caller, taken as verified
/// (`Engine::check_verified`), on fresh in-memory state. `Err` names what the config lacks,
/// or the credential a case sends without `as:` (it would be verified, which a test cannot).
async fn decide_case(config: &Arc<Config>, case: &Case, now: i64) -> Result<Decision, String> {
    let r = &case.request;
    let headers: HashMap<String, String> = r
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let req = RequestView {
        method: &r.method,
        host: &r.host,
        path: &r.path,
        headers: &headers,
        source_ip: r.source_ip,
        source_principal: r.principal.as_deref().unwrap_or_default(),
        scheme: "https",
        peer_certificate: None,
    };
    let caller = match &case.caller {
        Some(caller) => Some(given(config, caller, now).map_err(|e| format!("`as`: {e}"))?),
        None => {
            // A credential in the request with no `as:` would be verified by the server,
            // which a policy test never does: answering `credential_missing` for it (as
            // if the header were not there) would pass a case the server decides otherwise.
            if let Ok(cred) = crate::decide::extract_credential(config, &req) {
                return Err(format!(
                    "`request.headers.{}` carries a credential, and a policy test never \
                     verifies one: say who calls with `as:` (claims, or an `api_key` id) and \
                     drop the header, which would be a second credential",
                    cred.header
                ));
            }
            None
        }
    };
    // A fresh engine per case: empty state, keys that are never fetched, and no approvals
    // webhook (a case on a gated route must not notify real approvers of a request that
    // exists nowhere).
    let engine = Engine::offline(config.clone());
    Ok(engine.check_verified(&req, caller.as_ref(), now).await)
}

/// Who a caller stands for: a verified identity, or, when the server would refuse its
/// credential at that time (claims it does not accept, an expired API key), the server's
/// 401. `Err` names what the config lacks.
fn given(config: &Config, caller: &Caller, now: i64) -> Result<GivenCaller, String> {
    match caller {
        Caller::ApiKey { api_key } => {
            let key = config
                .api_keys
                .as_ref()
                .and_then(|keys| keys.get(api_key))
                .ok_or_else(|| format!("no API key `{api_key}` in the config"))?;
            Ok(match key.valid_at(now) {
                Ok(key) => GivenCaller::Verified(key.identity.clone()),
                Err(e) => GivenCaller::Refused {
                    issuer: None,
                    deny: crate::decide::api_key_refused(e),
                },
            })
        }
        Caller::Token {
            issuer,
            claims,
            proven,
        } => {
            let issuer = match issuer {
                Some(name) => config.issuers.iter().find(|i| &*i.name == name),
                None if config.issuers.len() == 1 => config.issuers.first(),
                None if config.issuers.is_empty() => {
                    return Err("the config has no issuers".into());
                }
                None => {
                    return Err(
                        "the config has several issuers: name one (`as: {issuer: ...}`)".into(),
                    );
                }
            }
            .ok_or_else(|| {
                format!(
                    "no issuer named `{}` in the config",
                    issuer.as_deref().unwrap_or_default()
                )
            })?;
            let mut claims = claims.clone();
            claims
                .entry("iss")
                .or_insert_with(|| Value::String(issuer.rules.issuer.clone()));
            if let Some(aud) = issuer.rules.audiences.first() {
                claims
                    .entry("aud")
                    .or_insert_with(|| Value::String(aud.clone()));
            }
            // Default times a current token of this issuer has: issued a minute ago (or half
            // its `max_lifetime`, if shorter), expiring in ten minutes or at its
            // `max_lifetime`, whichever is sooner.
            let max = issuer
                .rules
                .max_lifetime_secs
                .map(|m| i64::try_from(m).unwrap_or(i64::MAX));
            let age = max.map_or(60, |m| (m / 2).min(60));
            let iat = claims
                .entry("iat")
                .or_insert_with(|| Value::from(now - age))
                .as_i64()
                .unwrap_or(now - age);
            let default_exp = max.map_or(now + 600, |m| (now + 600).min(iat.saturating_add(m)));
            claims
                .entry("exp")
                .or_insert_with(|| Value::from(default_exp));
            // The server checks a token's claims (issuer, audience, the types of `sub`,
            // `jti` and `sid`, the times) when it verifies the token, before any rule: a
            // caller whose claims it would refuse gets its 401.
            let times = crate::identity::jwt::check_claims(&claims, &issuer.rules, now);
            let crate::identity::jwt::ClaimTimes { exp, nbf, iat } = match times {
                Ok(times) => times,
                Err(e) => {
                    return Ok(GivenCaller::Refused {
                        issuer: Some(issuer.name.clone()),
                        deny: crate::decide::invalid_token(e),
                    });
                }
            };
            let jwt = VerifiedJwt {
                exp,
                nbf,
                iat,
                kid: None,
                alg: jsonwebtoken::Algorithm::RS256,
                key_fingerprint: Arc::from("policy-test"),
                claims,
            };
            // A `cnf` asking for a proof of possession the server cannot check is refused
            // by `check_verified`, after the revocation lists, as by the server; so is a
            // token that must be bound (a `cnf`, `cert_bound`, `dpop: required`) unless
            // the case says the request proves it.
            let identity = Arc::new(Identity::from_verified(
                issuer.name.clone(),
                jwt,
                &issuer.claims,
            ));
            Ok(if *proven {
                GivenCaller::Proven(identity)
            } else {
                GivenCaller::Verified(identity)
            })
        }
    }
}

/// What in `got` differs from `expect`.
fn mismatches(expect: &Expect, got: &Decision) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |what: &str, want: Option<String>, have: Option<String>| {
        if let Some(want) = want
            && have.as_deref() != Some(want.as_str())
        {
            out.push(format!(
                "expected {what} {want}, got {}",
                have.unwrap_or_else(|| "none".to_string())
            ));
        }
    };
    let verdict = |allow: bool| if allow { "allow" } else { "deny" }.to_string();
    check(
        "decision",
        expect.decision.map(|v| verdict(v == Verdict::Allow)),
        Some(verdict(got.is_allow())),
    );
    check(
        "status",
        expect.status.map(|s| s.to_string()),
        Some(got.http_status().to_string()),
    );
    check(
        "reason",
        expect.reason.clone(),
        Some(got.code.as_str().to_string()),
    );
    check(
        "route",
        expect.route.clone(),
        got.route.as_deref().map(str::to_string),
    );
    check(
        "rule",
        expect.rule.clone(),
        got.rule.as_deref().map(str::to_string),
    );
    if let Some(dry) = &expect.dry_run {
        match &got.dry_run {
            Some(would) => {
                let would = as_decision(would);
                out.extend(
                    mismatches(dry, &would)
                        .into_iter()
                        .map(|m| format!("dry run: {m}")),
                );
            }
            None => out.push("expected a dry-run decision, but the config has no `dry_run`".into()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::ReasonCode;

    fn expect(yaml: &str) -> Expect {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_expected_field_is_compared() {
        let got = Decision::new(ReasonCode::InsufficientScope, "missing scope")
            .with_route(Some(Arc::from("orders-create")))
            .with_rule(Some(Arc::from("orders-writer")));
        let all = "{decision: deny, status: 403, reason: insufficient_scope, route: orders-create, rule: orders-writer}";
        assert_eq!(mismatches(&expect(all), &got), Vec::<String>::new());
        let wrong = "{decision: allow, status: 401, reason: credential_missing, route: admin, rule: admin-role}";
        assert_eq!(
            mismatches(&expect(wrong), &got),
            [
                "expected decision allow, got deny",
                "expected status 401, got 403",
                "expected reason credential_missing, got insufficient_scope",
                "expected route admin, got orders-create",
                "expected rule admin-role, got orders-writer",
            ]
        );
        let none = Decision::new(ReasonCode::NoRoute, "no route");
        assert_eq!(
            mismatches(&expect("{route: orders-read}"), &none),
            ["expected route orders-read, got none"]
        );
        let dry = "{dry_run: {decision: allow, reason: allowed, route: orders-v2, rule: auditors}}";
        assert_eq!(
            mismatches(&expect(dry), &got),
            ["expected a dry-run decision, but the config has no `dry_run`"]
        );
        let with_dry = got.clone().with_dry_run(
            Decision::new(ReasonCode::Allowed, "granted")
                .with_route(Some(Arc::from("orders-v2")))
                .with_rule(Some(Arc::from("auditors"))),
        );
        assert_eq!(mismatches(&expect(dry), &with_dry), Vec::<String>::new());
        let wrong_dry = "{dry_run: {decision: deny, status: 403, reason: no_matching_route, route: x, rule: y}}";
        assert_eq!(
            mismatches(&expect(wrong_dry), &with_dry),
            [
                "dry run: expected decision deny, got allow",
                "dry run: expected status 403, got 200",
                "dry run: expected reason no_matching_route, got allowed",
                "dry run: expected route x, got orders-v2",
                "dry run: expected rule y, got auditors",
            ]
        );
    }
}
