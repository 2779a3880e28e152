use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::authz::ReasonCode;
use crate::config;

/// 2026-03-30 06:30:00 UTC, a Monday: 08:30 in Paris (CEST, the day after the DST switch).
const MON_0630_UTC_AFTER_DST: i64 = 1_774_852_200;
/// 2026-03-27 06:30:00 UTC, a Friday: 07:30 in Paris (CET, before the DST switch).
const FRI_0630_UTC_BEFORE_DST: i64 = 1_774_593_000;

fn id(claims: Value) -> Identity {
    let claims = claims.as_object().cloned().unwrap_or_default();
    Identity {
        issuer_name: Arc::from("dev"),
        issuer: "https://dev.portcullis.invalid".to_string(),
        subject: "alice".to_string(),
        scopes: Vec::new(),
        roles: Vec::new(),
        expires_at: claims
            .get("exp")
            .and_then(Value::as_i64)
            .unwrap_or(i64::MAX),
        not_before: None,
        issued_at: claims.get("iat").and_then(Value::as_i64),
        key_fingerprint: Arc::from("k"),
        key_kid: None,
        key_alg: None,
        claims,
    }
}

fn view<'a>(headers: &'a HashMap<String, String>, source: Option<&str>) -> RequestView<'a> {
    RequestView {
        method: "GET",
        host: "h",
        path: "/admin",
        headers,
        source_ip: source.map(|s| s.parse().unwrap()),
        source_principal: "",
        scheme: "http",
        peer_certificate: None,
    }
}

fn xff(value: &str) -> HashMap<String, String> {
    HashMap::from([("x-forwarded-for".to_string(), value.to_string())])
}

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

#[test]
fn client_ip_without_trusted_hops_is_the_source_and_ignores_xff() {
    let h = xff("203.0.113.9");
    assert_eq!(client_ip(&view(&h, Some("10.0.0.1")), 0), ip("10.0.0.1"));
    assert_eq!(client_ip(&view(&h, None), 0), None);
}

#[test]
fn client_ip_takes_the_entry_n_hops_from_the_right() {
    // Client-written junk on the left, one trusted proxy appended the client, Envoy appended
    // its peer (the proxy, equal to the source address).
    let h = xff("6.6.6.6, 198.51.100.7, 10.0.0.5");
    let v = view(&h, Some("10.0.0.5"));
    assert_eq!(client_ip(&v, 1), ip("198.51.100.7"));
    assert_eq!(client_ip(&v, 2), ip("6.6.6.6"));
    // Without Envoy's own append the last entry is the proxy-written one.
    let h = xff("6.6.6.6, 198.51.100.7");
    assert_eq!(
        client_ip(&view(&h, Some("10.0.0.5")), 1),
        ip("198.51.100.7")
    );
    // A proxy on loopback: Envoy appended its own address (any), never 127.0.0.1.
    let h = xff("6.6.6.6, 198.51.100.7, 192.0.2.2");
    assert_eq!(
        client_ip(&view(&h, Some("127.0.0.1")), 1),
        ip("198.51.100.7")
    );
    assert_eq!(client_ip(&view(&h, Some("::1")), 1), ip("198.51.100.7"));
    assert_eq!(
        client_ip(&view(&h, Some("::ffff:127.0.0.1")), 2),
        ip("6.6.6.6")
    );
}

#[test]
fn client_ip_is_unknown_when_envoy_took_the_source_from_the_header() {
    // Envoy with its own `xff_num_trusted_hops: 1` (the module reads the address Envoy
    // derives): the source is the client's entry, and the last one is the proxy Envoy
    // appended. Counting from the right would make the proxy the client.
    let h = xff("6.6.6.6, 198.51.100.7, 10.0.0.5");
    assert_eq!(client_ip(&view(&h, Some("198.51.100.7")), 1), None);
    assert_eq!(client_ip(&view(&h, Some("6.6.6.6")), 2), None);
}

#[test]
fn client_ip_is_unknown_without_a_source_address_behind_trusted_proxies() {
    // The HTTP API without `x-portcullis-source-address`: whether Envoy appended its peer
    // (the proxy 10.0.0.5) is unknown, and counting from the right would take the proxy,
    // which an internal-only CIDR list allows, for the client.
    let h = xff("198.51.100.7, 10.0.0.5");
    assert_eq!(
        client_ip(&view(&h, Some("10.0.0.5")), 1),
        ip("198.51.100.7")
    );
    assert_eq!(client_ip(&view(&h, None), 1), None);
    assert_eq!(client_ip(&view(&h, None), 2), None);
    assert!(!source(&["10.0.0.0/8"], &[]).holds(client_ip(&view(&h, None), 1)));
}

#[test]
fn client_ip_fails_closed_on_short_missing_or_malformed_xff() {
    let none = HashMap::new();
    assert_eq!(client_ip(&view(&none, Some("10.0.0.5")), 1), None);
    let h = xff("10.0.0.5");
    assert_eq!(client_ip(&view(&h, Some("10.0.0.5")), 1), None);
    let h = xff("198.51.100.7, garbage, 10.0.0.5");
    assert_eq!(client_ip(&view(&h, Some("10.0.0.5")), 2), None);
    assert_eq!(client_ip(&view(&h, Some("10.0.0.5")), 1), None);
    // A port is not an address.
    let h = xff("198.51.100.7:443");
    assert_eq!(client_ip(&view(&h, Some("10.0.0.5")), 1), None);
    // Garbage left of the client (client-written) is never read.
    let h = xff("garbage, 198.51.100.7");
    assert_eq!(
        client_ip(&view(&h, Some("10.0.0.5")), 1),
        ip("198.51.100.7")
    );
}

#[test]
fn client_ip_reads_ipv6_entries() {
    let h = xff("[2001:db8::7], 2001:db8:1::1");
    assert_eq!(
        client_ip(&view(&h, Some("2001:db8:1::1")), 1),
        ip("2001:db8::7")
    );
}

fn source(cidrs: &[&str], not: &[&str]) -> SourceCondition {
    SourceCondition {
        cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        not_cidrs: not.iter().map(|c| c.parse().unwrap()).collect(),
    }
}

#[test]
fn source_cidrs_ipv4_ipv6_and_exclusions() {
    let s = source(&["10.0.0.0/8", "2001:db8::/32"], &["10.9.0.0/16"]);
    assert!(s.holds(ip("10.1.2.3")));
    assert!(!s.holds(ip("10.9.2.3")));
    assert!(!s.holds(ip("192.168.1.1")));
    assert!(s.holds(ip("2001:db8:ffff::1")));
    assert!(!s.holds(ip("2001:db9::1")));
    // An IPv4-mapped IPv6 address is its IPv4 address, in both directions.
    assert!(s.holds(ip("::ffff:10.1.2.3")));
    assert!(!s.holds(ip("::ffff:10.9.2.3")));
    assert!(!s.holds(None), "an unknown client address never passes");
    let only_not = source(&[], &["192.0.2.0/24"]);
    assert!(only_not.holds(ip("198.51.100.1")));
    assert!(!only_not.holds(ip("192.0.2.1")));
    assert!(!only_not.holds(None));
}

fn cond() -> ContextConditions {
    ContextConditions::default()
}

#[test]
fn session_age_uses_auth_time_then_iat_and_denies_without_either() {
    let c = ContextConditions {
        max_session_age: Some(600),
        ..cond()
    };
    let now = 1_800_000_000;
    let ctx = Context::at(now);
    assert!(c.evaluate(&id(json!({"iat": now - 600})), &ctx).is_empty());
    assert_eq!(
        c.evaluate(&id(json!({"iat": now - 601})), &ctx),
        vec![ContextFailure::SessionAge(600)]
    );
    // auth_time wins over a fresh iat (a refreshed token of an old login).
    assert_eq!(
        c.evaluate(&id(json!({"iat": now, "auth_time": now - 3600})), &ctx),
        vec![ContextFailure::SessionAge(600)]
    );
    assert!(
        c.evaluate(&id(json!({"iat": now - 3600, "auth_time": now - 5})), &ctx)
            .is_empty()
    );
    assert_eq!(
        c.evaluate(&id(json!({})), &ctx),
        vec![ContextFailure::SessionAgeUnknown]
    );
    // A malformed auth_time never falls back to a fresh iat.
    assert_eq!(
        c.evaluate(&id(json!({"iat": now, "auth_time": "yesterday"})), &ctx),
        vec![ContextFailure::SessionAgeInvalid]
    );
    // Nor does a fractional one, and the answer says what is wrong with it (not that the
    // token carries no `auth_time`).
    let fractional = c.evaluate(&id(json!({"iat": now, "auth_time": 1_796_299_000.5})), &ctx);
    assert_eq!(fractional, vec![ContextFailure::SessionAgeInvalid]);
    let text = fractional[0].to_string();
    assert!(
        text.contains("`auth_time` is not a whole number") && !text.contains("neither"),
        "{text}"
    );
    let text = ContextFailure::SessionAge(600).to_string();
    assert_eq!(
        text,
        "login older than 10m for this route (its `auth_time`, else the token's `iat`)"
    );
}

#[test]
fn token_lifetime_is_exp_minus_iat_and_needs_iat() {
    let c = ContextConditions {
        max_token_lifetime: Some(900),
        ..cond()
    };
    let ctx = Context::at(1_800_000_000);
    assert!(
        c.evaluate(&id(json!({"iat": 1000, "exp": 1900})), &ctx)
            .is_empty()
    );
    assert_eq!(
        c.evaluate(&id(json!({"iat": 1000, "exp": 1901})), &ctx),
        vec![ContextFailure::Lifetime(900)]
    );
    assert_eq!(
        c.evaluate(&id(json!({"exp": 1900})), &ctx),
        vec![ContextFailure::LifetimeUnknown]
    );
}

fn window(days: u8, hours: &str, tz: &str) -> TimeWindow {
    let (start_min, end_min) = TimeWindow::parse_hours(hours).unwrap();
    TimeWindow {
        days: DaySet(days),
        start_min,
        end_min,
        tz: jiff::tz::TimeZone::get(tz).unwrap(),
        tz_name: tz.to_string(),
    }
}

#[test]
fn time_window_follows_daylight_saving_time() {
    let w = window(0x1f, "08:00-18:00", "Europe/Paris");
    // Same UTC clock time, both weekdays: 08:30 local after the switch, 07:30 before it.
    assert!(w.holds(MON_0630_UTC_AFTER_DST));
    assert!(!w.holds(FRI_0630_UTC_BEFORE_DST));
    // A fixed UTC window sees both as 06:30.
    let utc = window(0x1f, "06:00-07:00", "UTC");
    assert!(utc.holds(MON_0630_UTC_AFTER_DST) && utc.holds(FRI_0630_UTC_BEFORE_DST));
}

#[test]
fn time_window_days_end_exclusive_and_overnight() {
    let weekdays = window(0x1f, "00:00-24:00", "UTC");
    // 2026-03-28 is a Saturday.
    let sat_noon = 1_774_699_200;
    assert!(!weekdays.holds(sat_noon));
    assert!(window(DaySet::ALL.0, "00:00-24:00", "UTC").holds(sat_noon));
    let w = window(DaySet::ALL.0, "08:00-18:00", "UTC");
    let monday_midnight = 1_774_828_800; // 2026-03-30 00:00 UTC
    assert!(w.holds(monday_midnight + 8 * 3600));
    assert!(w.holds(monday_midnight + 18 * 3600 - 1));
    assert!(
        !w.holds(monday_midnight + 18 * 3600),
        "the end is exclusive"
    );
    assert!(!w.holds(monday_midnight + 8 * 3600 - 1));
    let night = window(DaySet::ALL.0, "22:00-06:00", "UTC");
    assert!(night.holds(monday_midnight + 23 * 3600));
    assert!(night.holds(monday_midnight + 5 * 3600));
    assert!(!night.holds(monday_midnight + 12 * 3600));
}

#[test]
fn hours_and_days_parse_strictly() {
    assert_eq!(TimeWindow::parse_hours("08:00-18:30"), Some((480, 1110)));
    assert_eq!(TimeWindow::parse_hours("00:00-24:00"), Some((0, 1440)));
    for bad in [
        "8:00-18:00",
        "08:00",
        "24:00-08:00",
        "08:60-09:00",
        "08:00-08:00",
    ] {
        assert_eq!(TimeWindow::parse_hours(bad), None, "{bad}");
    }
    assert_eq!(DaySet::parse_day("Mon"), Some(0));
    assert_eq!(DaySet::parse_day("sunday"), Some(6));
    assert_eq!(DaySet::parse_day("mo"), None);
    assert_eq!(DaySet::parse_day("mond"), None);
}

#[test]
fn posture_from_claim_and_from_header() {
    let c = ContextConditions {
        posture: vec![
            PostureCondition {
                source: PostureSource::Claim("device.trust".to_string()),
                test: PostureTest::OneOf(vec![json!("managed"), json!("compliant")]),
            },
            PostureCondition {
                source: PostureSource::Header("x-device-posture".to_string()),
                test: PostureTest::Equals(json!("ok")),
            },
        ],
        ..cond()
    };
    let good = HashMap::from([("x-device-posture".to_string(), "ok".to_string())]);
    let bad = HashMap::from([("x-device-posture".to_string(), "ok,ok".to_string())]);
    fn ctx(h: &HashMap<String, String>) -> Context<'_> {
        Context::of(&view(h, Some("10.0.0.1")), 0, 0)
    }
    let managed = id(json!({"device": {"trust": "managed"}}));
    assert!(c.evaluate(&managed, &ctx(&good)).is_empty());
    assert_eq!(
        c.evaluate(&managed, &ctx(&bad)),
        vec![ContextFailure::Posture("x-device-posture".to_string())]
    );
    assert_eq!(
        c.evaluate(&id(json!({"device": {"trust": "byod"}})), &ctx(&good)),
        vec![ContextFailure::Posture("device.trust".to_string())]
    );
    assert_eq!(c.evaluate(&managed, &Context::at(0)).len(), 1);
}

const CONFIG: &str = r#"
issuers:
  - name: dev
    issuer: https://dev.portcullis.invalid
    audiences: [a]
    keys: {file: config/dev/jwks.json}
network:
  trusted_headers: [x-device-posture]
routes:
  - id: admin
    methods: [GET]
    path: /admin
    rules:
      - id: fresh-admin
        scopes: [admin]
        max_session_age: 10m
        source: {cidrs: [10.0.0.0/8]}
      - id: auditor
        scopes: [audit]
"#;

#[test]
fn a_rule_failing_only_on_context_is_context_denied() {
    let now = 1_800_000_000;
    let cfg = config::from_str(CONFIG, Path::new("Cargo.toml")).unwrap();
    let h = HashMap::new();
    let check = |claims: Value, src: &str| {
        let req = view(&h, Some(src));
        let m = cfg.policy.match_route(&req).unwrap();
        let mut identity = id(claims);
        identity.scopes = vec!["admin".to_string()];
        cfg.policy
            .authorize(&m, &Arc::new(identity), &Context::of(&req, now, 0))
    };
    let ok = check(json!({"iat": now - 60}), "10.1.1.1");
    assert_eq!(
        (ok.code, ok.rule.as_deref()),
        (ReasonCode::Allowed, Some("fresh-admin"))
    );
    let old = check(json!({"iat": now - 601}), "10.1.1.1");
    assert_eq!(old.code, ReasonCode::ContextDenied);
    assert_eq!(old.http_status(), 403);
    assert_eq!(old.rule.as_deref(), Some("fresh-admin"));
    assert_eq!(
        old.detail,
        "login older than 10m for this route (its `auth_time`, else the token's `iat`)"
    );
    let outside = check(json!({"iat": now - 601}), "192.0.2.1");
    assert_eq!(outside.code, ReasonCode::ContextDenied);
    assert_eq!(
        outside.detail,
        "source address not allowed for this route; login older than 10m for this route (its `auth_time`, else the token's `iat`)"
    );
}

fn config_error(extra_rule: &str, network: &str) -> String {
    let text = format!(
        "issuers:\n  - {{name: dev, issuer: https://i, audiences: [a], keys: {{file: config/dev/jwks.json}}}}\n{network}routes:\n  - id: r\n    methods: [GET]\n    path: /r\n    rules:\n      - {{id: x, {extra_rule}}}\n"
    );
    match config::from_str(&text, Path::new("Cargo.toml")) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_validation_of_context_conditions() {
    assert!(
        config_error(
            "source: {cidrs: [10.0.0.0/8, '2001:db8::/32', 192.0.2.1]}",
            ""
        )
        .is_empty()
    );
    assert!(config_error("source: {cidrs: [10.0.0.0/33]}", "").contains("source.cidrs[0]"));
    assert!(config_error("source: {}", "").contains("give `cidrs`"));
    assert!(config_error("max_session_age: 0s", "").contains("at least 1s"));
    assert!(config_error("time_window: {days: [mon, funday]}", "").contains("time_window.days[1]"));
    assert!(
        config_error("time_window: {timezone: Mars/Olympus}", "").contains("unknown time zone")
    );
    assert!(config_error("time_window: {hours: '9-17'}", "").contains("time_window.hours"));
    assert!(
        config_error(
            "time_window: {days: [sat, sun], hours: '22:00-06:00', timezone: America/New_York}",
            ""
        )
        .is_empty()
    );
    let untrusted = config_error("posture: [{header: x-device-posture, equals: ok}]", "");
    assert!(untrusted.contains("not a trusted header"), "{untrusted}");
    let net = "network: {trusted_headers: [x-device-posture]}\n";
    assert!(config_error("posture: [{header: x-device-posture, equals: ok}]", net).is_empty());
    assert!(config_error("posture: [{claim: d, one_of: []}]", "").contains("one_of"));
    assert!(
        config_error("posture: [{claim: d, header: x, equals: 1}]", net).contains("exactly one")
    );
    assert!(
        config_error(
            "scopes: [a]",
            "network: {trusted_headers: [authorization]}\n"
        )
        .contains("cannot be a trusted posture header")
    );
}

#[test]
fn config_validation_of_revocation() {
    let base = "issuers: []\nroutes: [{id: r, methods: [GET], path: /r, public: true}]\n";
    let err =
        |extra: &str| match config::from_str(&format!("{base}{extra}"), Path::new("Cargo.toml")) {
            Ok(c) => format!("ok {:?}", c.revocation_file),
            Err(e) => e.to_string(),
        };
    assert!(err("revocation: {file: no-such-file.yaml}").contains("revocation file"));
    assert!(err("revocation: {file: Cargo.toml}").starts_with("ok Some("));
    assert!(err("revocation: {reload: 10ms}").contains("revocation.reload"));
    assert!(err("revocation: {admin_token_sha256: abc}").contains("64 hex digits"));
    assert_eq!(err(""), "ok None");
}

/// A network written in IPv4-mapped form (as a dual-stack listener logs its clients) is its
/// IPv4 network: client addresses are compared in IPv4 form, so kept as IPv6 it would hold
/// nobody, and a `not_cidrs` entry would block nobody.
#[test]
fn ipv4_mapped_networks_in_the_config_hold_their_ipv4_clients() {
    let text = "routes:\n  - id: admin\n    methods: [GET]\n    path: /admin\n    rules:\n      - id: r\n        scopes: [admin]\n        source: {cidrs: [\"::ffff:10.0.0.0/104\"], not_cidrs: [\"::ffff:10.66.0.0/112\", \"::ffff:10.1.2.3\"]}\n";
    let cfg = config::from_str(text, Path::new("t.yaml")).unwrap();
    let src = cfg.policy.routes()[0].rules[0]
        .context
        .source
        .clone()
        .unwrap();
    assert!(src.holds(ip("10.9.9.9")));
    assert!(src.holds(ip("::ffff:10.9.9.9")));
    assert!(!src.holds(ip("10.66.1.1")), "an excluded network let in");
    assert!(!src.holds(ip("::ffff:10.66.1.1")));
    assert!(!src.holds(ip("10.1.2.3")), "an excluded address let in");
    assert!(!src.holds(ip("192.0.2.1")));
    // Other IPv6 networks stay IPv6.
    let text = text.replace("::ffff:10.0.0.0/104", "2001:db8::/32");
    let cfg = config::from_str(&text, Path::new("t.yaml")).unwrap();
    let src = cfg.policy.routes()[0].rules[0]
        .context
        .source
        .clone()
        .unwrap();
    assert!(src.holds(ip("2001:db8::1")));
    assert!(!src.holds(ip("10.9.9.9")));
}
