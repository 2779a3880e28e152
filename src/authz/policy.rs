//! The compiled route table and its rules: which route a request reaches (most specific wins,
//! deny by default) and whether an identity satisfies one of the route's rules.
//!
//! Built once by `config` from a validated file; matching a request allocates only the cleaned
//! path's segment list and the captured parameter values. Pure: no I/O, no clock, no logging.
//!
//! Matching, and why:
//! - Hosts: case-insensitive, port ignored; `*.example.com` matches one or more labels below
//!   `example.com` (never `example.com` itself); no hosts = any host. Once a route has hosts, a
//!   request host ending in a dot is refused: Envoy strips one, then routes by what is left.
//! - Methods: exact and case-sensitive (`get` is not `GET`); HEAD is not implied by GET.
//! - Templates: literal segments, `{name}` (one non-empty segment, captured), `*` (one non-empty
//!   segment), and a trailing `/**` matching zero or more further segments. `/admin/**` DOES
//!   match `/admin` and `/admin/`: a prefix protected by a rule must never have an unprotected
//!   root.
//! - Most specific wins: segment by segment, literal > `{param}`/`*` > `/**` (a template that
//!   ends beats one that continues with `/**`), then exact host > wildcard host (longer suffix
//!   first) > any host, then file order.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use super::context::{Context, ContextConditions, ContextFailure};
use super::decision::{Decision, ReasonCode};
use super::path;
use super::request::RequestView;
use crate::identity::Identity;
use crate::identity::peer::PrincipalPattern;

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Literal(Box<str>),
    Param(Arc<str>),
    Any,
}

/// A compiled path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub segs: Vec<Seg>,
    /// Ends with `/**`.
    pub tail: bool,
}

/// Why a path template is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("a path template must start with `/`")]
    NotAbsolute,
    #[error("a path template must not contain `?`, `#` or `%`")]
    ForbiddenChar,
    #[error("empty segment in path template (`//` or a trailing `/`)")]
    EmptySegment,
    #[error("`**` is only allowed as the last segment")]
    TailNotLast,
    #[error("parameter `{0}` appears more than once")]
    DuplicateParam(String),
    #[error("invalid parameter name `{0}`")]
    BadParamName(String),
    #[error("segment `{0}` mixes a parameter or wildcard with text")]
    MixedSegment(String),
    #[error("segment `{0}` is not a clean path segment: {1}")]
    UncleanLiteral(String, path::PathError),
}

impl Template {
    /// Parses `/orders/{id}`, `/files/*/raw`, `/admin/**`, `/`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        if text.contains(['?', '#', '%']) {
            return Err(TemplateError::ForbiddenChar);
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(TemplateError::NotAbsolute);
        };
        let mut segs = Vec::new();
        let mut tail = false;
        if rest.is_empty() {
            return Ok(Template { segs, tail });
        }
        let parts: Vec<&str> = rest.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            match *part {
                "" => return Err(TemplateError::EmptySegment),
                "**" if last => tail = true,
                "**" => return Err(TemplateError::TailNotLast),
                "*" => segs.push(Seg::Any),
                p if p.starts_with('{') && p.ends_with('}') && p.len() >= 2 => {
                    let name = &p[1..p.len() - 1];
                    if !valid_param_name(name) {
                        return Err(TemplateError::BadParamName(name.to_string()));
                    }
                    if segs
                        .iter()
                        .any(|s| matches!(s, Seg::Param(n) if &**n == name))
                    {
                        return Err(TemplateError::DuplicateParam(name.to_string()));
                    }
                    segs.push(Seg::Param(Arc::from(name)));
                }
                p if p.contains(['{', '}', '*']) => {
                    return Err(TemplateError::MixedSegment(p.to_string()));
                }
                p => {
                    // A literal must itself be a clean path segment, so that a request can
                    // ever match it (and so `..` or `;` never appear in a template).
                    let raw = format!("/{p}");
                    path::clean(&raw)
                        .map_err(|e| TemplateError::UncleanLiteral(p.to_string(), e))?;
                    segs.push(Seg::Literal(Box::from(p)));
                }
            }
        }
        Ok(Template { segs, tail })
    }

    /// The names of the template's parameters.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segs.iter().filter_map(|s| match s {
            Seg::Param(n) => Some(&**n),
            _ => None,
        })
    }

    /// True when the cleaned segments match.
    pub fn matches(&self, segs: &[Cow<'_, str>]) -> bool {
        let n = self.segs.len();
        if (self.tail && segs.len() < n) || (!self.tail && segs.len() != n) {
            return false;
        }
        self.segs.iter().zip(segs).all(|(t, s)| match t {
            Seg::Literal(l) => **l == **s,
            // INVARIANT: a parameter or `*` never matches an empty segment, so a trailing `/`
            // is never captured as an empty resource name.
            Seg::Param(_) | Seg::Any => !s.is_empty(),
        })
    }

    /// The captured parameters of a matching request.
    fn capture<'p>(&'p self, segs: &[Cow<'_, str>]) -> Vec<(&'p str, String)> {
        self.segs
            .iter()
            .zip(segs)
            .filter_map(|(t, s)| match t {
                Seg::Param(n) => Some((&**n, s.to_string())),
                _ => None,
            })
            .collect()
    }

    /// Specificity key: lower is more specific, compared lexicographically.
    fn rank(&self) -> Vec<u8> {
        let mut r: Vec<u8> = self
            .segs
            .iter()
            .map(|s| match s {
                Seg::Literal(_) => 0,
                Seg::Param(_) | Seg::Any => 1,
            })
            .collect();
        if self.tail {
            r.push(2);
        }
        r
    }

    /// True when some path matches both templates.
    pub fn overlaps(&self, other: &Template) -> bool {
        let (a, b) = (self.segs.len(), other.segs.len());
        // A `/**` tail matches any further segments (one or more of them, or none at its root).
        let lengths = match (self.tail, other.tail) {
            (false, false) => a == b,
            (true, false) => b >= a,
            (false, true) => a >= b,
            (true, true) => true,
        };
        lengths
            && self
                .segs
                .iter()
                .zip(&other.segs)
                .all(|(x, y)| match (x, y) {
                    (Seg::Literal(x), Seg::Literal(y)) => x == y,
                    _ => true,
                })
    }

    /// Two templates with the same shape match exactly the same requests.
    fn same_shape(&self, other: &Template) -> bool {
        self.tail == other.tail
            && self.segs.len() == other.segs.len()
            && self
                .segs
                .iter()
                .zip(&other.segs)
                .all(|(a, b)| match (a, b) {
                    (Seg::Literal(x), Seg::Literal(y)) => x == y,
                    (Seg::Param(_) | Seg::Any, Seg::Param(_) | Seg::Any) => true,
                    _ => false,
                })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segs.is_empty() && !self.tail {
            return f.write_str("/");
        }
        for s in &self.segs {
            match s {
                Seg::Literal(l) => write!(f, "/{l}")?,
                Seg::Param(n) => write!(f, "/{{{n}}}")?,
                Seg::Any => f.write_str("/*")?,
            }
        }
        if self.tail {
            f.write_str("/**")?;
        }
        Ok(())
    }
}

fn valid_param_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A host a route applies to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostPattern {
    /// Lower-case host without port or trailing dot.
    Exact(Box<str>),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(Box<str>),
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

impl HostPattern {
    /// Parses a configured host: `api.example.com`, `*.example.com`, `[::1]`.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let lower = text.trim().to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        if lower.is_empty() {
            return Err("empty host".to_string());
        }
        if let Some(suffix) = lower.strip_prefix("*.") {
            if !valid_dns_name(suffix) {
                return Err(format!("invalid host pattern `{text}`"));
            }
            return Ok(HostPattern::Suffix(Box::from(format!(".{suffix}"))));
        }
        if lower.starts_with('[') {
            let ok = lower.ends_with(']')
                && lower[1..lower.len() - 1]
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok();
            if !ok {
                return Err(format!(
                    "invalid IPv6 host `{text}` (write it as `[::1]`, without a port)"
                ));
            }
            return Ok(HostPattern::Exact(Box::from(
                canonical_ipv6(lower).unwrap_or_else(|| lower.to_string()),
            )));
        }
        if lower.contains(':') {
            return Err(format!(
                "host `{text}` has a port: hosts match without the port"
            ));
        }
        if !valid_dns_name(lower) {
            return Err(format!("invalid host `{text}`"));
        }
        Ok(HostPattern::Exact(Box::from(lower)))
    }

    /// Rank of a match (lower is more specific), or `None`. `host` is already normalized.
    fn matches(&self, host: &str) -> Option<(u8, usize)> {
        match self {
            HostPattern::Exact(h) => host.eq_ignore_ascii_case(h).then_some((0, 0)),
            HostPattern::Suffix(s) => {
                let (hb, sb) = (host.as_bytes(), s.as_bytes());
                if hb.len() <= sb.len() {
                    return None;
                }
                let (prefix, end) = hb.split_at(hb.len() - sb.len());
                // What the `*` covers must be DNS labels: Envoy joins two `Host` lines into
                // `admin.example.com,www.example.com`, which `*.example.com` must not match
                // (an upstream may serve the first name).
                let ok = end.eq_ignore_ascii_case(sb)
                    && std::str::from_utf8(prefix).is_ok_and(valid_dns_name);
                ok.then_some((1, usize::MAX - sb.len()))
            }
        }
    }
}

fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The request's host without port or trailing dot, an IPv6 literal in its canonical form
/// (RFC 5952). `[::1]:8080` -> `[::1]`, `[0:0::1]` -> `[::1]`.
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let host = without_port(raw);
    match canonical_ipv6(host) {
        Some(canonical) if canonical != host => std::borrow::Cow::Owned(canonical),
        _ => std::borrow::Cow::Borrowed(host),
    }
}

/// Whether `raw` (port aside) is a host both Envoy and Portcullis read
/// the same way: DNS labels, or a bracketed IPv6 address in its canonical form. Envoy picks
/// a virtual host by plain string matching: its `*.internal.example.com` takes
/// `x..internal.example.com` or `a@b.internal.example.com`, which are no DNS names and so
/// match no wildcard route here, and `[0::1]` is not its `[::1]`, which is the same address
/// here. Deciding such a host against another route than the one Envoy serves it from could
/// let a request reach a protected virtual host through a public route, so a policy with
/// host-scoped routes refuses it (the reason, never the host, is told).
///
/// On success, the host as `normalize_host` gives it.
fn plain_host(raw: &str) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    let host = strip_port(raw);
    // Envoy picks the virtual host by the spelling it forwards, after its own
    // `strip_trailing_host_dot` (one dot). A host still ending in a dot (`a.example.com..`
    // sent, or no strip configured) is no virtual host's `a.example.com`: Envoy serves it
    // from another one, so it cannot be decided as `a.example.com` here.
    if host.ends_with('.') {
        return Err(
            "it ends in a dot (set Envoy's `strip_trailing_host_dot: true`, which \
                    removes one; a host that still ends in one is refused)",
        );
    }
    if host.starts_with('[') {
        return match canonical_ipv6(host) {
            Some(c) if c == host => Ok(std::borrow::Cow::Borrowed(host)),
            Some(c) if c.eq_ignore_ascii_case(host) => Ok(std::borrow::Cow::Owned(c)),
            Some(_) => Err("an IPv6 address not in its canonical form (RFC 5952, e.g. `[::1]`)"),
            None => Err("not a DNS name or an IP address"),
        };
    }
    if host.len() <= 253 && valid_dns_name(host) {
        Ok(std::borrow::Cow::Borrowed(host))
    } else {
        Err("not a DNS name or an IP address")
    }
}

/// `[addr]` written as Rust (and RFC 5952) writes the address: one spelling per address, so
/// `[0::1]` cannot slip past a route for `[::1]` to a less specific one. `None` when `host`
/// is no bracketed IPv6 address (a zone id included), which then matches no IPv6 route.
fn canonical_ipv6(host: &str) -> Option<String> {
    let inside = host.strip_prefix('[')?.strip_suffix(']')?;
    let addr = inside.parse::<std::net::Ipv6Addr>().ok()?;
    Some(format!("[{addr}]"))
}

/// The host without port or trailing dot.
fn without_port(raw: &str) -> &str {
    let host = strip_port(raw);
    host.strip_suffix('.').unwrap_or(host)
}

/// The host without its port (`a.b:80` -> `a.b`, `[::1]:80` -> `[::1]`); anything that is not
/// a port after the host is kept, so the result matches no host.
fn strip_port(raw: &str) -> &str {
    if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => {
                let rest = &raw[end + 1..];
                let port_ok = rest.is_empty()
                    || rest
                        .strip_prefix(':')
                        .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
                // Anything else after `]` is garbage: keep it, so it matches no host.
                if port_ok { &raw[..=end] } else { raw }
            }
            None => raw,
        }
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    }
}

/// A claim test of a rule.
#[derive(Debug, Clone)]
pub enum ClaimTest {
    /// The claim is JSON-equal to the value.
    Equals(Value),
    /// The claim is JSON-equal to one of the values.
    OneOf(Vec<Value>),
    /// The claim is an array with a JSON-equal member. Substrings of string claims never count:
    /// `"admin-readonly"` must not satisfy `contains: admin`.
    Contains(Value),
}

#[derive(Debug, Clone)]
pub struct ClaimCondition {
    pub claim: String,
    pub test: ClaimTest,
}

/// How a path parameter is tied to the caller.
#[derive(Debug, Clone)]
pub enum BindingKind {
    /// The parameter equals this string claim.
    EqualsClaim(String),
    /// The parameter is a member of this string-list claim (or equals a single-string claim).
    InClaim(String),
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub param: Arc<str>,
    pub kind: BindingKind,
}

/// One grant; all conditions must hold.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub id: Arc<str>,
    /// Issuer names; empty = any configured issuer.
    pub issuers: Vec<Arc<str>>,
    /// All of these.
    pub scopes: Vec<String>,
    /// Any of these (none configured = no role condition).
    pub roles: Vec<String>,
    pub claims: Vec<ClaimCondition>,
    pub bind: Vec<Binding>,
    /// API key ids this rule grants (`*`: any key). Non-empty: the rule holds only for API
    /// keys; empty: it never holds for one.
    pub api_keys: Vec<Arc<str>>,
    /// Source network, session age, token lifetime, time window, posture.
    pub context: ContextConditions,
    /// Any of these peer principals. A rule with only principals (no other condition) is a
    /// service grant that needs no token.
    pub principals: Vec<PrincipalPattern>,
}

impl CompiledRule {
    /// True when the peer identity alone satisfies the rule (it has principals and no
    /// condition on a token; its other context conditions must still hold).
    pub fn is_peer_only(&self) -> bool {
        !self.principals.is_empty()
            && self.issuers.is_empty()
            && self.scopes.is_empty()
            && self.roles.is_empty()
            && self.claims.is_empty()
            && self.bind.is_empty()
            && self.api_keys.is_empty()
            // Source network, time window and posture headers are about the request and are
            // evaluated for a token-less peer too; session age, token lifetime and posture
            // claims read the token, so a rule with them needs one.
            && !self.context.needs_token()
    }
}

/// One route.
#[derive(Debug, Clone)]
pub struct CompiledRoute {
    pub id: Arc<str>,
    /// Empty = any host.
    pub hosts: Vec<HostPattern>,
    pub methods: Vec<Box<str>>,
    pub template: Template,
    pub public: bool,
    pub rules: Vec<CompiledRule>,
}

impl CompiledRoute {
    fn host_rank(&self, host: &str) -> Option<(u8, usize)> {
        if self.hosts.is_empty() {
            return Some((2, 0));
        }
        self.hosts.iter().filter_map(|p| p.matches(host)).min()
    }
}

/// The compiled route table.
#[derive(Debug, Default)]
pub struct Policy {
    routes: Vec<CompiledRoute>,
    /// Specificity group of each route: equal groups have equal path rank.
    group: Vec<usize>,
    /// Candidates per first literal segment (routes starting with it, plus every route that
    /// starts with a parameter, `*` or `**`), most specific first.
    by_first: HashMap<Box<str>, Vec<usize>>,
    /// Candidates for any other first segment (and for `/`), most specific first.
    generic: Vec<usize>,
    /// Some route names `hosts`: a request can miss every route by its host alone, so the
    /// `no_matching_route` detail names the host too.
    host_scoped: bool,
}

/// A matched route with its captured path parameters.
#[derive(Debug)]
pub struct RouteMatch<'p> {
    pub route_id: &'p Arc<str>,
    pub public: bool,
    pub params: Vec<(&'p str, String)>,
    /// Index of the route in the policy that produced this match.
    pub route_index: usize,
}

impl RouteMatch<'_> {
    /// A captured path parameter by name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Policy {
    /// Builds the table. Routes are already validated; file order breaks exact ties.
    pub fn new(routes: Vec<CompiledRoute>) -> Policy {
        let ranks: Vec<Vec<u8>> = routes.iter().map(|r| r.template.rank()).collect();
        let mut order: Vec<usize> = (0..routes.len()).collect();
        // A stable sort keeps file order among equally specific routes.
        order.sort_by(|&a, &b| ranks[a].cmp(&ranks[b]));
        let mut group = vec![0usize; routes.len()];
        for (pos, &i) in order.iter().enumerate() {
            group[i] = match pos.checked_sub(1).map(|p| order[p]) {
                Some(prev) if ranks[prev] == ranks[i] => group[prev],
                Some(prev) => group[prev] + 1,
                None => 0,
            };
        }
        let first_literal = |i: usize| match routes[i].template.segs.first() {
            Some(Seg::Literal(l)) => Some(l.clone()),
            _ => None,
        };
        let generic: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| first_literal(i).is_none())
            .collect();
        let mut by_first: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        for &i in &order {
            if let Some(l) = first_literal(i) {
                by_first.entry(l).or_default();
            }
        }
        for (lit, list) in by_first.iter_mut() {
            list.extend(order.iter().copied().filter(|&i| match first_literal(i) {
                Some(l) => l == *lit,
                None => true,
            }));
        }
        let host_scoped = routes.iter().any(|r| !r.hosts.is_empty());
        Policy {
            routes,
            group,
            by_first,
            generic,
            host_scoped,
        }
    }

    /// The routes, in file order.
    pub fn routes(&self) -> &[CompiledRoute] {
        &self.routes
    }

    /// Path hygiene, then host + method + path matching (most specific wins).
    /// `Err` is the deny decision (`PathRejected` or `NoRoute`).
    pub fn match_route<'p>(&'p self, req: &RequestView<'_>) -> Result<RouteMatch<'p>, Decision> {
        let segs = path::clean(req.path)
            .map_err(|e| Decision::new(ReasonCode::PathRejected, format!("path rejected: {e}")))?;
        let host = if self.host_scoped {
            plain_host(req.host).map_err(|why| {
                Decision::new(ReasonCode::PathRejected, format!("host rejected: {why}"))
            })?
        } else {
            normalize_host(req.host)
        };
        let host = &*host;
        let candidates = segs
            .first()
            .and_then(|s| self.by_first.get(s.as_ref()))
            .unwrap_or(&self.generic);
        let mut best: Option<(usize, (u8, usize))> = None;
        for &i in candidates {
            if let Some((b, _)) = best
                && self.group[b] != self.group[i]
            {
                // Candidates are sorted by specificity: every later one is less specific.
                break;
            }
            let route = &self.routes[i];
            if !route.template.matches(&segs) || !route.methods.iter().any(|m| **m == *req.method) {
                continue;
            }
            let Some(rank) = route.host_rank(host) else {
                continue;
            };
            if best.is_none_or(|(_, b)| rank < b) {
                best = Some((i, rank));
            }
        }
        let Some((i, _)) = best else {
            return Err(no_route(req, self.host_scoped.then_some(host)));
        };
        let route = &self.routes[i];
        Ok(RouteMatch {
            route_id: &route.id,
            public: route.public,
            params: route.template.capture(&segs),
            route_index: i,
        })
    }

    /// Evaluates the matched route's rules for a verified identity in a request context.
    /// A rule that fails only on context conditions makes the deny `ContextDenied`.
    pub fn authorize(
        &self,
        m: &RouteMatch<'_>,
        identity: &Arc<Identity>,
        ctx: &Context<'_>,
    ) -> Decision {
        self.authorize_peer(m, Some(identity), &[], ctx)
    }

    /// True when some rule of the matched route is a service grant (principals only), so a
    /// request without a token may still be granted by its peer identity.
    pub fn route_has_peer_rules(&self, m: &RouteMatch<'_>) -> bool {
        self.routes
            .get(m.route_index)
            .is_some_and(|r| r.rules.iter().any(CompiledRule::is_peer_only))
    }

    /// True when every rule of the matched route is a service grant.
    pub fn route_is_peer_only(&self, m: &RouteMatch<'_>) -> bool {
        self.routes
            .get(m.route_index)
            .is_some_and(|r| !r.rules.is_empty() && r.rules.iter().all(CompiledRule::is_peer_only))
    }

    /// Evaluates the matched route's rules for a verified identity (`None`: the request
    /// carries no token) and the request's peer principals (Envoy's `source.principal` and
    /// the forwarded certificate's URI SANs). Without an identity only service grants
    /// (rules with principals and nothing else) can hold.
    pub fn authorize_peer(
        &self,
        m: &RouteMatch<'_>,
        identity: Option<&Arc<Identity>>,
        principals: &[&str],
        ctx: &Context<'_>,
    ) -> Decision {
        let route_id = Some(m.route_id.clone());
        let with = |d: Decision| {
            d.with_route(route_id.clone())
                .with_identity(identity.cloned())
        };
        let Some(route) = self
            .routes
            .get(m.route_index)
            .filter(|r| Arc::ptr_eq(&r.id, m.route_id) || r.id == *m.route_id)
        else {
            // A match from another policy (e.g. across a reload): fail closed.
            return with(Decision::new(
                ReasonCode::Internal,
                "the matched route is not part of this policy",
            ));
        };
        if route.public {
            return with(Decision::new(ReasonCode::Public, "route is public"));
        }
        let mut closest: Option<(&CompiledRule, Vec<Failure<'_>>)> = None;
        let mut context_only: Option<(&CompiledRule, Vec<Failure<'_>>)> = None;
        for rule in &route.rules {
            let failures = evaluate(rule, m, identity.map(|i| &**i), principals, ctx);
            if failures.is_empty() {
                return with(
                    Decision::new(
                        ReasonCode::Allowed,
                        format!("granted by rule `{}`", rule.id),
                    )
                    .with_rule(Some(rule.id.clone())),
                );
            }
            // The caller holds every grant of this rule and only the context is wrong: that
            // is the most useful explanation, whatever other rules say.
            if context_only.is_none() && failures.iter().all(|f| matches!(f, Failure::Context(_))) {
                context_only = Some((rule, failures));
                continue;
            }
            if closest
                .as_ref()
                .is_none_or(|(_, f)| failures.len() < f.len())
            {
                closest = Some((rule, failures));
            }
        }
        if let Some((rule, failures)) = context_only {
            let detail = failures
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return with(
                Decision::new(ReasonCode::ContextDenied, detail).with_rule(Some(rule.id.clone())),
            );
        }
        let Some((rule, failures)) = closest else {
            return with(Decision::new(
                ReasonCode::InsufficientScope,
                "the route grants nothing",
            ));
        };
        let code = if failures.iter().all(|f| matches!(f, Failure::Binding(_))) {
            ReasonCode::ResourceMismatch
        } else {
            ReasonCode::InsufficientScope
        };
        let detail = failures
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        with(Decision::new(code, detail).with_rule(Some(rule.id.clone())))
    }

    /// Routes that some other route always beats for some of their methods: same host set,
    /// overlapping methods and the same template shape (or a duplicate).
    pub fn shadow_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (j, later) in self.routes.iter().enumerate() {
            for earlier in &self.routes[..j] {
                if !earlier.template.same_shape(&later.template) {
                    continue;
                }
                // A host pattern both list ranks them alike for that host: the earlier wins
                // there, whatever other hosts either lists.
                let same_hosts = sorted(&earlier.hosts) == sorted(&later.hosts);
                let overlap: Vec<String> = sorted(&later.hosts)
                    .into_iter()
                    .filter(|h| earlier.hosts.contains(h))
                    .map(HostPattern::to_string)
                    .collect();
                if !same_hosts && overlap.is_empty() {
                    continue;
                }
                let shared: Vec<&str> = later
                    .methods
                    .iter()
                    .filter(|m| earlier.methods.contains(m))
                    .map(|m| &**m)
                    .collect();
                if shared.is_empty() {
                    continue;
                }
                if same_hosts {
                    let what = if shared.len() == later.methods.len() {
                        "can never be chosen".to_string()
                    } else {
                        format!("is never chosen for {}", shared.join(", "))
                    };
                    out.push(format!(
                        "route `{}` {what}: route `{}` has the same hosts and path shape `{}` and comes first",
                        later.id, earlier.id, earlier.template
                    ));
                } else {
                    out.push(format!(
                        "route `{}` is never chosen for {} on host{} {}: route `{}` also lists {}, has the same path shape `{}` and comes first",
                        later.id,
                        shared.join(", "),
                        if overlap.len() == 1 { "" } else { "s" },
                        overlap.join(", "),
                        earlier.id,
                        if overlap.len() == 1 { "it" } else { "them" },
                        earlier.template
                    ));
                }
            }
        }
        out
    }
}

impl Policy {
    /// Warnings for protected routes that grant `GET` but not `HEAD` on paths a public
    /// catch-all (`/**`) route answers `HEAD` for: a `HEAD` there is decided by the public
    /// route, allowed without a token, and most frameworks answer `HEAD` with the `GET`
    /// handler (status and headers of the protected resource).
    pub fn head_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let catch_alls = self.routes.iter().filter(|p| {
            p.public
                && p.template.segs.is_empty()
                && p.template.tail
                && p.methods.iter().any(|m| &**m == "HEAD")
        });
        for public in catch_alls {
            for route in &self.routes {
                let protected = !route.public
                    && route.methods.iter().any(|m| &**m == "GET")
                    && !route.methods.iter().any(|m| &**m == "HEAD");
                let same_hosts =
                    public.hosts.is_empty() || route.hosts.iter().any(|h| public.hosts.contains(h));
                if protected && same_hosts {
                    out.push(format!(
                        "route `{}` grants GET but not HEAD on `{}`: a HEAD there goes to public route `{}` (`/**`) and is allowed without a token, and most frameworks answer HEAD with the GET handler; add HEAD to its methods",
                        route.id, route.template, public.id
                    ));
                }
            }
        }
        out
    }
}

fn sorted(hosts: &[HostPattern]) -> Vec<&HostPattern> {
    let mut v: Vec<&HostPattern> = hosts.iter().collect();
    v.sort();
    v.dedup();
    v
}

/// The `no_matching_route` deny: method and path, and the (normalized) host when routes are
/// host-scoped (`host`).
fn no_route(req: &RequestView<'_>, host: Option<&str>) -> Decision {
    let (p, _query) = path::split_query(req.path);
    // The query is never echoed (it may carry secrets); method and path are cut short so a
    // hostile request cannot inflate logs.
    let method =
        if !req.method.is_empty() && req.method.len() <= 32 && req.method.bytes().all(is_tchar) {
            req.method
        } else {
            "(invalid method)"
        };
    let p = if p.len() > 256 {
        // The path passed hygiene, so it is ASCII and any byte index is a char boundary.
        &p[..256]
    } else {
        p
    };
    let Some(host) = host else {
        return Decision::new(ReasonCode::NoRoute, format!("no route for `{method} {p}`"));
    };
    // The host comes from the client too: echoed only when it is a host name or address.
    let host = match host {
        "" => "(no host)",
        h if h.len() <= 255 && (valid_dns_name(h) || is_bracketed_ipv6(h)) => h,
        _ => "(invalid host)",
    };
    Decision::new(
        ReasonCode::NoRoute,
        format!("no route for `{method} {p}` on host `{host}`"),
    )
}

fn is_bracketed_ipv6(host: &str) -> bool {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
}

/// An RFC 9110 token character.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// One unmet condition of a rule. Its text names configuration, never the caller's claim values.
#[derive(Debug)]
enum Failure<'r> {
    Issuer,
    Scope(&'r str),
    Roles(&'r [String]),
    Claim(&'r str),
    Binding(&'r Binding),
    /// An API key on a rule for tokens.
    NotForApiKeys,
    /// A token on a rule for API keys.
    ApiKeysOnly,
    /// An API key the rule does not name.
    ApiKeyNotNamed,
    Context(ContextFailure),
    /// None of the request's peer principals is listed.
    Principal,
    /// The rule has token conditions and the request carries no token.
    Token,
}

impl fmt::Display for Failure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Issuer => f.write_str("the token's issuer is not accepted by this rule"),
            Failure::Scope(s) => write!(f, "missing scope `{s}`"),
            Failure::Roles(r) => {
                let list = r.iter().map(|r| format!("`{r}`")).collect::<Vec<_>>();
                write!(f, "missing role {}", list.join(" or "))
            }
            Failure::Claim(c) => write!(f, "claim `{c}` does not satisfy the rule"),
            Failure::NotForApiKeys => f.write_str("the rule does not accept API keys"),
            Failure::ApiKeysOnly => f.write_str("the rule accepts only API keys"),
            Failure::ApiKeyNotNamed => f.write_str("the rule does not name this API key"),
            Failure::Principal => f.write_str("the peer principal is not granted by this rule"),
            Failure::Token => f.write_str("this rule requires a token"),
            Failure::Binding(b) => match &b.kind {
                BindingKind::EqualsClaim(c) => {
                    write!(f, "path parameter `{}` does not match claim `{c}`", b.param)
                }
                BindingKind::InClaim(c) => {
                    write!(f, "path parameter `{}` is not in claim `{c}`", b.param)
                }
            },
            Failure::Context(c) => c.fmt(f),
        }
    }
}

fn evaluate<'r>(
    rule: &'r CompiledRule,
    m: &RouteMatch<'_>,
    id: Option<&Identity>,
    principals: &[&str],
    ctx: &Context<'_>,
) -> Vec<Failure<'r>> {
    let mut failures = Vec::new();
    if !rule.principals.is_empty()
        && !principals
            .iter()
            .any(|p| rule.principals.iter().any(|pat| pat.matches(p)))
    {
        failures.push(Failure::Principal);
    }
    let Some(id) = id else {
        // INVARIANT: without a token, only a rule with no token condition can hold.
        if !rule.is_peer_only() {
            failures.push(Failure::Token);
        } else if !rule.context.is_empty() {
            failures.extend(
                rule.context
                    .evaluate_without_token(ctx)
                    .into_iter()
                    .map(Failure::Context),
            );
        }
        return failures;
    };
    // INVARIANT: API keys and tokens never share a rule, so a key can only be granted where
    // the policy names keys, and a token never through a key's rule.
    match (id.api_key_id(), rule.api_keys.is_empty()) {
        (Some(_), true) => failures.push(Failure::NotForApiKeys),
        (Some(key), false) => {
            if !rule.api_keys.iter().any(|k| &**k == "*" || &**k == key) {
                failures.push(Failure::ApiKeyNotNamed);
            }
        }
        (None, false) => failures.push(Failure::ApiKeysOnly),
        (None, true) => {}
    }
    if !rule.issuers.is_empty() && !rule.issuers.contains(&id.issuer_name) {
        failures.push(Failure::Issuer);
    }
    for s in &rule.scopes {
        if !id.scopes.iter().any(|h| h == s) {
            failures.push(Failure::Scope(s));
        }
    }
    if !rule.roles.is_empty() && !rule.roles.iter().any(|r| id.roles.contains(r)) {
        failures.push(Failure::Roles(&rule.roles));
    }
    for c in &rule.claims {
        if !claim_holds(c, id.claim(&c.claim)) {
            failures.push(Failure::Claim(&c.claim));
        }
    }
    for b in &rule.bind {
        if !binding_holds(b, m, id) {
            failures.push(Failure::Binding(b));
        }
    }
    if !rule.context.is_empty() {
        failures.extend(
            rule.context
                .evaluate(id, ctx)
                .into_iter()
                .map(Failure::Context),
        );
    }
    failures
}

fn claim_holds(c: &ClaimCondition, value: Option<&Value>) -> bool {
    let Some(value) = value else {
        return false;
    };
    match &c.test {
        ClaimTest::Equals(want) => value == want,
        ClaimTest::OneOf(wants) => wants.iter().any(|w| w == value),
        ClaimTest::Contains(want) => value.as_array().is_some_and(|a| a.contains(want)),
    }
}

fn binding_holds(b: &Binding, m: &RouteMatch<'_>, id: &Identity) -> bool {
    // INVARIANT: config validation guarantees every bound parameter is in the template, so a
    // missing one means a mismatched match; it fails (closed).
    let Some(param) = m.param(&b.param) else {
        return false;
    };
    match &b.kind {
        BindingKind::EqualsClaim(c) => id.claim(c).and_then(Value::as_str) == Some(param),
        BindingKind::InClaim(c) => match id.claim(c) {
            Some(Value::String(s)) => s == param,
            Some(Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(param)),
            _ => false,
        },
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
