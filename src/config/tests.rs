//! Config loading and validation: every error names its field.

use std::path::{Path, PathBuf};

use jsonwebtoken::Algorithm;

use super::*;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml")
}

/// A path inside `config/`, so `dev/jwks.json` resolves to the shipped dev key set.
fn beside_shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/test.yaml")
}

const ROUTE: &str = "routes:\n  - { id: h, methods: [GET], path: /h, public: true }\n";

fn compile(text: &str) -> Result<Config, ConfigError> {
    from_str(text, &beside_shipped())
}

/// An issuer entry (YAML flow mapping body) plus one public route.
fn with_issuer(issuer: &str) -> String {
    format!("issuers:\n  - {{ {issuer} }}\n{ROUTE}")
}

const DEV: &str =
    "name: dev, issuer: \"https://dev.test\", audiences: [api], keys: { file: dev/jwks.json }";

/// `text` compiles, with a warning that starts with `field` and holds `message`.
#[track_caller]
fn warns(text: &str, field: &str, message: &str) {
    let c =
        compile(text).unwrap_or_else(|e| panic!("refused, expected a warning at `{field}`: {e}"));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.starts_with(&format!("{field}: ")) && w.contains(message)),
        "no warning at `{field}` with `{message}`: {:?}",
        c.warnings
    );
}

#[track_caller]
fn fails(text: &str, field: &str, message: &str) -> ConfigError {
    let e = match compile(text) {
        Ok(_) => panic!("compiled, expected an error at `{field}`"),
        Err(e) => e,
    };
    assert_eq!(e.field, field, "{e}");
    assert!(
        e.message.contains(message),
        "message `{}` lacks `{message}`",
        e.message
    );
    assert_eq!(e.file, beside_shipped());
    e
}

#[test]
fn shipped_config_compiles_without_warnings() {
    let c = load(&shipped()).unwrap();
    assert_eq!(c.issuers.len(), 1);
    let dev = &c.issuers[0];
    assert_eq!(&*dev.name, "dev");
    assert_eq!(dev.rules.algorithms, vec![Algorithm::RS256]);
    assert_eq!(dev.rules.max_token_bytes, 8192);
    assert_eq!(dev.rules.leeway_secs, 30);
    assert_eq!(
        (dev.header.as_str(), dev.scheme.as_str()),
        ("authorization", "Bearer")
    );
    assert_eq!(c.policy.routes().len(), 7);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let keys = dev.keys.file.as_ref().unwrap();
    assert!(keys.is_absolute() && keys.is_file(), "{}", keys.display());
}

#[test]
fn load_names_a_missing_file() {
    let e = load(Path::new("/nonexistent/portcullis.yaml")).unwrap_err();
    assert_eq!(e.field, "");
    assert!(e.message.starts_with("cannot read the config file"), "{e}");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/portcullis.yaml: cannot read"),
        "{e}"
    );
    assert_eq!(
        e.hint.as_deref(),
        Some("name the config file with `--config PATH`")
    );
    // A relative path (the default `config/portcullis.yaml`) says where it was looked for.
    let e = load(Path::new("no-such-dir/portcullis.yaml")).unwrap_err();
    let hint = e.hint.unwrap_or_default();
    let cwd = std::env::current_dir().unwrap();
    assert!(
        hint.contains(&cwd.display().to_string()) && hint.contains("--config PATH"),
        "{hint}"
    );
}

#[test]
fn empty_or_shapeless_files_are_errors() {
    fails("", "", "the config file is empty");
    fails("# only a comment\n", "", "the config file is empty");
    fails("---\n", "", "the config file is empty");
    fails("[]\n", "", "top level must be a mapping");
    fails("routes: [\n", "", "invalid YAML");
    fails("routes: []\n", "routes", "no routes are configured");
    fails("server: {}\n", "routes", "no routes are configured");
}

#[test]
fn unknown_fields_name_the_field_and_suggest_the_closest() {
    let e = fails("rotues: []\n", "rotues", "unknown field `rotues`");
    assert_eq!(e.hint.as_deref(), Some("did you mean `routes`?"));
    let e = fails(
        "routes:\n  - { id: a, methods: [GET], path: /a, rules: [{ id: r, scope: [x] }] }\n",
        "routes[0].rules[0].scope",
        "unknown field `scope`",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `scopes`?"));
    let e = fails(
        "routes:\n  - { id: a, methods: [GET], path: /a, zzzzzzzz: 1 }\n",
        "routes[0].zzzzzzzz",
        "unknown field",
    );
    assert!(e.hint.unwrap().starts_with("valid fields here: id, hosts"));
    let e = fails(
        &with_issuer(&format!("{DEV}, token: {{ headr: x }}")),
        "issuers[0].token.headr",
        "unknown field",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `header`?"));
}

#[test]
fn type_errors_name_the_field() {
    let e = fails(
        "routes:\n  - { id: a, path: /a, public: true }\n",
        "routes[0].methods",
        "missing field `methods`",
    );
    assert_eq!(e.hint.as_deref(), Some("add `methods:`"));
    fails(
        "routes:\n  - { id: a, methods: GET, path: /a, public: true }\n",
        "routes[0].methods",
        "expected a sequence",
    );
    fails(
        &format!("server: {{ shutdown_grace: soon }}\n{ROUTE}"),
        "server.shutdown_grace",
        "invalid duration `soon`",
    );
    fails(
        &format!("server: {{ shutdown_delay: 5 }}\n{ROUTE}"),
        "server.shutdown_delay",
        "invalid",
    );
    fails(
        &format!("server: {{ max_connections: 0 }}\n{ROUTE}"),
        "server.max_connections",
        "is 0, so no connection",
    );
    fails(
        &format!("server: {{ max_connections: many }}\n{ROUTE}"),
        "server.max_connections",
        "invalid type",
    );
    assert_eq!(compile(ROUTE).unwrap().file.server.max_connections, 4096);
    fails(
        &format!("tokens: {{ max_bytes: -1 }}\n{ROUTE}"),
        "tokens.max_bytes",
        "invalid type: integer (value not shown), expected usize",
    );
    fails(
        "routes:\n  - { id: a, id: b, methods: [GET], path: /a, public: true }\n",
        "routes[0]",
        "duplicate entry",
    );
}

#[test]
fn token_size_must_be_sane() {
    fails(
        &format!("tokens: {{ max_bytes: 100 }}\n{ROUTE}"),
        "tokens.max_bytes",
        "out of range",
    );
    fails(
        &format!("tokens: {{ max_bytes: 100000 }}\n{ROUTE}"),
        "tokens.max_bytes",
        "out of range",
    );
    let c = compile(&format!(
        "tokens: {{ max_bytes: 256 }}\n{}",
        with_issuer(DEV)
    ))
    .unwrap();
    assert_eq!(c.issuers[0].rules.max_token_bytes, 256);
}

#[test]
fn issuer_name_defaults_to_the_url_and_must_be_unique() {
    let c = compile(&with_issuer(
        "issuer: \"https://a.test\", audiences: [x], keys: { url: \"https://a.test/k\" }",
    ))
    .unwrap();
    assert_eq!(&*c.issuers[0].name, "https://a.test");
    assert_eq!(c.issuers[0].rules.algorithms, DEFAULT_ALGORITHMS);
    let two = format!(
        "issuers:\n  - {{ {DEV} }}\n  - {{ {} }}\n{ROUTE}",
        DEV.replace("dev.test", "other.test")
    );
    fails(&two, "issuers[1].name", "duplicate issuer name `dev`");
    let same_iss = format!(
        "issuers:\n  - {{ {DEV} }}\n  - {{ {} }}\n{ROUTE}",
        DEV.replace("name: dev", "name: dev2")
    );
    fails(
        &same_iss,
        "issuers[1].issuer",
        "already configured for header `authorization`",
    );
    fails(
        &with_issuer("issuer: \"\", audiences: [x], keys: { file: dev/jwks.json }"),
        "issuers[0].issuer",
        "non-empty",
    );
}

#[test]
fn audiences_are_required() {
    fails(
        &with_issuer("issuer: \"https://a.test\", audiences: [], keys: { file: dev/jwks.json }"),
        "issuers[0].audiences",
        "at least one audience",
    );
    fails(
        &with_issuer(
            "issuer: \"https://a.test\", audiences: [\"\"], keys: { file: dev/jwks.json }",
        ),
        "issuers[0].audiences[0]",
        "empty audience",
    );
}

#[test]
fn algorithms_are_parsed_and_restricted() {
    fails(
        &with_issuer(&format!("{DEV}, algorithms: [RS256, none]")),
        "issuers[0].algorithms[1]",
        "`none`",
    );
    fails(
        &with_issuer(&format!("{DEV}, algorithms: [rs256]")),
        "issuers[0].algorithms[0]",
        "unknown algorithm `rs256`",
    );
    fails(
        &with_issuer(&format!("{DEV}, algorithms: []")),
        "issuers[0].algorithms",
        "empty",
    );
    let url = "issuer: \"https://a.test\", audiences: [x], keys: { url: \"https://a.test/k\" }";
    fails(
        &with_issuer(&format!("{url}, algorithms: [HS256]")),
        "issuers[0].algorithms[0]",
        "only accepted with keys from a local `file`",
    );
    let disc = "issuer: \"https://a.test\", audiences: [x], keys: { discovery: true }";
    fails(
        &with_issuer(&format!("{disc}, algorithms: [ES256, HS512]")),
        "issuers[0].algorithms[1]",
        "local `file`",
    );
    let c = compile(&with_issuer(&format!(
        "{DEV}, algorithms: [HS256, EdDSA, HS256]"
    )))
    .unwrap();
    assert_eq!(
        c.issuers[0].rules.algorithms,
        vec![Algorithm::HS256, Algorithm::EdDSA]
    );
}

#[test]
fn exactly_one_key_source() {
    fails(
        &with_issuer("issuer: \"https://a.test\", audiences: [x], keys: {}"),
        "issuers[0].keys",
        "none is set",
    );
    fails(
        &with_issuer(
            "issuer: \"https://a.test\", audiences: [x], keys: { file: dev/jwks.json, discovery: true }",
        ),
        "issuers[0].keys",
        "found file and discovery",
    );
}

#[test]
fn key_urls_must_be_https_unless_loopback_or_allowed() {
    let iss = |keys: &str| {
        with_issuer(&format!(
            "issuer: \"https://a.test\", audiences: [x], keys: {{ {keys} }}"
        ))
    };
    fails(
        &iss("url: \"http://idp.test/k\""),
        "issuers[0].keys.url",
        "plain http",
    );
    fails(
        &iss("url: \"ftp://idp.test/k\""),
        "issuers[0].keys.url",
        "unsupported URL scheme",
    );
    fails(
        &iss("url: \"idp.test/k\""),
        "issuers[0].keys.url",
        "is not a URL",
    );
    let e = fails(
        &iss("url: \"https://user:hunter2@idp.test/k\""),
        "issuers[0].keys.url",
        "user credentials",
    );
    assert!(!e.to_string().contains("hunter2"), "{e}");
    for ok in [
        "url: \"http://127.0.0.1:8080/k\"",
        "url: \"http://localhost/k\"",
        "url: \"http://[::1]:9/k\"",
        "url: \"http://idp.test/k\", allow_http: true",
        "url: \"HTTPS://idp.test/k\"",
    ] {
        compile(&iss(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    fails(
        &with_issuer("issuer: \"http://a.test\", audiences: [x], keys: { discovery: true }"),
        "issuers[0].issuer",
        "plain http",
    );
    fails(
        &iss("url: \"https://a.test/k\", min_refresh: 2h, max_refresh: 1h"),
        "issuers[0].keys.min_refresh",
        "greater than max_refresh",
    );
    // An enormous interval overflowed the refresh schedule (a panic on every key load).
    fails(
        &iss("url: \"https://a.test/k\", min_refresh: 300000000000y, max_refresh: 300000000000y"),
        "issuers[0].keys.min_refresh",
        "too long: use at most 24h",
    );
    // The value is echoed as written, not as humantime formats it (`1day 1h`).
    fails(
        &iss("url: \"https://a.test/k\", max_refresh: 25h"),
        "issuers[0].keys.max_refresh",
        "`25h` is too long",
    );
    fails(
        &iss("url: \"https://a.test/k\", max_refresh: 90m, max_stale: 1h"),
        "issuers[0].keys.max_stale",
        "max_stale (1h) is not longer than max_refresh (90m)",
    );
    compile(&iss(
        "url: \"https://a.test/k\", min_refresh: 24h, max_refresh: 24h, max_stale: 48h",
    ))
    .unwrap();
    // Keys must be loaded again before they turn stale.
    fails(
        &iss("url: \"https://a.test/k\", max_refresh: 2h, max_stale: 1h"),
        "issuers[0].keys.max_stale",
        "not longer than max_refresh (2h)",
    );
    fails(
        &iss("url: \"https://a.test/k\", max_stale: 1h"),
        "issuers[0].keys.max_stale",
        "not longer than max_refresh (1h)",
    );
    fails(
        &iss("file: jwks.json, min_refresh: 10m, max_stale: 5m"),
        "issuers[0].keys.max_stale",
        "not longer than min_refresh (10m)",
    );
    compile(&iss("url: \"https://a.test/k\", max_stale: 61m")).unwrap();
    fails(
        &iss("url: \"https://a.test/k\", min_refresh: 0s"),
        "issuers[0].keys.min_refresh",
        "at least 1s",
    );
    fails(
        &iss("url: \"https://a.test/k\", unknown_kid_interval: 500ms"),
        "issuers[0].keys.unknown_kid_interval",
        "at least 1s",
    );
    fails(
        &iss("url: \"https://a.test/k\", fetch_timeout: 0s"),
        "issuers[0].keys.fetch_timeout",
        "greater than 0",
    );
    fails(
        &iss("url: \"https://a.test/k\", max_bytes: 0"),
        "issuers[0].keys.max_bytes",
        "greater than 0",
    );
}

#[test]
fn key_file_is_resolved_and_must_exist() {
    let e = fails(
        &with_issuer(
            "issuer: \"https://a.test\", audiences: [x], keys: { file: dev/missing.json }",
        ),
        "issuers[0].keys.file",
        "does not exist",
    );
    assert!(e.message.contains("config/dev/missing.json"), "{e}");
    let c = compile(&with_issuer(DEV)).unwrap();
    let f = c.issuers[0].keys.file.clone().unwrap();
    assert_eq!(
        f,
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dev/jwks.json")
    );
}

#[test]
fn token_location_is_checked() {
    let c = compile(&with_issuer(&format!(
        "{DEV}, token: {{ header: X-Api-Token, scheme: \"\" }}"
    )))
    .unwrap();
    assert_eq!(
        (c.issuers[0].header.as_str(), c.issuers[0].scheme.as_str()),
        ("x-api-token", "")
    );
    fails(
        &with_issuer(&format!("{DEV}, token: {{ header: \"x token\" }}")),
        "issuers[0].token.header",
        "not a valid header name",
    );
    fails(
        &with_issuer(&format!("{DEV}, token: {{ header: \"\" }}")),
        "issuers[0].token.header",
        "not a valid header name",
    );
    fails(
        &with_issuer(&format!("{DEV}, token: {{ scheme: \"Bear er\" }}")),
        "issuers[0].token.scheme",
        "not a valid authorization scheme",
    );
    fails(
        &with_issuer(&format!("{DEV}, claims: {{ scopes: \"\" }}")),
        "issuers[0].claims.scopes",
        "must not be empty",
    );
    fails(
        &with_issuer(&format!("{DEV}, max_lifetime: 0s")),
        "issuers[0].max_lifetime",
        "at least 1s",
    );
    fails(
        &with_issuer(&format!("{DEV}, required_typ: \"\"")),
        "issuers[0].required_typ",
        "must not be empty",
    );
}

#[test]
fn identity_headers_are_safe_header_names() {
    let up = |h: &str| format!("upstream:\n  identity_headers: {{ {h} }}\n{ROUTE}");
    fails(
        &up("X-User: sub"),
        "upstream.identity_headers.X-User",
        "must be lower-case",
    );
    fails(
        &up("\":authority\": sub"),
        "upstream.identity_headers.:authority",
        "pseudo-header",
    );
    fails(
        &up("authorization: sub"),
        "upstream.identity_headers.authorization",
        "cannot carry identity",
    );
    fails(
        &up("host: sub"),
        "upstream.identity_headers.host",
        "cannot carry identity",
    );
    fails(
        &up("connection: sub"),
        "upstream.identity_headers.connection",
        "cannot carry identity",
    );
    fails(
        &up("transfer-encoding: sub"),
        "upstream.identity_headers.transfer-encoding",
        "cannot carry identity",
    );
    fails(
        &up("\"x user\": sub"),
        "upstream.identity_headers.x user",
        "not a valid header name",
    );
    fails(
        &up("x-user: \"\""),
        "upstream.identity_headers.x-user",
        "claim path must not be empty",
    );
    let clash = format!(
        "issuers:\n  - {{ {DEV}, token: {{ header: x-token }} }}\nupstream:\n  identity_headers: {{ x-token: sub }}\n{ROUTE}"
    );
    fails(
        &clash,
        "upstream.identity_headers.x-token",
        "where an issuer's token is read from",
    );
}

#[test]
fn routes_are_public_xor_ruled() {
    fails(
        "routes:\n  - { id: a, methods: [GET], path: /a, public: true, rules: [{ id: r }] }\n",
        "routes[0].rules",
        "a public route cannot have rules",
    );
    fails(
        "routes:\n  - { id: a, methods: [GET], path: /a }\n",
        "routes[0].rules",
        "would grant nothing",
    );
}

#[test]
fn route_ids_and_rule_ids_are_unique() {
    fails(
        "routes:\n  - { id: a, methods: [GET], path: /a, public: true }\n  - { id: a, methods: [GET], path: /b, public: true }\n",
        "routes[1].id",
        "duplicate route id `a` (also routes[0])",
    );
    fails(
        "routes:\n  - { id: a, methods: [GET], path: /a, rules: [{ id: r, scopes: [x] }, { id: r, scopes: [y] }] }\n",
        "routes[0].rules[1].id",
        "duplicate rule id `r`",
    );
    fails(
        "routes:\n  - { id: \"\", methods: [GET], path: /a, public: true }\n",
        "routes[0].id",
        "must not be empty",
    );
}

#[test]
fn methods_hosts_and_paths_are_validated() {
    let r = |body: &str| format!("routes:\n  - {{ id: a, {body} }}\n");
    fails(
        &r("methods: [], path: /a, public: true"),
        "routes[0].methods",
        "would match nothing",
    );
    fails(
        &r("methods: [GET, \"GE T\"], path: /a, public: true"),
        "routes[0].methods[1]",
        "not a valid HTTP method",
    );
    fails(
        &r("methods: [GET], path: a, public: true"),
        "routes[0].path",
        "must start with `/`",
    );
    fails(
        &r("methods: [GET], path: \"/a/**/b\", public: true"),
        "routes[0].path",
        "only allowed as the last segment",
    );
    fails(
        &r("methods: [GET], path: \"/a/{x}/{x}\", public: true"),
        "routes[0].path",
        "parameter `x` appears more than once",
    );
    fails(
        &r("methods: [GET], path: \"/a%20b\", public: true"),
        "routes[0].path",
        "`?`, `#` or `%`",
    );
    fails(
        &r("methods: [GET], path: \"/a?b=1\", public: true"),
        "routes[0].path",
        "`?`, `#` or `%`",
    );
    fails(
        &r("methods: [GET], path: \"/a/../b\", public: true"),
        "routes[0].path",
        "not a clean path segment",
    );
    fails(
        &r("methods: [GET], path: /a, hosts: [\"a.test:8080\"], public: true"),
        "routes[0].hosts[0]",
        "has a port",
    );
    fails(
        &r("methods: [GET], path: /a, hosts: [\"*\"], public: true"),
        "routes[0].hosts[0]",
        "invalid host",
    );
    fails(
        &r("methods: [GET], path: /a, hosts: [\"a b\"], public: true"),
        "routes[0].hosts[0]",
        "invalid host",
    );
    fails(
        &r("methods: [GET], path: /a, hosts: [\"[::1\"], public: true"),
        "routes[0].hosts[0]",
        "invalid IPv6 host",
    );
    fails(
        &r("methods: [\"*\"], path: /a, public: true"),
        "routes[0].methods[0]",
        "no any-method wildcard",
    );
    let c = compile(&r("methods: [GET], path: /**, public: true")).unwrap();
    assert_eq!(c.warnings.len(), 1);
    assert!(
        c.warnings[0].contains("public and matches every path"),
        "{}",
        c.warnings[0]
    );
    let c = compile(&r("methods: [get], path: /a, public: true")).unwrap();
    assert_eq!(c.warnings.len(), 1);
    assert!(
        c.warnings[0].contains("`get` is not upper-case"),
        "{}",
        c.warnings[0]
    );
}

#[test]
fn rule_conditions_are_validated() {
    let rule = |body: &str| {
        format!(
            "routes:\n  - {{ id: a, methods: [GET], path: \"/u/{{user}}\", rules: [{{ id: r, {body} }}] }}\n"
        )
    };
    fails(
        &rule("scopes: [\"a b\"]"),
        "routes[0].rules[0].scopes[0]",
        "invalid scope `a b`",
    );
    fails(
        &rule("roles: [\"\"]"),
        "routes[0].rules[0].roles[0]",
        "empty role",
    );
    let e = fails(
        &rule("bind: [{ param: usr, equals_claim: sub }]"),
        "routes[0].rules[0].bind[0].param",
        "`usr` is not a parameter",
    );
    assert_eq!(e.hint.as_deref(), Some("parameters of `/u/{user}`: `user`"));
    fails(
        &rule("bind: [{ param: user, equals_claim: sub, in_claim: t }]"),
        "routes[0].rules[0].bind[0]",
        "exactly one of `equals_claim` or `in_claim`",
    );
    fails(
        &rule("bind: [{ param: user }]"),
        "routes[0].rules[0].bind[0]",
        "exactly one of `equals_claim` or `in_claim`",
    );
    fails(
        &rule("bind: [{ param: user, in_claim: \"\" }]"),
        "routes[0].rules[0].bind[0]",
        "must not be empty",
    );
    fails(
        &rule("claims: [{ claim: a }]"),
        "routes[0].rules[0].claims[0]",
        "exactly one of `equals`, `one_of` or `contains`",
    );
    fails(
        &rule("claims: [{ claim: a, equals: 1, contains: 2 }]"),
        "routes[0].rules[0].claims[0]",
        "exactly one of",
    );
    fails(
        &rule("claims: [{ claim: a, one_of: [] }]"),
        "routes[0].rules[0].claims[0].one_of",
        "could never hold",
    );
    fails(
        &rule("claims: [{ claim: \"\", equals: 1 }]"),
        "routes[0].rules[0].claims[0].claim",
        "must not be empty",
    );
    // A rule naming an issuer that is not configured (removed, or a typo) loads with a
    // warning and grants its name's callers nothing: removing an issuer must never be a
    // refused reload.
    warns(
        &rule("issuers: [corp]"),
        "routes[0].rules[0].issuers[0]",
        "issuer `corp` is not configured, so this rule grants its callers nothing",
    );
    warns(
        &rule("issuers: [corp]"),
        "routes[0].rules[0].issuers[0]",
        "defaults to its `issuer` URL",
    );
    warns(
        &format!("issuers:\n  - {{ {DEV} }}\n{}", rule("issuers: [deb]")),
        "routes[0].rules[0].issuers[0]",
        "did you mean `dev`?",
    );
    let bind_literal = "routes:\n  - { id: a, methods: [GET], path: /u, rules: [{ id: r, bind: [{ param: u, equals_claim: sub }] }] }\n";
    let e = fails(
        bind_literal,
        "routes[0].rules[0].bind[0].param",
        "not a parameter",
    );
    assert!(e.hint.unwrap().contains("has no `{param}` segments"));
}

#[test]
fn risky_but_valid_setups_warn() {
    let c = compile("routes:\n  - { id: a, methods: [GET], path: /a, rules: [{ id: anyone }] }\n")
        .unwrap();
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("no issuers are configured"))
    );
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("rule `anyone` has no conditions"))
    );
    let dup = "routes:\n  - { id: a, methods: [GET], path: /a, public: true }\n  - { id: b, methods: [GET], path: /a, public: true }\n";
    let c = compile(dup).unwrap();
    assert_eq!(c.warnings, vec!["route `b` can never be chosen: route `a` has the same hosts and path shape `/a` and comes first".to_string()]);
    let other_host = "routes:\n  - { id: a, methods: [GET], path: /a, public: true }\n  - { id: b, methods: [GET], path: /a, hosts: [x.test], public: true }\n";
    assert!(compile(other_host).unwrap().warnings.is_empty());
    // Host lists that overlap: for the shared host, the route listed first always wins
    // (both rank alike there), so the stricter second route is never applied on it.
    // A rule with only a context condition says so: it does have a condition.
    let context_only = "issuers: [{name: dev, issuer: https://dev.test, audiences: [a], keys: {file: dev/jwks.json}}]\nroutes:\n  - { id: r, methods: [GET], path: /r, rules: [{id: fresh, max_session_age: 5m}] }\n";
    let warned = compile(context_only).unwrap().warnings;
    assert!(
        warned.iter().any(|w| w.contains(
            "rule `fresh` has no conditions on the caller (issuers, scopes, roles, claims, bind): any valid token from any configured issuer that meets its context conditions is allowed"
        )),
        "{warned:?}"
    );
    // A protected GET route whose HEAD a public catch-all answers.
    let head = "issuers: [{name: dev, issuer: https://dev.test, audiences: [a], keys: {file: dev/jwks.json}}]\nroutes:\n  - { id: static, methods: [GET, HEAD, OPTIONS], path: \"/**\", public: true }\n  - { id: admin, methods: [GET, POST], path: \"/admin/**\", rules: [{id: admins, roles: [admin]}] }\n  - { id: both, methods: [GET, HEAD], path: \"/orders/**\", rules: [{id: any, scopes: [a]}] }\n";
    let warned: Vec<String> = compile(head)
        .unwrap()
        .warnings
        .into_iter()
        .filter(|w| w.contains("HEAD"))
        .collect();
    assert_eq!(
        warned,
        vec![
            "route `admin` grants GET but not HEAD on `/admin/**`: a HEAD there goes to public route `static` (`/**`) and is allowed without a token, and most frameworks answer HEAD with the GET handler; add HEAD to its methods"
                .to_string()
        ]
    );
    let overlap = "routes:\n  - { id: all-sites, hosts: [www.example.com, admin.example.com, \"*.corp.test\"], methods: [GET], path: \"/reports/{id}\", public: true }\n  - { id: admin-site, hosts: [admin.example.com, \"*.corp.test\"], methods: [GET, POST], path: \"/reports/{n}\", public: true }\n";
    assert_eq!(
        compile(overlap).unwrap().warnings,
        vec![
            "route `admin-site` is never chosen for GET on hosts admin.example.com, *.corp.test: route `all-sites` also lists them, has the same path shape `/reports/{id}` and comes first"
                .to_string()
        ]
    );
}

#[test]
fn error_display_has_file_field_message_and_hint() {
    let e = fails("rotues: []\n", "rotues", "unknown field");
    let s = e.to_string();
    assert!(
        s.starts_with(&format!(
            "{}: rotues: unknown field `rotues`",
            beside_shipped().display()
        )),
        "{s}"
    );
    assert!(s.ends_with("(hint: did you mean `routes`?)"), "{s}");
}

#[test]
fn edit_distance_and_closest() {
    assert_eq!(edit_distance("rotues", "routes"), 2);
    assert_eq!(edit_distance("", "ab"), 2);
    assert_eq!(closest("scope", &["scopes", "roles"]), Some("scopes"));
    assert_eq!(closest("zzzzzz", &["scopes", "roles"]), None);
}

#[test]
fn dpop_nonce_needs_dpop_a_sane_lifetime_and_a_real_secret() {
    let dpop =
        |extra: &str| with_issuer(&format!("{DEV}, dpop: optional, dpop_nonce: {{ {extra} }}"));
    fails(
        &with_issuer(&format!("{DEV}, dpop_nonce: {{}}")),
        "issuers[0].dpop_nonce",
        "does not accept DPoP",
    );
    fails(
        &dpop("lifetime: 1s"),
        "issuers[0].dpop_nonce.lifetime",
        "between 5s and 1h",
    );
    fails(
        &dpop("lifetime: 2h"),
        "issuers[0].dpop_nonce.lifetime",
        "between 5s and 1h",
    );
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.key");
    fails(
        &dpop(&format!("secret_file: \"{}\"", missing.display())),
        "issuers[0].dpop_nonce.secret_file",
        "cannot read",
    );
    let short = dir.path().join("short.key");
    std::fs::write(&short, "sixteen-byte-key").unwrap();
    let e = fails(
        &dpop(&format!("secret_file: \"{}\"", short.display())),
        "issuers[0].dpop_nonce.secret_file",
        "holds 16 bytes; a nonce secret needs at least 32",
    );
    assert!(!e.to_string().contains("sixteen-byte-key"), "{e}");
    let e = compile(&dpop("secrets: x")).unwrap_err();
    assert!(e.to_string().contains("secrets"), "{e}");

    // A good one: the lifetime and the file it watches are kept, and nonces verify.
    let good = dir.path().join("nonce.key");
    std::fs::write(&good, [7u8; 32]).unwrap();
    let c = compile(&dpop(&format!(
        "secret_file: \"{}\", lifetime: 2m",
        good.display()
    )))
    .unwrap();
    let nonces = c.issuers[0].dpop.nonce.as_ref().unwrap();
    assert_eq!(nonces.source.as_deref(), Some(good.as_path()));
    let same = crate::identity::dpop_nonce::NonceRules::new(&[7u8; 32], "dev", 120, None);
    assert_eq!(
        same.check(&nonces.issue(1_800_000_000), 1_800_000_000),
        crate::identity::dpop_nonce::NonceCheck::Current
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn dpop_nonce_without_a_shared_secret_warns_when_replicas_share_state() {
    let text = format!(
        "state: {{ backend: redis }}\n{}",
        with_issuer(&format!("{DEV}, dpop: required, dpop_nonce: {{}}"))
    );
    let c = compile(&text).unwrap();
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("issuers[0].dpop_nonce") && w.contains("secret_file")),
        "{:?}",
        c.warnings
    );
    let alone = compile(&with_issuer(&format!(
        "{DEV}, dpop: required, dpop_nonce: {{}}"
    )))
    .unwrap();
    assert!(alone.warnings.is_empty(), "{:?}", alone.warnings);
    assert!(
        alone.issuers[0]
            .dpop
            .nonce
            .as_ref()
            .unwrap()
            .source
            .is_none()
    );
}

#[test]
fn a_random_dpop_nonce_secret_survives_a_reload() {
    // Without `secret_file`, each load must not roll a new secret: a reload would retire
    // every nonce handed out, and each DPoP client would get a `use_dpop_nonce` retry.
    let text = with_issuer(&format!("{DEV}, dpop: required, dpop_nonce: {{}}"));
    let nonces = |c: &Config| c.issuers[0].dpop.nonce.clone().unwrap();
    let (first, reloaded) = (compile(&text).unwrap(), compile(&text).unwrap());
    let now = 1_800_000_000;
    let nonce = nonces(&first).issue(now);
    assert_eq!(
        nonces(&reloaded).check(&nonce, now),
        crate::identity::dpop_nonce::NonceCheck::Current
    );
    // The issuer's name is in the MAC: one issuer's nonce is not another's.
    let other = compile(&text.replace("name: dev", "name: other")).unwrap();
    assert_eq!(
        nonces(&other).check(&nonce, now),
        crate::identity::dpop_nonce::NonceCheck::Rejected
    );
}

#[test]
fn dry_run_routes_are_checked_like_routes_and_named_by_their_own_path() {
    let with = |dry: &str| format!("{}dry_run:\n  routes:\n{dry}", with_issuer(DEV));
    let rule = |r: &str| format!("    - {{ id: d, methods: [GET], path: /d, rules: [{r}] }}\n");
    fails(&with("    []\n"), "dry_run", "nothing to try out");
    // Everything under `dry_run:` commented out is not "no dry run".
    let bare = format!("{}dry_run:\n  # routes: []\n", with_issuer(DEV));
    fails(&bare, "dry_run", "is empty: there is nothing to try out");
    fails(
        &format!("{}dry_run: ~\n", with_issuer(DEV)),
        "dry_run",
        "is empty",
    );
    fails(
        &with(&rule("{ id: x, scopes: [\"a b\"] }")),
        "dry_run.routes[0].rules[0].scopes[0]",
        "invalid scope",
    );
    warns(
        &with(&rule("{ id: x, issuers: [deb] }")),
        "dry_run.routes[0].rules[0].issuers[0]",
        "issuer `deb` is not configured",
    );
    fails(
        &with(&format!(
            "{}{}",
            rule("{ id: x, roles: [r] }"),
            rule("{ id: y, roles: [r] }")
        )),
        "dry_run.routes[1].id",
        "duplicate route id `d` (also dry_run.routes[0])",
    );
    fails(
        &with(
            "    - { id: d, methods: [GET], path: /d, public: true, rules: [{ id: x, roles: [r] }] }\n",
        ),
        "dry_run.routes[0].rules",
        "a public route cannot have rules",
    );
    // The live routes keep their own names in errors.
    fails(
        &format!(
            "{}dry_run: {{ routes: [] }}\n",
            with_issuer(DEV).replace("methods: [GET]", "methods: []")
        ),
        "routes[0].methods",
        "no methods",
    );
    let e = compile(&format!("{}dry_run: {{ rotues: [] }}\n", with_issuer(DEV))).unwrap_err();
    assert!(e.to_string().contains("rotues"), "{e}");

    // A valid candidate compiles beside the live routes, and its warnings say where they are.
    let c = compile(&with(&format!(
        "{}    - {{ id: e, methods: [GET], path: /d, rules: [{{ id: y, roles: [r] }}] }}\n",
        rule("{ id: x, roles: [r] }")
    )))
    .unwrap();
    assert!(c.dry_run.is_some());
    assert!(
        c.warnings
            .iter()
            .any(|w| w.starts_with("dry_run: ") && w.contains("`e`")),
        "{:?}",
        c.warnings
    );
    assert!(compile(&with_issuer(DEV)).unwrap().dry_run.is_none());
}

#[test]
fn dry_run_changes_replace_add_and_remove_live_routes() {
    let live = "routes:
  - { id: h, methods: [GET], path: /h, public: true }
  - { id: a, methods: [GET], path: /a, rules: [{ id: r, roles: [x] }] }
  - { id: b, methods: [GET], path: /b, rules: [{ id: r, roles: [x] }] }
";
    let text = |dry: &str| format!("issuers:\n  - {{ {DEV} }}\n{live}dry_run:\n{dry}");
    fails(
        &text("  remove: [c]\n"),
        "dry_run.remove[0]",
        "unknown route `c`",
    );
    fails(
        &text("  remove: [a, b, a]\n"),
        "dry_run.remove[2]",
        "`a` is listed twice",
    );
    let empty = compile(&text("  remove: [h, a, b]\n")).unwrap();
    assert!(
        empty
            .warnings
            .iter()
            .any(|w| w.contains("removes every route")),
        "{:?}",
        empty.warnings
    );
    fails(
        &text("  routes: [{ id: a, methods: [GET], path: /a, public: true }]\n  remove: [b, a]\n"),
        "dry_run.remove[1]",
        "`a` is also in `dry_run.routes`",
    );
    let c = compile(&text(
        "  routes:
    - { id: a, methods: [GET], path: /a, public: true }
    - { id: n, methods: [GET], path: /n, public: true }
  remove: [b]
",
    ))
    .unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let candidate = c.dry_run.as_ref().unwrap();
    let route_of = |policy: &crate::authz::Policy, path: &str| {
        let headers = std::collections::HashMap::new();
        let req = crate::authz::RequestView {
            method: "GET",
            host: "api.test",
            path,
            headers: &headers,
            source_ip: None,
            source_principal: "",
            scheme: "https",
            peer_certificate: None,
        };
        policy
            .match_route(&req)
            .map(|m| (m.route_id.to_string(), m.public))
            .map_err(|d| d.code)
    };
    // Kept, replaced (now public), removed, added; the live policy is untouched.
    assert_eq!(route_of(candidate, "/h"), Ok(("h".into(), true)));
    assert_eq!(route_of(candidate, "/a"), Ok(("a".into(), true)));
    assert_eq!(
        route_of(candidate, "/b"),
        Err(crate::authz::ReasonCode::NoRoute)
    );
    assert_eq!(route_of(candidate, "/n"), Ok(("n".into(), true)));
    assert_eq!(route_of(&c.policy, "/a"), Ok(("a".into(), false)));
    assert_eq!(route_of(&c.policy, "/b"), Ok(("b".into(), false)));
    assert_eq!(
        route_of(&c.policy, "/n"),
        Err(crate::authz::ReasonCode::NoRoute)
    );
}

#[test]
fn dry_run_warns_about_changes_that_change_nothing_or_cannot_pass() {
    let live = "routes:
  - { id: h, methods: [GET], path: /h, public: true }
  - { id: a, methods: [GET], path: /a, rules: [{ id: r, roles: [x] }] }
";
    let text = |issuers: &str, dry: &str| format!("{issuers}{live}dry_run:\n{dry}");
    let issuers = format!("issuers:\n  - {{ {DEV} }}\n");
    // A copy of the live route, spaced differently, is still the same route.
    let same = "  routes: [{ id: a,  methods: [GET], path: /a, rules: [{ id: r, roles: [x] }] }]\n";
    let c = compile(&text(&issuers, same)).unwrap();
    assert_eq!(
        c.warnings,
        vec![
            "dry_run.routes[0]: `a` is the same as the live route: the dry run changes nothing there"
                .to_string()
        ]
    );
    let changed = same.replace("roles: [x]", "roles: [y]");
    let c = compile(&text(&issuers, &changed)).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    // Without issuers, a candidate that protects the public live route cannot let anyone in.
    let public = "routes: [{ id: h, methods: [GET], path: /h, public: true }]\n";
    let protect = "dry_run:\n  routes: [{ id: h, methods: [GET], path: /h, rules: [{ id: r, roles: [x] }] }]\n";
    let c = compile(&format!("{public}{protect}")).unwrap();
    assert_eq!(
        c.warnings,
        vec![
            "dry_run: no issuers are configured: every non-public candidate route would answer 401"
                .to_string()
        ],
    );
    let c = compile(&format!("{issuers}{public}{protect}")).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn an_approver_subject_with_a_colon_names_an_issuer() {
    let with = |subjects: &str, pre: &str| {
        format!(
            "issuers:\n  - {{ {DEV} }}\nroutes:\n  - {{ id: g, methods: [DELETE], path: /g, rules: [{{ id: gated, roles: [r], approval: {{ approvers: {{ subjects: [{subjects}] }}, pre_approve: [{pre}] }} }}] }}\n"
        )
    };
    assert!(compile(&with("\"dev:carol\", bob", "")).is_ok());
    // An issuer that is gone (or a typo): the entry names nobody, said by a warning, so
    // that removing an issuer is never a refused reload.
    warns(
        &with("bob, \"corp:carol\"", ""),
        "routes[0].rules[0].approval.approvers.subjects[1]",
        "`corp` is not a configured issuer, so this entry names nobody",
    );
    warns(
        &with("bob", "{ subjects: [\"dev:ann\", \"x:y\"] }"),
        "routes[0].rules[0].approval.pre_approve[0].subjects[1]",
        "`x` is not a configured issuer",
    );
}

/// A list key whose items are all commented out is YAML null. For a list whose absence means
/// "any" (or lifts a restriction), reading that as the empty list would widen access in
/// silence: it is an error naming the field, while the absent key keeps its meaning.
#[test]
fn identity_headers_with_every_entry_commented_out_are_an_error_not_none() {
    let e = fails(
        &format!("{ROUTE}upstream:\n  identity_headers:\n    # x-portcullis-subject: sub\n"),
        "upstream.identity_headers",
        "every entry commented out",
    );
    assert!(e.message.contains("`{}`"), "{}", e.message);
    // Absent: the defaults; `{}`: none, on purpose.
    let absent = compile(ROUTE).unwrap();
    assert!(!absent.file.upstream.identity_headers.is_empty());
    let none = compile(&format!("{ROUTE}upstream:\n  identity_headers: {{}}\n")).unwrap();
    assert!(none.file.upstream.identity_headers.is_empty());
}

#[test]
fn a_restricting_list_with_every_item_commented_out_is_an_error() {
    let rule = |lines: &str| {
        format!(
            "issuers:\n  - {{ {DEV} }}\nroutes:\n  - id: r\n    methods: [GET]\n    path: /u/{{user}}\n    rules:\n      - id: p\n{lines}"
        )
    };
    let commented = |key: &str| format!("        {key}:\n          # - x\n");
    for key in [
        "issuers",
        "scopes",
        "roles",
        "claims",
        "bind",
        "api_keys",
        "posture",
        "principals",
    ] {
        let other = if key == "scopes" { "roles" } else { "scopes" };
        let e = fails(
            &rule(&format!("        {other}: [x]\n{}", commented(key))),
            &format!("routes[0].rules[0].{key}"),
            "is empty (every item commented out?)",
        );
        assert!(e.hint.unwrap().contains("remove the key"), "{key}");
    }
    for (key, field) in [
        ("source: { cidrs: }", "source.cidrs"),
        ("source: { not_cidrs: }", "source.not_cidrs"),
        ("time_window: { days: }", "time_window.days"),
    ] {
        fails(
            &rule(&format!("        scopes: [x]\n        {key}\n")),
            &format!("routes[0].rules[0].{field}"),
            "is empty",
        );
    }
    let route = "routes:\n  - id: r\n    hosts:\n      # - a.example.com\n    methods: [GET]\n    path: /\n    public: true\n";
    fails(route, "routes[0].hosts", "is empty");
    fails(
        &format!("{ROUTE}rate_limits:\n  # - {{ id: l, by: route, requests: 1, per: 1s }}\n"),
        "rate_limits",
        "is empty",
    );
    fails(
        &format!(
            "{ROUTE}rate_limits:\n  - {{ id: l, by: route, requests: 1, per: 1s, routes: }}\n"
        ),
        "rate_limits[0].routes",
        "is empty",
    );
    fails(
        &with_issuer(&format!("{DEV}, algorithms: ")),
        "issuers[0].algorithms",
        "is empty",
    );
    fails(
        &with_issuer(&format!("{DEV}, dpop_algorithms: ")),
        "issuers[0].dpop_algorithms",
        "is empty",
    );
    fails(
        &format!(
            "server:\n  tls: {{ cert: c.pem, key: k.pem, allowed_client_principals: }}\n{ROUTE}"
        ),
        "server.tls.allowed_client_principals",
        "is empty",
    );

    // The absent key keeps its meaning: any configured issuer, any host.
    let c = compile(&rule("        scopes: [x]\n")).unwrap();
    assert!(c.policy.routes()[0].rules[0].issuers.is_empty());
    assert!(c.policy.routes()[0].hosts.is_empty());
    // So does an explicit `[]`, written on purpose.
    let c = compile(&rule("        scopes: [x]\n        issuers: []\n")).unwrap();
    assert!(c.policy.routes()[0].rules[0].issuers.is_empty());
}

/// An enormous `max_ttl` loaded and then panicked inside Check (the per-token expiry
/// overflowed `Duration`).
#[test]
fn the_token_cache_ttl_is_at_most_a_day() {
    let cache = |ttl: &str| format!("tokens: {{ cache: {{ max_ttl: {ttl} }} }}\n{ROUTE}");
    let e = fails(
        &cache("10000000000y"),
        "tokens.cache.max_ttl",
        "too long: use at most 24h",
    );
    assert!(e.hint.is_some());
    fails(&cache("24h 1s"), "tokens.cache.max_ttl", "too long");
    compile(&cache("24h")).unwrap();
}

/// A service grant (only `principals`) lets a caller in without a token, and an approval
/// needs a subject: with both, every token-less call was a 403 `internal_error`.
#[test]
fn a_service_grant_cannot_require_an_approval() {
    let rule = |conditions: &str| {
        format!(
            "issuers:\n  - {{ {DEV} }}\nroutes:\n  - id: r\n    methods: [POST]\n    path: /x\n    rules:\n      - {{ id: svc, principals: [\"spiffe://example.org/ns/a/sa/b\"], {conditions}approval: {{ approvers: {{ roles: [lead] }} }} }}\n"
        )
    };
    let e = fails(
        &rule(""),
        "routes[0].rules[0].approval",
        "could never be approved",
    );
    assert!(e.hint.unwrap().contains("require a token"));
    // The same rule with a token condition needs a token, whose subject is approved.
    compile(&rule("issuers: [dev], ")).unwrap();
    compile(&rule("scopes: [x], ")).unwrap();
}

#[test]
fn a_binding_without_issuers_warns_only_when_several_issuers_are_trusted() {
    let route = |rule_extra: &str| {
        format!(
            "routes:\n  - id: user\n    methods: [GET]\n    path: /users/{{id}}\n    rules:\n      - {{ id: self, bind: [{{ param: id, equals_claim: sub }}]{rule_extra} }}\n"
        )
    };
    let two = format!(
        "issuers:\n  - {{ {DEV} }}\n  - {{ {} }}\n",
        DEV.replace("name: dev", "name: dev2")
            .replace("https://dev.test", "https://dev2.test")
    );
    let c = compile(&format!("{two}{}", route(""))).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("rule `self` binds `{id}`")
            && c.warnings[0].contains("2 issuers")
            && c.warnings[0].contains("issuers: [name]"),
        "{}",
        c.warnings[0]
    );
    // Restricted to one issuer, or only one trusted: nothing to warn about.
    let c = compile(&format!("{two}{}", route(", issuers: [dev]"))).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let one = format!("issuers:\n  - {{ {DEV} }}\n");
    let c = compile(&format!("{one}{}", route(""))).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // Several issuers named explicitly: the same hole as none named.
    let c = compile(&format!("{two}{}", route(", issuers: [dev, dev2]"))).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("rule `self` binds `{id}`")
            && c.warnings[0].contains("names 2 issuers")
            && c.warnings[0].contains("unique only within one issuer"),
        "{}",
        c.warnings[0]
    );
}

/// A rule for API keys that can never grant one warns: a key whose own `routes` never cover
/// the route, or a condition that reads a token's `iat`/`auth_time`, which keys lack.
#[test]
fn an_api_key_rule_that_can_never_grant_warns() {
    // The rules' warnings (the key's own endpoints are checked elsewhere).
    let rule_warnings = |c: &Config| -> Vec<String> {
        c.warnings
            .iter()
            .filter(|w| !w.starts_with("api_keys:"))
            .cloned()
            .collect()
    };
    let config = |route: &str, rule_extra: &str| {
        format!(
            "issuers:\n  - {{ {DEV} }}\napi_keys:\n  keys:\n    - {{ id: k1, owner: o, hash: \"sha256:{}\", expires: 2099-01-01T00:00:00Z, routes: [\"GET /orders/{{id}}\", \"POST /reports/**\"] }}\nroutes:\n  - {{ {route}, rules: [{{ id: keys, api_keys: [k1]{rule_extra} }}] }}\n",
            "0".repeat(64)
        )
    };
    let orders = "id: orders, methods: [GET], path: '/orders/{id}'";
    let c = compile(&config(orders, "")).unwrap();
    assert!(rule_warnings(&c).is_empty(), "{:?}", rule_warnings(&c));
    // Covered through another template of the same shape, or a tail.
    for covered in [
        "id: o, methods: [GET, PUT], path: '/orders/*'",
        "id: r, methods: [POST], path: '/reports/{year}/q1'",
        "id: r, methods: [POST], path: '/reports/**'",
    ] {
        let c = compile(&config(covered, "")).unwrap();
        assert!(
            rule_warnings(&c).is_empty(),
            "{covered}: {:?}",
            rule_warnings(&c)
        );
    }
    for never in [
        "id: other, methods: [POST], path: '/other'",
        "id: o, methods: [DELETE], path: '/orders/{id}'",
        "id: o, methods: [GET], path: '/orders/{id}/items'",
        "id: r, methods: [GET], path: '/reports/**'",
    ] {
        let c = compile(&config(never, "")).unwrap();
        assert_eq!(
            rule_warnings(&c).len(),
            1,
            "{never}: {:?}",
            rule_warnings(&c)
        );
        assert!(
            rule_warnings(&c)[0].contains("routes[0].rules[0]: rule `keys` names API key `k1`")
                && rule_warnings(&c)[0].contains("never cover this route"),
            "{}",
            rule_warnings(&c)[0]
        );
    }
    // `*` names no key in particular.
    let c = compile(
        &config("id: other, methods: [POST], path: '/other'", "").replace("[k1] }", "['*'] }"),
    )
    .unwrap();
    assert!(rule_warnings(&c).is_empty(), "{:?}", rule_warnings(&c));
    for (extra, what) in [
        (", max_session_age: 10m", "`max_session_age`"),
        (", max_token_lifetime: 10m", "`max_token_lifetime`"),
    ] {
        let c = compile(&config(orders, extra)).unwrap();
        assert_eq!(rule_warnings(&c).len(), 1, "{:?}", rule_warnings(&c));
        assert!(
            rule_warnings(&c)[0].contains(what) && rule_warnings(&c)[0].contains("context_denied"),
            "{}",
            rule_warnings(&c)[0]
        );
    }
}

/// `approvals_listen` moves the approvals API to a listener of its own: it must not reuse
/// another listener's address, `approvals_tls` needs it, and with `server.tls` on the Check
/// listener it must have TLS too (an approver's token would otherwise cross in the clear).
#[test]
fn the_approvals_listener_is_its_own_and_keeps_tls_when_the_check_listener_has_it() {
    let pki = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mtls");
    let tls = |ca: &str| {
        format!(
            "{{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}",
            pki.join("server.crt").display(),
            pki.join("server.key").display(),
            pki.join(ca).display()
        )
    };
    let server = |lines: &str| format!("server:\n{lines}{ROUTE}");

    let c = compile(&server("  approvals_listen: 127.0.0.1:9194\n")).unwrap();
    assert_eq!(
        c.file.server.approvals_listen.as_deref(),
        Some("127.0.0.1:9194")
    );
    assert!(
        compile(ROUTE)
            .unwrap()
            .file
            .server
            .approvals_listen
            .is_none()
    );
    let c = compile(&server(&format!(
        "  tls: {}\n  approvals_listen: 127.0.0.1:9194\n  approvals_tls: {}\n",
        tls("ca.crt"),
        tls("other-ca.crt")
    )))
    .unwrap();
    let approvals_tls = c.file.server.approvals_tls.unwrap();
    assert!(approvals_tls.client_ca.unwrap().ends_with("other-ca.crt"));

    fails(
        &server("  listen: 127.0.0.1:9191\n  approvals_listen: 127.0.0.1:9191\n"),
        "server.approvals_listen",
        "is also `server.listen`",
    );
    fails(
        &server("  approvals_listen: 127.0.0.1:9192\n"),
        "server.approvals_listen",
        "is also `server.admin_listen`",
    );
    fails(
        &server("  http_listen: 127.0.0.1:9193\n  approvals_listen: 127.0.0.1:9193\n"),
        "server.approvals_listen",
        "is also `server.http_listen`",
    );
    // Port 0 picks a free port for each listener, so it never clashes.
    compile(&server(
        "  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n  approvals_listen: 127.0.0.1:0\n",
    ))
    .unwrap();
    fails(
        &server(&format!("  approvals_tls: {}\n", tls("ca.crt"))),
        "server.approvals_tls",
        "`approvals_listen` is not",
    );
    fails(
        &server(&format!(
            "  tls: {}\n  approvals_listen: 127.0.0.1:9194\n",
            tls("ca.crt")
        )),
        "server.approvals_tls",
        "would be plaintext",
    );
    // Its section is checked like `server.tls`, and errors name it.
    fails(
        &server(&format!(
            "  approvals_listen: 127.0.0.1:9194\n  approvals_tls: {}\n",
            tls("no-such-ca.crt")
        )),
        "server.approvals_tls.client_ca",
        "does not exist",
    );
    fails(
        &server(
            "  approvals_listen: 127.0.0.1:9194\n  approvals_tls: { cert: c.pem, key: k.pem, allowed_client_principals: }\n",
        ),
        "server.approvals_tls.allowed_client_principals",
        "is empty",
    );
}

/// The same for a section or value that adds a restriction: a key with everything under it
/// commented out (YAML null) would read as absent and drop the restriction in silence, so a
/// DBA's `DELETE` needed no approval and an internal-only rule took any network. An error;
/// the absent key keeps its meaning.
#[test]
fn a_restricting_section_with_everything_commented_out_is_an_error() {
    let rule = |lines: &str| {
        format!(
            "issuers:\n  - {{ {DEV} }}\nroutes:\n  - id: drop\n    methods: [DELETE]\n    path: /databases/{{db}}\n    rules:\n      - id: dba\n        roles: [dba]\n{lines}"
        )
    };
    for key in [
        "approval",
        "source",
        "time_window",
        "max_session_age",
        "max_token_lifetime",
    ] {
        let e = fails(
            &rule(&format!("        {key}:\n          # something: here\n")),
            &format!("routes[0].rules[0].{key}"),
            "has no value (everything under it commented out?)",
        );
        assert!(e.hint.unwrap().contains("remove the key"), "{key}");
    }
    for key in ["max_lifetime", "required_typ", "dpop_nonce"] {
        fails(
            &format!(
                "issuers:\n  - name: dev\n    issuer: \"https://dev.test\"\n    audiences: [api]\n    keys: {{ file: dev/jwks.json }}\n    {key}:\n{ROUTE}"
            ),
            &format!("issuers[0].{key}"),
            "has no value",
        );
    }
    for (text, field) in [
        ("server:\n  tls:\n", "server.tls"),
        (
            "server:\n  approvals_listen: 127.0.0.1:9194\n  approvals_tls:\n",
            "server.approvals_tls",
        ),
        ("revocation:\n  file:\n", "revocation.file"),
    ] {
        fails(&format!("{text}{ROUTE}"), field, "has no value");
    }
    for (key, field) in [
        ("time_window: {days: [mon], hours: }", "time_window.hours"),
        (
            "time_window: {days: [mon], timezone: }",
            "time_window.timezone",
        ),
        (
            "approval: {approvers: {roles: [lead]}, pre_approve: [{roles: [dba], from: \"2026-01-01T00:00:00Z\", until: }]}",
            "approval.pre_approve[0].until",
        ),
        (
            "approval: {approvers: {roles: [lead]}, pre_approve: [{roles: [dba], from: }]}",
            "approval.pre_approve[0].from",
        ),
    ] {
        fails(
            &rule(&format!("        {key}\n")),
            &format!("routes[0].rules[0].{field}"),
            "has no value",
        );
    }
    // Absent, each keeps its meaning (no such restriction).
    let c = compile(&rule("")).unwrap();
    assert!(c.policy.routes()[0].rules[0].context.is_empty());
    assert!(crate::approvals::compile(&c.file.routes).is_empty());
}

/// Lifetimes that end up in the state store are bounded: an unbounded `approval.ttl`
/// overflowed the in-memory store's clock on every approve (a panic) and Redis's `PX`, and a
/// `revocation.default_ttl` past the admin API's 400 days turned every call without
/// `expires_at` into a 400.
#[test]
fn approval_and_default_revocation_lifetimes_are_bounded() {
    let gated = |ttl: &str| {
        format!(
            "issuers:\n  - {{ {DEV} }}\nroutes:\n  - {{ id: g, methods: [DELETE], path: /g, rules: [{{ id: gated, roles: [r], approval: {{ approvers: {{ roles: [lead] }}, ttl: {ttl} }} }}] }}\n"
        )
    };
    compile(&gated("30d")).unwrap();
    let e = fails(
        &gated("500000000000y"),
        "routes[0].rules[0].approval.ttl",
        "must be at most 30d",
    );
    assert!(e.hint.is_some());
    fails(
        &gated("31d"),
        "routes[0].rules[0].approval.ttl",
        "must be at most 30d",
    );
    compile(&format!("revocation:\n  default_ttl: 400d\n{ROUTE}")).unwrap();
    fails(
        &format!("revocation:\n  default_ttl: 401d\n{ROUTE}"),
        "revocation.default_ttl",
        "must be at most 400d",
    );
}

/// Every listener address is what the server binds: an IP address and a port. A host name, a
/// port out of range or an invalid address used to pass `check` and fail only when serving,
/// with an error that named no field.
#[test]
fn listener_addresses_are_socket_addresses_named_by_field() {
    let server = |lines: &str| format!("server:\n{lines}{ROUTE}");
    for (line, field) in [
        ("  listen: localhost\n", "server.listen"),
        ("  listen: 127.0.0.1:99999\n", "server.listen"),
        ("  listen: 999.1.1.1:20191\n", "server.listen"),
        ("  admin_listen: localhost:9192\n", "server.admin_listen"),
        ("  http_listen: 127.0.0.1\n", "server.http_listen"),
        ("  approvals_listen: ':9194'\n", "server.approvals_listen"),
    ] {
        let e = fails(&server(line), field, "is not an IP address and port");
        assert!(e.hint.is_some(), "{e}");
    }
    compile(&server(
        "  listen: '[::]:9191'\n  admin_listen: '[::1]:9192'\n  http_listen: 0.0.0.0:9193\n",
    ))
    .unwrap();
}

/// Two listeners on one address cannot both bind: the later one is refused, naming both.
#[test]
fn two_listeners_on_one_address_are_an_error_naming_both() {
    let server = |lines: &str| format!("server:\n{lines}{ROUTE}");
    fails(
        &server("  listen: 127.0.0.1:9191\n  admin_listen: 127.0.0.1:9191\n"),
        "server.admin_listen",
        "`127.0.0.1:9191` is also `server.listen`",
    );
    fails(
        &server("  http_listen: 127.0.0.1:9192\n"),
        "server.http_listen",
        "is also `server.admin_listen`",
    );
    // A wildcard address covers the others on its port.
    fails(
        &server("  listen: 0.0.0.0:9191\n  http_listen: 127.0.0.1:9191\n"),
        "server.http_listen",
        "overlaps `server.listen` (`0.0.0.0:9191`)",
    );
    fails(
        &server("  listen: '[::]:9191'\n  admin_listen: 10.0.0.1:9191\n"),
        "server.admin_listen",
        "overlaps `server.listen`",
    );
    // Other ports, an IPv4 wildcard beside an IPv6 address, and port 0 do not clash.
    compile(&server(
        "  listen: 0.0.0.0:9191\n  admin_listen: '[::1]:9191'\n  http_listen: 127.0.0.1:0\n  approvals_listen: 127.0.0.1:0\n",
    ))
    .unwrap();
}

/// A Redis URL the client cannot parse fails at compile time, naming `state.redis_url`,
/// and the error never repeats the URL or its password.
#[test]
fn an_unusable_redis_url_is_an_error_without_the_password() {
    let state = |url: &str| format!("state:\n  backend: redis\n  redis_url: \"{url}\"\n{ROUTE}");
    compile(&state("redis://:s3cretPW@127.0.0.1:6379/0")).unwrap();
    compile(&state("redis://[::1]:6379/0")).unwrap();
    for url in [
        "redis://:s3cretPW@[bad:21370/0",
        "redis://:s3cretPW@127.0.0.1:99999/0",
    ] {
        let e = fails(
            &state(url),
            "state.redis_url",
            "the Redis client cannot use this URL",
        );
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("s3cretPW"), "{shown}");
        assert!(
            !shown.contains("21370") && !shown.contains("99999"),
            "{shown}"
        );
    }
}

/// The test PKI (tests/fixtures/mtls): a CA, a server and client certificates.
fn mtls_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mtls")
        .join(name)
        .display()
        .to_string()
}

/// `state:` with the Redis backend at `url` and `tls` (YAML flow mapping body, or empty).
fn redis_state(url: &str, tls: &str) -> String {
    let tls = if tls.is_empty() {
        String::new()
    } else {
        format!("  tls: {{ {tls} }}\n")
    };
    format!("state:\n  backend: redis\n  redis_url: \"{url}\"\n{tls}{ROUTE}")
}

/// `rediss://` (TLS) URLs compile, with or without `state.tls`; the files are resolved
/// against the config file's folder.
#[test]
fn a_rediss_url_compiles_with_or_without_tls_files() {
    compile(&redis_state(
        "rediss://:s3cretPW@redis.example.com:6380/0",
        "",
    ))
    .unwrap();
    let ca = mtls_fixture("ca.crt");
    compile(&redis_state(
        "rediss://10.0.0.5:6380/0",
        &format!("ca_file: '{ca}'"),
    ))
    .unwrap();
    let both = format!(
        "ca_file: '{ca}', cert_file: '{}', key_file: '{}'",
        mtls_fixture("envoy.crt"),
        mtls_fixture("envoy.key")
    );
    compile(&redis_state("rediss://10.0.0.5:6380/0", &both)).unwrap();
    // Relative to the config's folder (`config/`): `dev/jwks.json` is there, `ca.crt` is not.
    compile(&redis_state(
        "rediss://10.0.0.5:6380/0",
        "ca_file: dev/jwks.json",
    ))
    .unwrap();
    fails(
        &redis_state("rediss://10.0.0.5:6380/0", "ca_file: ca.crt"),
        "state.tls.ca_file",
        "does not exist",
    );
}

/// `#insecure` (the Redis client's "accept any certificate") is refused, whatever the
/// scheme, naming the field and never the URL or its password.
#[test]
fn an_insecure_redis_url_is_refused_without_the_password() {
    for url in [
        "rediss://:s3cretPW@10.0.0.5:6380/0#insecure",
        "rediss://:s3cretPW@10.0.0.5:6380/0#INSECURE",
        "redis://:s3cretPW@10.0.0.5:6379/0#insecure",
    ] {
        let e = fails(&redis_state(url, ""), "state.redis_url", "`#insecure`");
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains("s3cretPW") && !shown.contains("10.0.0.5"),
            "{shown}"
        );
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("state.tls.ca_file"))
        );
    }
    // With a CA file too: the fragment still turns verification off, so still refused.
    let ca = format!("ca_file: '{}'", mtls_fixture("ca.crt"));
    fails(
        &redis_state("rediss://10.0.0.5:6380/0#insecure", &ca),
        "state.redis_url",
        "`#insecure`",
    );
}

/// `state.tls` with a URL that is not `rediss://` would be ignored: refused.
#[test]
fn tls_settings_without_a_rediss_url_are_refused() {
    let ca = format!("ca_file: '{}'", mtls_fixture("ca.crt"));
    for url in [
        "redis://:s3cretPW@10.0.0.5:6379/0",
        "unix:///run/redis.sock",
    ] {
        let e = fails(&redis_state(url, &ca), "state.tls", "not a `rediss://` URL");
        assert!(!format!("{e}").contains("s3cretPW"), "{e}");
    }
    // An unknown scheme names the TLS one among those accepted.
    fails(
        &redis_state("tls://10.0.0.5:6379/0", ""),
        "state.redis_url",
        "`rediss://` (TLS)",
    );
}

/// A client certificate without its key (or a key without its certificate), a missing
/// file and an unknown field are errors naming the field.
#[test]
fn state_tls_files_come_in_pairs_and_must_exist() {
    let url = "rediss://10.0.0.5:6380/0";
    let cert = mtls_fixture("envoy.crt");
    let key = mtls_fixture("envoy.key");
    fails(
        &redis_state(url, &format!("cert_file: '{cert}'")),
        "state.tls.key_file",
        "without its private key",
    );
    fails(
        &redis_state(url, &format!("key_file: '{key}'")),
        "state.tls.cert_file",
        "without its certificate",
    );
    fails(
        &redis_state(
            url,
            &format!("cert_file: '{cert}', key_file: /nonexistent/client.key"),
        ),
        "state.tls.key_file",
        "file `/nonexistent/client.key` does not exist",
    );
    fails(
        &redis_state(url, "ca_file: /nonexistent/ca.pem"),
        "state.tls.ca_file",
        "does not exist",
    );
    let e = compile(&redis_state(url, "insecure: true")).unwrap_err();
    assert_eq!(e.field, "state.tls.insecure", "{e}");
    assert!(e.message.contains("unknown field"), "{e}");
}

/// What the store loads at start (and `portcullis check`): files that exist but are no PEM
/// CA, certificate or key, or a key that is not the certificate's, name the field and the
/// file, never their contents.
#[test]
fn state_tls_files_that_do_not_load_name_the_field() {
    let load = |tls: &str| {
        let c = compile(&redis_state("rediss://10.0.0.5:6380/0", tls)).unwrap();
        crate::state::redis::load_tls(&c.source, &c.file.state)
    };
    let ca = mtls_fixture("ca.crt");
    let (cert, key) = (mtls_fixture("envoy.crt"), mtls_fixture("envoy.key"));
    let good = format!("ca_file: '{ca}', cert_file: '{cert}', key_file: '{key}'");
    assert!(load(&good).unwrap().is_some());
    assert!(load(&format!("ca_file: '{ca}'")).unwrap().is_some());
    let jwks = "dev/jwks.json";
    for (tls, field, says) in [
        (
            format!("ca_file: {jwks}"),
            "state.tls.ca_file",
            "holds no PEM certificate",
        ),
        (
            format!("ca_file: '{key}'"),
            "state.tls.ca_file",
            "holds no PEM certificate",
        ),
        (
            format!("cert_file: {jwks}, key_file: '{key}'"),
            "state.tls.cert_file",
            "holds no PEM certificate",
        ),
        (
            format!("cert_file: '{cert}', key_file: '{cert}'"),
            "state.tls.key_file",
            "holds no PEM private key",
        ),
        (
            format!(
                "cert_file: '{cert}', key_file: '{}'",
                mtls_fixture("checkout.key")
            ),
            "state.tls.key_file",
            "is not the key of the certificate",
        ),
    ] {
        let e = match load(&tls) {
            Ok(_) => panic!("{tls}: loaded, expected an error at `{field}`"),
            Err(e) => e,
        };
        assert_eq!(e.field, field, "{tls}: {e}");
        assert!(e.message.contains(says), "{tls}: {e}");
        assert_eq!(e.file, beside_shipped());
        assert!(!e.message.contains("PRIVATE KEY"), "{e}");
    }
}

/// Reload refuses any change of `state` (src/reload.rs compares the section): a changed TLS
/// file is part of it.
#[test]
fn the_state_tls_settings_are_part_of_the_state_section() {
    let with = |ca: &str| {
        compile(&redis_state(
            "rediss://10.0.0.5:6380/0",
            &format!("ca_file: '{}'", mtls_fixture(ca)),
        ))
        .unwrap()
        .file
        .state
    };
    assert_eq!(with("ca.crt"), with("ca.crt"));
    assert_ne!(with("ca.crt"), with("other-ca.crt"));
    // Debug shows the TLS paths (not secret), never the URL.
    let shown = format!("{:?}", with("ca.crt"));
    assert!(
        shown.contains("ca.crt") && !shown.contains("10.0.0.5"),
        "{shown}"
    );
}

/// A secret written in the wrong shape (a Redis URL for the whole `state` section, a webhook
/// URL for `approvals.webhook`, a plain key for an API key entry) was quoted by serde's
/// message, and so printed by `portcullis check` and logged by a refused reload. The message
/// names the field, the kind of value, what was expected and the line, never the value.
#[test]
fn a_value_in_the_wrong_shape_is_never_echoed() {
    let cases = [
        (
            "state: \"redis://:hunter2@10.0.0.5:6379/0\"\n".to_string(),
            "state",
            "invalid type: string (value not shown), expected struct StateConfig at line 1",
        ),
        (
            "state:\n  backend: redis://:hunter2@10.0.0.5:6379/0\n".to_string(),
            "state.backend",
            "unknown variant (value not shown), expected `memory` or `redis` at line 2",
        ),
        (
            "approvals:\n  webhook: https://hooks.slack.com/services/T0/B0/hunter2\n".to_string(),
            "approvals.webhook",
            "invalid type: string (value not shown), expected struct WebhookConfig",
        ),
        (
            "api_keys:\n  keys:\n    - pck_hunter2\n".to_string(),
            "api_keys.keys[0]",
            "invalid type: string (value not shown), expected struct ApiKeyConfig at line 3",
        ),
        (
            "api_keys:\n  keys: [pck_hunter2]\n".to_string(),
            "api_keys.keys[0]",
            "expected struct ApiKeyConfig",
        ),
        (
            "issuers:\n  - { name: dev, issuer: \"https://dev.test\", audiences: [api], keys: { file: dev/jwks.json }, dpop: optional, dpop_nonce: \"hunter2\" }\n".to_string(),
            "issuers[0].dpop_nonce",
            "invalid type: string (value not shown), expected struct DpopNonceConfig",
        ),
        (
            "state: 4242424242\n".to_string(),
            "state",
            "invalid type: integer (value not shown)",
        ),
    ];
    for (text, field, message) in cases {
        let e = fails(&format!("{text}{ROUTE}"), field, message);
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("10.0.0.5") && !shown.contains("4242"),
            "{shown}"
        );
    }
}

/// Only values are hidden: a quoted value may hold `, expected ` or escaped quotes, kinds
/// without a value and booleans stay, and field names stay unless names are hidden too.
#[test]
fn hide_values_hides_only_the_quoted_value() {
    let cases = [
        (
            r#"invalid type: string "a\", expected x", expected struct S at line 1 column 2"#,
            Names::Shown,
            "invalid type: string (value not shown), expected struct S at line 1 column 2",
        ),
        (
            "invalid value: floating point `1.5`, expected a u32",
            Names::Shown,
            "invalid value: floating point (value not shown), expected a u32",
        ),
        (
            "invalid type: map, expected a string",
            Names::Shown,
            "invalid type: map, expected a string",
        ),
        (
            "invalid type: boolean `true`, expected usize",
            Names::Shown,
            "invalid type: boolean `true`, expected usize",
        ),
        (
            "unknown variant `a`, expected `b`, expected `memory` or `redis` at line 2",
            Names::Shown,
            "unknown variant (value not shown), expected `memory` or `redis` at line 2",
        ),
        (
            "unknown variant `secret`, there are no variants",
            Names::Shown,
            "unknown variant (value not shown), there are no variants",
        ),
        (
            "unknown field `scope`, expected one of `id`, `scopes`",
            Names::Shown,
            "unknown field `scope`, expected one of `id`, `scopes`",
        ),
        (
            "keys[0]: unknown field `pck_x`, expected one of `id`, `owner` at line 1",
            Names::Hidden,
            "keys[0]: unknown field (value not shown), expected one of `id`, `owner` at line 1",
        ),
        (
            r#"duplicate entry with key "pck_\"x" at line 3"#,
            Names::Hidden,
            "duplicate entry with key (value not shown) at line 3",
        ),
        (
            r#"duplicate entry with key "routes""#,
            Names::Shown,
            r#"duplicate entry with key "routes""#,
        ),
        // Without the end serde writes, the rest is hidden rather than guessed.
        (
            "invalid type: string \"pck_x",
            Names::Shown,
            "invalid type: string (value not shown)",
        ),
        (
            "unknown variant `pck_x",
            Names::Shown,
            "unknown variant (value not shown)",
        ),
    ];
    for (message, names, want) in cases {
        assert_eq!(hide_values(message, names), want, "{message}");
    }
}

/// Without issuers or API keys, only routes that cannot grant anyone are reported: a
/// service grant by `principals` (the mTLS walkthrough's config) needs neither.
#[test]
fn the_no_issuers_warning_names_only_routes_nobody_can_pass() {
    let c = compile(
        "routes:\n  - { id: stock, methods: [GET], path: /internal/stock, rules: [{ id: checkout, principals: [\"spiffe://example.org/ns/shop/sa/checkout\"] }] }\n  - { id: h, methods: [GET], path: /h, public: true }\n",
    )
    .unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let c = compile(
        "routes:\n  - { id: stock, methods: [GET], path: /internal/stock, rules: [{ id: checkout, principals: [\"spiffe://example.org/ns/shop/sa/checkout\"] }] }\n  - { id: orders, methods: [GET], path: /orders, rules: [{ id: readers, scopes: [orders:read] }] }\n",
    )
    .unwrap();
    assert_eq!(
        c.warnings,
        vec![
            "no issuers are configured: route(s) `orders` answer 401 to every request (without \
             issuers or API keys only public routes and service grants by `principals` can allow)"
                .to_string()
        ]
    );
}

/// A credential header is never a trusted posture header: the configured API key header
/// (it was accepted) and each issuer's token header, as `authorization` and `cookie` are.
#[test]
fn credential_headers_cannot_be_trusted_posture_headers() {
    let keys = "api_keys:\n  header: x-service-key\n  keys: []\n";
    let issuer =
        format!("issuers:\n  - {{ {DEV}, token: {{ header: x-id-token, scheme: \"\" }} }}\n");
    for header in ["x-service-key", "x-id-token", "authorization", "cookie"] {
        fails(
            &format!("{keys}{issuer}network:\n  trusted_headers: [{header}]\n{ROUTE}"),
            "network.trusted_headers[0]",
            "cannot be a trusted posture header",
        );
    }
    // The default API key header, when `api_keys` is configured.
    fails(
        &format!("api_keys:\n  keys: []\nnetwork:\n  trusted_headers: [x-api-key]\n{ROUTE}"),
        "network.trusted_headers[0]",
        "cannot be a trusted posture header",
    );
    compile(&format!(
        "{keys}{issuer}network:\n  trusted_headers: [x-device-posture]\n{ROUTE}"
    ))
    .unwrap();
}

/// An API key endpoint that can never be used is reported: a lower-case method (methods
/// are case-sensitive, as a route's `methods` are) or a method and path no route matches.
#[test]
fn api_key_endpoints_no_route_can_match_warn() {
    const HASH: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let text = |routes: &str| {
        format!(
            "api_keys:\n  keys:\n    - {{id: k, owner: o, hash: \"{HASH}\", expires: 2030-01-01T00:00:00Z, routes: {routes}}}\nroutes:\n  - {{id: orders, methods: [GET], path: \"/orders/{{id}}\", rules: [{{id: r, api_keys: [k]}}]}}\n  - {{id: files, methods: [GET], path: \"/files/**\", rules: [{{id: f, api_keys: [k]}}]}}\ndry_run:\n  routes: [{{id: reports, methods: [GET], path: /reports, rules: [{{id: x, api_keys: [k]}}]}}]\n"
        )
    };
    // Exact, overlapping, under a `/**` route, and a dry-run candidate's route: no warning.
    let c = compile(&text(
        "[\"GET /orders/{id}\", \"GET /orders/42\", \"GET /files/a/{x}\", \"GET /reports\"]",
    ))
    .unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let c = compile(&text(
        "[\"get /orders/{id}\", \"POST /orders/{id}\", \"GET /orderz/{id}\", \"GET /orders\"]",
    ))
    .unwrap();
    let key_warnings: Vec<String> = c
        .warnings
        .iter()
        .filter(|w| w.starts_with("api_keys:"))
        .cloned()
        .collect();
    assert_eq!(
        key_warnings,
        vec![
            "api_keys: key `k`: `get /orders/{id}`: `get` is not upper-case; methods are \
             case-sensitive, so it will not match `GET`"
                .to_string(),
            "api_keys: key `k`: `POST /orders/{id}` matches no route's method and path: the key \
             can never be used there"
                .to_string(),
            "api_keys: key `k`: `GET /orderz/{id}` matches no route's method and path: the key \
             can never be used there"
                .to_string(),
            "api_keys: key `k`: `GET /orders` matches no route's method and path: the key can \
             never be used there"
                .to_string(),
        ]
    );
}

/// An error a value's own parser raises (a duration, a size, an empty value) names the line
/// the value is on, not the line where the mapping around it starts (serde_yaml's place).
#[test]
fn a_bad_duration_or_empty_value_names_its_own_line() {
    let text = format!(
        "issuers:\n  - name: dev\n    issuer: \"https://dev.test\"\n    audiences: [api]\n    keys: {{ file: dev/jwks.json }}\n    # skew\n    leeway: 30 parsecs\n{ROUTE}"
    );
    fails(&text, "issuers[0].leeway", "at line 7 column 5");
    let text = format!("tokens:\n  cache:\n    capacity: 10\n    max_ttl:\n{ROUTE}");
    fails(&text, "tokens.cache.max_ttl", "at line 4 column 5");
    // Where serde_yaml's place is already the closer one (the value itself), it stays.
    let text = format!("tokens:\n  cache:\n    capacity: 10\n    max_bytes: 64 potatoes\n{ROUTE}");
    fails(&text, "tokens.cache.max_bytes", "at line 4 column 16");
    let text = format!("server:\n  listen: 127.0.0.1:1\n  leeway: 1s\n{ROUTE}");
    fails(&text, "server.leeway", "unknown field `leeway`");
}

/// A SIGTERMed instance stops within minutes: `shutdown_delay` (serving on, not ready) and
/// `shutdown_grace` (in-flight checks finishing) are at most 5m each, and the grace covers
/// the longest a check may wait, `decision_timeout`. `0s` of delay is the default.
#[test]
fn shutdown_delay_and_grace_are_bounded() {
    let server = |s: &str| format!("server: {{ {s} }}\n{ROUTE}");
    let e = fails(
        &server("shutdown_delay: 400d"),
        "server.shutdown_delay",
        "must be at most 5m",
    );
    assert!(
        e.hint
            .as_deref()
            .is_some_and(|h| h.contains("terminationGracePeriodSeconds")),
        "{e}"
    );
    fails(
        &server("shutdown_delay: 5m 1s"),
        "server.shutdown_delay",
        "at most 5m",
    );
    fails(
        &server("shutdown_grace: 400d"),
        "server.shutdown_grace",
        "must be at most 5m",
    );
    fails(
        &server("shutdown_grace: 0s"),
        "server.shutdown_grace",
        "at least `server.decision_timeout` (200ms)",
    );
    fails(
        &server("shutdown_grace: 1s, decision_timeout: 2s"),
        "server.shutdown_grace",
        "at least `server.decision_timeout` (2s)",
    );
    for ok in [
        "shutdown_delay: 0s, shutdown_grace: 5m",
        "shutdown_delay: 5m, shutdown_grace: 200ms",
        "shutdown_grace: 2s, decision_timeout: 2s",
    ] {
        compile(&server(ok)).unwrap_or_else(|e| panic!("`{ok}` refused: {e}"));
    }
}

/// `approvals.webhook` with `settings` next to its (secret-bearing) URL.
fn webhook(settings: &str) -> String {
    format!(
        "approvals:\n  webhook: {{ url: 'https://chat.example.com/hooks/s3cr3t', {settings} }}\n{ROUTE}"
    )
}

/// The webhook's retries double their pauses up to 30s each: at most 10 (about 2 minutes
/// of pauses), and each attempt's timeout is 100ms to 60s. The URL is never echoed.
#[test]
fn webhook_retries_and_timeout_are_bounded() {
    for (settings, field, message) in [
        ("retries: 11", "approvals.webhook.retries", "at most 10"),
        (
            "retries: 4294967295",
            "approvals.webhook.retries",
            "at most 10",
        ),
        (
            "timeout: 0s",
            "approvals.webhook.timeout",
            "between 100ms and 60s",
        ),
        (
            "timeout: 99ms",
            "approvals.webhook.timeout",
            "between 100ms and 60s",
        ),
        (
            "timeout: 61s",
            "approvals.webhook.timeout",
            "between 100ms and 60s",
        ),
    ] {
        let e = fails(&webhook(settings), field, message);
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }
    for ok in ["retries: 0, timeout: 100ms", "retries: 10, timeout: 60s"] {
        compile(&webhook(ok)).unwrap_or_else(|e| panic!("`{ok}` refused: {e}"));
    }
}

/// Approvers are sent `<link_base>/<id>` as a link: an absolute http(s) URL without query
/// or fragment, so neither a `javascript:` link nor `?x=1/<id>` reaches them.
#[test]
fn link_base_is_an_http_url_a_path_can_follow() {
    let base = |b: &str| format!("approvals:\n  link_base: '{b}'\n{ROUTE}");
    for (bad, message) in [
        (
            "javascript:alert(1)",
            "absolute `http://` or `https://` URL",
        ),
        (
            "ftp://files.example.com/r",
            "absolute `http://` or `https://` URL",
        ),
        ("/requests", "absolute `http://` or `https://` URL"),
        (
            "approvals.example.com/r",
            "absolute `http://` or `https://` URL",
        ),
        (
            "https:approvals.example.com/r",
            "absolute `http://` or `https://` URL",
        ),
        ("https://", "absolute `http://` or `https://` URL"),
        (
            "https://approvals.example.com/r?id=",
            "query (`?`) or fragment (`#`)",
        ),
        (
            "https://approvals.example.com/r#",
            "query (`?`) or fragment (`#`)",
        ),
        (
            "https://approvals.example.com/my requests",
            "spaces or control characters",
        ),
        (
            "https://approver:hunter2@approvals.example.com/r",
            "user name or password",
        ),
        (
            "https://approver@approvals.example.com/r",
            "user name or password",
        ),
    ] {
        fails(&base(bad), "approvals.link_base", message);
    }
    for ok in [
        "https://approvals.example.com/requests",
        "http://127.0.0.1:8080/",
        "HTTPS://approvals.example.com",
    ] {
        compile(&base(ok)).unwrap_or_else(|e| panic!("`{ok}` refused: {e}"));
    }
    // Only the webhook's message carries the link: without one it is unused.
    warns(
        &base("https://a.example.com/r"),
        "approvals.link_base",
        "unused",
    );
    let with_hook = format!(
        "approvals:\n  link_base: https://a.example.com/r\n  webhook: {{ url: 'https://chat.example.com/h' }}\n{ROUTE}"
    );
    let c = compile(&with_hook).unwrap();
    assert!(
        !c.warnings.iter().any(|w| w.contains("link_base")),
        "{:?}",
        c.warnings
    );
}

/// The webhook URL is an absolute http(s) URL with a host, its scheme in any case; the
/// URL (which holds the chat's secret) is never echoed.
#[test]
fn webhook_url_is_an_absolute_http_url() {
    let hook = |url: &str| format!("approvals:\n  webhook: {{ url: '{url}' }}\n{ROUTE}");
    for bad in [
        "https://",
        "https:chat.example.com/s3cr3t",
        "ftp://chat.example.com/s3cr3t",
        "chat.example.com/s3cr3t",
    ] {
        let e = fails(
            &hook(bad),
            "approvals.webhook.url",
            "absolute `http://` or `https://`",
        );
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }
    for ok in ["HTTPS://chat.example.com/s3cr3t", "http://127.0.0.1:9/h"] {
        compile(&hook(ok)).unwrap_or_else(|e| panic!("`{ok}` refused: {e}"));
    }
}

/// An empty `state.key_prefix` would put every key in the Redis database's root namespace,
/// among other applications' keys.
#[test]
fn key_prefix_must_not_be_empty() {
    for backend in ["memory", "redis"] {
        let e = fails(
            &format!("state: {{ backend: {backend}, key_prefix: '' }}\n{ROUTE}"),
            "state.key_prefix",
            "must not be empty",
        );
        assert!(
            e.hint.as_deref().is_some_and(|h| h.contains("portcullis:")),
            "{e}"
        );
    }
    compile(&format!("state: {{ key_prefix: 'a:' }}\n{ROUTE}")).unwrap();
}
