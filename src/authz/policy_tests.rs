//! Route matching, specificity and rule evaluation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::config;

/// Compiles a `routes:` section (plus an optional issuer-free preamble) into a policy.
fn policy(routes_yaml: &str) -> Policy {
    let text = format!("routes:\n{routes_yaml}");
    config::from_str(&text, Path::new("test.yaml"))
        .unwrap_or_else(|e| panic!("{e}"))
        .policy
}

fn req<'a>(
    method: &'a str,
    host: &'a str,
    path: &'a str,
    h: &'a HashMap<String, String>,
) -> RequestView<'a> {
    RequestView {
        method,
        host,
        path,
        headers: h,
        source_ip: None,
        source_principal: "",
        scheme: "https",
        peer_certificate: None,
    }
}

/// The route id chosen for a request, or the deny reason.
fn route(p: &Policy, method: &str, host: &str, path: &str) -> String {
    let h = HashMap::new();
    match p.match_route(&req(method, host, path, &h)) {
        Ok(m) => m.route_id.to_string(),
        Err(d) => d.code.as_str().to_string(),
    }
}

fn identity(claims: Value) -> Arc<Identity> {
    let claims = claims.as_object().cloned().unwrap_or_default();
    let scopes = crate::identity::string_list(claims.get("scope"), true);
    let roles = crate::identity::string_list(claims.get("roles"), false);
    Arc::new(Identity {
        issuer_name: Arc::from(
            claims
                .get("issuer_name")
                .and_then(Value::as_str)
                .unwrap_or("dev"),
        ),
        issuer: "https://dev.portcullis.invalid".to_string(),
        subject: claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        claims,
        scopes,
        roles,
        expires_at: 0,
        not_before: None,
        issued_at: None,
        key_fingerprint: Arc::from("test"),
        key_kid: None,
        key_alg: None,
    })
}

const SAMPLE: &str = r#"
  - { id: healthz, methods: [GET], path: /healthz, public: true }
  - { id: order, methods: [GET], path: "/orders/{id}", rules: [{ id: r, scopes: [orders:read] }] }
  - { id: order-new, methods: [GET], path: /orders/new, public: true }
  - { id: orders, methods: [POST], path: /orders, public: true }
  - { id: admin, methods: [GET, POST], path: "/admin/**", rules: [{ id: r, roles: [admin] }] }
  - { id: admin-x, methods: [GET], path: "/admin/*/x", rules: [{ id: r, roles: [admin] }] }
  - { id: files, methods: [GET], path: "/files/*/raw", public: true }
  - { id: catch, methods: [GET], path: "/{section}/**", public: true }
"#;

#[test]
fn literal_beats_param_beats_tail() {
    let p = policy(SAMPLE);
    assert_eq!(route(&p, "GET", "h", "/orders/42"), "order");
    assert_eq!(route(&p, "GET", "h", "/orders/new"), "order-new");
    assert_eq!(route(&p, "GET", "h", "/admin/a/x"), "admin-x");
    assert_eq!(route(&p, "GET", "h", "/admin/a/y"), "admin");
    assert_eq!(route(&p, "GET", "h", "/files/a/raw"), "files");
    assert_eq!(route(&p, "GET", "h", "/files/a/raw/b"), "catch");
    assert_eq!(route(&p, "GET", "h", "/other/thing"), "catch");
}

#[test]
fn tail_matches_its_own_root() {
    let p = policy(SAMPLE);
    assert_eq!(route(&p, "GET", "h", "/admin"), "admin");
    assert_eq!(route(&p, "GET", "h", "/admin/"), "admin");
    assert_eq!(route(&p, "POST", "h", "/admin"), "admin");
    assert_eq!(route(&p, "GET", "h", "/admin?x=1"), "admin");
}

#[test]
fn trailing_slash_never_matches_a_param_or_literal_end() {
    let p = policy(SAMPLE);
    // The catch-all `/{section}/**` is the only route covering these.
    assert_eq!(route(&p, "GET", "h", "/orders/42/"), "catch");
    assert_eq!(route(&p, "GET", "h", "/healthz/"), "catch");
    assert_eq!(route(&p, "POST", "h", "/orders/"), "no_matching_route");
}

#[test]
fn methods_are_exact_and_head_is_not_get() {
    let p = policy(SAMPLE);
    assert_eq!(route(&p, "get", "h", "/healthz"), "no_matching_route");
    assert_eq!(route(&p, "HEAD", "h", "/healthz"), "no_matching_route");
    assert_eq!(route(&p, "DELETE", "h", "/orders/42"), "no_matching_route");
    assert_eq!(route(&p, "POST", "h", "/orders"), "orders");
    // A method a route lacks falls through to a less specific route that has it.
    assert_eq!(route(&p, "GET", "h", "/orders"), "catch");
}

#[test]
fn nothing_matches_is_denied_with_method_and_path() {
    let p = policy("  - { id: a, methods: [GET], path: /a, public: true }\n");
    let h = HashMap::new();
    let d = p
        .match_route(&req("PUT", "h", "/b/c?secret=1", &h))
        .unwrap_err();
    assert_eq!(d.code, ReasonCode::NoRoute);
    assert_eq!(d.http_status(), 403);
    assert_eq!(d.detail, "no route for `PUT /b/c`");
    assert_eq!(route(&p, "GET", "h", "/"), "no_matching_route");
}

/// With host-scoped routes, a request can miss every route by its host alone: the detail
/// names the host (normalized, never the query), and only a host that is a name or address.
#[test]
fn nothing_matches_names_the_host_when_routes_are_host_scoped() {
    let p =
        policy("  - { id: a, hosts: [api.example.com], methods: [GET], path: /a, public: true }\n");
    let h = HashMap::new();
    let detail = |host: &str, path: &str| p.match_route(&req("GET", host, path, &h)).unwrap_err();
    let d = detail("www.example.com:8443", "/a?secret=1");
    assert_eq!(d.code, ReasonCode::NoRoute);
    assert_eq!(d.detail, "no route for `GET /a` on host `www.example.com`");
    assert_eq!(
        detail("[::1]:80", "/b").detail,
        "no route for `GET /b` on host `[::1]`"
    );
    // A host that is no name or address is refused before matching, and never echoed.
    for hostile in [
        "",
        "a.example.com,b.example.com",
        "x`y",
        "a\nb",
        "[::1",
        "*.example.com",
    ] {
        let d = detail(hostile, "/a");
        assert_eq!(d.code, ReasonCode::PathRejected, "{hostile}");
        assert_eq!(
            d.detail, "host rejected: not a DNS name or an IP address",
            "{hostile}"
        );
    }
}

#[test]
fn root_and_tail_only_templates() {
    let p = policy(
        "  - { id: root, methods: [GET], path: /, public: true }\n  - { id: all, methods: [GET], path: /**, public: true }\n",
    );
    assert_eq!(route(&p, "GET", "h", "/"), "root");
    assert_eq!(route(&p, "GET", "h", "/x"), "all");
    assert_eq!(route(&p, "GET", "h", "/x/y/"), "all");
}

#[test]
fn path_hygiene_runs_before_matching() {
    let p = policy(SAMPLE);
    for bad in [
        "/orders/%2e%2e/admin",
        "//admin/x",
        "/admin%2fx",
        "/admin;a/x",
        "/admin/x#y",
        "orders",
    ] {
        assert_eq!(route(&p, "GET", "h", bad), "path_rejected", "{bad}");
    }
    assert_eq!(route(&p, "GET", "h", "/%61dmin/y"), "admin");
}

const HOSTS: &str = r#"
  - { id: any, methods: [GET], path: /x, public: true }
  - { id: wild, methods: [GET], path: /x, hosts: ["*.example.com"], public: true }
  - { id: deep, methods: [GET], path: /x, hosts: ["*.eu.example.com"], public: true }
  - { id: exact, methods: [GET], path: /x, hosts: [API.example.com.], public: true }
  - { id: v6, methods: [GET], path: /x, hosts: ["[::1]"], public: true }
  - { id: only, methods: [GET], path: /only, hosts: [api.example.com], public: true }
"#;

/// What the README says of `*.example.com`: any number of labels below it, never the bare
/// domain; and `*` only as the whole first label.
#[test]
fn a_wildcard_host_covers_every_depth_below_its_domain_only() {
    let p = policy(
        "  - { id: wild, methods: [GET], path: /x, hosts: [\"*.example.com\"], public: true }\n",
    );
    for host in ["a.example.com", "a.b.example.com", "x.y.z.example.com"] {
        assert_eq!(route(&p, "GET", host, "/x"), "wild", "{host}");
    }
    for host in ["example.com", "example.com.evil.test", "aexample.com"] {
        assert_eq!(route(&p, "GET", host, "/x"), "no_matching_route", "{host}");
    }
    for pattern in [
        "*",
        "*example.com",
        "a*.example.com",
        "api.*.example.com",
        "*.*.example.com",
    ] {
        assert!(HostPattern::parse(pattern).is_err(), "{pattern}");
    }
}

#[test]
fn host_specificity_and_normalization() {
    let p = policy(HOSTS);
    assert_eq!(route(&p, "GET", "api.example.com", "/x"), "exact");
    assert_eq!(route(&p, "GET", "API.Example.COM:8443", "/x"), "exact");
    // Envoy (`strip_trailing_host_dot`) forwards `api.example.com..` as `api.example.com.`
    // and serves it from the virtual host of that spelling, not `api.example.com`'s: a host
    // still ending in a dot is refused, never decided as `api.example.com` (a public route
    // there let it reach another virtual host's upstream).
    for dotted in [
        "api.example.com.",
        "API.example.com.:80",
        "web.example.com.",
    ] {
        assert_eq!(route(&p, "GET", dotted, "/x"), "path_rejected", "{dotted}");
    }
    assert_eq!(route(&p, "GET", "web.example.com", "/x"), "wild");
    assert_eq!(route(&p, "GET", "a.b.example.com", "/x"), "wild");
    assert_eq!(route(&p, "GET", "a.eu.example.com", "/x"), "deep");
    assert_eq!(route(&p, "GET", "example.com", "/x"), "any");
    assert_eq!(route(&p, "GET", "evilexample.com", "/x"), "any");
    assert_eq!(route(&p, "GET", "[::1]:8080", "/x"), "v6");
    assert_eq!(route(&p, "GET", "[::1]", "/x"), "v6");
    assert_eq!(route(&p, "GET", "[::1]evil", "/x"), "path_rejected");
    assert_eq!(route(&p, "GET", "[2001:DB8::1]", "/x"), "any");
    // Envoy's `[::1]` virtual host takes no other spelling of the address: another one is
    // refused rather than decided against the `[::1]` route (or falling through to `any`)
    // while Envoy serves it from another virtual host.
    for spelled in [
        "[0::1]",
        "[0:0:0:0:0:0:0:1]:80",
        "[0000::0001]",
        "[::0.0.0.1]",
        "[::1%25lo]",
    ] {
        assert_eq!(
            route(&p, "GET", spelled, "/x"),
            "path_rejected",
            "{spelled}"
        );
    }
    assert_eq!(route(&p, "GET", "[::2]", "/x"), "any");
    // ... and so is a configured one written another way.
    let spelled =
        policy("  - { id: v6, methods: [GET], path: /x, hosts: [\"[0:0::1]\"], public: true }\n");
    assert_eq!(route(&spelled, "GET", "[::1]", "/x"), "v6");
    assert_eq!(route(&p, "GET", "other.test", "/only"), "no_matching_route");
    assert_eq!(route(&p, "GET", "", "/only"), "path_rejected");
    assert_eq!(route(&p, "GET", "api.example.com:443", "/only"), "only");
    // Envoy's `*.example.com` takes any text in front of the suffix; here what a wildcard
    // covers must be DNS labels. So two `Host` lines that Envoy joined, or other garbage,
    // are refused: decided against a less specific route (`any`) they would be allowed
    // while Envoy serves them from the wildcard's virtual host.
    let long_label = format!("{}.example.com", "a".repeat(64));
    for garbage in [
        "admin.example.com,www.example.com",
        "admin.example.com, www.example.com",
        "user@www.example.com",
        "a b.example.com",
        "a..example.com",
        ".example.com",
        "a!b.example.com",
        &long_label,
    ] {
        assert_eq!(
            route(&p, "GET", garbage, "/x"),
            "path_rejected",
            "{garbage}"
        );
        assert_eq!(
            route(&p, "GET", garbage, "/only"),
            "path_rejected",
            "{garbage}"
        );
    }
    // A policy without host-scoped routes decides the same whatever the host.
    let hostless = policy("  - { id: any, methods: [GET], path: /x, public: true }\n");
    assert_eq!(route(&hostless, "GET", "a..example.com", "/x"), "any");
}

#[test]
fn normalize_host_strips_port_and_dot() {
    assert_eq!(normalize_host("a.b:80"), "a.b");
    assert_eq!(normalize_host("a.b."), "a.b");
    assert_eq!(normalize_host("[::1]:8080"), "[::1]");
    assert_eq!(normalize_host("[::1]"), "[::1]");
    assert_eq!(normalize_host("[0::1]:8080"), "[::1]");
    assert_eq!(normalize_host("[2001:DB8::A]"), "[2001:db8::a]");
    assert_eq!(normalize_host("::1"), "::1");
    assert_eq!(normalize_host("a.b:x"), "a.b:x");
}

#[test]
fn file_order_breaks_exact_ties_and_is_warned() {
    let text = "routes:\n  - { id: first, methods: [GET], path: \"/a/{x}\", public: true }\n  - { id: second, methods: [GET, PUT], path: /a/*, public: true }\n";
    let c = config::from_str(text, Path::new("t.yaml")).unwrap();
    assert_eq!(route(&c.policy, "GET", "h", "/a/1"), "first");
    assert_eq!(route(&c.policy, "PUT", "h", "/a/1"), "second");
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("route `second` is never chosen for GET"),
        "{}",
        c.warnings[0]
    );
}

#[test]
fn params_are_captured_decoded() {
    let p = policy(
        "  - { id: u, methods: [GET], path: \"/users/{user}/files/{file}\", public: true }\n",
    );
    let h = HashMap::new();
    let m = p
        .match_route(&req("GET", "h", "/users/al%69ce/files/a%20b", &h))
        .unwrap();
    assert_eq!(m.param("user"), Some("alice"));
    assert_eq!(m.param("file"), Some("a b"));
    assert_eq!(m.param("nope"), None);
}

#[test]
fn templates_parse_and_reject() {
    assert!(Template::parse("/a/{b}/*/**").is_ok());
    assert_eq!(Template::parse("a"), Err(TemplateError::NotAbsolute));
    assert_eq!(Template::parse("/a?b"), Err(TemplateError::ForbiddenChar));
    assert_eq!(Template::parse("/a%2f"), Err(TemplateError::ForbiddenChar));
    assert_eq!(Template::parse("/a#"), Err(TemplateError::ForbiddenChar));
    assert_eq!(Template::parse("/a//b"), Err(TemplateError::EmptySegment));
    assert_eq!(Template::parse("/a/"), Err(TemplateError::EmptySegment));
    assert_eq!(Template::parse("/**/a"), Err(TemplateError::TailNotLast));
    assert_eq!(
        Template::parse("/{a}/{a}"),
        Err(TemplateError::DuplicateParam("a".into()))
    );
    assert_eq!(
        Template::parse("/{1a}"),
        Err(TemplateError::BadParamName("1a".into()))
    );
    assert_eq!(
        Template::parse("/{}"),
        Err(TemplateError::BadParamName(String::new()))
    );
    assert_eq!(
        Template::parse("/a{b}"),
        Err(TemplateError::MixedSegment("a{b}".into()))
    );
    assert_eq!(
        Template::parse("/a*"),
        Err(TemplateError::MixedSegment("a*".into()))
    );
    assert!(matches!(
        Template::parse("/../a"),
        Err(TemplateError::UncleanLiteral(..))
    ));
    assert!(matches!(
        Template::parse("/a;b"),
        Err(TemplateError::UncleanLiteral(..))
    ));
    assert_eq!(
        Template::parse("/a/{b}/*/**").unwrap().to_string(),
        "/a/{b}/*/**"
    );
    assert_eq!(Template::parse("/").unwrap().to_string(), "/");
}

// ---- rules ----

const RULES: &str = r#"
  - id: orders
    methods: [GET]
    path: "/orders/{id}"
    rules:
      - { id: reader, scopes: ["orders:read"] }
      - { id: both, scopes: ["orders:read", "orders:audit"], roles: [auditor, admin] }
  - id: profile
    methods: [GET]
    path: "/users/{user}/profile"
    rules:
      - { id: own, bind: [{ param: user, equals_claim: sub }] }
  - id: tenant
    methods: [GET]
    path: "/tenants/{tenant}/**"
    rules:
      - { id: member, bind: [{ param: tenant, in_claim: tenants }] }
  - id: claims
    methods: [GET]
    path: /claims
    rules:
      - id: c
        claims:
          - { claim: email_verified, equals: true }
          - { claim: org.tier, one_of: [gold, platinum] }
          - { claim: groups, contains: eng }
"#;

fn decide(p: &Policy, path: &str, claims: Value) -> Decision {
    let h = HashMap::new();
    let m = p.match_route(&req("GET", "h", path, &h)).unwrap();
    p.authorize(&m, &identity(claims), &Context::at(0))
}

#[test]
fn any_rule_grants_and_names_itself() {
    let p = policy(RULES);
    let d = decide(&p, "/orders/1", json!({"scope": "x orders:read"}));
    assert_eq!(
        (d.code, d.rule.as_deref(), d.route.as_deref()),
        (ReasonCode::Allowed, Some("reader"), Some("orders"))
    );
    assert!(d.identity.is_some());
}

#[test]
fn missing_scope_names_the_scope_of_the_closest_rule() {
    let p = policy(RULES);
    let d = decide(&p, "/orders/1", json!({"scope": "orders:write"}));
    assert_eq!(d.code, ReasonCode::InsufficientScope);
    assert_eq!(d.http_status(), 403);
    assert_eq!(d.rule.as_deref(), Some("reader"));
    assert_eq!(d.detail, "missing scope `orders:read`");
    // Scope names are exact: no prefix, no case folding.
    let d = decide(
        &p,
        "/orders/1",
        json!({"scope": ["ORDERS:READ", "orders:read:all"]}),
    );
    assert_eq!(d.code, ReasonCode::InsufficientScope);
}

#[test]
fn roles_are_any_of() {
    let p = policy(RULES);
    let d = decide(
        &p,
        "/orders/1",
        json!({"scope": "orders:audit", "roles": ["admin"]}),
    );
    // Both rules miss one condition; the earlier rule is reported on a tie.
    assert_eq!(
        (d.code, d.rule.as_deref()),
        (ReasonCode::InsufficientScope, Some("reader"))
    );
    assert_eq!(d.detail, "missing scope `orders:read`");
    let d = decide(
        &p,
        "/orders/1",
        json!({"scope": "orders:audit orders:read", "roles": ["user"]}),
    );
    assert_eq!(d.code, ReasonCode::Allowed, "reader alone suffices");
    let d = decide(
        &p,
        "/orders/1",
        json!({"scope": "orders:audit orders:read", "roles": ["auditor"]}),
    );
    assert_eq!(d.code, ReasonCode::Allowed);
}

#[test]
fn equals_claim_binding() {
    let p = policy(RULES);
    let d = decide(&p, "/users/alice/profile", json!({"sub": "alice"}));
    assert_eq!(
        (d.code, d.rule.as_deref()),
        (ReasonCode::Allowed, Some("own"))
    );
    let d = decide(&p, "/users/bob/profile", json!({"sub": "alice"}));
    assert_eq!(
        (d.code, d.rule.as_deref()),
        (ReasonCode::ResourceMismatch, Some("own"))
    );
    assert_eq!(d.detail, "path parameter `user` does not match claim `sub`");
    assert!(!d.detail.contains("alice") && !d.detail.contains("bob"));
    // Case-sensitive, and a non-string claim never binds.
    assert_eq!(
        decide(&p, "/users/Alice/profile", json!({"sub": "alice"})).code,
        ReasonCode::ResourceMismatch
    );
    assert_eq!(
        decide(&p, "/users/42/profile", json!({"sub": 42})).code,
        ReasonCode::ResourceMismatch
    );
    assert_eq!(
        decide(&p, "/users/alice/profile", json!({})).code,
        ReasonCode::ResourceMismatch
    );
}

#[test]
fn in_claim_binding() {
    let p = policy(RULES);
    let t = json!({"tenants": ["acme", "globex"]});
    assert_eq!(
        decide(&p, "/tenants/acme/x", t.clone()).code,
        ReasonCode::Allowed
    );
    assert_eq!(
        decide(&p, "/tenants/globex", t.clone()).code,
        ReasonCode::Allowed
    );
    assert_eq!(
        decide(&p, "/tenants/initech/x", t.clone()).code,
        ReasonCode::ResourceMismatch
    );
    assert_eq!(
        decide(&p, "/tenants/ACME/x", t).code,
        ReasonCode::ResourceMismatch
    );
    assert_eq!(
        decide(&p, "/tenants/acme/x", json!({"tenants": "acme"})).code,
        ReasonCode::Allowed
    );
    assert_eq!(
        decide(&p, "/tenants/acme/x", json!({"tenants": "acme globex"})).code,
        ReasonCode::ResourceMismatch
    );
    assert_eq!(
        decide(&p, "/tenants/acme/x", json!({"tenants": {"acme": true}})).code,
        ReasonCode::ResourceMismatch
    );
}

#[test]
fn claim_conditions() {
    let p = policy(RULES);
    let good = json!({"email_verified": true, "org": {"tier": "gold"}, "groups": ["eng", "ops"]});
    assert_eq!(decide(&p, "/claims", good).code, ReasonCode::Allowed);
    for (bad, claim) in [
        (
            json!({"email_verified": "true", "org": {"tier": "gold"}, "groups": ["eng"]}),
            "email_verified",
        ),
        (
            json!({"email_verified": true, "org": {"tier": "silver"}, "groups": ["eng"]}),
            "org.tier",
        ),
        (
            json!({"email_verified": true, "org": {"tier": "gold"}, "groups": "engineering"}),
            "groups",
        ),
        (
            json!({"email_verified": true, "org": {"tier": "gold"}, "groups": "eng"}),
            "groups",
        ),
        (
            json!({"email_verified": true, "groups": ["eng"]}),
            "org.tier",
        ),
    ] {
        let d = decide(&p, "/claims", bad);
        assert_eq!(d.code, ReasonCode::InsufficientScope, "{claim}");
        assert_eq!(
            d.detail,
            format!("claim `{claim}` does not satisfy the rule")
        );
    }
}

#[test]
fn rule_issuer_restriction() {
    let text = r#"
issuers:
  - { name: a, issuer: "https://a.test", audiences: [x], keys: { url: "https://a.test/jwks" } }
  - { name: b, issuer: "https://b.test", audiences: [x], keys: { url: "https://b.test/jwks" } }
routes:
  - { id: r, methods: [GET], path: /r, rules: [{ id: only-a, issuers: [a] }] }
"#;
    let p = config::from_str(text, Path::new("t.yaml")).unwrap().policy;
    assert_eq!(
        decide(&p, "/r", json!({"issuer_name": "a"})).code,
        ReasonCode::Allowed
    );
    let d = decide(&p, "/r", json!({"issuer_name": "b"}));
    assert_eq!(
        (d.code, d.rule.as_deref()),
        (ReasonCode::InsufficientScope, Some("only-a"))
    );
}

#[test]
fn a_match_from_another_policy_fails_closed() {
    let p1 = policy("  - { id: a, methods: [GET], path: /a, rules: [{ id: r, scopes: [s] }] }\n");
    let p2 = policy("  - { id: b, methods: [GET], path: /a, public: true }\n");
    let h = HashMap::new();
    let m = p2.match_route(&req("GET", "h", "/a", &h)).unwrap();
    let d = p1.authorize(&m, &identity(json!({"scope": "s"})), &Context::at(0));
    assert_eq!(d.code, ReasonCode::Internal);
}
