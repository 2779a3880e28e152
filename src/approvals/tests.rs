use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Map;

use super::*;
use crate::authz::{Decision, ReasonCode};
use crate::state::{MemoryStore, StateStore};

const NOW: i64 = 1_800_000_000;

fn identity(sub: &str, roles: &[&str]) -> Arc<Identity> {
    Arc::new(Identity {
        issuer_name: Arc::from("corp"),
        issuer: "https://login.example.com".to_string(),
        subject: sub.to_string(),
        claims: Map::new(),
        scopes: vec![],
        roles: roles.iter().map(|r| r.to_string()).collect(),
        expires_at: NOW + 600,
        not_before: None,
        issued_at: None,
        key_fingerprint: Arc::from("k"),
        key_kid: None,
        key_alg: None,
    })
}

fn config(extra_rule: &str) -> crate::config::Config {
    let text = format!(
        r#"
issuers:
  - {{ name: corp, issuer: "https://login.example.com", audiences: [api], keys: {{ file: config/dev/jwks.json }} }}
routes:
  - id: drop-db
    methods: [DELETE]
    path: /databases/{{db}}
    rules:
      - id: dba
        roles: [dba]
        approval:
          approvers: {{ roles: [dba-lead], subjects: ["corp:carol"] }}
          ttl: 15m
          uses: 1
          pre_approve:
            - roles: [on-call]
              from: "2027-01-15T08:00:00Z"
              until: "2027-01-15T09:00:00Z"
{extra_rule}
"#
    );
    crate::config::from_str(&text, std::path::Path::new("test.yaml")).unwrap()
}

/// A webhook (to a closed port) whose payloads the tests read; nothing is sent.
fn test_webhook() -> super::webhook::Webhook {
    super::webhook::Webhook::new(
        &crate::config::schema::WebhookConfig {
            url: "http://127.0.0.1:9/hook".into(),
            timeout: crate::config::duration::HumanDuration::from_secs(1),
            retries: 0,
        },
        None,
    )
}

struct Req {
    headers: HashMap<String, String>,
    method: &'static str,
    host: &'static str,
    path: &'static str,
}

impl Req {
    fn new(method: &'static str, host: &'static str, path: &'static str) -> Req {
        Req {
            headers: HashMap::new(),
            method,
            host,
            path,
        }
    }
    fn view(&self) -> RequestView<'_> {
        RequestView {
            method: self.method,
            host: self.host,
            path: self.path,
            headers: &self.headers,
            source_ip: None,
            source_principal: "",
            scheme: "http",
            peer_certificate: None,
        }
    }
}

fn granted(who: &Arc<Identity>) -> Decision {
    granted_by(who, "dba")
}

fn granted_by(who: &Arc<Identity>, rule: &str) -> Decision {
    Decision::new(ReasonCode::Allowed, format!("granted by rule `{rule}`"))
        .with_route(Some(Arc::from("drop-db")))
        .with_rule(Some(Arc::from(rule)))
        .with_identity(Some(who.clone()))
}

/// A second rule on `drop-db`, after `dba`: role `support` asks, role `support-lead` approves,
/// five uses.
const SUPPORT_RULE: &str = r#"      - id: support
        roles: [support]
        approval:
          approvers: { roles: [support-lead] }
          uses: 5
"#;

/// The compiled approval policy of `rule` on `drop-db`.
fn policy_of(config: &crate::config::Config, rule: &str) -> Arc<ApprovalPolicy> {
    compile(&config.file.routes)[&("drop-db".to_string(), rule.to_string())].clone()
}

fn approvals(store: Arc<dyn StateStore>) -> Approvals {
    Approvals::new(&config(""), store)
}

fn approval_id(d: &Decision) -> String {
    let header = d
        .response_headers
        .iter()
        .find(|(n, _)| n == APPROVAL_ID_HEADER)
        .map(|(_, v)| v.clone())
        .expect("approval id header");
    let body = d
        .body_fields
        .iter()
        .find(|(n, _)| *n == "approval_id")
        .map(|(_, v)| v.clone())
        .expect("approval_id body field");
    assert_eq!(header, body);
    header
}

#[test]
fn fingerprints_differ_by_subject_rule_method_host_path_query_and_body() {
    let config = config(SUPPORT_RULE);
    let (dba, support) = (policy_of(&config, "dba"), policy_of(&config, "support"));
    let alice = identity("alice", &[]);
    let base = Req::new("DELETE", "db.example.com", "/databases/orders");
    let fp = fingerprint(&alice, &dba, &base.view(), None);
    assert_eq!(fp.len(), 64);
    assert_eq!(
        fp,
        fingerprint(&alice, &dba, &base.view(), None),
        "deterministic"
    );
    // The host is compared as routes match it.
    let same = Req::new("DELETE", "DB.example.com.:443", "/databases/orders");
    assert_eq!(fp, fingerprint(&alice, &dba, &same.view(), None));
    // Another rule (or route) is another request: it has other approvers.
    assert_ne!(fp, fingerprint(&alice, &support, &base.view(), None));
    let mut other_route = (*dba).clone();
    other_route.route = Arc::from("drop-db-2");
    assert_ne!(fp, fingerprint(&alice, &other_route, &base.view(), None));
    for other in [
        Req::new("GET", "db.example.com", "/databases/orders"),
        Req::new("DELETE", "db2.example.com", "/databases/orders"),
        Req::new("DELETE", "db.example.com", "/databases/users"),
        Req::new("DELETE", "db.example.com", "/databases/orders?force=true"),
    ] {
        assert_ne!(
            fp,
            fingerprint(&alice, &dba, &other.view(), None),
            "{}",
            other.path
        );
    }
    assert_ne!(
        fp,
        fingerprint(&identity("bob", &[]), &dba, &base.view(), None)
    );
    assert_ne!(fp, fingerprint(&alice, &dba, &base.view(), Some("abc")));
}

#[test]
fn ids_are_random_and_validated() {
    let a = new_id();
    assert!(valid_id(&a), "{a}");
    assert_ne!(a, new_id());
    for bad in ["", "apr_", "apr_xyz", "../approval:rec:x", &format!("{a}0")] {
        assert!(!valid_id(bad), "{bad}");
    }
}

#[test]
fn records_round_trip_as_json() {
    let alice = identity("alice", &[]);
    let r = Req::new("DELETE", "db.example.com", "/databases/orders?x=secret");
    let record = Record {
        id: new_id(),
        state: ApprovalState::Pending,
        fingerprint: fingerprint(&alice, &policy_of(&config(""), "dba"), &r.view(), None),
        issuer_name: "corp".into(),
        issuer: alice.issuer.clone(),
        subject: "alice".into(),
        method: "DELETE".into(),
        host: "db.example.com".into(),
        path: display_path(r.path).into_owned(),
        body_sha256: None,
        query: query_of(r.path).map(query_shape),
        query_sha256: query_of(r.path).map(|q| sha256_hex(q.as_bytes())),
        justification: Some("ticket 42".into()),
        route: "drop-db".into(),
        rule: "dba".into(),
        requested_at: NOW,
        expires_at: NOW + 3600,
        decided_by: None,
        decided_at: None,
        reason: None,
        uses: 1,
        grant_expires_at: None,
    };
    let json = record.to_json();
    assert!(
        !json.contains("secret"),
        "the query string is never stored: {json}"
    );
    assert!(json.contains(r#""query":"x=…""#), "{json}");
    assert_eq!(Record::from_json(&json), Some(record));
    assert_eq!(Record::from_json("{not json"), None);
}

#[test]
fn approvers_see_a_querys_names_and_digest_never_its_values() {
    assert_eq!(query_of("/a"), None);
    assert_eq!(query_of("/a?"), None);
    assert_eq!(query_of("/a?x=1&y#frag"), Some("x=1&y"));
    assert_eq!(
        query_shape("force=true&dry_run&token=abc=def&"),
        "force=…&…&token=…&"
    );
    assert_eq!(query_shape("a\u{202E}b=1\n"), "ab=…");
    // A bare parameter is all value, and `%3D` is an `=`: shown before, only the text after
    // a literal `=` was hidden.
    assert_eq!(
        query_shape("force=1&SECRETBARE&token%3DSECRETENC&t%3dLOW=x"),
        "force=…&…&token%3D…&t%3d…"
    );
    // A name that still holds a `%` or a `;` is not plain: it is hidden with its value.
    assert_eq!(
        query_shape("SECRET%26a=1&SECRET;a=1&%3Dx&=y"),
        "…=…&…=…&%3D…&=…"
    );
    for shape in [
        query_shape("force=1&SECRETBARE&token%3DSECRETENC"),
        query_shape("SECRET%26a=1&SECRET;b=1&%53ECRET"),
    ] {
        assert!(!shape.contains("SECRET"), "{shape}");
    }
    assert_eq!(
        query_shape(&format!("{}=1", "n".repeat(2000)))
            .chars()
            .count(),
        500
    );
}

#[tokio::test]
async fn a_requests_record_shows_its_query_shape_and_digest() {
    let a = approvals(Arc::new(MemoryStore::new()));
    let (alice, bob) = (identity("alice", &["dba"]), identity("bob", &["dba-lead"]));
    let r = Req::new("DELETE", "db", "/databases/orders?force=true&token=s3cr3t");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    let listed = a.list(&bob, false, NOW).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].path, "/databases/orders");
    assert_eq!(listed[0].query.as_deref(), Some("force=…&token=…"));
    assert_eq!(
        listed[0].query_sha256.as_deref(),
        Some(sha256_hex(b"force=true&token=s3cr3t").as_str())
    );
    let shown = format!("{:?}", listed[0]);
    assert!(
        !shown.contains("s3cr3t") && !shown.contains("true"),
        "{shown}"
    );
    // The webhook tells the same, never the values.
    let hook = test_webhook();
    let payload = hook.payload(&listed[0]);
    // The requester as audit lines and listings name them: the configured issuer name, with
    // the token's `iss` beside it.
    assert_eq!(
        (&payload["issuer"], &payload["iss"], &payload["subject"]),
        (
            &"corp".into(),
            &"https://login.example.com".into(),
            &"alice".into()
        )
    );
    assert!(
        payload["summary"]
            .as_str()
            .unwrap()
            .starts_with("corp:alice asks to "),
        "{payload}"
    );
    assert_eq!(payload["query"], "force=…&token=…");
    assert_eq!(
        payload["query_sha256"],
        listed[0].query_sha256.as_deref().unwrap()
    );
    assert!(payload["body_sha256"].is_null(), "{payload}");
    assert!(!payload.to_string().contains("s3cr3t"), "{payload}");
}

#[test]
fn approvers_hold_a_role_or_are_named() {
    let config = config("");
    let policies = compile(&config.file.routes);
    let p = &policies[&("drop-db".to_string(), "dba".to_string())];
    assert!(p.is_approver(&identity("bob", &["dba-lead"])));
    assert!(
        p.is_approver(&identity("carol", &[])),
        "named as corp:carol"
    );
    assert!(!p.is_approver(&identity("dave", &["dba"])));
    // `corp:carol` is corp's carol: another issuer's subject spelled `corp:carol` is not.
    let mut elsewhere = (*identity("corp:carol", &[])).clone();
    elsewhere.issuer_name = Arc::from("partner");
    assert!(!p.is_approver(&elsewhere));
    assert!(
        !p.is_approver(&identity("", &["dba-lead"])),
        "no subject, no approval"
    );
    assert_eq!(p.ttl, Duration::from_secs(900));
    assert_eq!(p.uses, 1);
}

/// Approver roles are claims of the approver's issuer: with a second issuer trusted (a
/// partner's, a test IdP), any token of it carrying `dba-lead` made its holder an approver,
/// even where the rule takes requesters from one issuer only. Approvers now default to the
/// rule's `issuers`, `approvers.issuers` names them, and `check` warns where neither does.
#[test]
fn approver_roles_count_only_from_the_issuers_trusted_for_approvers() {
    let rule = |name: &str, issuers: &str, approvers: &str| {
        format!(
            "      - id: {name}\n        roles: [dba]\n{issuers}        approval:\n          \
             approvers: {{ roles: [dba-lead]{approvers} }}\n"
        )
    };
    let text = format!(
        r#"
issuers:
  - {{ name: corp, issuer: "https://login.example.com", audiences: [api], keys: {{ file: config/dev/jwks.json }} }}
  - {{ name: partner, issuer: "https://partner.example.com", audiences: [api], keys: {{ file: config/dev/jwks.json }} }}
routes:
  - id: drop-db
    methods: [DELETE]
    path: /databases/{{db}}
    rules:
{}{}{}{}"#,
        rule("by-rule", "        issuers: [corp]\n", ""),
        rule("named", "", ", issuers: [corp]"),
        rule(
            "widened",
            "        issuers: [corp]\n",
            ", issuers: [corp, partner]"
        ),
        rule("any", "", ""),
    );
    let config = crate::config::from_str(&text, std::path::Path::new("test.yaml")).unwrap();
    let policies = compile(&config.file.routes);
    let p = |rule: &str| policies[&("drop-db".to_string(), rule.to_string())].clone();
    let corp_lead = identity("bob", &["dba-lead"]);
    let mut partner_lead = (*identity("mallory", &["dba-lead"])).clone();
    partner_lead.issuer_name = Arc::from("partner");
    for rule in ["by-rule", "named"] {
        assert!(p(rule).is_approver(&corp_lead), "{rule}");
        assert!(!p(rule).is_approver(&partner_lead), "{rule}");
        assert!(
            p(rule).approvers_text().contains("(of issuer `corp`)"),
            "{}",
            p(rule).approvers_text()
        );
    }
    assert!(p("widened").is_approver(&partner_lead));
    assert!(p("any").is_approver(&partner_lead));
    let warned: Vec<&String> = (config.warnings.iter())
        .filter(|w| w.contains("approvers.issuers"))
        .collect();
    assert_eq!(warned.len(), 1, "{:?}", config.warnings);
    assert!(
        warned[0].contains("rules[3].approval.approvers"),
        "{warned:?}"
    );
}

#[test]
fn pre_approval_holds_only_for_the_role_inside_the_window() {
    let config = config("");
    let p = compile(&config.file.routes)[&("drop-db".to_string(), "dba".to_string())].clone();
    let from = p.pre_approve[0].from.unwrap();
    let until = p.pre_approve[0].until.unwrap();
    assert_eq!(until - from, 3600);
    let on_call = identity("alice", &["dba", "on-call"]);
    assert_eq!(p.pre_approved(&on_call, from), Some(0));
    assert_eq!(p.pre_approved(&on_call, until - 1), Some(0));
    assert_eq!(
        p.pre_approved(&on_call, until),
        None,
        "the end is exclusive"
    );
    assert_eq!(p.pre_approved(&on_call, from - 1), None);
    assert_eq!(p.pre_approved(&identity("alice", &["dba"]), from), None);
}

/// `from`/`until` are RFC 3339, which allows a numeric offset: `+01:00` was refused as "not an
/// RFC 3339 time", so a window could only be written in UTC. The same instant in any offset
/// is the same bound; a time without an offset is still read as UTC, with a warning.
#[test]
fn pre_approval_windows_take_rfc3339_offsets() {
    let load = |from: &str, until: &str| {
        let text = format!(
            "issuers:\n  - {{ name: corp, issuer: \"https://login.example.com\", audiences: [api], keys: {{ file: config/dev/jwks.json }} }}\nroutes:\n  - id: r\n    methods: [GET]\n    path: /x\n    rules:\n      - id: a\n        roles: [dba]\n        approval:\n          approvers: {{ roles: [lead] }}\n          pre_approve: [{{ roles: [x], from: '{from}', until: '{until}' }}]\n"
        );
        crate::config::from_str(&text, std::path::Path::new("t.yaml"))
    };
    let window = |from: &str, until: &str| {
        let config = load(from, until).unwrap_or_else(|e| panic!("{from} .. {until}: {e}"));
        let p = compile(&config.file.routes)[&("r".to_string(), "a".to_string())].clone();
        assert!(!p.pre_approve[0].invalid);
        (
            p.pre_approve[0].from.unwrap(),
            p.pre_approve[0].until.unwrap(),
        )
    };
    let utc = window("2027-01-15T08:00:00Z", "2027-01-15T09:00:00Z");
    assert_eq!(
        window("2027-01-15T09:00:00+01:00", "2027-01-15T04:00:00-05:00"),
        utc
    );
    assert_eq!(window("2027-01-15T08:00:00", "2027-01-15 09:00:00"), utc);
    // ... and said so: a local time written without its offset moves the window.
    let warnings = |from: &str, until: &str| load(from, until).unwrap().warnings;
    assert_eq!(
        warnings("2027-01-15T08:00:00Z", "2027-01-15T10:00:00+01:00"),
        Vec::<String>::new()
    );
    let w = warnings("2027-01-15T08:00:00Z", "2027-01-15 09:00:00");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("pre_approve[0].until")
            && w[0].contains("no UTC offset")
            && w[0].contains("(2027-01-15T09:00:00Z)"),
        "{w:?}"
    );
    // Offsets count in the order check too: 10:00+05:00 is 05:00Z, before 08:00Z.
    let e = load("2027-01-15T08:00:00Z", "2027-01-15T10:00:00+05:00").unwrap_err();
    assert!(e.to_string().contains("ends before it starts"), "{e}");
}

#[test]
fn justification_is_trimmed_cleaned_and_capped() {
    let mut r = Req::new("DELETE", "h", "/databases/x");
    assert_eq!(justification(&r.view()), None);
    r.headers.insert(
        JUSTIFICATION_HEADER.into(),
        format!("  INC-7\u{7} {}", "x".repeat(900)),
    );
    let j = justification(&r.view()).unwrap();
    assert!(j.starts_with("INC-7 x"));
    assert!(j.chars().count() <= 500);
    // Bidirectional overrides and line separators would reorder or split what approvers
    // read in the listing or the webhook's chat message.
    r.headers.insert(
        JUSTIFICATION_HEADER.into(),
        "fix \u{202E}fdp.exe\u{2066}x\u{2069}\u{2028}INC-8\u{200F}".into(),
    );
    assert_eq!(justification(&r.view()).unwrap(), "fix fdp.exexINC-8");
}

#[test]
fn config_rejects_unusable_approvals() {
    for (rule, want) in [
        ("approvers: {}", "no approvers"),
        (
            "approvers: { roles: [a] }\n          uses: 0",
            "approve nothing",
        ),
        (
            "approvers: { roles: [a] }\n          ttl: 0s",
            "at least 1s",
        ),
        (
            "approvers: { roles: [a] }\n          pre_approve: [{ roles: [x], from: yesterday }]",
            "RFC 3339",
        ),
    ] {
        let text = format!(
            "routes:\n  - id: r\n    methods: [GET]\n    path: /x\n    rules:\n      - id: a\n        approval:\n          {rule}\n"
        );
        let e = crate::config::from_str(&text, std::path::Path::new("t.yaml")).unwrap_err();
        assert!(e.to_string().contains(want), "{rule}: {e}");
        assert!(e.field.contains("approval"), "{e}");
    }
}

#[tokio::test]
async fn a_request_without_approval_is_refused_with_one_id_per_action() {
    let a = approvals(Arc::new(MemoryStore::new()));
    let alice = identity("alice", &["dba"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let d = a.gate(&r.view(), granted(&alice), NOW).await;
    assert_eq!(d.code, ReasonCode::ApprovalRequired);
    assert_eq!(d.http_status(), 403);
    let id = approval_id(&d);
    assert!(d.detail.contains("role `dba-lead`"), "{}", d.detail);
    // Retrying while pending reuses the request.
    let again = a.gate(&r.view(), granted(&alice), NOW + 1).await;
    assert_eq!(approval_id(&again), id);
    // Another action is another request.
    let other = Req::new("DELETE", "db", "/databases/users");
    let d2 = a.gate(&other.view(), granted(&alice), NOW).await;
    assert_ne!(approval_id(&d2), id);
    // Denies and public allows pass through untouched.
    let deny = Decision::new(ReasonCode::InsufficientScope, "no");
    assert_eq!(
        a.gate(&r.view(), deny, NOW).await.code,
        ReasonCode::InsufficientScope
    );
}

#[tokio::test]
async fn an_approval_allows_exactly_its_uses_then_asks_again() {
    let a = approvals(Arc::new(MemoryStore::new()));
    let alice = identity("alice", &["dba"]);
    let bob = identity("bob", &["dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);

    assert!(matches!(
        a.approve(&alice, &id, None, NOW).await,
        Err(ApprovalError::NotApprover(_))
    ));
    let listed = a.list(&bob, false, NOW).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    assert!(a.list(&alice, false, NOW).await.unwrap().is_empty());

    let record = a.approve(&bob, &id, None, NOW).await.unwrap();
    assert_eq!(record.state, ApprovalState::Approved);
    assert_eq!(record.decided_by.as_deref(), Some("corp:bob"));
    assert!(matches!(
        a.approve(&bob, &id, None, NOW).await,
        Err(ApprovalError::AlreadyDecided { .. })
    ));

    let used = a.gate(&r.view(), granted(&alice), NOW + 1).await;
    assert_eq!(used.code, ReasonCode::Allowed, "{}", used.detail);
    let again = a.gate(&r.view(), granted(&alice), NOW + 2).await;
    assert_eq!(again.code, ReasonCode::ApprovalRequired);
    assert_ne!(
        approval_id(&again),
        id,
        "a spent approval opens a new request"
    );
    // The approval was for alice: bob's same action still needs its own.
    let bob_dba = identity("bob", &["dba", "dba-lead"]);
    assert_eq!(
        a.gate(&r.view(), granted(&bob_dba), NOW + 3).await.code,
        ReasonCode::ApprovalRequired
    );
}

#[tokio::test]
async fn nobody_approves_their_own_request() {
    let a = approvals(Arc::new(MemoryStore::new()));
    let lead = identity("bob", &["dba", "dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&lead), NOW).await);
    assert_eq!(
        a.approve(&lead, &id, None, NOW).await,
        Err(ApprovalError::SelfApproval(id.clone()))
    );
    assert!(matches!(
        a.reject(&lead, &id, None, NOW).await,
        Err(ApprovalError::SelfApproval(_))
    ));
    // Still pending: another lead can approve it.
    let carol = identity("carol", &[]);
    assert!(a.approve(&carol, &id, None, NOW).await.is_ok());
}

#[tokio::test]
async fn concurrent_retries_never_both_spend_a_single_use() {
    let a = Arc::new(approvals(Arc::new(MemoryStore::new())));
    let alice = identity("alice", &["dba"]);
    let bob = identity("bob", &["dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    a.approve(&bob, &id, None, NOW).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (a, alice) = (a.clone(), alice.clone());
        tasks.push(tokio::spawn(async move {
            let r = Req::new("DELETE", "db", "/databases/orders");
            a.gate(&r.view(), granted(&alice), NOW + 1).await.code
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        if t.await.unwrap() == ReasonCode::Allowed {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 1);
}

#[tokio::test]
async fn a_rejection_is_named_on_retry_and_ttls_are_bounded() {
    let a = approvals(Arc::new(MemoryStore::new()));
    let alice = identity("alice", &["dba"]);
    let bob = identity("bob", &["dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    assert!(matches!(
        a.approve(&bob, &id, Some(Duration::from_secs(3600)), NOW)
            .await,
        Err(ApprovalError::InvalidTtl(_))
    ));
    a.reject(&bob, &id, Some("not during business hours".into()), NOW)
        .await
        .unwrap();
    let d = a.gate(&r.view(), granted(&alice), NOW + 1).await;
    assert_eq!(d.code, ReasonCode::ApprovalRequired);
    assert_eq!(approval_id(&d), id);
    assert!(d.detail.contains("rejected by `corp:bob`"), "{}", d.detail);
    assert!(d.detail.contains("business hours"), "{}", d.detail);
    assert!(matches!(
        a.approve(&bob, "apr_00000000000000000000000000000000", None, NOW)
            .await,
        Err(ApprovalError::NotFound(_))
    ));
}

#[tokio::test]
async fn pre_approval_allows_without_a_request() {
    let a = approvals(Arc::new(MemoryStore::new()));
    let p = a.policy("drop-db", "dba").unwrap().clone();
    let from = p.pre_approve[0].from.unwrap();
    let on_call = identity("alice", &["dba", "on-call"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let d = a.gate(&r.view(), granted(&on_call), from + 10).await;
    assert_eq!(d.code, ReasonCode::Allowed);
    assert!(d.detail.contains("pre-approved"), "{}", d.detail);
    let outside = a.gate(&r.view(), granted(&on_call), from - 10).await;
    assert_eq!(outside.code, ReasonCode::ApprovalRequired);
}

#[tokio::test]
async fn a_body_envoy_cut_short_opens_no_request_and_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let a = approvals(store.clone());
    let alice = identity("alice", &["dba"]);
    let bob = identity("bob", &["dba-lead"]);
    let mut r = Req::new("DELETE", "db", "/databases/orders");
    r.headers
        .insert(BODY_SHA256_HEADER.to_string(), sha256_hex(b"{\"force\":"));
    for partial in ["true", "TRUE", " true"] {
        r.headers
            .insert(PARTIAL_BODY_HEADER.to_string(), partial.to_string());
        let d = a.gate(&r.view(), granted(&alice), NOW).await;
        assert_eq!(d.code, ReasonCode::ApprovalRequired, "{partial}");
        assert_eq!(d.http_status(), 403);
        assert!(d.detail.contains("only part of it"), "{}", d.detail);
        assert!(
            d.response_headers
                .iter()
                .all(|(n, _)| n != APPROVAL_ID_HEADER),
            "a request was opened for a partial body"
        );
    }
    assert!(a.list(&bob, false, NOW).await.unwrap().is_empty());
    // The whole body (Envoy says so, or says nothing) asks for an approval as before.
    for whole in [Some("false"), None] {
        match whole {
            Some(v) => r
                .headers
                .insert(PARTIAL_BODY_HEADER.to_string(), v.to_string()),
            None => r.headers.remove(PARTIAL_BODY_HEADER),
        };
        let d = a.gate(&r.view(), granted(&alice), NOW).await;
        assert!(approval_id(&d).starts_with("apr_"), "{whole:?}");
    }
    // A pre-approval is not bound to a body: it still allows.
    let p = a.policy("drop-db", "dba").unwrap().clone();
    let from = p.pre_approve[0].from.unwrap();
    r.headers
        .insert(PARTIAL_BODY_HEADER.to_string(), "true".to_string());
    let on_call = identity("dave", &["dba", "on-call"]);
    let d = a.gate(&r.view(), granted(&on_call), from + 10).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
}

#[tokio::test]
async fn unreachable_state_fails_closed_with_a_clear_reason() {
    let a = approvals(Arc::new(crate::state::UnavailableStore::new(
        "redis is unreachable",
    )));
    let alice = identity("alice", &["dba"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let d = a.gate(&r.view(), granted(&alice), NOW).await;
    assert_eq!(d.code, ReasonCode::StateUnavailable);
    assert_eq!(d.http_status(), 503);
    assert!(d.detail.contains("unreachable"), "{}", d.detail);
    assert_eq!(d.route.as_deref(), Some("drop-db"));
    let bob = identity("bob", &["dba-lead"]);
    assert!(matches!(
        a.list(&bob, false, NOW).await,
        Err(ApprovalError::State(_))
    ));
}

#[test]
fn debug_output_never_shows_the_redis_or_webhook_url() {
    let text = "state: { backend: redis, redis_url: 'redis://:hunter2@db:6379/0' }\napprovals: { webhook: { url: 'https://hooks.example.com/T0/s3cr3t' } }\nroutes:\n  - { id: r, methods: [GET], path: /x, public: true }\n";
    let config = crate::config::from_str(text, std::path::Path::new("t.yaml")).unwrap();
    let debug = format!("{:?}", config.file);
    assert!(
        !debug.contains("hunter2") && !debug.contains("s3cr3t"),
        "{debug}"
    );
    assert!(debug.contains("<redacted>"));
}

#[test]
fn a_bad_redis_url_is_a_config_error_that_does_not_echo_it() {
    let text = "state: { backend: redis, redis_url: 'http://:hunter2@db:6379' }\nroutes:\n  - { id: r, methods: [GET], path: /x, public: true }\n";
    let e = crate::config::from_str(text, std::path::Path::new("t.yaml")).unwrap_err();
    assert_eq!(e.field, "state.redis_url");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let zero =
        "state: { timeout: 0s }\nroutes:\n  - { id: r, methods: [GET], path: /x, public: true }\n";
    let e = crate::config::from_str(zero, std::path::Path::new("t.yaml")).unwrap_err();
    assert_eq!(e.field, "state.timeout");
}

#[tokio::test]
async fn a_caller_opens_at_most_max_new_requests_per_request_ttl() {
    let mut cfg = config("");
    cfg.file.approvals.max_new_requests = 2;
    let a = Approvals::new(&cfg, Arc::new(MemoryStore::new()));
    let alice = identity("alice", &["dba"]);
    // `who` asks for DELETE /databases/orders?v=`q`.
    let ask = |who: &Arc<Identity>, q: u32| {
        let path: &'static str = Box::leak(format!("/databases/orders?v={q}").into());
        let decision = granted(who);
        let a = &a;
        async move {
            a.gate(&Req::new("DELETE", "db", path).view(), decision, NOW)
                .await
        }
    };
    let first = ask(&alice, 1).await;
    let second = ask(&alice, 2).await;
    assert_eq!(first.code, ReasonCode::ApprovalRequired);
    assert_eq!(second.code, ReasonCode::ApprovalRequired);
    assert_ne!(approval_id(&first), approval_id(&second));

    // A third new action opens nothing: a 429 that says when, with no approval id.
    let third = ask(&alice, 3).await;
    assert_eq!(
        (third.code, third.http_status()),
        (ReasonCode::RateLimited, 429)
    );
    assert!(
        third.detail.contains("opened 2 approval requests"),
        "{}",
        third.detail
    );
    assert!(
        third
            .response_headers
            .iter()
            .any(|(n, v)| n == "retry-after" && v.parse::<u64>().is_ok_and(|s| s > 0)),
        "{:?}",
        third.response_headers
    );
    assert!(
        !third
            .response_headers
            .iter()
            .any(|(n, _)| n == APPROVAL_ID_HEADER)
    );
    assert_eq!(third.route.as_deref(), Some("drop-db"));
    let bob = identity("bob", &["dba-lead"]);
    assert_eq!(a.list(&bob, false, NOW).await.unwrap().len(), 2);

    // Retrying a pending action still names its request; the slot the third one reserved
    // was released, so it is refused again rather than reported pending.
    let retry = ask(&alice, 1).await;
    assert_eq!(approval_id(&retry), approval_id(&first));
    let again = ask(&alice, 3).await;
    assert_eq!(again.code, ReasonCode::RateLimited);

    // Another caller has a budget of their own.
    let dave = identity("dave", &["dba"]);
    let theirs = ask(&dave, 3).await;
    assert_eq!(theirs.code, ReasonCode::ApprovalRequired);
}

#[tokio::test]
async fn steady_pre_approved_traffic_keeps_one_record_per_action() {
    let a = approvals(Arc::new(MemoryStore::new()));
    let from = a.policy("drop-db", "dba").unwrap().pre_approve[0]
        .from
        .unwrap();
    let on_call = identity("alice", &["dba", "on-call"]);
    for i in 0..5 {
        for path in ["/databases/orders", "/databases/users"] {
            let r = Req::new("DELETE", "db", path);
            let d = a.gate(&r.view(), granted(&on_call), from + i).await;
            assert_eq!(d.code, ReasonCode::Allowed);
        }
    }
    let bob = identity("bob", &["dba-lead"]);
    let listed = a.list(&bob, true, from + 10).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|r| r.state == ApprovalState::PreApproved && valid_id(&r.id))
    );
    // A listing says until when the pre-approval allows the action: its window's end, never
    // the (past) moment it was recorded.
    let until = a.policy("drop-db", "dba").unwrap().pre_approve[0].until;
    assert!(until.is_some_and(|u| u > from + 10));
    for r in &listed {
        assert_eq!(r.grant_expires_at, until, "{r:?}");
        assert_eq!(super::api::to_pb(r, None).expires_at, until.unwrap());
    }
}

#[test]
fn max_new_requests_must_be_at_least_one() {
    let text = "issuers: []\napprovals: {max_new_requests: 0}\nroutes: [{id: r, methods: [GET], path: /r, public: true}]\n";
    let Err(e) = crate::config::from_str(text, std::path::Path::new("t.yaml")) else {
        panic!("0 must be refused");
    };
    let e = e.to_string();
    assert!(e.contains("approvals.max_new_requests"), "{e}");
}

/// A request whose record cannot be written releases its slot: the retry opens a request an
/// approver can see, never one only the requester is told about.
#[tokio::test]
async fn a_failed_record_write_leaves_no_request_nobody_can_see() {
    let store = Arc::new(crate::state::testing::TestStore::default());
    store
        .fail_index_add
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let a = approvals(store.clone());
    let alice = identity("alice", &["dba"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let first = a.gate(&r.view(), granted(&alice), NOW).await;
    assert_eq!(first.code, ReasonCode::StateUnavailable);
    store
        .fail_index_add
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let retry = a.gate(&r.view(), granted(&alice), NOW + 1).await;
    let id = approval_id(&retry);
    let bob = identity("bob", &["dba-lead"]);
    let listed = a.list(&bob, false, NOW + 1).await.unwrap();
    assert!(listed.iter().any(|rec| rec.id == id), "{id} is not listed");
}

/// An approval used while its id cannot be read still allows (the use is spent), and is
/// named `unknown` rather than by an empty string in the detail and the audit event.
#[tokio::test]
async fn an_approval_used_while_its_id_cannot_be_read_is_named_unknown() {
    let store = Arc::new(crate::state::testing::TestStore::default());
    let a = approvals(store.clone());
    let alice = identity("alice", &["dba"]);
    let bob = identity("bob", &["dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    a.approve(&bob, &id, None, NOW).await.unwrap();
    store
        .fail_get
        .lock()
        .unwrap()
        .push("approval:grantid:".to_string());
    let used = a.gate(&r.view(), granted(&alice), NOW + 1).await;
    assert_eq!(used.code, ReasonCode::Allowed, "{}", used.detail);
    assert!(
        used.detail.contains("approved (`unknown`"),
        "{}",
        used.detail
    );
}

/// A pre-approval record whose listing failed is not kept unlisted: the next request
/// writes both.
#[tokio::test]
async fn a_pre_approval_record_is_never_kept_unlisted() {
    let store = Arc::new(crate::state::testing::TestStore::default());
    store
        .fail_index_add
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let a = approvals(store.clone());
    let from = a.policy("drop-db", "dba").unwrap().pre_approve[0]
        .from
        .unwrap();
    let on_call = identity("alice", &["dba", "on-call"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let d = a.gate(&r.view(), granted(&on_call), from).await;
    assert_eq!(
        d.code,
        ReasonCode::Allowed,
        "the allow never waits on the store"
    );
    store
        .fail_index_add
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let d = a.gate(&r.view(), granted(&on_call), from + 1).await;
    assert_eq!(d.code, ReasonCode::Allowed);
    let bob = identity("bob", &["dba-lead"]);
    assert_eq!(a.list(&bob, true, from + 2).await.unwrap().len(), 1);
}

/// A retry that arrives while the first request for its action is still being opened (here:
/// held in the cap's check, which then refuses it) is not given an id that never exists.
#[tokio::test]
async fn a_retry_racing_the_opening_of_its_request_names_no_id() {
    let store = Arc::new(crate::state::testing::TestStore {
        rate_check: crate::state::testing::Gate::after(1),
        ..Default::default()
    });
    let mut cfg = config("");
    cfg.file.approvals.max_new_requests = 1;
    let a = Arc::new(Approvals::new(&cfg, store.clone()));
    let alice = identity("alice", &["dba"]);
    let one = Req::new("DELETE", "db", "/databases/one");
    let d = a.gate(&one.view(), granted(&alice), NOW).await;
    assert_eq!(d.code, ReasonCode::ApprovalRequired);
    let first = tokio::spawn({
        let (a, alice) = (a.clone(), alice.clone());
        async move {
            let two = Req::new("DELETE", "db", "/databases/two");
            a.gate(&two.view(), granted(&alice), NOW).await
        }
    });
    store.rate_check.reached.notified().await;
    let two = Req::new("DELETE", "db", "/databases/two");
    let retry = a.gate(&two.view(), granted(&alice), NOW).await;
    store.rate_check.release.notify_one();
    assert_eq!(first.await.unwrap().code, ReasonCode::RateLimited);
    assert_eq!(retry.code, ReasonCode::ApprovalRequired);
    assert!(retry.detail.contains("being opened"), "{}", retry.detail);
    assert!(
        !retry
            .response_headers
            .iter()
            .any(|(n, _)| n == APPROVAL_ID_HEADER),
        "{:?}",
        retry.response_headers
    );
}

/// An approval whose record cannot be written leaves no usable grant behind (it would be
/// used with no `approved` event and a record still pending), and the approver can retry.
#[tokio::test]
async fn an_approval_that_cannot_be_recorded_grants_nothing_and_can_be_retried() {
    let store = Arc::new(crate::state::testing::TestStore::default());
    let a = approvals(store.clone());
    let alice = identity("alice", &["dba"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    let bob = identity("bob", &["dba-lead"]);
    store
        .fail_index_add
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        a.approve(&bob, &id, None, NOW + 1).await,
        Err(ApprovalError::State(_))
    ));
    let d = a.gate(&r.view(), granted(&alice), NOW + 2).await;
    assert_eq!(d.code, ReasonCode::ApprovalRequired, "{}", d.detail);
    store
        .fail_index_add
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let approved = a.approve(&bob, &id, None, NOW + 3).await.unwrap();
    assert_eq!(approved.state, ApprovalState::Approved);
    let d = a.gate(&r.view(), granted(&alice), NOW + 4).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
}

/// An approval is spent only by the rule it was asked and approved under: the same caller's
/// same action granted by another rule (another token) needs that rule's approvers.
#[tokio::test]
async fn an_approval_under_one_rule_never_satisfies_another_rules_approval() {
    let a = Approvals::new(&config(SUPPORT_RULE), Arc::new(MemoryStore::new()));
    let alice_support = identity("alice", &["support"]);
    let alice_dba = identity("alice", &["dba"]);
    let sam = identity("sam", &["support-lead"]);
    let bob = identity("bob", &["dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/orders");

    let asked = a
        .gate(&r.view(), granted_by(&alice_support, "support"), NOW)
        .await;
    let support_id = approval_id(&asked);
    let approved = a.approve(&sam, &support_id, None, NOW).await.unwrap();
    assert_eq!((approved.rule.as_str(), approved.uses), ("support", 5));

    // The same request with her dba token is granted by rule `dba`: Sam's approval is not
    // a dba-lead's, so it asks anew, as a request of its own that dba approvers decide.
    for t in 1..=5 {
        let d = a.gate(&r.view(), granted(&alice_dba), NOW + t).await;
        assert_eq!(d.code, ReasonCode::ApprovalRequired, "{}", d.detail);
        assert_ne!(approval_id(&d), support_id);
    }
    let dba_id = approval_id(&a.gate(&r.view(), granted(&alice_dba), NOW + 6).await);
    assert!(a.list(&sam, false, NOW + 6).await.unwrap().is_empty());
    let for_bob = a.list(&bob, false, NOW + 6).await.unwrap();
    assert_eq!(
        for_bob
            .iter()
            .map(|r| (r.id.as_str(), r.rule.as_str()))
            .collect::<Vec<_>>(),
        [(dba_id.as_str(), "dba")]
    );
    assert!(matches!(
        a.approve(&sam, &dba_id, None, NOW + 6).await,
        Err(ApprovalError::NotApprover(_))
    ));

    // Sam's approval is untouched by those attempts: its five uses are still there for
    // rule `support`, and none more.
    for t in 7..12 {
        let d = a
            .gate(&r.view(), granted_by(&alice_support, "support"), NOW + t)
            .await;
        assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
    }
    let spent = a
        .gate(&r.view(), granted_by(&alice_support, "support"), NOW + 12)
        .await;
    assert_eq!(spent.code, ReasonCode::ApprovalRequired);

    // Bob's approval of the dba request allows rule `dba` once.
    a.approve(&bob, &dba_id, None, NOW + 13).await.unwrap();
    let d = a.gate(&r.view(), granted(&alice_dba), NOW + 14).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
}

/// The cast of the shared-state fault tests: approvals on a `TestStore` (faults injected per
/// key prefix) with their sink and audit lines, alice (a dba) asking to drop `orders`, bob (a
/// dba lead) deciding.
fn fault_case() -> (
    Arc<crate::state::testing::TestStore>,
    Approvals,
    crate::audit::AuditSink,
    AuditLines,
    Arc<Identity>,
    Arc<Identity>,
    Req,
) {
    let store = Arc::new(crate::state::testing::TestStore::default());
    let (a, sink, lines) = AuditLines::approvals(store.clone());
    let alice = identity("alice", &["dba"]);
    let bob = identity("bob", &["dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    (store, a, sink, lines, alice, bob, r)
}

/// The audit lines an `AuditSink` wrote, for tests that look at approval events.
#[derive(Clone, Default)]
struct AuditLines(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for AuditLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AuditLines {
    /// An `Approvals` on `store` whose events go to the returned lines.
    fn approvals(store: Arc<dyn StateStore>) -> (Approvals, crate::audit::AuditSink, AuditLines) {
        let lines = AuditLines::default();
        let writer = lines.clone();
        let sink = crate::audit::AuditSink::to_writer(move || writer).unwrap();
        let mut a = approvals(store);
        a.set_audit(sink.clone());
        (a, sink, lines)
    }

    /// Every approval line written so far.
    fn lines(&self, sink: &crate::audit::AuditSink) -> Vec<serde_json::Value> {
        assert!(sink.flush(Duration::from_secs(5)), "audit flush timed out");
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect()
    }

    /// The `event` of every approval line written so far.
    fn events(&self, sink: &crate::audit::AuditSink) -> Vec<String> {
        self.lines(sink)
            .iter()
            .map(|v| v["event"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// An approval line names the requester's issuer as a decision line does: `issuer` is the
/// configured name (the one `actor` and rules use), the token's `iss` is beside it.
#[tokio::test]
async fn approval_events_name_the_issuer_by_its_configured_name() {
    let (a, sink, lines) = AuditLines::approvals(Arc::new(MemoryStore::new()));
    let alice = identity("alice", &["dba"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    a.approve(&identity("bob", &["dba-lead"]), &id, None, NOW + 1)
        .await
        .unwrap();
    let lines = lines.lines(&sink);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert_eq!(line["issuer"], "corp", "{line}");
        assert_eq!(line["iss"], "https://login.example.com", "{line}");
    }
    assert_eq!(lines[1]["actor"], "corp:bob", "{}", lines[1]);
}

/// An approval whose record cannot be written, and whose cleanup cannot delete anything of
/// the grant's either, leaves nothing usable: the grant is written only after the record.
/// The request stays pending and listed, another approver can still decide it, and no
/// `approved` or `used` event is written.
#[tokio::test]
async fn a_failed_approval_whose_cleanup_fails_too_grants_nothing() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    store
        .fail_index_add
        .store(true, std::sync::atomic::Ordering::SeqCst);
    *store.fail_delete.lock().unwrap() = vec!["approval:grant".into()];
    assert!(matches!(
        a.approve(&bob, &id, None, NOW + 1).await,
        Err(ApprovalError::State(_))
    ));
    store
        .fail_index_add
        .store(false, std::sync::atomic::Ordering::SeqCst);

    let d = a.gate(&r.view(), granted(&alice), NOW + 2).await;
    assert_eq!(d.code, ReasonCode::ApprovalRequired, "{}", d.detail);
    assert_eq!(approval_id(&d), id);
    let carol = identity("carol", &[]);
    let listed = a.list(&carol, false, NOW + 2).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| (r.id.as_str(), r.state))
            .collect::<Vec<_>>(),
        [(id.as_str(), ApprovalState::Pending)]
    );
    let rejected = a.reject(&carol, &id, None, NOW + 3).await.unwrap();
    assert_eq!(rejected.state, ApprovalState::Rejected);
    let d = a.gate(&r.view(), granted(&alice), NOW + 4).await;
    assert_eq!(d.code, ReasonCode::ApprovalRequired, "{}", d.detail);
    assert!(
        d.detail.contains("rejected by `corp:carol`"),
        "{}",
        d.detail
    );
    assert_eq!(lines.events(&sink), ["requested", "rejected"]);
}

/// An approval ends either by its last use or by its time: the audit log says which, once.
#[tokio::test]
async fn a_spent_approval_is_not_also_logged_as_expired() {
    let store = Arc::new(crate::state::MemoryStore::new());
    let (a, sink, lines) = AuditLines::approvals(store.clone());
    let bob = identity("bob", &["dba-lead"]);
    let alice = identity("alice", &["dba"]);
    let spent = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&spent.view(), granted(&alice), NOW).await);
    a.approve(&bob, &id, None, NOW + 1).await.unwrap();
    let d = a.gate(&spent.view(), granted(&alice), NOW + 2).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
    // Another approval, never used, for comparison.
    let unused = Req::new("DELETE", "db", "/databases/staging");
    let other = approval_id(&a.gate(&unused.view(), granted(&alice), NOW + 3).await);
    a.approve(&bob, &other, None, NOW + 4).await.unwrap();

    let later = NOW + 16 * 60;
    assert_eq!(
        a.sweep(later).await.unwrap(),
        1,
        "only the unused one expires"
    );
    assert_eq!(a.sweep(later + 1).await.unwrap(), 0, "once");
    assert_eq!(
        lines.events(&sink),
        [
            "requested",
            "approved",
            "used",
            "requested",
            "approved",
            "expired"
        ]
    );
}

/// The grant is the last write: when it fails, the approved record written before it is
/// put back to pending and the decision released, so the approval can be retried.
#[tokio::test]
async fn a_failed_grant_write_leaves_the_request_pending_and_retryable() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    *store.fail_set.lock().unwrap() = vec!["approval:grant:".into()];
    assert!(matches!(
        a.approve(&bob, &id, None, NOW + 1).await,
        Err(ApprovalError::State(_))
    ));
    let d = a.gate(&r.view(), granted(&alice), NOW + 2).await;
    assert_eq!(d.code, ReasonCode::ApprovalRequired, "{}", d.detail);
    let listed = a.list(&bob, false, NOW + 2).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.state).collect::<Vec<_>>(),
        [ApprovalState::Pending]
    );
    store.fail_set.lock().unwrap().clear();
    a.approve(&bob, &id, None, NOW + 3).await.unwrap();
    let d = a.gate(&r.view(), granted(&alice), NOW + 4).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
    assert_eq!(lines.events(&sink), ["requested", "approved", "used"]);
}

/// A grant write that fails and cannot be taken back either may have landed (a timeout
/// after Redis applied it): the request is then left approved, as its record says, and the
/// approval is logged, so nothing that may be used is unlisted or unaudited.
#[tokio::test]
async fn a_grant_that_cannot_be_taken_back_is_recorded_and_audited_as_approved() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    *store.fail_set.lock().unwrap() = vec!["approval:grant:".into()];
    *store.fail_delete.lock().unwrap() = vec!["approval:grant:".into()];
    assert!(matches!(
        a.approve(&bob, &id, None, NOW + 1).await,
        Err(ApprovalError::State(_))
    ));
    let listed = a.list(&bob, true, NOW + 2).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.state).collect::<Vec<_>>(),
        [ApprovalState::Approved]
    );
    assert!(matches!(
        a.reject(&bob, &id, None, NOW + 2).await,
        Err(ApprovalError::AlreadyDecided {
            state: "approved",
            ..
        })
    ));
    assert_eq!(lines.events(&sink), ["requested", "approved"]);
    // Here the grant never landed: the next request asks anew.
    let d = a.gate(&r.view(), granted(&alice), NOW + 3).await;
    assert_eq!(d.code, ReasonCode::ApprovalRequired, "{}", d.detail);
    assert_ne!(approval_id(&d), id);
}

/// A rejection whose record cannot be written releases the decision it claimed: the request
/// stays pending, and can be rejected again (or approved), rather than being locked and
/// reported as "already approved".
#[tokio::test]
async fn a_failed_rejection_can_be_retried() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    store
        .fail_index_add
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        a.reject(&bob, &id, Some("no".into()), NOW + 1).await,
        Err(ApprovalError::State(_))
    ));
    store
        .fail_index_add
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let listed = a.list(&bob, false, NOW + 2).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.state).collect::<Vec<_>>(),
        [ApprovalState::Pending]
    );
    let rejected = a.reject(&bob, &id, Some("no".into()), NOW + 2).await;
    assert_eq!(rejected.map(|r| r.state), Ok(ApprovalState::Rejected));
    let d = a.gate(&r.view(), granted(&alice), NOW + 3).await;
    assert!(d.detail.contains("rejected by `corp:bob`"), "{}", d.detail);
    assert_eq!(lines.events(&sink), ["requested", "rejected"]);
}

/// A request whose decision is claimed but whose record still reads pending (another
/// approver's decision has not finished) is reported as such, never as "already approved";
/// a decided one is named by its state.
#[tokio::test]
async fn a_lost_claim_names_the_state_truthfully() {
    let store = Arc::new(MemoryStore::new());
    let a = approvals(store.clone());
    let alice = identity("alice", &["dba"]);
    let bob = identity("bob", &["dba-lead"]);
    let carol = identity("carol", &[]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    // Carol's decision, on another replica, has claimed it and not written it yet.
    let key = claimed_elsewhere(&store, &id).await;
    for e in [
        a.reject(&bob, &id, None, NOW + 1).await.unwrap_err(),
        a.approve(&bob, &id, None, NOW + 1).await.unwrap_err(),
    ] {
        assert_eq!(e, ApprovalError::BeingDecided(id.clone()));
        assert!(!e.to_string().contains("approved"), "{e}");
        assert!(e.to_string().contains("being decided"), "{e}");
    }
    // Once decided, the state is named.
    store.delete(&key).await.unwrap();
    a.reject(&carol, &id, None, NOW + 2).await.unwrap();
    assert_eq!(
        a.approve(&bob, &id, None, NOW + 3).await,
        Err(ApprovalError::AlreadyDecided {
            id: id.clone(),
            state: "rejected"
        })
    );
}

/// An output that refuses writes while `fail` is set.
struct Flaky(Arc<std::sync::atomic::AtomicBool>);

impl std::io::Write for Flaky {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits (at most 10 s) until the audit log's refusing state is `want`.
async fn until_refusing(sink: &crate::audit::AuditSink, want: bool) {
    let started = std::time::Instant::now();
    while sink.refusing() != want {
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// While the audit log refuses records, an approved request is refused (503) without
/// spending its approval: the allow would have been turned into an `audit_unavailable` deny
/// after the use was taken. Once the log takes records again, the approval still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_not_spent_while_the_audit_log_refuses_records() {
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let output = Flaky(fail.clone());
    let sink = crate::audit::AuditSink::to_writer(move || output).unwrap();
    let mut a = approvals(Arc::new(MemoryStore::new()));
    a.set_audit(sink.clone());
    let alice = identity("alice", &["dba"]);
    let bob = identity("bob", &["dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);

    // The output starts failing; the approval's own event is the write that finds out.
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    a.approve(&bob, &id, None, NOW).await.unwrap();
    until_refusing(&sink, true).await;
    let refused = a.gate(&r.view(), granted(&alice), NOW + 1).await;
    assert_eq!(
        refused.code,
        ReasonCode::AuditUnavailable,
        "{}",
        refused.detail
    );
    assert_eq!(refused.http_status(), 503);

    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    until_refusing(&sink, false).await;
    let used = a.gate(&r.view(), granted(&alice), NOW + 2).await;
    assert_eq!(used.code, ReasonCode::Allowed, "{}", used.detail);
    assert!(used.detail.contains(&id), "{}", used.detail);
}

/// Claims the decision of request `id` as carol's approve on another replica just did (the
/// claim's whole lifetime left, so it is not stale); returns the claim's key.
async fn claimed_elsewhere(store: &MemoryStore, id: &str) -> String {
    let key = format!("approval:decided:{id}");
    let lifetime = config("").file.approvals.request_ttl.get() + super::service::RECORD_GRACE;
    assert!(
        store
            .insert_if_absent(&key, "corp:carol", lifetime)
            .await
            .unwrap()
    );
    key
}

/// The key of `who`'s request slot for `r` under rule `dba`.
fn slot_key(who: &Arc<Identity>, r: &Req) -> String {
    let fp = fingerprint(who, &policy_of(&config(""), "dba"), &r.view(), None);
    format!("approval:req:{fp}")
}

/// A slot whose write timed out but landed (Redis applied it late) is released by the
/// opener that wrote it: the next retry opens a request approvers can see, instead of
/// being told for `request_ttl` that one "is being opened".
#[tokio::test]
async fn a_request_slot_that_lands_after_a_timeout_blocks_nothing() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    *store.land_then_fail.lock().unwrap() = vec!["approval:req:".into()];
    let first = a.gate(&r.view(), granted(&alice), NOW).await;
    assert_eq!(first.code, ReasonCode::StateUnavailable, "{}", first.detail);
    store.land_then_fail.lock().unwrap().clear();

    let retry = a.gate(&r.view(), granted(&alice), NOW + 1).await;
    assert_eq!(retry.code, ReasonCode::ApprovalRequired, "{}", retry.detail);
    let id = approval_id(&retry);
    let listed = a.list(&bob, false, NOW + 1).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    a.approve(&bob, &id, None, NOW + 2).await.unwrap();
    let d = a.gate(&r.view(), granted(&alice), NOW + 3).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
    assert_eq!(lines.events(&sink), ["requested", "approved", "used"]);
}

/// A slot left without its record (its opener's write timed out but landed, and releasing
/// it failed too) is adopted by a retry once it is older than any opening takes: the retry
/// gets its id, pending and listed, audited `requested` once, and nothing is allowed until
/// it is approved. A younger one is still "being opened".
#[tokio::test]
async fn a_slot_left_without_its_record_is_adopted_by_a_retry() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    *store.land_then_fail.lock().unwrap() = vec!["approval:req:".into()];
    *store.fail_delete.lock().unwrap() = vec!["approval:req:".into()];
    let first = a.gate(&r.view(), granted(&alice), NOW).await;
    assert_eq!(first.code, ReasonCode::StateUnavailable, "{}", first.detail);
    store.land_then_fail.lock().unwrap().clear();
    store.fail_delete.lock().unwrap().clear();

    // Just taken: its opener may still be writing the record.
    let young = a.gate(&r.view(), granted(&alice), NOW + 1).await;
    assert_eq!(young.code, ReasonCode::ApprovalRequired, "{}", young.detail);
    assert!(young.detail.contains("being opened"), "{}", young.detail);
    assert!(a.list(&bob, false, NOW + 1).await.unwrap().is_empty());

    // The same slot a minute older (a memory store's clock cannot be moved forward: the
    // slot is written again with a minute less to live).
    let key = slot_key(&alice, &r);
    let orphan = store.get(&key).await.unwrap().expect("the slot landed");
    let request_ttl = config("").file.approvals.request_ttl.get();
    store
        .set(&key, &orphan, request_ttl - Duration::from_secs(60))
        .await
        .unwrap();
    let adopted = a.gate(&r.view(), granted(&alice), NOW + 60).await;
    assert_eq!(
        adopted.code,
        ReasonCode::ApprovalRequired,
        "{}",
        adopted.detail
    );
    assert_eq!(approval_id(&adopted), orphan);
    assert!(adopted.detail.contains("is pending"), "{}", adopted.detail);
    let again = a.gate(&r.view(), granted(&alice), NOW + 61).await;
    assert_eq!(approval_id(&again), orphan);
    let listed = a.list(&bob, false, NOW + 61).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| (r.id.as_str(), r.state))
            .collect::<Vec<_>>(),
        [(orphan.as_str(), ApprovalState::Pending)]
    );
    // It ends with its slot, not an hour after the adoption.
    assert!(
        listed[0].expires_at <= NOW + 60 + 3600 - 60,
        "{:?}",
        listed[0]
    );
    a.approve(&bob, &orphan, None, NOW + 62).await.unwrap();
    let d = a.gate(&r.view(), granted(&alice), NOW + 63).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
    assert_eq!(lines.events(&sink), ["requested", "approved", "used"]);
}

/// A request record whose write timed out but landed, and which could not be withdrawn
/// either (the store still down), may be listed and approved: it gets its `requested`
/// line, marked unconfirmed, so no approval in the log lacks its request. The requester was
/// refused with a 503.
#[tokio::test]
async fn a_request_record_that_may_have_landed_is_audited_as_unconfirmed() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    *store.land_then_fail.lock().unwrap() = vec!["approval:rec:".into()];
    *store.fail_delete.lock().unwrap() = vec!["approval:rec:".into()];
    let first = a.gate(&r.view(), granted(&alice), NOW).await;
    assert_eq!(first.code, ReasonCode::StateUnavailable, "{}", first.detail);
    store.land_then_fail.lock().unwrap().clear();
    store.fail_delete.lock().unwrap().clear();
    let logged = lines.lines(&sink);
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["event"], "requested");
    assert!(
        logged[0]["reason"]
            .as_str()
            .is_some_and(|why| why.starts_with("unconfirmed")),
        "{}",
        logged[0]
    );
    let listed = a.list(&bob, false, NOW + 1).await.unwrap();
    assert_eq!(listed.len(), 1, "the record landed: {listed:?}");
    assert_eq!(listed[0].id, logged[0]["approval_id"]);
    a.approve(&bob, &listed[0].id, None, NOW + 2).await.unwrap();
    assert_eq!(lines.events(&sink), ["requested", "approved"]);
}

/// An approve or reject whose claim timed out but landed releases it: the request stays
/// pending, listed, and open to be decided again, not "being decided" until the claim
/// expires.
#[tokio::test]
async fn a_claim_that_lands_after_a_timeout_is_released() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    *store.land_then_fail.lock().unwrap() = vec!["approval:decided:".into()];
    assert!(matches!(
        a.approve(&bob, &id, None, NOW + 1).await,
        Err(ApprovalError::State(_))
    ));
    assert!(matches!(
        a.reject(&bob, &id, None, NOW + 2).await,
        Err(ApprovalError::State(_))
    ));
    store.land_then_fail.lock().unwrap().clear();
    let listed = a.list(&bob, false, NOW + 3).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.state).collect::<Vec<_>>(),
        [ApprovalState::Pending]
    );
    let approved = a.approve(&bob, &id, None, NOW + 3).await.unwrap();
    assert_eq!(approved.state, ApprovalState::Approved);
    let d = a.gate(&r.view(), granted(&alice), NOW + 4).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
    assert_eq!(lines.events(&sink), ["requested", "approved", "used"]);
}

/// A decision claim that landed late and could not be released (the store still down) is
/// taken over once it is older than any decision takes, with the request still pending: the
/// request is decided, not stuck "being decided" until it expires. Before that, it is not.
#[tokio::test]
async fn a_claim_nobody_could_release_is_taken_over_once_stale() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    let carol = identity("carol", &[]);
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    *store.land_then_fail.lock().unwrap() = vec!["approval:decided:".into()];
    *store.fail_delete.lock().unwrap() = vec!["approval:decided:".into()];
    assert!(matches!(
        a.approve(&bob, &id, None, NOW + 1).await,
        Err(ApprovalError::State(_))
    ));
    store.land_then_fail.lock().unwrap().clear();
    store.fail_delete.lock().unwrap().clear();
    let key = format!("approval:decided:{id}");
    let held = store.get(&key).await.unwrap().expect("the claim stayed");
    // Soon after: another decision may still be under way.
    assert_eq!(
        a.reject(&carol, &id, None, NOW + 2).await,
        Err(ApprovalError::BeingDecided(id.clone()))
    );
    // Whatever the approver's clock says: the claim's age is the store's.
    assert_eq!(
        a.reject(&carol, &id, None, NOW + 600).await,
        Err(ApprovalError::BeingDecided(id.clone()))
    );
    // The same claim, as old as `ADOPT_AFTER` by the store's clock (a memory store's clock
    // cannot be moved forward: the claim is written again with that much less to live).
    let left = store.ttl_left(&key).await.unwrap().unwrap();
    store
        .set(&key, &held, left - super::service::ADOPT_AFTER)
        .await
        .unwrap();
    let after = NOW + 2;
    let approved = a.approve(&carol, &id, None, after).await.unwrap();
    assert_eq!(approved.decided_by.as_deref(), Some("corp:carol"));
    let d = a.gate(&r.view(), granted(&alice), after + 1).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
    assert_eq!(lines.events(&sink), ["requested", "approved", "used"]);
    // A decided request's claim is never taken over.
    assert!(matches!(
        a.reject(&bob, &id, None, after + 600).await,
        Err(ApprovalError::AlreadyDecided { .. })
    ));
}

/// Releasing a claim never releases another decision's: a claim that failed with nothing
/// written leaves the one held by another replica's decision in place.
#[tokio::test]
async fn a_failed_claim_never_releases_another_decisions_claim() {
    let store = Arc::new(crate::state::testing::TestStore::default());
    let a = approvals(store.clone());
    let alice = identity("alice", &["dba"]);
    let bob = identity("bob", &["dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/orders");
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    // Carol's decision, on another replica, holds the claim; Bob's fails (a timeout whose
    // write found the claim taken).
    let key = claimed_elsewhere(&store.inner, &id).await;
    *store.land_then_fail.lock().unwrap() = vec!["approval:decided:".into()];
    assert!(matches!(
        a.approve(&bob, &id, None, NOW + 1).await,
        Err(ApprovalError::State(_))
    ));
    store.land_then_fail.lock().unwrap().clear();
    assert_eq!(
        store.get(&key).await.unwrap().as_deref(),
        Some("corp:carol")
    );
    assert_eq!(
        a.approve(&bob, &id, None, NOW + 2).await,
        Err(ApprovalError::BeingDecided(id.clone()))
    );
}

/// A rejection whose record write timed out but landed is not left in force unaudited: the
/// pending record is written back and the decision released, so the request is pending
/// (as the approver is told), retries are not told it was rejected, and it can be rejected
/// again, audited then.
#[tokio::test]
async fn a_rejection_that_lands_after_a_timeout_is_undone() {
    let (store, a, sink, lines, alice, bob, r) = fault_case();
    let id = approval_id(&a.gate(&r.view(), granted(&alice), NOW).await);
    *store.land_then_fail.lock().unwrap() = vec!["approval:rec:".into()];
    assert!(matches!(
        a.reject(&bob, &id, Some("no".into()), NOW + 1).await,
        Err(ApprovalError::State(_))
    ));
    store.land_then_fail.lock().unwrap().clear();
    let listed = a.list(&bob, false, NOW + 2).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.state).collect::<Vec<_>>(),
        [ApprovalState::Pending]
    );
    let d = a.gate(&r.view(), granted(&alice), NOW + 2).await;
    assert!(d.detail.contains("is pending"), "{}", d.detail);
    assert_eq!(lines.events(&sink), ["requested"]);
    let rejected = a.reject(&bob, &id, Some("no".into()), NOW + 3).await;
    assert_eq!(rejected.map(|r| r.state), Ok(ApprovalState::Rejected));
    let d = a.gate(&r.view(), granted(&alice), NOW + 4).await;
    assert!(d.detail.contains("rejected by `corp:bob`"), "{}", d.detail);
    assert_eq!(lines.events(&sink), ["requested", "rejected"]);
}

/// `list --all` shows what an approval has left: its uses while in force, 0 once spent
/// (also after a newer approval of the same action took its counter), nothing for a record
/// that grants no counted uses now (pending, rejected, expired).
#[tokio::test]
async fn uses_left_is_known_for_approvals_in_force_only() {
    let a = approvals(Arc::new(MemoryStore::new()));
    let (alice, bob) = (identity("alice", &["dba"]), identity("bob", &["dba-lead"]));
    let left = |ids: &[&str], now: i64| {
        let a = &a;
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let bob = bob.clone();
        async move {
            let listed = a.list(&bob, true, now).await.unwrap();
            let found: Vec<Record> = ids
                .iter()
                .map(|id| listed.iter().find(|r| &r.id == id).unwrap().clone())
                .collect();
            a.uses_left(&found, now).await.unwrap()
        }
    };
    let orders = Req::new("DELETE", "db", "/databases/orders");
    let first = approval_id(&a.gate(&orders.view(), granted(&alice), NOW).await);
    let staging = Req::new("DELETE", "db", "/databases/staging");
    let rejected = approval_id(&a.gate(&staging.view(), granted(&alice), NOW).await);
    a.reject(&bob, &rejected, None, NOW + 1).await.unwrap();
    assert_eq!(left(&[&first, &rejected], NOW + 1).await, [None, None]);

    a.approve(&bob, &first, None, NOW + 1).await.unwrap();
    assert_eq!(left(&[&first], NOW + 2).await, [Some(1)]);
    let d = a.gate(&orders.view(), granted(&alice), NOW + 2).await;
    assert_eq!(d.code, ReasonCode::Allowed, "{}", d.detail);
    assert_eq!(left(&[&first], NOW + 3).await, [Some(0)]);

    // The next request for the same action, approved: the first stays spent.
    let second = approval_id(&a.gate(&orders.view(), granted(&alice), NOW + 3).await);
    assert_ne!(second, first);
    a.approve(&bob, &second, None, NOW + 4).await.unwrap();
    assert_eq!(left(&[&first, &second], NOW + 5).await, [Some(0), Some(1)]);

    // Past the rule's ttl (15m) the approval is over: nothing is claimed about its uses.
    assert_eq!(left(&[&second], NOW + 4 + 15 * 60).await, [None]);
}

/// A record keeps at most `DISPLAY_PATH_MAX` bytes of the path, saying how long it was:
/// one caller's requests with 300 KB paths made `approvals list` too large for every
/// approver's client.
#[test]
fn a_record_keeps_a_long_path_cut_and_says_so() {
    assert_eq!(display_path("/databases/x?force=1"), "/databases/x");
    let long = format!("/databases/{}", "x".repeat(300_000));
    let shown = display_path(&long);
    assert!(shown.len() < DISPLAY_PATH_MAX + 64, "{}", shown.len());
    assert!(shown.starts_with("/databases/xxx"));
    assert!(shown.ends_with("… (cut: 300011 bytes in all)"), "{shown}");
}

/// A requester's `sub` is theirs to choose at some issuers: one holding a newline, an escape
/// sequence or a bidirectional override printed a made-up request line (or reordered one)
/// in the approver's listing and the webhook's summary, and `"alice "` read as `alice`. The
/// webhook shows such a subject quoted and escaped; a plain one stays as it is.
#[tokio::test]
async fn a_subject_that_is_not_plain_text_is_shown_quoted_and_escaped() {
    assert_eq!(super::shown("alice"), "alice");
    assert_eq!(super::shown("a b"), "a b");
    assert_eq!(super::shown("alice "), "\"alice \"");
    assert_eq!(
        super::shown("eve\nfake line\u{1b}[2J\u{202e}\"x\\"),
        "\"eve\\u{a}fake line\\u{1b}[2J\\u{202e}\\\"x\\\\\""
    );
    let a = approvals(Arc::new(MemoryStore::new()));
    let mallory = identity(
        "mallory DELETE db/databases/scratch\n\napr_0 approved",
        &["dba"],
    );
    let bob = identity("bob", &["dba-lead"]);
    let r = Req::new("DELETE", "db", "/databases/prod");
    approval_id(&a.gate(&r.view(), granted(&mallory), NOW).await);
    let listed = a.list(&bob, false, NOW).await.unwrap();
    let hook = test_webhook();
    let payload = hook.payload(&listed[0]);
    let summary = payload["summary"].as_str().unwrap();
    assert!(!summary.contains('\n'), "{summary}");
    assert!(
        summary.starts_with(
            "corp:\"mallory DELETE db/databases/scratch\\u{a}\\u{a}apr_0 approved\" asks to DELETE db/databases/prod"
        ),
        "{summary}"
    );
    assert!(
        !payload["subject"].as_str().unwrap().contains('\n'),
        "{payload}"
    );
}
