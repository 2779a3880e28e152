//! Compiling the credential sections of the config: `api_keys` (with its optional key file)
//! and `rate_limits`. Part of `Compiler`; same rules: every error names file, field and a
//! hint, and nothing compiles partially.
//!
//! Reads the API key file (a second config file holding only hashes) once, at load time.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use super::schema::{ApiKeyConfig, ApiKeyFileConfig, ConfigFile, RateLimitBy};
use super::{CompiledIssuer, Compiler, FORBIDDEN_IDENTITY_HEADERS, Res, valid_header_name};
use crate::identity::apikey::{self, ApiKey, ApiKeys, KeyEndpoint};
use crate::state::RateLimit;

/// One compiled rate limit.
#[derive(Debug, Clone)]
pub struct CompiledRateLimit {
    pub id: Arc<str>,
    pub by: RateLimitBy,
    pub limit: RateLimit,
    /// Route ids; empty = every route.
    pub routes: Vec<Arc<str>>,
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
        if file.upstream.identity_headers.contains_key(&header) {
            return Err(self.err(
                "api_keys.header",
                format!("`{header}` is also an upstream identity header"),
            ));
        }

        // (field prefix, entry) for inline keys, then the key file's.
        let mut entries: Vec<(String, ApiKeyConfig)> = section
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("api_keys.keys[{i}]"), k.clone()))
            .collect();
        if let Some(rel) = &section.file {
            let path = crate::keys::resolve_path(&self.dir, rel);
            let parsed = self.key_file(&path)?;
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
        Ok(Some(Arc::new(ApiKeys::new(header, keys))))
    }

    fn key_file(&self, path: &Path) -> Res<ApiKeyFileConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            self.hint(
                "api_keys.file",
                format!("cannot read the API key file `{}`: {e}", path.display()),
                "relative paths are resolved against the config file's folder",
            )
        })?;
        if serde_yaml::from_str::<serde_yaml::Value>(&text).is_ok_and(|v| v.is_null()) {
            return Ok(ApiKeyFileConfig { keys: Vec::new() });
        }
        serde_yaml::from_str(&text).map_err(|e| {
            self.hint(
                "api_keys.file",
                format!("invalid API key file `{}`: {e}", path.display()),
                "the file holds `keys: [{id, owner, hash, expires, routes}, ...]`",
            )
        })
    }

    /// Checks a rule's `api_keys` against the known key ids.
    pub(super) fn rule_api_keys(
        &self,
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
            if name != "*" && keys.get(name).is_none() {
                return Err(self.hint(
                    format!("{field}[{k}]"),
                    format!("unknown API key `{name}`"),
                    "name a key id from `api_keys`, or `*` for any key",
                ));
            }
            if !out.iter().any(|o| **o == **name) {
                out.push(Arc::from(name.as_str()));
            }
        }
        Ok(out)
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
            });
        }
        Ok(out)
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
