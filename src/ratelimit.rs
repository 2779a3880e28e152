//! Rate limits: which configured limits select a granted request, the bucket each one counts
//! it in, and the 429 a request over a limit gets (`Retry-After` and the IETF `RateLimit` /
//! `RateLimit-Policy` headers, draft-ietf-httpapi-ratelimit-headers).
//!
//! The buckets live in the shared `StateStore` (GCRA); this module only chooses keys and
//! shapes answers. It never changes a deny and never counts a request the grant refused
//! or a limit refused (the limits that select a request count it together or not at all,
//! and approvals run after them);
//! it fails closed: a store error is a 503 `state_unavailable`, never an allow.
//!
//! Headers, per limit: `RateLimit-Policy: "<id>";q=<burst>;w=<seconds to refill the burst>`
//! and `RateLimit: "<id>";r=<remaining>;t=<seconds>`. On the 429 they name the limit that
//! refused and `t` is the wait until one more request fits (as `Retry-After`). On an allow
//! they list every limit that counted the request, in config order, and `t` is the wait until
//! that bucket is full again; Envoy adds them to the response the client gets.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use crate::authz::{Decision, ReasonCode, RequestView, RouteMatch};
use crate::config::schema::RateLimitBy;
use crate::config::{CompiledRateLimit, Config};
use crate::identity::Identity;
use crate::state::{RateOutcome, StateStore};

/// The state key of the bucket `limit` counts this request in; `None` when the limit does
/// not select it (another route, or no identity / API key to count by).
pub fn bucket_key(
    limit: &CompiledRateLimit,
    route_id: &str,
    identity: Option<&Identity>,
    client: Option<IpAddr>,
) -> Option<String> {
    if !limit.covers(route_id) {
        return None;
    }
    let id = &limit.id;
    match limit.by {
        RateLimitBy::Subject => {
            let who = identity?;
            // Length-prefixed so no issuer/subject pair can collide with another.
            Some(format!(
                "rate:{id}:sub:{}:{}:{}",
                who.issuer_name.len(),
                who.issuer_name,
                who.subject
            ))
        }
        RateLimitBy::ApiKey => Some(format!("rate:{id}:key:{}", identity?.api_key_id()?)),
        RateLimitBy::ClientIp => Some(match client {
            Some(ip) => format!("rate:{id}:ip:{}", client_network(ip, limit.ipv6_prefix)),
            // No address: all such requests share one bucket rather than escaping the limit.
            None => format!("rate:{id}:ip:unknown"),
        }),
        RateLimitBy::Route => Some(format!("rate:{id}:route:{route_id}")),
    }
}

/// What a `client_ip` bucket counts: an IPv4 address as it is (`192.0.2.7`), an IPv6
/// address as its network of `ipv6_prefix` bits (`2001:db8:1:2::/64`). A host holds a whole
/// /64 and may use a new address from it for every request; counting single IPv6 addresses
/// would let it escape the limit. An IPv4-mapped address (`::ffff:192.0.2.7`) is its IPv4
/// address: masked as IPv6, every IPv4 client would share the bucket `::/64`.
pub fn client_network(ip: IpAddr, ipv6_prefix: u8) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let prefix = ipv6_prefix.min(128);
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            format!("{}/{prefix}", Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// The limits (and their buckets) that select a request, in config order.
pub fn applicable<'c>(
    config: &'c Config,
    req: &RequestView<'_>,
    route_id: &str,
    identity: Option<&Identity>,
) -> Vec<(&'c CompiledRateLimit, String)> {
    // The address network conditions read (the same reading of X-Forwarded-For), and only
    // when a limit counts by it. `None` (a chain that is not the configured one) counts in
    // one shared bucket.
    let by_client = config
        .rate_limits
        .iter()
        .any(|l| l.by == RateLimitBy::ClientIp);
    let client = by_client
        .then(|| crate::authz::context::client_ip(req, config.file.network.trusted_proxy_hops))
        .flatten();
    config
        .rate_limits
        .iter()
        .filter_map(|l| bucket_key(l, route_id, identity, client).map(|k| (l, k)))
        .collect()
}

/// Spends one request from every limit that selects an allowed `decision`, all at once: a
/// limit over its budget turns it into a 429, and then no limit counts it (a client over
/// its own limit does not drain a shared one). An allow comes back carrying what is left of
/// every limit that counted it. Denies pass through unchanged and uncounted.
pub async fn enforce(
    store: &dyn StateStore,
    config: &Config,
    req: &RequestView<'_>,
    m: &RouteMatch<'_>,
    decision: Decision,
) -> Decision {
    if !decision.is_allow() || config.rate_limits.is_empty() {
        return decision;
    }
    let limits = applicable(config, req, m.route_id, decision.identity.as_deref());
    if limits.is_empty() {
        return decision;
    }
    // A deny in the granted decision's place keeps its route, rule and caller.
    let instead = |deny: Decision| {
        deny.with_route(decision.route.clone())
            .with_rule(decision.rule.clone())
            .with_identity(decision.identity.clone())
    };
    let buckets: Vec<(&str, crate::state::RateLimit)> = limits
        .iter()
        .map(|(l, key)| (key.as_str(), l.limit))
        .collect();
    let outcomes = match store.rate_check_all(&buckets).await {
        Ok(o) if o.len() == limits.len() => o,
        Ok(_) => {
            return instead(Decision::new(
                ReasonCode::StateUnavailable,
                "the rate limits' buckets could not be read",
            ));
        }
        Err(e) => {
            return instead(Decision::new(
                ReasonCode::StateUnavailable,
                format!("rate limits need shared state: {e}"),
            ));
        }
    };
    // Over one limit or more: none counted it; the client is told the longest wait.
    let refusing = limits
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| !o.allowed)
        .max_by_key(|(_, o)| o.retry_after);
    if let Some(((limit, _), outcome)) = refusing {
        return instead(limited(limit, outcome));
    }
    let counted: Vec<(&CompiledRateLimit, RateOutcome)> =
        limits.iter().map(|(l, _)| *l).zip(outcomes).collect();
    with_quota(decision, &counted)
}

/// An allow, with the `RateLimit-Policy` and `RateLimit` fields of every limit that counted
/// it (one list item per limit), so a client can pace itself before it meets a 429.
fn with_quota(decision: Decision, counted: &[(&CompiledRateLimit, RateOutcome)]) -> Decision {
    if counted.is_empty() {
        return decision;
    }
    let list = |item: &dyn Fn(&CompiledRateLimit, &RateOutcome) -> String| {
        counted
            .iter()
            .map(|(l, o)| item(l, o))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let policies = list(&|l, _| policy_item(l));
    let left = list(&|l, o| quota_item(l, o.remaining, ceil_secs(o.reset)));
    decision
        .with_header("ratelimit-policy", policies)
        .with_header("ratelimit", left)
}

/// One `RateLimit-Policy` item: the burst and the seconds it takes to refill.
fn policy_item(limit: &CompiledRateLimit) -> String {
    let window = ceil_secs(limit.limit.emission_interval() * limit.limit.burst.max(1)).max(1);
    format!("\"{}\";q={};w={window}", limit.id, limit.limit.burst.max(1))
}

/// One `RateLimit` item: requests left now, and a wait in seconds.
fn quota_item(limit: &CompiledRateLimit, remaining: u32, secs: u64) -> String {
    format!("\"{}\";r={remaining};t={secs}", limit.id)
}

/// The 429 for a request over `limit`.
pub fn limited(limit: &CompiledRateLimit, outcome: &RateOutcome) -> Decision {
    let retry = ceil_secs(outcome.retry_after.unwrap_or(Duration::from_secs(1))).max(1);
    let id = &limit.id;
    Decision::new(
        ReasonCode::RateLimited,
        format!("rate limit `{id}` exceeded; retry in {retry}s"),
    )
    .with_header("retry-after", retry.to_string())
    .with_header("ratelimit-policy", policy_item(limit))
    .with_header("ratelimit", quota_item(limit, outcome.remaining, retry))
    .with_body_field("rate_limit", id.to_string())
}

/// Whole seconds, rounded up (a wait a client is told).
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::state::{MemoryStore, RateLimit};

    fn view<'a>(headers: &'a HashMap<String, String>, ip: &str) -> RequestView<'a> {
        RequestView {
            method: "GET",
            host: "api.example.com",
            path: "/orders/1",
            headers,
            source_ip: ip.parse().ok(),
            source_principal: "",
            scheme: "http",
            peer_certificate: None,
        }
    }

    fn limit(by: RateLimitBy, routes: &[&str]) -> CompiledRateLimit {
        CompiledRateLimit {
            id: Arc::from("l1"),
            by,
            limit: RateLimit {
                requests: 2,
                per: Duration::from_secs(60),
                burst: 2,
            },
            routes: routes.iter().map(|r| Arc::from(*r)).collect(),
            ipv6_prefix: crate::config::creds::DEFAULT_IPV6_PREFIX,
        }
    }

    /// The bucket a `client_ip` limit puts a request from `peer` with `xff` in, behind
    /// `hops` trusted proxies.
    fn client_bucket(xff: Option<&str>, peer: &str, hops: u32) -> String {
        let text = format!(
            "network: {{trusted_proxy_hops: {hops}}}\nroutes:\n  - {{id: h, methods: [GET], path: /h, public: true}}\nrate_limits:\n  - {{id: c, by: client_ip, requests: 2, per: 1h}}\n"
        );
        let config = crate::config::from_str(&text, std::path::Path::new("test.yaml")).unwrap();
        let h: HashMap<String, String> = xff
            .map(|x| ("x-forwarded-for".to_string(), x.to_string()))
            .into_iter()
            .collect();
        let found = applicable(&config, &view(&h, peer), "h", None);
        assert_eq!(found.len(), 1);
        found[0].1.clone()
    }

    #[test]
    fn client_ip_limits_count_the_client_network_conditions_see() {
        // No trusted hops: the peer, whatever the header says.
        assert_eq!(
            client_bucket(Some("1.1.1.1"), "10.0.0.1", 0),
            "rate:c:ip:10.0.0.1"
        );
        // client 9.9.9.9 -> proxy 10.0.0.5 -> Envoy (which appends the peer).
        assert_eq!(
            client_bucket(Some("6.6.6.6, 9.9.9.9, 10.0.0.5"), "10.0.0.5", 1),
            "rate:c:ip:9.9.9.9"
        );
        assert_eq!(
            client_bucket(Some("6.6.6.6, 9.9.9.9"), "10.0.0.5", 1),
            "rate:c:ip:9.9.9.9"
        );
        // A loopback peer: Envoy appends its own node address, not the peer's; that entry
        // is Envoy's, not the client's (it used to be counted as the client, so every
        // client shared one bucket).
        assert_eq!(
            client_bucket(Some("9.9.9.9, 192.0.2.2"), "127.0.0.1", 1),
            "rate:c:ip:9.9.9.9"
        );
        // Fewer entries than trusted hops, or a garbled one: not the configured chain, so
        // one shared bucket, never a client-chosen value and never no limit.
        assert_eq!(
            client_bucket(Some("9.9.9.9"), "10.0.0.5", 3),
            "rate:c:ip:unknown"
        );
        assert_eq!(
            client_bucket(Some("not-an-ip, 10.0.0.5"), "10.0.0.5", 1),
            "rate:c:ip:unknown"
        );
        assert_eq!(client_bucket(None, "10.0.0.5", 1), "rate:c:ip:unknown");
    }

    #[test]
    fn bucket_keys_select_by_route_and_identity() {
        let who = crate::identity::apikey::ApiKey::new("k1", "team", [0; 32], i64::MAX, vec![]);
        let id = &who.identity;
        let ip = "10.0.0.1".parse().ok();
        let only_orders = limit(RateLimitBy::Route, &["orders"]);
        assert!(bucket_key(&only_orders, "admin", Some(id), ip).is_none());
        assert_eq!(
            bucket_key(&only_orders, "orders", None, ip).as_deref(),
            Some("rate:l1:route:orders")
        );
        let by_key = limit(RateLimitBy::ApiKey, &[]);
        assert_eq!(
            bucket_key(&by_key, "x", Some(id), ip).as_deref(),
            Some("rate:l1:key:k1")
        );
        assert!(bucket_key(&by_key, "x", None, ip).is_none());
        let by_sub = limit(RateLimitBy::Subject, &[]);
        assert_eq!(
            bucket_key(&by_sub, "x", Some(id), ip).as_deref(),
            Some("rate:l1:sub:7:api-key:team")
        );
        let by_ip = limit(RateLimitBy::ClientIp, &[]);
        assert_eq!(
            bucket_key(&by_ip, "x", None, None).as_deref(),
            Some("rate:l1:ip:unknown")
        );
    }

    #[test]
    fn client_ip_buckets_hold_an_ipv4_address_or_an_ipv6_network() {
        let key = |l: &CompiledRateLimit, ip: &str| bucket_key(l, "x", None, ip.parse().ok());
        let by_ip = limit(RateLimitBy::ClientIp, &[]);
        assert_eq!(
            key(&by_ip, "192.0.2.7").as_deref(),
            Some("rate:l1:ip:192.0.2.7")
        );
        // Every address of a /64 is one client: rotating through it spends one budget.
        let bucket = key(&by_ip, "2001:db8:1:2::1");
        assert_eq!(bucket.as_deref(), Some("rate:l1:ip:2001:db8:1:2::/64"));
        assert_eq!(key(&by_ip, "2001:db8:1:2:8a3f:12ff:fe00:9c1"), bucket);
        assert_ne!(key(&by_ip, "2001:db8:1:3::1"), bucket);
        // An IPv4-mapped address is the IPv4 client, not the network `::/64`.
        assert_eq!(
            key(&by_ip, "::ffff:192.0.2.7").as_deref(),
            Some("rate:l1:ip:192.0.2.7")
        );
        assert_ne!(
            key(&by_ip, "::ffff:192.0.2.8"),
            key(&by_ip, "::ffff:192.0.2.7")
        );
        let site = CompiledRateLimit {
            ipv6_prefix: 48,
            ..limit(RateLimitBy::ClientIp, &[])
        };
        assert_eq!(
            key(&site, "2001:db8:1:2::1").as_deref(),
            Some("rate:l1:ip:2001:db8:1::/48")
        );
        let host = CompiledRateLimit {
            ipv6_prefix: 128,
            ..limit(RateLimitBy::ClientIp, &[])
        };
        assert_eq!(
            key(&host, "2001:db8:1:2::1").as_deref(),
            Some("rate:l1:ip:2001:db8:1:2::1/128")
        );
        // IPv4 ignores the IPv6 prefix.
        assert_eq!(key(&site, "192.0.2.7"), key(&by_ip, "192.0.2.7"));
    }

    #[tokio::test]
    async fn a_client_rotating_through_its_ipv6_subnet_meets_its_limit() {
        let config = crate::config::from_str(
            "routes:\n  - {id: h, methods: [GET], path: /h, public: true}\nrate_limits:\n  - {id: c, by: client_ip, requests: 2, per: 1h}\n",
            std::path::Path::new("test.yaml"),
        )
        .unwrap();
        let store = MemoryStore::new();
        let h = HashMap::new();
        let mut codes = Vec::new();
        for ip in [
            "2001:db8::1",
            "2001:db8::2",
            "2001:db8::3",
            "2001:db8:0:1::1",
        ] {
            let req = RequestView {
                path: "/h",
                ..view(&h, ip)
            };
            let m = config.policy.match_route(&req).unwrap();
            let d = enforce(&store, &config, &req, &m, crate::decide::public_allow(&m)).await;
            codes.push(d.code);
        }
        // The third address of the same /64 is over the budget; the next /64 is another client.
        assert_eq!(
            codes,
            [
                ReasonCode::Public,
                ReasonCode::Public,
                ReasonCode::RateLimited,
                ReasonCode::Public
            ]
        );
    }

    #[tokio::test]
    async fn the_limit_turns_the_third_request_into_a_429_with_headers() {
        let store = MemoryStore::new();
        let l = limit(RateLimitBy::Route, &[]);
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            outcomes.push(store.rate_check("k", l.limit).await.unwrap());
        }
        assert!(outcomes[0].allowed && outcomes[1].allowed && !outcomes[2].allowed);
        let d = limited(&l, &outcomes[2]);
        assert_eq!(d.http_status(), 429);
        let h: HashMap<_, _> = d
            .response_headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        // 2 per 60s: one more request fits after 30s.
        assert_eq!(h["retry-after"], "30");
        assert_eq!(h["ratelimit-policy"], "\"l1\";q=2;w=60");
        assert_eq!(h["ratelimit"], "\"l1\";r=0;t=30");
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one_second() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        let l = limit(RateLimitBy::Route, &[]);
        let o = RateOutcome {
            allowed: false,
            limit: 2,
            remaining: 0,
            reset: Duration::ZERO,
            retry_after: Some(Duration::ZERO),
        };
        assert!(
            limited(&l, &o)
                .response_headers
                .iter()
                .any(|(n, v)| n == "retry-after" && v == "1")
        );
    }

    fn config_with_limit() -> Config {
        crate::config::from_str(
            "routes:\n  - {id: h, methods: [GET], path: /h, public: true}\nrate_limits:\n  - {id: l, by: route, requests: 1, per: 1m}\n",
            std::path::Path::new("test.yaml"),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn an_allow_lists_the_quota_left_of_every_limit_that_counted_it() {
        let config = crate::config::from_str(
            "routes:\n  - {id: h, methods: [GET], path: /h, public: true}\n  - {id: o, methods: [GET], path: /o, public: true}\nrate_limits:\n  - {id: a, by: route, requests: 1, per: 1m, burst: 3}\n  - {id: b, by: client_ip, requests: 2, per: 1h, burst: 2, routes: [h]}\n",
            std::path::Path::new("test.yaml"),
        )
        .unwrap();
        let store = MemoryStore::new();
        let h = HashMap::new();
        let quota = |path: &'static str| {
            let req = RequestView {
                path,
                ..view(&h, "10.0.0.1")
            };
            let config = &config;
            let store = &store;
            async move {
                let m = config.policy.match_route(&req).unwrap();
                let d = enforce(store, config, &req, &m, crate::decide::public_allow(&m)).await;
                assert!(d.is_allow(), "{d:?}");
                d.response_headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.clone()))
                    .collect::<Vec<_>>()
            }
        };
        // Both limits count /h: one list item each, in config order. `t`: until the bucket
        // is full again.
        assert_eq!(
            quota("/h").await,
            vec![
                (
                    "ratelimit-policy".to_string(),
                    "\"a\";q=3;w=180, \"b\";q=2;w=3600".to_string()
                ),
                (
                    "ratelimit".to_string(),
                    "\"a\";r=2;t=60, \"b\";r=1;t=1800".to_string()
                ),
            ]
        );
        // Only `a` counts /o (its bucket is per route, so a fresh one).
        assert_eq!(
            quota("/o").await,
            vec![
                (
                    "ratelimit-policy".to_string(),
                    "\"a\";q=3;w=180".to_string()
                ),
                ("ratelimit".to_string(), "\"a\";r=2;t=60".to_string()),
            ]
        );
        // No limit selects a request: an allow stays bare.
        let bare = crate::config::from_str(
            "routes:\n  - {id: h, methods: [GET], path: /h, public: true}\n",
            std::path::Path::new("test.yaml"),
        )
        .unwrap();
        let req = RequestView {
            path: "/h",
            ..view(&h, "10.0.0.1")
        };
        let m = bare.policy.match_route(&req).unwrap();
        let d = enforce(&store, &bare, &req, &m, crate::decide::public_allow(&m)).await;
        assert!(d.is_allow() && d.response_headers.is_empty(), "{d:?}");
    }

    #[tokio::test]
    async fn a_client_new_to_a_full_memory_store_gets_a_503_the_others_keep_their_limits() {
        let config = crate::config::from_str(
            "routes:\n  - {id: h, methods: [GET], path: /h, public: true}\nrate_limits:\n  - {id: c, by: client_ip, requests: 1, per: 1h}\n",
            std::path::Path::new("test.yaml"),
        )
        .unwrap();
        let store = MemoryStore::with_bucket_cap(1);
        let h = HashMap::new();
        let check = |ip: &'static str| {
            let (config, store, h) = (&config, &store, &h);
            async move {
                let req = RequestView {
                    path: "/h",
                    ..view(h, ip)
                };
                let m = config.policy.match_route(&req).unwrap();
                enforce(store, config, &req, &m, crate::decide::public_allow(&m)).await
            }
        };
        assert!(check("192.0.2.1").await.is_allow());
        let d = check("2001:db8:1:2::9").await;
        assert_eq!(
            (d.code, d.http_status()),
            (ReasonCode::StateUnavailable, 503)
        );
        assert!(!d.detail.contains("2001:db8"), "{}", d.detail);
        assert_eq!(check("192.0.2.1").await.code, ReasonCode::RateLimited);
    }

    #[tokio::test]
    async fn a_store_error_is_a_503_never_an_allow() {
        let config = config_with_limit();
        let h = HashMap::new();
        let req = RequestView {
            path: "/h",
            ..view(&h, "10.0.0.1")
        };
        let m = config.policy.match_route(&req).unwrap();
        let allow = crate::decide::public_allow(&m);
        let d = enforce(
            &crate::state::UnavailableStore::new("down"),
            &config,
            &req,
            &m,
            allow,
        )
        .await;
        assert_eq!(
            (d.code, d.http_status()),
            (ReasonCode::StateUnavailable, 503)
        );
        // A deny passes through untouched, without asking the store.
        let deny = Decision::new(ReasonCode::NoRoute, "x");
        let d = enforce(
            &crate::state::UnavailableStore::new("down"),
            &config,
            &req,
            &m,
            deny,
        )
        .await;
        assert_eq!(d.code, ReasonCode::NoRoute);
    }
}
