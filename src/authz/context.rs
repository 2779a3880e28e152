//! Context conditions of a rule: where the request comes from (source CIDRs), how fresh the
//! session and the token are, when it is made (time windows in a time zone), and device
//! posture (a claim, or a header only a trusted component can set). OWNER: context helper.
//!
//! Pure: the caller passes `now` and the request; the time-zone database is compiled in
//! (`jiff` with its bundled tzdb), so no file is read. Never imports tonic, tokio or tracing.
//! Every failure text names configuration, never the caller's values.
//!
//! Fail closed: a condition that cannot be evaluated (no client address, no `auth_time` and no
//! `iat`, a missing posture claim or header) does not hold.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use super::request::{Headers, RequestView};
use crate::identity::Identity;

/// What the context conditions are evaluated against, beyond the identity.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Seconds since the Unix epoch.
    pub now: i64,
    /// The client address (see `client_ip`); `None` when it cannot be established.
    pub client_ip: Option<IpAddr>,
    /// The request headers (lower-case names), for posture headers.
    pub headers: Option<&'a dyn Headers>,
}

impl<'a> Context<'a> {
    /// The context of a request at `now`, with the client address derived through
    /// `trusted_hops` trusted proxies (see `client_ip`).
    pub fn of(req: &RequestView<'a>, now: i64, trusted_hops: u32) -> Self {
        Context {
            now,
            client_ip: client_ip(req, trusted_hops),
            headers: Some(req.headers),
        }
    }

    /// A context with only a time: no client address, no headers. Conditions on the source or
    /// on posture headers never hold in it.
    pub fn at(now: i64) -> Self {
        Context {
            now,
            client_ip: None,
            headers: None,
        }
    }
}

/// The client address of a request.
///
/// `trusted_hops == 0`: the source address Envoy reports (the TCP peer with the shipped Envoy
/// config, or what Envoy derived with its own `xff_num_trusted_hops`). X-Forwarded-For is
/// ignored: any client can send it.
///
/// `trusted_hops == N > 0`: N trusted proxies in front of Envoy each appended the address they
/// saw to X-Forwarded-For. With `use_remote_address: true` (every shipped config) Envoy
/// appends one entry too, dropped first: its TCP peer (equal to the source address), or, when
/// that peer is on loopback (a proxy on the same host), Envoy's own address instead (checked
/// against Envoy 1.40: `127.0.0.1` never appears, the node's address does). The client is then
/// the N-th entry from the right; entries left of it were written by the client and are never
/// read. A source address found further left (Envoy derived it from the header with its own
/// `xff_num_trusted_hops` > 0) gives `None`.
///
/// Fail closed: a missing header, too few entries, or an unparsable entry among those read gives
/// `None`, and every source condition fails. The source address is NOT used as a fallback: with
/// trusted proxies in front, it is a proxy's address, which a CIDR list may well allow. Nor is
/// the header read without a source address (the HTTP API without
/// `x-portcullis-source-address`): whether Envoy appended its entry is then unknown, and
/// counting from the right would take that entry, a trusted proxy, for the client.
pub fn client_ip(req: &RequestView<'_>, trusted_hops: u32) -> Option<IpAddr> {
    if trusted_hops == 0 {
        return req.source_ip;
    }
    let src = req.source_ip?.to_canonical();
    let xff = req.header("x-forwarded-for")?;
    // Walk from the right without allocating: this runs for every request with a token.
    let mut entries = xff.rsplit(',').map(str::trim).peekable();
    if let Some(last) = entries.peek() {
        if src.is_loopback() || parse_xff_entry(last) == Some(src) {
            entries.next();
        } else if xff
            .split(',')
            .any(|e| parse_xff_entry(e.trim()) == Some(src))
        {
            // The source is an entry Envoy took from the header (its own
            // `xff_num_trusted_hops` > 0, read by the module): counting from the right would
            // land on the proxy Envoy appended. The chain is not the one configured.
            return None;
        }
    }
    // Every entry written by a trusted proxy must parse: garbage there means the chain is not
    // what the configuration says it is.
    for hop in 1..=trusted_hops {
        let ip = parse_xff_entry(entries.next()?)?;
        if hop == trusted_hops {
            return Some(ip);
        }
    }
    None
}

/// One X-Forwarded-For entry: a bare IPv4 or IPv6 address (bracketed IPv6 accepted). Ports
/// and anything else are refused.
fn parse_xff_entry(entry: &str) -> Option<IpAddr> {
    let bare = entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .unwrap_or(entry);
    let ip: IpAddr = bare.parse().ok()?;
    // An IPv4-mapped IPv6 address is the IPv4 address, so `10.0.0.0/8` covers `::ffff:10.1.2.3`.
    Some(ip.to_canonical())
}

/// A source-network condition: the client address must be in one of `cidrs` (when any are
/// given) and in none of `not_cidrs`.
#[derive(Debug, Clone, Default)]
pub struct SourceCondition {
    pub cidrs: Vec<IpNet>,
    pub not_cidrs: Vec<IpNet>,
}

impl SourceCondition {
    pub fn holds(&self, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip.map(|ip| ip.to_canonical()) else {
            return false;
        };
        (self.cidrs.is_empty() || self.cidrs.iter().any(|n| n.contains(&ip)))
            && !self.not_cidrs.iter().any(|n| n.contains(&ip))
    }
}

/// Days of the week, Monday first (bit 0) as ISO 8601 numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaySet(pub u8);

impl DaySet {
    pub const ALL: DaySet = DaySet(0x7f);

    /// `mon`..`sun` (or the full English name), case-insensitive.
    pub fn parse_day(name: &str) -> Option<u8> {
        const NAMES: [&str; 7] = [
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
            "sunday",
        ];
        let lower = name.trim().to_ascii_lowercase();
        NAMES
            .iter()
            .position(|n| {
                lower.len() >= 3 && n.starts_with(&lower) && (lower.len() == 3 || lower == *n)
            })
            .and_then(|i| u8::try_from(i).ok())
    }

    pub fn contains(self, day_from_monday: u8) -> bool {
        day_from_monday < 7 && self.0 & (1 << day_from_monday) != 0
    }
}

/// A time window: on these local days, between these local times, in a time zone.
#[derive(Debug, Clone)]
pub struct TimeWindow {
    pub days: DaySet,
    /// Minutes after local midnight: `[start, end)`. `start > end` wraps past midnight
    /// (`22:00-06:00`); the day checked is the local day of the instant itself.
    pub start_min: u16,
    pub end_min: u16,
    pub tz: jiff::tz::TimeZone,
    /// The configured name, for messages.
    pub tz_name: String,
}

impl TimeWindow {
    /// Parses `HH:MM-HH:MM` (`24:00` allowed as an end) into minutes.
    pub fn parse_hours(text: &str) -> Option<(u16, u16)> {
        let (a, b) = text.split_once('-')?;
        let start = parse_hhmm(a.trim(), false)?;
        let end = parse_hhmm(b.trim(), true)?;
        (start != end).then_some((start, end))
    }

    pub fn holds(&self, now: i64) -> bool {
        let Ok(ts) = jiff::Timestamp::from_second(now) else {
            return false;
        };
        let local = ts.to_zoned(self.tz.clone());
        let day = u8::try_from(local.weekday().to_monday_zero_offset()).unwrap_or(u8::MAX);
        let minute = u16::try_from(local.hour()).unwrap_or(0) * 60
            + u16::try_from(local.minute()).unwrap_or(0);
        let in_hours = if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&minute)
        } else {
            minute >= self.start_min || minute < self.end_min
        };
        self.days.contains(day) && in_hours
    }
}

fn parse_hhmm(text: &str, end: bool) -> Option<u16> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    match (h, m) {
        (24, 0) if end => Some(24 * 60),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

/// Where a posture signal is read.
#[derive(Debug, Clone)]
pub enum PostureSource {
    /// A (dotted) claim path of the verified token.
    Claim(String),
    /// A request header that only a trusted component (Envoy, a device-trust proxy) sets;
    /// config validation admits only headers listed in `network.trusted_headers`.
    Header(String),
}

/// A posture test.
#[derive(Debug, Clone)]
pub enum PostureTest {
    Equals(Value),
    OneOf(Vec<Value>),
}

#[derive(Debug, Clone)]
pub struct PostureCondition {
    pub source: PostureSource,
    pub test: PostureTest,
}

impl PostureCondition {
    /// `id` is `None` for a caller without a token: a claim condition then does not hold.
    fn holds(&self, id: Option<&Identity>, ctx: &Context<'_>) -> bool {
        let test = |v: &Value| match &self.test {
            PostureTest::Equals(w) => v == w,
            PostureTest::OneOf(ws) => ws.iter().any(|w| w == v),
        };
        match &self.source {
            PostureSource::Claim(c) => id.and_then(|id| id.claim(c)).is_some_and(test),
            PostureSource::Header(h) => {
                // A repeated header arrives joined with `,` and never matches a single value.
                let Some((_, v)) = ctx.headers.and_then(|hs| hs.entry(h)) else {
                    return false;
                };
                test(&Value::String(v.to_string()))
            }
        }
    }
}

/// All context conditions of one rule. The default has none.
#[derive(Debug, Clone, Default)]
pub struct ContextConditions {
    pub source: Option<SourceCondition>,
    /// Seconds: `now - auth_time` (or `iat` when there is no `auth_time`) must not exceed it.
    pub max_session_age: Option<u64>,
    /// Seconds: `exp - iat` must not exceed it.
    pub max_token_lifetime: Option<u64>,
    pub time_window: Option<TimeWindow>,
    pub posture: Vec<PostureCondition>,
}

/// One unmet context condition. The text names configuration only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextFailure {
    Source,
    SessionAge(u64),
    SessionAgeUnknown,
    /// `auth_time` is there but not a whole number of seconds.
    SessionAgeInvalid,
    Lifetime(u64),
    LifetimeUnknown,
    TimeWindow(String),
    Posture(String),
}

impl fmt::Display for ContextFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContextFailure::Source => f.write_str("source address not allowed for this route"),
            ContextFailure::SessionAge(s) => {
                write!(
                    f,
                    "login older than {} for this route (its `auth_time`, else the token's `iat`)",
                    human(*s)
                )
            }
            ContextFailure::SessionAgeUnknown => f.write_str(
                "the token carries neither `auth_time` nor `iat`: its session age is unknown",
            ),
            ContextFailure::SessionAgeInvalid => f.write_str(
                "the token's `auth_time` is not a whole number of seconds: its session age is \
                 unknown",
            ),
            ContextFailure::Lifetime(s) => {
                write!(f, "token lifetime longer than {} for this route", human(*s))
            }
            ContextFailure::LifetimeUnknown => {
                f.write_str("the token carries no `iat`: its lifetime is unknown")
            }
            ContextFailure::TimeWindow(tz) => {
                write!(f, "outside the allowed time window ({tz})")
            }
            ContextFailure::Posture(what) => write!(f, "device posture `{what}` not satisfied"),
        }
    }
}

fn human(secs: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

impl ContextConditions {
    pub fn is_empty(&self) -> bool {
        self.source.is_none()
            && self.max_session_age.is_none()
            && self.max_token_lifetime.is_none()
            && self.time_window.is_none()
            && self.posture.is_empty()
    }

    /// True when a condition reads the token (`max_session_age`, `max_token_lifetime`, a
    /// posture claim): a caller without one never meets it. Source, time window and posture
    /// headers are about the request, and hold for a token-less peer too.
    pub fn needs_token(&self) -> bool {
        self.max_session_age.is_some()
            || self.max_token_lifetime.is_some()
            || self
                .posture
                .iter()
                .any(|p| matches!(p.source, PostureSource::Claim(_)))
    }

    /// Every unmet condition for a verified identity, in a fixed order.
    pub fn evaluate(&self, id: &Identity, ctx: &Context<'_>) -> Vec<ContextFailure> {
        self.evaluate_for(Some(id), ctx)
    }

    /// Every unmet condition for a caller without a token (a service granted on its peer
    /// identity). Fails closed: a condition that reads the token does not hold.
    pub fn evaluate_without_token(&self, ctx: &Context<'_>) -> Vec<ContextFailure> {
        self.evaluate_for(None, ctx)
    }

    fn evaluate_for(&self, id: Option<&Identity>, ctx: &Context<'_>) -> Vec<ContextFailure> {
        let mut out = Vec::new();
        if let Some(s) = &self.source
            && !s.holds(ctx.client_ip)
        {
            out.push(ContextFailure::Source);
        }
        if let Some(max) = self.max_session_age {
            let started = match id.map(|id| (id.claims.get("auth_time"), id.issued_at)) {
                // INVARIANT: a present but non-integer `auth_time` never falls back to `iat`,
                // so a malformed claim cannot make a session look fresher.
                Some((Some(v), _)) => v.as_i64().ok_or(ContextFailure::SessionAgeInvalid),
                Some((None, iat)) => iat.ok_or(ContextFailure::SessionAgeUnknown),
                None => Err(ContextFailure::SessionAgeUnknown),
            };
            match started {
                Ok(t) if now_minus(ctx.now, t) <= max => {}
                Ok(_) => out.push(ContextFailure::SessionAge(max)),
                Err(why) => out.push(why),
            }
        }
        if let Some(max) = self.max_token_lifetime {
            match id.and_then(|id| id.issued_at.map(|iat| (iat, id.expires_at))) {
                Some((iat, exp)) if now_minus(exp, iat) <= max => {}
                Some(_) => out.push(ContextFailure::Lifetime(max)),
                None => out.push(ContextFailure::LifetimeUnknown),
            }
        }
        if let Some(w) = &self.time_window
            && !w.holds(ctx.now)
        {
            out.push(ContextFailure::TimeWindow(w.tz_name.clone()));
        }
        for p in &self.posture {
            if !p.holds(id, ctx) {
                let what = match &p.source {
                    PostureSource::Claim(c) => c.clone(),
                    PostureSource::Header(h) => h.clone(),
                };
                out.push(ContextFailure::Posture(what));
            }
        }
        out
    }
}

/// `a - b` in seconds, clamped at zero. A time in the future is age zero: the token checks
/// (`jwt::check_claims`, also applied to policy-test callers) refuse an `iat` or `auth_time`
/// later than now by more than the issuer's leeway, so only clock skew within it is clamped.
fn now_minus(a: i64, b: i64) -> u64 {
    u64::try_from(a.saturating_sub(b)).unwrap_or(0)
}

#[cfg(test)]
#[path = "context_tests.rs"]
mod tests;
