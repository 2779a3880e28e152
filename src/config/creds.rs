//! Compiling the credential sections of the config: `api_keys` (with its optional key file)
//! and `rate_limits`. Part of `Compiler`; same rules: every error names file, field and a
//! hint, and nothing compiles partially.
//!
//! Reads the API key file (a second config file holding only hashes) once, at load time.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use super::schema::{
    ApiKeyConfig, ApiKeyFileConfig, ConfigFile, RateLimitBy, RouteConfig, RuleConfig,
};
use super::{
    CompiledIssuer, Compiler, FORBIDDEN_IDENTITY_HEADERS, Names, Res, hide_values,
    valid_header_name,
};
use crate::authz::context::ContextConditions;
use crate::authz::policy::{Seg, Template};
use crate::identity::apikey::{self, ApiKey, ApiKeys, KeyEndpoint};
use crate::state::RateLimit;

/// True when some path matches both templates.
fn templates_overlap(a: &Template, b: &Template) -> bool {
    let n = a.segs.len().min(b.segs.len());
    let same_prefix = a.segs[..n].iter().zip(&b.segs[..n]).all(|pair| match pair {
        (Seg::Literal(x), Seg::Literal(y)) => x == y,
        _ => true,
    });
    let lengths = match (a.tail, b.tail) {
        (false, false) => a.segs.len() == b.segs.len(),
        (true, false) => b.segs.len() >= a.segs.len(),
        (false, true) => a.segs.len() >= b.segs.len(),
        (true, true) => true,
    };
    same_prefix && lengths
}

/// One compiled rate limit.
#[derive(Debug, Clone)]
pub struct CompiledRateLimit {
    pub id: Arc<str>,
    pub by: RateLimitBy,
    pub limit: RateLimit,
    /// Route ids; empty = every route.
    pub routes: Vec<Arc<str>>,
    /// `by: client_ip`: the prefix length of the IPv6 network one bucket covers.
    pub ipv6_prefix: u8,
}

impl CompiledRateLimit {
    /// True when the limit applies to this route.
    pub fn covers(&self, route_id: &str) -> bool {
        self.routes.is_empty() || self.routes.iter().any(|r| &**r == route_id)
    }
}

/// Longest accepted `per`: buckets are kept in memory, and a day-long window is a quota
/// that belongs in a billing system rather than a token bucket.
const MAX_RATE_PERIOD_SECS: u64 = 24 * 3600;

/// The IPv6 network a `client_ip` bucket covers by default: a /64 is one subnet, and any host
/// on it can pick a fresh address from it for every request (SLAAC privacy addresses do it
/// unasked), so counting single addresses would let one client escape its limit.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// The widest accepted `ipv6_prefix`: shorter prefixes cover whole providers, so one bucket
/// would be shared by unrelated clients.
const MIN_IPV6_PREFIX: u32 = 32;

impl Compiler {
    /// Compiles `api_keys` (inline keys plus the key file). `None` when the section is absent.
    pub(super) fn api_keys(
        &mut self,
        file: &ConfigFile,
        issuers: &[Arc<CompiledIssuer>],
    ) -> Res<Option<Arc<ApiKeys>>> {
        let Some(section) = &file.api_keys else {
            return Ok(None);
        };
        let header = section.header.to_ascii_lowercase();
        if !valid_header_name(&header) || header.starts_with(':') {
            return Err(self.err(
                "api_keys.header",
                format!("`{}` is not a valid header name", section.header),
            ));
        }
        if FORBIDDEN_IDENTITY_HEADERS.contains(&header.as_str()) {
            return Err(self.hint(
                "api_keys.header",
                format!("`{header}` cannot carry an API key"),
                "use a dedicated header such as `x-api-key`",
            ));
        }
        if issuers.iter().any(|i| i.header == header) {
            return Err(self.err(
                "api_keys.header",
                format!("`{header}` is where an issuer's token is read from"),
            ));
        }
        // Headers that mean something else to Envoy or to Portcullis: a key there would be
        // rewritten by Envoy (`x-forwarded-for` gets the client address appended) or read
        // as something else, and every request would fail in a way hard to trace back here.
        let taken = matches!(header.as_str(), "dpop" | "forwarded" | "x-request-id")
            || header.starts_with("x-forwarded-")
            || header.starts_with("x-envoy-")
            || header == crate::grpc::http::SOURCE_ADDRESS_HEADER;
        if taken {
            return Err(self.hint(
                "api_keys.header",
                format!(
                    "`{header}` already means something to Envoy or Portcullis (a DPoP proof, \
                     forwarding, Envoy's own, the client address)"
                ),
                "use a dedicated header such as `x-api-key`",
            ));
        }
        if file.upstream.identity_headers.contains_key(&header) {
            return Err(self.err(
                "api_keys.header",
                format!("`{header}` is also an upstream identity header"),
            ));
        }

        // (field prefix, entry) for inline keys, then the key file's.
        let mut key_file = None;
        let mut entries: Vec<(String, ApiKeyConfig)> = section
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("api_keys.keys[{i}]"), k.clone()))
            .collect();
        if let Some(rel) = &section.file {
            let path = crate::keys::resolve_path(&self.dir, rel);
            let parsed = self.key_file(&path)?;
            key_file = Some(path.clone());
            entries.extend(
                parsed
                    .keys
                    .into_iter()
                    .enumerate()
                    .map(|(i, k)| (format!("api_keys.file({}).keys[{i}]", path.display()), k)),
            );
        }

        let mut keys: Vec<ApiKey> = Vec::with_capacity(entries.len());
        for (field, entry) in &entries {
            let f = |s: &str| format!("{field}.{s}");
            if !apikey::valid_id(&entry.id) {
                return Err(self.hint(
                    f("id"),
                    format!("invalid key id `{}`", entry.id),
                    "1 to 64 letters, digits, `.`, `_` or `-`",
                ));
            }
            if keys.iter().any(|k| *k.id == *entry.id) {
                return Err(self.err(f("id"), format!("duplicate API key id `{}`", entry.id)));
            }
            if entry.owner.trim().is_empty() || entry.owner.chars().any(char::is_control) {
                return Err(self.err(f("owner"), "the owner must be a non-empty name"));
            }
            let hash = apikey::parse_hash(&entry.hash).map_err(|e| {
                self.hint(
                    f("hash"),
                    e.to_string(),
                    "`portcullis apikey new` prints a ready entry; never put the key itself here",
                )
            })?;
            if keys.iter().any(|k| k.hash == hash) {
                return Err(self.err(
                    f("hash"),
                    format!("key `{}` has the same hash as another key", entry.id),
                ));
            }
            let expires_at = apikey::parse_expiry(&entry.expires).map_err(|e| {
                self.hint(f("expires"), e.to_string(), "e.g. `2027-01-31T00:00:00Z`")
            })?;
            if entry.routes.is_empty() {
                return Err(self.hint(
                    f("routes"),
                    "no routes: the key would work nowhere",
                    "e.g. `routes: [\"GET /orders/{id}\"]`",
                ));
            }
            let mut endpoints = Vec::with_capacity(entry.routes.len());
            for (j, r) in entry.routes.iter().enumerate() {
                let ep = KeyEndpoint::parse(r).map_err(|e| {
                    self.hint(
                        f(&format!("routes[{j}]")),
                        e.to_string(),
                        "write `METHOD /path/template`, e.g. `GET /orders/{id}`",
                    )
                })?;
                endpoints.push(ep);
            }
            keys.push(ApiKey::new(
                &entry.id,
                entry.owner.trim(),
                hash,
                expires_at,
                endpoints,
            ));
        }
        if keys.is_empty() {
            self.warnings
                .push("api_keys: no keys are configured: every API key is refused".to_string());
        }
        let mut table = ApiKeys::new(header, keys);
        table.file = key_file;
        Ok(Some(Arc::new(table)))
    }

    fn key_file(&self, path: &Path) -> Res<ApiKeyFileConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            self.hint(
                "api_keys.file",
                format!("cannot read the API key file `{}`: {e}", path.display()),
                "relative paths are resolved against the config file's folder",
            )
        })?;
        // Like the config file: an empty file (or only comments) is more likely a write caught
        // halfway (an editor truncating it, a copy in progress) than a decision to refuse every
        // key, so it is an error and, on a reload, the keys in force stay.
        if serde_yaml::from_str::<serde_yaml::Value>(&text).is_ok_and(|v| v.is_null()) {
            return Err(self.hint(
                "api_keys.file",
                format!("the API key file `{}` is empty", path.display()),
                "write `keys: []` for a file that holds no keys yet",
            ));
        }
        serde_yaml::from_str(&text).map_err(|e| {
            // Never the file's text: a plain key written where an entry belongs would be
            // quoted by serde (see `hide_values`), and here even a field name may be a key.
            self.hint(
                "api_keys.file",
                format!(
                    "invalid API key file `{}`: {}",
                    path.display(),
                    hide_values(&e.to_string(), Names::Hidden)
                ),
                "the file holds `keys: [{id, owner, hash, expires, routes}, ...]`",
            )
        })
    }

    /// Checks a rule's `api_keys` against the known key ids.
    pub(super) fn rule_api_keys(
        &mut self,
        field: &str,
        names: &[String],
        keys: Option<&ApiKeys>,
        token_conditions: bool,
    ) -> Res<Vec<Arc<str>>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let Some(keys) = keys else {
            return Err(self.hint(
                field,
                "the rule names API keys but no `api_keys` section is configured",
                "add `api_keys:` with the keys, or remove `api_keys` from the rule",
            ));
        };
        if token_conditions {
            return Err(self.hint(
                field,
                "a rule for API keys cannot also require issuers, scopes, roles or claims",
                "write a separate rule for bearer tokens; `bind` may be combined",
            ));
        }
        let mut out: Vec<Arc<str>> = Vec::with_capacity(names.len());
        for (k, name) in names.iter().enumerate() {
            // A warning, not an error: deleting a key's entry (or its line in the key file)
            // is how a key is revoked, and refusing that reload kept the key working. The
            // name stays in the rule, which grants it nothing while no key has that id (a
            // rule naming only such keys stays a rule for API keys: never one for tokens).
            if name != "*" && keys.get(name).is_none() {
                self.warnings.push(format!(
                    "{field}[{k}]: API key `{name}` is not configured, so this rule grants it \
                     nothing: drop the id from the rule if the key was removed, or name a key \
                     id from `api_keys` (or `*` for any key)"
                ));
            }
            if !out.iter().any(|o| **o == **name) {
                out.push(Arc::from(name.as_str()));
            }
        }
        Ok(out)
    }

    /// Warnings for a rule naming API keys that can never grant them: a key whose own
    /// `routes` never cover the rule's route (the key is refused there before any rule), and
    /// `max_session_age`/`max_token_lifetime`, which read a token's `iat`/`auth_time` that a
    /// key does not have (always 403 `context_denied`).
    pub(super) fn api_key_rule_warnings(
        &mut self,
        at: &str,
        rule: &RuleConfig,
        rc: &RouteConfig,
        template: &Template,
        names: &[Arc<str>],
        context: &ContextConditions,
    ) {
        if names.is_empty() {
            return;
        }
        if let Some(keys) = self.api_keys.clone() {
            for name in names.iter().filter(|k| &***k != "*") {
                let Some(key) = keys.get(name) else { continue };
                let covered = key.endpoints.iter().any(|e| {
                    rc.methods.iter().any(|m| *m == *e.method) && e.path.overlaps(template)
                });
                if !covered {
                    self.warnings.push(format!(
                        "{at}: rule `{}` names API key `{name}`, whose own `routes` never \
                         cover this route ({} {}): the key is refused here (403); add the \
                         endpoint to the key's `routes`, or drop the key from the rule",
                        rule.id,
                        rc.methods.join(", "),
                        rc.path
                    ));
                }
            }
        }
        let needs: Vec<&str> = [
            ("max_session_age", context.max_session_age.is_some()),
            ("max_token_lifetime", context.max_token_lifetime.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if !needs.is_empty() {
            self.warnings.push(format!(
                "{at}: rule `{}` grants API keys and sets `{}`, which reads a token's \
                 `iat`/`auth_time`: an API key has neither, so the rule never grants (403 \
                 `context_denied`); move the condition to a rule for tokens",
                rule.id,
                needs.join("` and `")
            ));
        }
    }

    /// Compiles `rate_limits` against the route ids.
    pub(super) fn rate_limits(
        &mut self,
        file: &ConfigFile,
        api_keys: Option<&ApiKeys>,
    ) -> Res<Vec<CompiledRateLimit>> {
        let route_ids: HashSet<&str> = file.routes.iter().map(|r| r.id.as_str()).collect();
        let mut out: Vec<CompiledRateLimit> = Vec::with_capacity(file.rate_limits.len());
        for (i, rl) in file.rate_limits.iter().enumerate() {
            let f = |s: &str| format!("rate_limits[{i}].{s}");
            if rl.id.is_empty()
                || !rl
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(self.hint(
                    f("id"),
                    format!("invalid rate limit id `{}`", rl.id),
                    "letters, digits, `.`, `_` or `-` (it is sent in the `RateLimit` header)",
                ));
            }
            if out.iter().any(|o| *o.id == *rl.id) {
                return Err(self.err(f("id"), format!("duplicate rate limit id `{}`", rl.id)));
            }
            if rl.requests == 0 {
                return Err(self.err(f("requests"), "must be at least 1"));
            }
            let per = rl.per.get();
            if per.as_secs() < 1 || per.as_secs() > MAX_RATE_PERIOD_SECS {
                return Err(self.hint(
                    f("per"),
                    format!("`{}` is out of range: use 1s to 24h", rl.per),
                    "e.g. `per: 1m`",
                ));
            }
            let burst = rl.burst.unwrap_or(rl.requests);
            if burst == 0 {
                return Err(self.err(f("burst"), "must be at least 1"));
            }
            let mut routes: Vec<Arc<str>> = Vec::with_capacity(rl.routes.len());
            for (j, r) in rl.routes.iter().enumerate() {
                if !route_ids.contains(r.as_str()) {
                    let known: Vec<&str> = route_ids.iter().copied().collect();
                    let hint = match super::closest(r, &known) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None => "use a route `id`".to_string(),
                    };
                    return Err(self.hint(
                        f(&format!("routes[{j}]")),
                        format!("unknown route `{r}`"),
                        hint,
                    ));
                }
                routes.push(Arc::from(r.as_str()));
            }
            let ipv6_prefix = match rl.ipv6_prefix {
                None => DEFAULT_IPV6_PREFIX,
                Some(_) if rl.by != RateLimitBy::ClientIp => {
                    return Err(self.hint(
                        f("ipv6_prefix"),
                        "only a `by: client_ip` limit counts by address",
                        "remove `ipv6_prefix`, or count this limit `by: client_ip`",
                    ));
                }
                Some(p) => match u8::try_from(p) {
                    Ok(p) if (MIN_IPV6_PREFIX..=128).contains(&u32::from(p)) => p,
                    _ => {
                        return Err(self.hint(
                            f("ipv6_prefix"),
                            format!("`{p}` is out of range: use {MIN_IPV6_PREFIX} to 128"),
                            "64 (the default) is one subnet, which one host can fill with \
                             addresses; 56 or 48 covers a whole site",
                        ));
                    }
                },
            };
            if rl.by == RateLimitBy::ApiKey && api_keys.is_none() {
                self.warnings.push(format!(
                    "rate_limits[{i}]: limit `{}` counts API keys but none are configured: it never applies",
                    rl.id
                ));
            }
            out.push(CompiledRateLimit {
                id: Arc::from(rl.id.as_str()),
                by: rl.by,
                limit: RateLimit {
                    requests: rl.requests,
                    per,
                    burst,
                },
                routes,
                ipv6_prefix,
            });
        }
        Ok(out)
    }

    /// Warns about key endpoints that can never be used: a method not in upper case (methods
    /// are case-sensitive, as in routes), or a method and path no route (live or `dry_run`)
    /// could match.
    pub(super) fn key_endpoint_warnings(&mut self, file: &ConfigFile, keys: Option<&ApiKeys>) {
        let Some(keys) = keys else { return };
        let candidates = file.dry_run.iter().flat_map(|d| &d.routes);
        let routes: Vec<(&[String], Template)> = (file.routes.iter().chain(candidates))
            .filter_map(|r| Some((r.methods.as_slice(), Template::parse(&r.path).ok()?)))
            .collect();
        for k in keys.keys() {
            for ep in &k.endpoints {
                let m = &*ep.method;
                if m.bytes().any(|b| b.is_ascii_lowercase()) {
                    self.warnings.push(format!(
                        "api_keys: key `{}`: `{ep}`: `{m}` is not upper-case; methods are \
                         case-sensitive, so it will not match `{}`",
                        k.id,
                        m.to_ascii_uppercase()
                    ));
                    continue;
                }
                let reachable = routes.iter().any(|(methods, template)| {
                    methods.iter().any(|x| x == m) && templates_overlap(template, &ep.path)
                });
                if !reachable {
                    self.warnings.push(format!(
                        "api_keys: key `{}`: `{ep}` matches no route's method and path: the key \
                         can never be used there",
                        k.id
                    ));
                }
            }
        }
    }

    /// Warns about keys no rule grants (they can never be used).
    pub(super) fn unused_key_warnings(&mut self, file: &ConfigFile, keys: Option<&ApiKeys>) {
        let Some(keys) = keys else { return };
        let named: HashSet<&str> = file
            .routes
            .iter()
            .flat_map(|r| &r.rules)
            .flat_map(|r| &r.api_keys)
            .map(String::as_str)
            .collect();
        if named.contains("*") {
            return;
        }
        for k in keys.keys() {
            if !named.contains(&*k.id) {
                self.warnings.push(format!(
                    "api_keys: key `{}` is named by no rule: it is refused everywhere",
                    k.id
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::{Config, ConfigError, from_str};

    const HASH: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const HASH2: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/test.yaml")
    }

    fn key(id: &str, hash: &str) -> String {
        format!(
            "{{id: {id}, owner: team, hash: \"{hash}\", expires: 2030-01-01T00:00:00Z, routes: [\"GET /orders/{{id}}\"]}}"
        )
    }

    /// A config with `api_keys` holding `keys`, a route whose rule names `rule_keys`, and
    /// `extra` YAML appended.
    fn config(keys: &[String], rule: &str, extra: &str) -> String {
        format!(
            "api_keys:\n  keys: [{}]\nroutes:\n  - id: orders\n    methods: [GET]\n    path: /orders/{{id}}\n    rules: [{rule}]\n{extra}",
            keys.join(", ")
        )
    }

    fn compile(text: &str) -> Result<Config, ConfigError> {
        from_str(text, &path())
    }

    #[track_caller]
    fn fails(text: &str, field: &str, message: &str) {
        match compile(text) {
            Ok(_) => panic!("compiled, expected an error at `{field}`"),
            Err(e) => {
                assert_eq!(e.field, field, "{e}");
                assert!(e.message.contains(message), "{e}");
            }
        }
    }

    #[test]
    fn keys_compile_with_the_default_header_and_named_rules() {
        let c = compile(&config(&[key("k1", HASH)], "{id: r, api_keys: [k1]}", "")).unwrap();
        let keys = c.api_keys.as_ref().unwrap();
        assert_eq!(keys.header, "x-api-key");
        assert_eq!(keys.verify("abc", 0).unwrap().id.as_ref(), "k1");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn bad_key_entries_name_their_field() {
        let rule = "{id: r, api_keys: [\"*\"]}";
        fails(
            &config(&[key("k 1", HASH)], rule, ""),
            "api_keys.keys[0].id",
            "invalid key id",
        );
        fails(
            &config(&[key("k1", "abc")], rule, ""),
            "api_keys.keys[0].hash",
            "sha256",
        );
        fails(
            &config(&[key("k1", HASH), key("k1", HASH2)], rule, ""),
            "api_keys.keys[1].id",
            "duplicate",
        );
        fails(
            &config(&[key("k1", HASH), key("k2", HASH)], rule, ""),
            "api_keys.keys[1].hash",
            "same hash",
        );
        let expiry = key("k1", HASH).replace("2030-01-01T00:00:00Z", "2030-01-01");
        fails(
            &config(&[expiry], rule, ""),
            "api_keys.keys[0].expires",
            "RFC 3339",
        );
        let no_routes = key("k1", HASH).replace("[\"GET /orders/{id}\"]", "[]");
        fails(
            &config(&[no_routes], rule, ""),
            "api_keys.keys[0].routes",
            "no routes",
        );
        let bad_route = key("k1", HASH).replace("GET /orders/{id}", "/orders");
        fails(
            &config(&[bad_route], rule, ""),
            "api_keys.keys[0].routes[0]",
            "METHOD",
        );
    }

    /// Deleting a key's entry is how a key is revoked: a rule still naming it loads (with a
    /// warning naming the field) and grants that name nothing, and stays a rule for API keys
    /// only, so it never turns into a rule any token meets.
    #[test]
    fn a_rule_naming_a_key_that_is_gone_loads_with_a_warning_and_grants_nothing() {
        let c = compile(&config(&[key("k1", HASH)], "{id: r, api_keys: [k2]}", "")).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w
                    .starts_with("routes[0].rules[0].api_keys[0]: API key `k2` is not configured")),
            "{:?}",
            c.warnings
        );
        let rule = &c.policy.routes()[0].rules[0];
        assert_eq!(
            rule.api_keys.iter().map(|k| &**k).collect::<Vec<_>>(),
            ["k2"]
        );
        assert!(
            !c.warnings.iter().any(|w| w.contains("has no conditions")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn rules_never_mix_api_keys_with_token_conditions() {
        let keys = [key("k1", HASH)];
        fails(
            &config(&keys, "{id: r, api_keys: [k1], scopes: [a]}", ""),
            "routes[0].rules[0].api_keys",
            "cannot also require",
        );
        let no_section =
            "routes:\n  - {id: o, methods: [GET], path: /o, rules: [{id: r, api_keys: [k1]}]}\n";
        fails(
            no_section,
            "routes[0].rules[0].api_keys",
            "no `api_keys` section",
        );
    }

    #[test]
    fn the_key_header_cannot_be_a_credential_or_identity_header() {
        let keys = [key("k1", HASH)];
        let with_header = |h: &str| {
            config(&keys, "{id: r, api_keys: [k1]}", "")
                .replace("api_keys:\n", &format!("api_keys:\n  header: {h}\n"))
        };
        fails(
            &with_header("authorization"),
            "api_keys.header",
            "cannot carry",
        );
        fails(
            &with_header("x-portcullis-subject"),
            "api_keys.header",
            "identity header",
        );
        fails(
            &with_header("bad header"),
            "api_keys.header",
            "not a valid header",
        );
        for taken in [
            "dpop",
            "X-Forwarded-For",
            "x-forwarded-proto",
            "x-envoy-original-path",
            "x-portcullis-source-address",
            "forwarded",
        ] {
            fails(
                &with_header(taken),
                "api_keys.header",
                "already means something",
            );
        }
        assert!(compile(&with_header("x-reporting-key")).is_ok());
    }

    #[test]
    fn the_api_key_issuer_name_is_reserved() {
        let text = "issuers:\n  - {name: api-key, issuer: \"https://x.test\", audiences: [a], keys: {file: dev/jwks.json}}\nroutes:\n  - {id: h, methods: [GET], path: /h, public: true}\n";
        fails(text, "issuers[0].name", "reserved");
    }

    #[test]
    fn a_key_no_rule_names_is_a_warning() {
        let c = compile(&config(
            &[key("k1", HASH), key("k2", HASH2)],
            "{id: r, api_keys: [k1]}",
            "",
        ))
        .unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("`k2`"), "{:?}", c.warnings);
    }

    #[test]
    fn rate_limits_compile_with_burst_defaulting_to_requests() {
        let c = compile(&config(
            &[key("k1", HASH)],
            "{id: r, api_keys: [k1]}",
            "rate_limits:\n  - {id: a, by: api_key, requests: 10, per: 1m}\n  - {id: b, by: client_ip, requests: 5, per: 1s, burst: 2, routes: [orders]}\n",
        ))
        .unwrap();
        assert_eq!(c.rate_limits.len(), 2);
        assert_eq!(c.rate_limits[0].limit.burst, 10);
        assert_eq!(
            c.rate_limits[0].limit.per,
            std::time::Duration::from_secs(60)
        );
        assert!(c.rate_limits[0].covers("anything"));
        assert_eq!(c.rate_limits[1].limit.burst, 2);
        assert!(c.rate_limits[1].covers("orders") && !c.rate_limits[1].covers("other"));
        assert_eq!(c.rate_limits[1].ipv6_prefix, 64);
    }

    #[test]
    fn a_client_ip_limit_takes_an_ipv6_prefix_from_32_to_128() {
        let with = |p: u32| {
            config(
                &[key("k1", HASH)],
                "{id: r, api_keys: [k1]}",
                &format!(
                    "rate_limits:\n  - {{id: a, by: client_ip, requests: 1, per: 1m, ipv6_prefix: {p}}}\n"
                ),
            )
        };
        for p in [32, 48, 56, 128] {
            assert_eq!(
                compile(&with(p)).unwrap().rate_limits[0].ipv6_prefix,
                p as u8
            );
        }
    }

    #[test]
    fn bad_rate_limits_name_their_field() {
        let base = config(&[key("k1", HASH)], "{id: r, api_keys: [k1]}", "");
        let with = |rl: &str| format!("{base}rate_limits:\n  - {rl}\n");
        fails(
            &with("{id: a, by: route, requests: 0, per: 1m}"),
            "rate_limits[0].requests",
            "at least 1",
        );
        fails(
            &with("{id: a, by: route, requests: 1, per: 10ms}"),
            "rate_limits[0].per",
            "out of range",
        );
        // Echoed as written: humantime would print `25h` as `1day 1h`.
        fails(
            &with("{id: a, by: route, requests: 1, per: 25h}"),
            "rate_limits[0].per",
            "`25h` is out of range",
        );
        fails(
            &with("{id: a, by: route, requests: 1, per: 1m, burst: 0}"),
            "rate_limits[0].burst",
            "at least 1",
        );
        fails(
            &with("{id: a, by: route, requests: 1, per: 1m, routes: [ordrs]}"),
            "rate_limits[0].routes[0]",
            "unknown route",
        );
        fails(
            &with("{id: \"a b\", by: route, requests: 1, per: 1m}"),
            "rate_limits[0].id",
            "invalid",
        );
        fails(
            &with("{id: a, by: client_ip, requests: 1, per: 1m, ipv6_prefix: 16}"),
            "rate_limits[0].ipv6_prefix",
            "out of range: use 32 to 128",
        );
        fails(
            &with("{id: a, by: client_ip, requests: 1, per: 1m, ipv6_prefix: 129}"),
            "rate_limits[0].ipv6_prefix",
            "out of range",
        );
        fails(
            &with("{id: a, by: client_ip, requests: 1, per: 1m, ipv6_prefix: 300}"),
            "rate_limits[0].ipv6_prefix",
            "out of range",
        );
        fails(
            &with("{id: a, by: subject, requests: 1, per: 1m, ipv6_prefix: 64}"),
            "rate_limits[0].ipv6_prefix",
            "`by: client_ip`",
        );
        let e = compile(&with("{id: a, by: user, requests: 1, per: 1m}")).unwrap_err();
        assert!(e.field.starts_with("rate_limits[0]"), "{e}");
    }

    #[test]
    fn the_key_file_is_read_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("keys.yaml"),
            format!("keys: [{}]\n", key("from-file", HASH)),
        )
        .unwrap();
        let text = "api_keys:\n  file: keys.yaml\nroutes:\n  - {id: o, methods: [GET], path: \"/orders/{id}\", rules: [{id: r, api_keys: [from-file]}]}\n";
        let c = from_str(text, &dir.path().join("portcullis.yaml")).unwrap();
        let keys = c.api_keys.as_ref().unwrap();
        assert!(keys.get("from-file").is_some());
        assert_eq!(
            keys.file.as_deref(),
            Some(dir.path().join("keys.yaml").as_path())
        );
        let e = from_str(
            &text.replace("keys.yaml", "missing.yaml"),
            &dir.path().join("portcullis.yaml"),
        )
        .unwrap_err();
        assert_eq!(e.field, "api_keys.file");
    }

    /// An empty key file was read as "no keys": on a hot reload, an editor truncating the
    /// file had every API key refused until the next poll. It is now refused, like an empty
    /// config file, so the last good keys stay in force; `keys: []` still means none.
    #[test]
    fn an_empty_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.yaml");
        let config = dir.path().join("portcullis.yaml");
        let text = "api_keys:\n  file: keys.yaml\nroutes:\n  - {id: o, methods: [GET], path: /o, public: true}\n";
        for empty in ["", "\n", "# keys: []\n", "---\n"] {
            std::fs::write(&file, empty).unwrap();
            let e = from_str(text, &config).unwrap_err();
            assert_eq!(e.field, "api_keys.file", "{e}");
            assert!(e.message.contains("is empty"), "{e}");
            assert!(e.message.contains("keys.yaml"), "{e}");
        }
        std::fs::write(&file, "keys: []\n").unwrap();
        let c = from_str(text, &config).unwrap();
        assert!(c.api_keys.is_some());
    }

    /// A plain key pasted into the key file (in place of an entry or the list, alone in the
    /// file, as a field name) was quoted in the error, and so printed by `portcullis
    /// check` and logged by a refused reload. The error names the file and what is wrong
    /// with it, never its text.
    #[test]
    fn a_key_file_error_never_echoes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.yaml");
        let config = dir.path().join("portcullis.yaml");
        let text = "api_keys:\n  file: keys.yaml\nroutes:\n  - {id: o, methods: [GET], path: /o, public: true}\n";
        let entry = key("a", HASH);
        for (body, message) in [
            (
                "keys:\n  - pck_hunter2\n".to_string(),
                "keys[0]: invalid type: string (value not shown), expected struct ApiKeyConfig at line 2",
            ),
            (
                "keys: [pck_hunter2]\n".to_string(),
                "expected struct ApiKeyConfig",
            ),
            (
                "pck_hunter2\n".to_string(),
                "invalid type: string (value not shown), expected struct ApiKeyFileConfig",
            ),
            (
                format!(
                    "keys: [{}]\n",
                    entry.replace("owner: team", "pck_hunter2: team")
                ),
                "keys[0]: unknown field (value not shown), expected one of `id`",
            ),
            (
                "pck_hunter2: 1\n".to_string(),
                "unknown field (value not shown), expected `keys`",
            ),
            (
                "keys: pck_hunter2\n".to_string(),
                "keys: invalid type: string (value not shown), expected a sequence",
            ),
        ] {
            std::fs::write(&file, &body).unwrap();
            let e = from_str(text, &config).unwrap_err();
            assert_eq!(e.field, "api_keys.file", "{e}");
            assert!(e.message.contains("keys.yaml"), "{e}");
            assert!(e.message.contains(message), "{e}");
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }
}
