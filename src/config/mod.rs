//! Configuration: YAML text -> validated, compiled `Config`. OWNER: policy helper.
//!
//! Takes text and a path (for error messages and for resolving relative key files); reads
//! the file only in `load`, and otherwise touches the filesystem only to check that a
//! configured key file exists. Every error names the file, the field path and, where it
//! helps, a hint. A config either compiles completely or not at all: there is no partial or
//! "allow-all" fallback.

pub mod bytes;
pub mod creds;
pub mod duration;
mod locate;
pub mod schema;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use jsonwebtoken::Algorithm;

use crate::authz::Policy;
use crate::authz::context::{
    ContextConditions, DaySet, PostureCondition, PostureSource, PostureTest, SourceCondition,
    TimeWindow,
};
use crate::authz::policy::{
    Binding, BindingKind, ClaimCondition, ClaimTest, CompiledRoute, CompiledRule, HostPattern,
    Template, is_tchar,
};
use crate::identity::dpop::{DEFAULT_DPOP_ALGORITHMS, DpopMode, DpopRules};
use crate::identity::dpop_nonce::{MIN_SECRET_BYTES, NonceRules};
use crate::identity::peer::PrincipalPattern;
use crate::identity::{ClaimPaths, JwtRules};

pub use creds::CompiledRateLimit;
pub use schema::ConfigFile;
use schema::{IssuerConfig, RouteConfig, RuleConfig, TlsConfig};

/// A config error: file, field path (e.g. `routes[2].rules[0].scopes`), message and a hint.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Empty when the error concerns the whole file.
    pub field: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// One trusted issuer, compiled.
#[derive(Debug, Clone)]
pub struct CompiledIssuer {
    pub name: Arc<str>,
    pub rules: JwtRules,
    pub claims: ClaimPaths,
    /// Lower-case header name carrying the token.
    pub header: String,
    /// Scheme (compare case-insensitively); empty for a bare header value.
    pub scheme: String,
    /// Key source with `file` resolved against the config file's folder.
    pub keys: schema::KeySourceConfig,
    /// DPoP (RFC 9449) for this issuer's tokens.
    pub dpop: DpopRules,
    /// Every token must be certificate-bound (`cnf.x5t#S256`, RFC 8705).
    pub cert_bound: bool,
}

/// A validated configuration, ready to serve.
#[derive(Debug)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    /// The raw file (server, tokens, upstream, audit settings are read from here).
    pub file: ConfigFile,
    pub issuers: Vec<Arc<CompiledIssuer>>,
    pub policy: Policy,
    /// `dry_run`: the candidate policy (live routes with its changes), decided beside `policy` and
    /// never enforced.
    pub dry_run: Option<Policy>,
    /// Non-fatal findings for `portcullis check` (e.g. unreachable routes).
    pub warnings: Vec<String>,
    /// Scoped API keys (hashes only); `None` when the `api_keys` section is absent.
    pub api_keys: Option<Arc<crate::identity::apikey::ApiKeys>>,
    /// Rate limits, in file order.
    pub rate_limits: Vec<CompiledRateLimit>,
    /// `revocation.file`, resolved against the config file's folder.
    pub revocation_file: Option<PathBuf>,
    /// The headers that carry credentials (every issuer's token header, the API key
    /// header), sorted and distinct: what `upstream.strip_authorization` removes.
    pub credential_headers: Vec<String>,
}

/// Algorithms accepted when an issuer lists none: every asymmetric one.
pub const DEFAULT_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Smallest `tokens.cache.max_bytes` for an enabled cache.
const CACHE_BYTES_MIN: u64 = 1 << 20;

/// Longest `tokens.cache.max_ttl`: a revocation or a key rotation already takes effect on
/// cached tokens, but a cache holding a verification for longer than a day is a typo (and an
/// enormous value overflowed the per-token expiry arithmetic).
const CACHE_TTL_MAX: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Most `approvals.webhook.retries`: the pauses between attempts double from 250ms and stop
/// growing at 30s (`approvals::webhook`), so 10 retries wait about 2 minutes in all; more
/// would keep a task per notification retrying for long after anyone cares.
const WEBHOOK_RETRIES_MAX: u32 = 10;

/// Bounds of `tokens.max_bytes`.
const TOKEN_BYTES_MIN: usize = 256;
const TOKEN_BYTES_MAX: usize = 65_536;

/// Headers an identity header must never replace: pseudo-headers are checked separately.
const FORBIDDEN_IDENTITY_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "host",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "cookie",
];

/// Reads and compiles a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        field: String::new(),
        message: format!("cannot read the config file: {e}"),
        hint: (e.kind() == std::io::ErrorKind::NotFound).then(|| missing_file_hint(path)),
    })?;
    from_str(&text, path)
}

/// Where a config file that does not exist was looked for, and how to name another: run
/// from another folder, the default `config/portcullis.yaml` is not found.
fn missing_file_hint(path: &Path) -> String {
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => format!(
            "looked for it in `{}`; run from the folder that holds it, or name it with \
             `--config PATH`",
            cwd.display()
        ),
        _ => "name the config file with `--config PATH`".to_string(),
    }
}

/// Compiles config text. `path` is used for messages and to resolve relative key files.
pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let file = parse(text, path)?;
    Compiler::new(path).compile(file)
}

/// `e`, an error of the config's `revocation.file`, as a config error naming the config
/// file, the field and the revocation file.
pub fn revocation_error(config: &Config, e: &crate::revocation::RevocationError) -> ConfigError {
    use crate::revocation::RevocationError as E;
    let message = match (e, &config.revocation_file) {
        // These name the revocation file already.
        (E::Read { .. } | E::Empty(_) | E::Parse { .. }, _) | (_, None) => e.to_string(),
        (_, Some(file)) => format!("`{}`: {e}", file.display()),
    };
    ConfigError {
        file: config.source.clone(),
        field: "revocation.file".to_string(),
        message,
        hint: None,
    }
}

/// Reads `revocation.file` as the server does at start (`portcullis check`): a file that is
/// unreadable, empty, not a revocation list, or scopes an entry to an issuer the config lacks
/// is an error naming the field and the file. Compiling never reads it: the file is watched
/// on its own, and a bad version keeps the last good list in force rather than refusing the
/// config.
pub fn check_revocation_file(config: &Config) -> Result<(), ConfigError> {
    let Some(path) = &config.revocation_file else {
        return Ok(());
    };
    let list = crate::revocation::Revocations::load(
        Some(path.clone()),
        crate::revocation::issuer_names(config),
    );
    match list.startup_error() {
        Some(e) => Err(revocation_error(config, e)),
        None => Ok(()),
    }
}

/// YAML -> `ConfigFile`, with the field path of any error.
fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
    let err = |field: &str, message: String, hint: Option<String>| ConfigError {
        file: path.to_path_buf(),
        field: field.to_string(),
        message,
        hint,
    };
    // A first, shape-free parse tells an empty file (which must never mean "allow all" or
    // silently "no routes") from a real one.
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        let message = hide_values(&e.to_string(), Names::Shown);
        let (field, message) = split_yaml_path(&message);
        err(field, format!("invalid YAML: {message}"), None)
    })?;
    if value.is_null() {
        return Err(err(
            "",
            "the config file is empty".to_string(),
            Some("start from the shipped config/portcullis.yaml".to_string()),
        ));
    }
    if !value.is_mapping() {
        return Err(err(
            "",
            "the top level must be a mapping of sections (`server`, `issuers`, `routes`, ...)"
                .to_string(),
            None,
        ));
    }
    // `dry_run:` with nothing under it (its lines commented out) would read as no dry run at
    // all: say so instead of trying nothing in silence.
    if value.get("dry_run").is_some_and(serde_yaml::Value::is_null) {
        return Err(err(
            "dry_run",
            "is empty: there is nothing to try out".to_string(),
            Some(
                "list changed or new routes under `dry_run.routes` and the ids of routes to \
                 drop under `dry_run.remove`, or remove the `dry_run:` line"
                    .to_string(),
            ),
        ));
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut field = match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        let written_at = locate::locate(text, e.path());
        let message = hide_values(&e.into_inner().to_string(), Names::Shown);
        let message = closer_location(message, written_at);
        // serde_yaml repeats (a shorter form of) the path in front of its message.
        let (_, message) = split_yaml_path(&message);
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(missing);
        }
        let hint = parse_hint(message);
        err(&field, message.to_string(), hint)
    })
}

/// `message` with its ` at line L column C` moved to `written_at` (where the field's path
/// leads in the file) when that is further down: serde_yaml places an error a value's own
/// parser raises (a duration, a size, an empty value) at the start of the mapping around it.
/// Both point at or before the mistake, so the later one is the closer.
fn closer_location(message: String, written_at: Option<(usize, usize)>) -> String {
    let Some((line, column)) = written_at else {
        return message;
    };
    let Some(at) = message.rfind(" at line ") else {
        return message;
    };
    let place = &message[at + " at line ".len()..];
    let reported = place
        .split_once(" column ")
        .and_then(|(l, c)| Some((l.parse::<usize>().ok()?, c.parse::<usize>().ok()?)));
    match reported {
        Some(reported) if (line, column) > reported => {
            format!("{} at line {line} column {column}", &message[..at])
        }
        _ => message,
    }
}

/// What [`hide_values`] shows of the names serde quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Names {
    /// Unknown field names and duplicate keys stay: they are keys, and naming a typo is the
    /// point of the message.
    Shown,
    /// Hidden as well: in the API key file any text may be a key pasted in the wrong place.
    Hidden,
}

/// Shown in place of a value serde would have quoted.
pub(super) const NOT_SHOWN: &str = "(value not shown)";

/// `message`, a serde or serde_yaml error, without the values it quotes from the file.
///
/// serde quotes the offending value (`invalid type: string "redis://:pw@host/0", expected
/// struct StateConfig`, `unknown variant `redis://:pw@host``), so a secret written in the
/// wrong shape (a Redis URL in place of the `state` section, a webhook URL in place of
/// `approvals.webhook`, a plain API key in place of an entry) would otherwise be printed by
/// `portcullis check` and logged by a refused reload. The kind of value, the expected shape
/// and the line stay; the field path is the caller's and stays too.
pub(super) fn hide_values(message: &str, names: Names) -> String {
    let mut out = message.to_string();
    // `invalid type: <unexpected>, expected <what>` and `invalid value: ...`: the quoted
    // value may hold anything, `, expected ` included, so the last one ends it.
    for marker in ["invalid type: ", "invalid value: "] {
        if let Some(at) = out.find(marker) {
            let start = at + marker.len();
            let end = out[start..]
                .rfind(", expected ")
                .map_or(out.len(), |e| start + e);
            let shown = hide_unexpected(&out[start..end]);
            out.replace_range(start..end, &shown);
        }
    }
    // `unknown variant `<value>`, expected ...`: a variant is a value written in the file.
    let mut quoted = vec!["unknown variant `"];
    if names == Names::Hidden {
        quoted.push("unknown field `");
    }
    for marker in quoted {
        if let Some(at) = out.find(marker) {
            let start = at + marker.len() - 1;
            let end = ["`, expected ", "`, there are no "]
                .iter()
                .find_map(|tail| out[start + 1..].rfind(tail))
                .map_or(out.len(), |e| start + 1 + e + 1);
            out.replace_range(start..end, NOT_SHOWN);
        }
    }
    if names == Names::Hidden {
        // serde_yaml's `duplicate entry with key "<key>"`, the key quoted as Rust does.
        let marker = "duplicate entry with key ";
        if let Some(at) = out.find(marker) {
            let start = at + marker.len();
            let end = debug_quoted_len(&out[start..]).map_or(out.len(), |n| start + n);
            out.replace_range(start..end, NOT_SHOWN);
        }
    }
    out
}

/// The length of the string quoted as `{:?}` does at the start of `text` (quotes included),
/// `None` when it does not start with one or it is not closed.
fn debug_quoted_len(text: &str) -> Option<usize> {
    let mut chars = text.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// serde's description of an unexpected value (`string "x"`, `integer `5``, `map`) with the
/// value replaced by [`NOT_SHOWN`]; kinds that quote nothing (`map`, `sequence`) and booleans
/// (no secret in `true`) stay.
fn hide_unexpected(unexpected: &str) -> String {
    match unexpected.find(['`', '"']) {
        None => unexpected.to_string(),
        Some(_) if matches!(unexpected, "boolean `true`" | "boolean `false`") => {
            unexpected.to_string()
        }
        Some(0) => NOT_SHOWN.to_string(),
        Some(q) => format!("{} {NOT_SHOWN}", unexpected[..q].trim_end()),
    }
}

/// Splits serde_yaml's `path: message` into its parts (`""` when there is no path).
fn split_yaml_path(message: &str) -> (&str, &str) {
    match message.split_once(": ") {
        Some((path, rest))
            if !path.is_empty()
                && !path.contains(|c: char| c.is_whitespace() || c == '`' || c == '"') =>
        {
            (path, rest)
        }
        _ => ("", message),
    }
}

/// A hint for a serde error message.
fn parse_hint(message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let unknown = rest.split('`').next().unwrap_or_default();
        let expected: Vec<&str> = rest
            .split_once("expected")
            .map(|(_, e)| e.split('`').skip(1).step_by(2).collect())
            .unwrap_or_default();
        if let Some(best) = closest(unknown, &expected) {
            return Some(format!("did you mean `{best}`?"));
        }
        if !expected.is_empty() {
            return Some(format!("valid fields here: {}", expected.join(", ")));
        }
        return None;
    }
    if message.contains("invalid duration") && !message.contains("e.g.") {
        return Some("write durations like `30s`, `15m`, `1h 30m` or `250ms`".to_string());
    }
    if message.starts_with("missing field `") {
        let name = message.split('`').nth(1).unwrap_or_default();
        return Some(format!("add `{name}:`"));
    }
    if message.starts_with(schema::EMPTY_LIST) {
        return Some(
            "an absent key means no restriction here: remove the key for that, or list at \
             least one item"
                .to_string(),
        );
    }
    if message.starts_with(schema::EMPTY_SECTION) {
        return Some(
            "an absent key means no such restriction: remove the key for that, or fill it in"
                .to_string(),
        );
    }
    if message.contains("expected a sequence") {
        return Some("write a list, e.g. `[a, b]`".to_string());
    }
    None
}

/// The candidate closest to `word` by edit distance, when it is close enough to be a typo.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.len() / 3).max(2);
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Validation and compilation of a parsed file.
struct Compiler {
    file: PathBuf,
    dir: PathBuf,
    warnings: Vec<String>,
    /// The compiled API keys, set before routes so rules can name them.
    api_keys: Option<Arc<crate::identity::apikey::ApiKeys>>,
    /// `network.trusted_headers`, validated: the only headers posture conditions may read.
    trusted_headers: HashSet<String>,
}

type Res<T> = Result<T, ConfigError>;

impl Compiler {
    fn new(path: &Path) -> Self {
        Compiler {
            file: path.to_path_buf(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            warnings: Vec::new(),
            api_keys: None,
            trusted_headers: HashSet::new(),
        }
    }

    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            field: field.into(),
            message: message.into(),
            hint: None,
        }
    }

    fn hint(
        &self,
        field: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            hint: Some(hint.into()),
            ..self.err(field, message)
        }
    }

    fn compile(mut self, file: ConfigFile) -> Res<Config> {
        let max_bytes = file.tokens.max_bytes;
        if !(TOKEN_BYTES_MIN..=TOKEN_BYTES_MAX).contains(&max_bytes) {
            return Err(self.err(
                "tokens.max_bytes",
                format!(
                    "`{max_bytes}` is out of range: use {TOKEN_BYTES_MIN} to {TOKEN_BYTES_MAX}"
                ),
            ));
        }

        let cache = &file.tokens.cache;
        if cache.capacity > 0 && cache.max_bytes.get() < CACHE_BYTES_MIN {
            return Err(self.hint(
                "tokens.cache.max_bytes",
                format!(
                    "`{}` is too small for a token cache: use at least 1MiB",
                    cache.max_bytes
                ),
                "to turn the cache off, set `tokens.cache.capacity: 0`",
            ));
        }

        if cache.max_ttl.get() > CACHE_TTL_MAX {
            return Err(self.hint(
                "tokens.cache.max_ttl",
                format!("`{}` is too long: use at most 24h", cache.max_ttl),
                "a cached token is never kept past its `exp` anyway; the default is `5m`",
            ));
        }

        self.listeners(&file)?;

        let mut issuers: Vec<Arc<CompiledIssuer>> = Vec::with_capacity(file.issuers.len());
        let shared_state = file.state.backend == schema::StateBackend::Redis;
        for (i, ic) in file.issuers.iter().enumerate() {
            let compiled = self.issuer(i, ic, max_bytes, shared_state)?;
            let field = format!("issuers[{i}]");
            if &*compiled.name == crate::identity::apikey::API_KEY_ISSUER {
                return Err(self.hint(
                    format!("{field}.name"),
                    format!(
                        "the issuer name `{}` is reserved for API keys",
                        compiled.name
                    ),
                    "give the issuer another `name`",
                ));
            }
            if issuers.iter().any(|o| o.name == compiled.name) {
                return Err(self.hint(
                    format!("{field}.name"),
                    format!("duplicate issuer name `{}`", compiled.name),
                    "give each issuer a unique `name`",
                ));
            }
            if issuers
                .iter()
                .any(|o| o.rules.issuer == compiled.rules.issuer && o.header == compiled.header)
            {
                return Err(self.err(
                    format!("{field}.issuer"),
                    format!(
                        "issuer `{}` is already configured for header `{}`",
                        compiled.rules.issuer, compiled.header
                    ),
                ));
            }
            issuers.push(Arc::new(compiled));
        }

        self.identity_headers(&file, &issuers)?;
        self.state_and_approvals(&file)?;
        self.shutdown(&file)?;
        self.api_keys = self.api_keys(&file, &issuers)?;
        self.trusted_headers(&file, &issuers)?;
        let revocation_file = self.revocation(&file)?;
        self.tls(&file)?;

        if file.routes.is_empty() {
            return Err(self.hint(
                "routes",
                "no routes are configured: every request would be denied",
                "add at least one route; a deny-all setup needs no Portcullis",
            ));
        }
        let issuer_names: HashSet<&str> = issuers.iter().map(|i| &*i.name).collect();
        let routes = self.routes("routes", &file.routes, &issuer_names)?;
        let shut = closed_without_identity(&routes);
        if issuers.is_empty() && self.api_keys.is_none() && !shut.is_empty() {
            self.warnings.push(format!(
                "no issuers are configured: route(s) {} answer 401 to every request (without \
                 issuers or API keys only public routes and service grants by `principals` \
                 can allow)",
                shut.join(", ")
            ));
        }

        let dry_run = self.dry_run(&file, &issuer_names, &routes)?;
        let policy = Policy::new(routes);
        let live_warnings: Vec<String> = policy
            .shadow_warnings()
            .into_iter()
            .chain(policy.head_warnings())
            .collect();
        if let Some(candidate) = &dry_run {
            // Only what the changes bring: the live routes' own findings are reported once.
            let new = candidate
                .shadow_warnings()
                .into_iter()
                .chain(candidate.head_warnings());
            self.warnings.extend(
                new.filter(|w| !live_warnings.contains(w))
                    .map(|w| format!("dry_run: {w}")),
            );
        }
        self.warnings.extend(live_warnings);
        let api_keys = self.api_keys.take();
        let rate_limits = self.rate_limits(&file, api_keys.as_deref())?;
        self.unused_key_warnings(&file, api_keys.as_deref());
        self.key_endpoint_warnings(&file, api_keys.as_deref());
        let mut credential_headers: Vec<String> = issuers
            .iter()
            .map(|i| i.header.clone())
            .chain(api_keys.as_ref().map(|k| k.header.clone()))
            .collect();
        credential_headers.sort_unstable();
        credential_headers.dedup();
        Ok(Config {
            source: self.file,
            file,
            issuers,
            policy,
            dry_run,
            warnings: self.warnings,
            api_keys,
            rate_limits,
            revocation_file,
            credential_headers,
        })
    }

    fn issuer(
        &mut self,
        i: usize,
        ic: &IssuerConfig,
        max_bytes: usize,
        shared_state: bool,
    ) -> Res<CompiledIssuer> {
        let f = |s: &str| format!("issuers[{i}].{s}");
        if ic.issuer.trim().is_empty() || ic.issuer.trim() != ic.issuer {
            return Err(self.err(
                f("issuer"),
                "the issuer must be the exact, non-empty `iss` value",
            ));
        }
        let name = ic.name.clone().unwrap_or_else(|| ic.issuer.clone());
        if name.trim().is_empty() {
            return Err(self.err(f("name"), "the issuer name must not be empty"));
        }
        if ic.audiences.is_empty() {
            return Err(self.hint(
                f("audiences"),
                "at least one audience is required",
                "list the `aud` values your API accepts, e.g. `[orders-api]`",
            ));
        }
        if let Some(j) = ic.audiences.iter().position(|a| a.trim().is_empty()) {
            return Err(self.err(f(&format!("audiences[{j}]")), "empty audience"));
        }

        // Key source: exactly one of file / url / discovery.
        let keys = &ic.keys;
        let set: Vec<&str> = [
            ("file", keys.file.is_some()),
            ("url", keys.url.is_some()),
            ("discovery", keys.discovery),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
        if set.len() != 1 {
            let found = if set.is_empty() {
                "none is set".to_string()
            } else {
                format!("found {}", set.join(" and "))
            };
            return Err(self.hint(
                f("keys"),
                format!("exactly one of `file`, `url` or `discovery: true` is required, {found}"),
                "e.g. `keys: { url: https://idp.example.com/jwks.json }`",
            ));
        }
        if let Some(url) = &keys.url {
            self.check_url(&f("keys.url"), url, keys.allow_http)?;
        }
        if keys.discovery {
            self.check_url(&f("issuer"), &ic.issuer, keys.allow_http)?;
        }
        // Past `max_stale` (a day by default) keys not refreshed fail closed anyway; a longer
        // interval is a typo, and an enormous one overflowed the refresh schedule.
        for (name, d) in [
            ("min_refresh", &keys.min_refresh),
            ("max_refresh", &keys.max_refresh),
        ] {
            if d.get() > crate::keys::MAX_REFRESH {
                return Err(self.hint(
                    f(&format!("keys.{name}")),
                    format!("`{d}` is too long: use at most 24h"),
                    "the defaults are `min_refresh: 1m` and `max_refresh: 1h`",
                ));
            }
        }
        if keys.min_refresh > keys.max_refresh {
            return Err(self.err(
                f("keys.min_refresh"),
                format!(
                    "min_refresh ({}) is greater than max_refresh ({})",
                    keys.min_refresh, keys.max_refresh
                ),
            ));
        }
        // Keys not loaded again within `max_stale` fail closed: an interval between loads as
        // long as that refuses every token for part of each interval, the issuer healthy.
        // Files are re-read every `min_refresh`; fetched sets are due at most `max_refresh`
        // after the last load.
        let (interval, longest) = match keys.file {
            Some(_) => ("min_refresh", &keys.min_refresh),
            None => ("max_refresh", &keys.max_refresh),
        };
        if *longest >= keys.max_stale {
            return Err(self.hint(
                f("keys.max_stale"),
                format!(
                    "max_stale ({}) is not longer than {interval} ({longest}): the keys would turn \
                     stale before they are loaded again, refusing every token until then",
                    keys.max_stale
                ),
                "keep max_stale well above it (the default is 24h, with max_refresh 1h)",
            ));
        }
        // Zero intervals would let a flood of unknown `kid`s (or a zero max-age) turn every
        // request into a fetch against the identity provider.
        for (name, d) in [
            ("min_refresh", &keys.min_refresh),
            ("unknown_kid_interval", &keys.unknown_kid_interval),
        ] {
            if d.get().as_secs() == 0 {
                return Err(self.err(f(&format!("keys.{name}")), "must be at least 1s"));
            }
        }
        if keys.max_bytes.get() == 0 {
            return Err(self.err(f("keys.max_bytes"), "must be greater than 0"));
        }
        if keys.fetch_timeout.get().is_zero() {
            return Err(self.err(f("keys.fetch_timeout"), "must be greater than 0"));
        }
        let mut resolved_keys = keys.clone();
        if let Some(file) = &keys.file {
            let resolved = crate::keys::resolve_path(&self.dir, file);
            if !resolved.is_file() {
                return Err(self.hint(
                    f("keys.file"),
                    format!("key file `{}` does not exist", resolved.display()),
                    "relative paths are resolved against the config file's folder",
                ));
            }
            resolved_keys.file = Some(resolved);
        }

        let algorithms = match &ic.algorithms {
            None => DEFAULT_ALGORITHMS.to_vec(),
            Some(list) if list.is_empty() => {
                return Err(self.hint(
                    f("algorithms"),
                    "the list is empty: no token could ever verify",
                    "omit `algorithms` for the asymmetric defaults",
                ));
            }
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (j, a) in list.iter().enumerate() {
                    let field = f(&format!("algorithms[{j}]"));
                    if a.eq_ignore_ascii_case("none") {
                        return Err(self.err(field, "`none` (unsigned tokens) is never accepted"));
                    }
                    let alg = Algorithm::from_str(a).map_err(|_| {
                        self.hint(
                            &field,
                            format!("unknown algorithm `{a}`"),
                            "use one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA (HS256/384/512 only with `keys.file`)",
                        )
                    })?;
                    let hmac =
                        matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
                    if hmac && keys.file.is_none() {
                        return Err(self.hint(
                            field,
                            format!("`{a}` (a shared secret) is only accepted with keys from a local `file`"),
                            "a fetched key set is public: a symmetric key in it would let anyone sign tokens",
                        ));
                    }
                    if !out.contains(&alg) {
                        out.push(alg);
                    }
                }
                out
            }
        };

        let header = ic.token.header.to_ascii_lowercase();
        if !valid_header_name(&header) {
            return Err(self.err(
                f("token.header"),
                format!("`{}` is not a valid header name", ic.token.header),
            ));
        }
        let scheme = ic.token.scheme.clone();
        if !scheme.bytes().all(is_tchar) {
            return Err(self.hint(
                f("token.scheme"),
                format!("`{scheme}` is not a valid authorization scheme"),
                "e.g. `Bearer`, or `\"\"` for a bare header value",
            ));
        }
        if scheme.is_empty() && header == "authorization" {
            self.warnings.push(format!(
                "issuers[{i}]: a bare token in the `authorization` header (empty scheme) is unusual"
            ));
        }
        if ic.claims.scopes.trim().is_empty() {
            return Err(self.err(f("claims.scopes"), "the claim path must not be empty"));
        }
        if ic.claims.roles.trim().is_empty() {
            return Err(self.err(f("claims.roles"), "the claim path must not be empty"));
        }
        if let Some(typ) = &ic.required_typ
            && typ.trim().is_empty()
        {
            return Err(self.hint(
                f("required_typ"),
                "must not be empty",
                "e.g. `at+jwt`, or omit the field",
            ));
        }
        if let Some(l) = &ic.max_lifetime
            && l.get().as_secs() == 0
        {
            return Err(self.err(f("max_lifetime"), "must be at least 1s"));
        }
        if ic.leeway.get().as_secs() > 300 {
            self.warnings.push(format!(
                "issuers[{i}].leeway: {} of clock skew is unusually large",
                ic.leeway
            ));
        }

        let mut dpop = self.dpop(i, ic, &header, max_bytes)?;
        dpop.nonce = self.dpop_nonce(i, ic, &name, shared_state)?.map(Arc::new);
        Ok(CompiledIssuer {
            dpop,
            cert_bound: ic.cert_bound,
            name: Arc::from(name),
            rules: JwtRules {
                issuer: ic.issuer.clone(),
                audiences: ic.audiences.clone(),
                algorithms,
                leeway_secs: ic.leeway.get().as_secs(),
                max_lifetime_secs: ic.max_lifetime.as_ref().map(|d| d.get().as_secs()),
                required_typ: ic.required_typ.clone(),
                max_token_bytes: max_bytes,
            },
            claims: ClaimPaths {
                scopes: ic.claims.scopes.clone(),
                roles: ic.claims.roles.clone(),
            },
            header,
            scheme,
            keys: resolved_keys,
        })
    }

    /// DPoP settings of one issuer.
    fn dpop(&self, i: usize, ic: &IssuerConfig, header: &str, max_bytes: usize) -> Res<DpopRules> {
        let f = |s: &str| format!("issuers[{i}].{s}");
        if ic.dpop != DpopMode::Disabled && header != "authorization" {
            return Err(self.hint(
                f("dpop"),
                format!("DPoP needs the token in the `authorization` header, not `{header}`"),
                "remove `token.header`, or set `dpop: disabled`",
            ));
        }
        let algorithms = match &ic.dpop_algorithms {
            None => DEFAULT_DPOP_ALGORITHMS.to_vec(),
            Some(list) if list.is_empty() => {
                return Err(self.hint(
                    f("dpop_algorithms"),
                    "the list is empty: no proof could ever verify",
                    "omit `dpop_algorithms` for the defaults",
                ));
            }
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (j, a) in list.iter().enumerate() {
                    // An unknown name (`ES512`, `es256`) is not called symmetric: that would
                    // send the user looking for another reason than the spelling.
                    let problem = match Algorithm::from_str(a) {
                        Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => {
                            Err(format!("`{a}` is not an asymmetric algorithm"))
                        }
                        Ok(alg) => Ok(alg),
                        Err(_) => Err(format!("unknown algorithm `{a}`")),
                    };
                    let alg = match problem {
                        Ok(alg) => alg,
                        Err(message) => {
                            return Err(self.hint(
                                f(&format!("dpop_algorithms[{j}]")),
                                message,
                                "use ES256, ES384, EdDSA, RS256, RS384, RS512, PS256, PS384 or PS512",
                            ));
                        }
                    };
                    if !out.contains(&alg) {
                        out.push(alg);
                    }
                }
                out
            }
        };
        let window = ic.dpop_window.get().as_secs();
        if !(1..=600).contains(&window) {
            return Err(self.err(f("dpop_window"), "must be between 1s and 10m"));
        }
        Ok(DpopRules {
            mode: ic.dpop,
            algorithms,
            window_secs: window,
            max_proof_bytes: max_bytes,
            nonce: None,
        })
    }

    /// `issuers[i].dpop_nonce`: the nonce secret (read here, never echoed) and lifetime.
    fn dpop_nonce(
        &mut self,
        i: usize,
        ic: &IssuerConfig,
        name: &str,
        shared_state: bool,
    ) -> Res<Option<NonceRules>> {
        let f = |s: &str| format!("issuers[{i}].dpop_nonce{s}");
        let Some(nc) = &ic.dpop_nonce else {
            return Ok(None);
        };
        if ic.dpop == DpopMode::Disabled {
            return Err(self.hint(
                f(""),
                "nonces are for DPoP proofs, and this issuer does not accept DPoP",
                "set `dpop: optional` or `dpop: required`, or remove `dpop_nonce`",
            ));
        }
        let lifetime = nc.lifetime.get().as_secs();
        if !(5..=3600).contains(&lifetime) {
            return Err(self.err(f(".lifetime"), "must be between 5s and 1h"));
        }
        let (secret, source) = match &nc.secret_file {
            Some(file) => {
                let path = crate::keys::resolve_path(&self.dir, file);
                let secret = std::fs::read(&path).map_err(|e| {
                    self.err(
                        f(".secret_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(self.hint(
                        f(".secret_file"),
                        format!(
                            "{} holds {} bytes; a nonce secret needs at least {MIN_SECRET_BYTES}",
                            path.display(),
                            secret.len()
                        ),
                        "e.g. `head -c 32 /dev/urandom > dpop-nonce.key`",
                    ));
                }
                (secret, Some(path))
            }
            None => {
                let secret = process_nonce_secret()
                    .map_err(|_| self.err(f(""), "no randomness available for a nonce secret"))?
                    .to_vec();
                if shared_state {
                    self.warnings.push(format!(
                        "issuers[{i}].dpop_nonce: without `secret_file` each replica makes its \
                         own nonces, and refuses the others' (clients retry until they reach \
                         the same replica twice); give every replica the same `secret_file`"
                    ));
                }
                (secret, None)
            }
        };
        Ok(Some(NonceRules::new(&secret, name, lifetime, source)))
    }

    /// Every `server.*listen` is an IP address and port (what the listeners bind: a host
    /// name or a port out of range is refused here, naming the field, not when serving), and
    /// no two listeners share an address (port 0, any free port, never clashes).
    fn listeners(&self, file: &ConfigFile) -> Res<()> {
        let server = &file.server;
        if server.max_connections == 0 {
            return Err(self.hint(
                "server.max_connections",
                "is 0, so no connection (not even Envoy's) would be served",
                "leave it out for 4096, or give the most connections each ext_authz listener \
                 may hold open (Envoy needs a handful per worker thread)",
            ));
        }
        let all = [
            ("listen", Some(&server.listen)),
            ("admin_listen", Some(&server.admin_listen)),
            ("http_listen", server.http_listen.as_ref()),
            ("approvals_listen", server.approvals_listen.as_ref()),
        ];
        let mut bound: Vec<(&str, &str, std::net::SocketAddr)> = Vec::new();
        for (name, text) in all {
            let Some(text) = text else { continue };
            let field = format!("server.{name}");
            let addr: std::net::SocketAddr = text.parse().map_err(|_| {
                self.hint(
                    field.clone(),
                    format!("`{text}` is not an IP address and port"),
                    "e.g. `127.0.0.1:9191`, `0.0.0.0:9191` or `[::]:9191` (host names are not \
                     resolved; ports go up to 65535)",
                )
            })?;
            for (other, other_text, other_addr) in &bound {
                if listeners_clash(*other_addr, addr) {
                    let message = if addr == *other_addr {
                        format!("`{text}` is also `server.{other}`")
                    } else {
                        format!("`{text}` overlaps `server.{other}` (`{other_text}`)")
                    };
                    let hint = if name == "approvals_listen" {
                        "give the approvals API an address of its own, or remove \
                         `approvals_listen` to serve it on `listen`"
                    } else {
                        "give each listener an address of its own"
                    };
                    return Err(self.hint(field, message, hint));
                }
            }
            bound.push((name, text, addr));
        }
        Ok(())
    }

    /// The gRPC listeners' TLS files exist, client verification is coherent, and the
    /// approvals listener has TLS when the Check listener has it.
    fn tls(&self, file: &ConfigFile) -> Res<()> {
        let server = &file.server;
        if let Some(tls) = &server.tls {
            self.tls_section("server.tls", tls)?;
        }
        if let Some(tls) = &server.approvals_tls {
            if server.approvals_listen.is_none() {
                return Err(self.hint(
                    "server.approvals_tls",
                    "is set but `approvals_listen` is not, so no listener would use it",
                    "add `approvals_listen: 0.0.0.0:9194` (the approvals API moves there), or use `server.tls` for the shared listener",
                ));
            }
            self.tls_section("server.approvals_tls", tls)?;
        }
        if server.approvals_listen.is_some()
            && server.tls.is_some()
            && server.approvals_tls.is_none()
        {
            return Err(self.hint(
                "server.approvals_tls",
                "`server.tls` protects the Check listener but `approvals_listen` would be plaintext",
                "add `approvals_tls` with the certificate and key, and a `client_ca` (and `allowed_client_principals`) for your approvers",
            ));
        }
        Ok(())
    }

    /// `state.tls`: a client certificate comes with its key, and the files exist. Their
    /// contents are read by `crate::state::redis::load_tls` (at start, and by `check`).
    fn state_tls(&self, tls: &schema::StateTlsConfig) -> Res<()> {
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => {
                return Err(self.hint(
                    "state.tls.key_file",
                    "`cert_file` is set without its private key",
                    "set both `cert_file` and `key_file` (mutual TLS), or neither",
                ));
            }
            (None, Some(_)) => {
                return Err(self.hint(
                    "state.tls.cert_file",
                    "`key_file` is set without its certificate",
                    "set both `cert_file` and `key_file` (mutual TLS), or neither",
                ));
            }
            _ => {}
        }
        let files = [
            ("ca_file", &tls.ca_file),
            ("cert_file", &tls.cert_file),
            ("key_file", &tls.key_file),
        ];
        for (name, path) in files {
            if let Some(path) = path {
                self.existing_file(&format!("state.tls.{name}"), path)?;
            }
        }
        Ok(())
    }

    /// `field`'s file, resolved against the config file's folder, exists.
    fn existing_file(&self, field: &str, path: &Path) -> Res<()> {
        let resolved = crate::keys::resolve_path(&self.dir, path);
        if resolved.is_file() {
            return Ok(());
        }
        Err(self.hint(
            field,
            format!("file `{}` does not exist", resolved.display()),
            "relative paths are resolved against the config file's folder",
        ))
    }

    /// One listener's TLS section (`field`): its files exist and client verification is
    /// coherent.
    fn tls_section(&self, field: &str, tls: &TlsConfig) -> Res<()> {
        let mut files = vec![("cert", &tls.cert), ("key", &tls.key)];
        if let Some(ca) = &tls.client_ca {
            files.push(("client_ca", ca));
        }
        for (name, path) in files {
            self.existing_file(&format!("{field}.{name}"), path)?;
        }
        if tls.client_ca.is_none() && tls.require_client_cert {
            return Err(self.hint(
                format!("{field}.client_ca"),
                "client certificates are required but no `client_ca` verifies them",
                "add `client_ca: envoy-ca.pem`, or `require_client_cert: false` for TLS without client certificates",
            ));
        }
        // With `require_client_cert: false` the hint above is already followed: say what
        // still needs the CA.
        if tls.client_ca.is_none() && !tls.allowed_client_principals.is_empty() {
            return Err(self.hint(
                format!("{field}.client_ca"),
                "`allowed_client_principals` is read from verified client certificates, and \
                 no `client_ca` verifies them",
                "add `client_ca: envoy-ca.pem`, or remove `allowed_client_principals` for TLS \
                 without client certificates",
            ));
        }
        for (j, p) in tls.allowed_client_principals.iter().enumerate() {
            PrincipalPattern::parse(p).map_err(|e| {
                self.err(
                    format!("{field}.allowed_client_principals[{j}]"),
                    format!("invalid principal `{p}`: {e}"),
                )
            })?;
        }
        Ok(())
    }

    /// A key or discovery URL: https, or http to a loopback host, or http with `allow_http`.
    fn check_url(&self, field: &str, url: &str, allow_http: bool) -> Res<()> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(self.hint(
                field,
                format!("`{url}` is not a URL"),
                "e.g. `https://idp.example.com`",
            ));
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            // Credentials in a URL end up in logs; refuse them without echoing the URL.
            return Err(self.err(field, "the URL must not contain user credentials"));
        }
        let host = crate::authz::policy::normalize_host(authority);
        let host = &*host;
        if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.err(field, format!("`{url}` is not a valid URL")));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "https" => Ok(()),
            "http" if allow_http || is_loopback(host) => Ok(()),
            "http" => Err(self.hint(
                field,
                format!("`{url}` uses plain http to a non-loopback host"),
                "use https, or set `keys.allow_http: true` for a test setup",
            )),
            _ => Err(self.err(
                field,
                format!("unsupported URL scheme `{scheme}`: use https"),
            )),
        }
    }

    fn identity_headers(&self, file: &ConfigFile, issuers: &[Arc<CompiledIssuer>]) -> Res<()> {
        for (name, claim) in &file.upstream.identity_headers {
            let field = format!("upstream.identity_headers.{name}");
            if name.starts_with(':') {
                return Err(self.err(field, format!("`{name}` is a pseudo-header")));
            }
            if *name != name.to_ascii_lowercase() {
                return Err(self.hint(
                    field,
                    format!("header name `{name}` must be lower-case"),
                    format!("write `{}`", name.to_ascii_lowercase()),
                ));
            }
            if !valid_header_name(name) {
                return Err(self.err(field, format!("`{name}` is not a valid header name")));
            }
            if FORBIDDEN_IDENTITY_HEADERS.contains(&name.as_str()) {
                return Err(self.err(
                    field,
                    format!(
                        "`{name}` cannot carry identity (it is a protocol or credential header)"
                    ),
                ));
            }
            if issuers.iter().any(|i| i.header == *name) {
                return Err(self.err(
                    field,
                    format!("`{name}` is where an issuer's token is read from"),
                ));
            }
            if claim.trim().is_empty() {
                return Err(self.err(field, "the claim path must not be empty"));
            }
        }
        Ok(())
    }

    /// One list of routes (`list` names it in errors): each compiled, ids distinct.
    fn routes(
        &mut self,
        list: &'static str,
        configs: &[RouteConfig],
        issuers: &HashSet<&str>,
    ) -> Res<Vec<CompiledRoute>> {
        let mut routes = Vec::with_capacity(configs.len());
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for (i, rc) in configs.iter().enumerate() {
            if let Some(first) = ids.insert(rc.id.as_str(), i) {
                return Err(self.err(
                    format!("{list}[{i}].id"),
                    format!("duplicate route id `{}` (also {list}[{first}])", rc.id),
                ));
            }
            routes.push(self.route(&format!("{list}[{i}]"), rc, issuers)?);
        }
        Ok(routes)
    }

    /// `dry_run`: the candidate policy, the `live` routes with `dry_run.routes` replacing
    /// the route of the same id (or added after them) and the `dry_run.remove` ids dropped.
    fn dry_run(
        &mut self,
        file: &ConfigFile,
        issuers: &HashSet<&str>,
        live: &[CompiledRoute],
    ) -> Res<Option<Policy>> {
        let Some(dry_run) = &file.dry_run else {
            return Ok(None);
        };
        if dry_run.routes.is_empty() && dry_run.remove.is_empty() {
            return Err(self.hint(
                "dry_run",
                "no routes to change and none to remove: there is nothing to try out",
                "list changed or new routes under `dry_run.routes` and the ids of routes to \
                 drop under `dry_run.remove`, or remove `dry_run`",
            ));
        }
        let changed = self.routes("dry_run.routes", &dry_run.routes, issuers)?;
        let live_ids: Vec<&str> = live.iter().map(|r| &*r.id).collect();
        for (k, id) in dry_run.remove.iter().enumerate() {
            let field = format!("dry_run.remove[{k}]");
            if dry_run.remove[..k].contains(id) {
                return Err(self.err(field, format!("`{id}` is listed twice")));
            }
            if !live_ids.contains(&id.as_str()) {
                let hint = match closest(id, &live_ids) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => "use the `id` of a route in `routes`".to_string(),
                };
                return Err(self.hint(field, format!("unknown route `{id}`"), hint));
            }
            if changed.iter().any(|r| *r.id == **id) {
                return Err(self.err(
                    field,
                    format!("`{id}` is also in `dry_run.routes`: change a route or remove it"),
                ));
            }
        }
        let mut routes = Vec::with_capacity(live.len() + changed.len());
        for route in live {
            if dry_run.remove.iter().any(|id| **id == *route.id) {
                continue;
            }
            let replacement = changed.iter().find(|r| r.id == route.id);
            routes.push(replacement.unwrap_or(route).clone());
        }
        let added = changed.iter().filter(|r| !live_ids.contains(&&*r.id));
        routes.extend(added.cloned());
        for (i, rc) in dry_run.routes.iter().enumerate() {
            if file.routes.iter().any(|live| same_route(live, rc)) {
                self.warnings.push(format!(
                    "dry_run.routes[{i}]: `{}` is the same as the live route: the dry run changes nothing there",
                    rc.id
                ));
            }
        }
        let protected = |rs: &[CompiledRoute]| !closed_without_identity(rs).is_empty();
        if issuers.is_empty() && self.api_keys.is_none() && !protected(live) && protected(&routes) {
            self.warnings.push(
                "dry_run: no issuers are configured: every non-public candidate route would answer 401"
                    .to_string(),
            );
        }
        if routes.is_empty() {
            self.warnings.push(
                "dry_run: the candidate removes every route: it would deny every request"
                    .to_string(),
            );
        }
        Ok(Some(Policy::new(routes)))
    }

    /// One route; `at` names it in errors (`routes[2]`, `dry_run.routes[0]`).
    fn route(&mut self, at: &str, rc: &RouteConfig, issuers: &HashSet<&str>) -> Res<CompiledRoute> {
        let f = |s: &str| format!("{at}.{s}");
        if rc.id.trim().is_empty() {
            return Err(self.err(f("id"), "the route id must not be empty"));
        }
        let mut hosts = Vec::with_capacity(rc.hosts.len());
        for (j, h) in rc.hosts.iter().enumerate() {
            let p = HostPattern::parse(h).map_err(|m| self.err(f(&format!("hosts[{j}]")), m))?;
            if !hosts.contains(&p) {
                hosts.push(p);
            }
        }
        if rc.methods.is_empty() {
            return Err(self.hint(
                f("methods"),
                "no methods: the route would match nothing",
                "e.g. `methods: [GET]`",
            ));
        }
        let mut methods: Vec<Box<str>> = Vec::with_capacity(rc.methods.len());
        for (j, m) in rc.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(is_tchar) {
                return Err(self.err(
                    f(&format!("methods[{j}]")),
                    format!("`{m}` is not a valid HTTP method"),
                ));
            }
            if m == "*" {
                return Err(self.hint(
                    f(&format!("methods[{j}]")),
                    "`*` is not a method: there is no any-method wildcard",
                    "list the methods explicitly, e.g. `[GET, POST]`",
                ));
            }
            if m.bytes().any(|b| b.is_ascii_lowercase()) {
                self.warnings.push(format!(
                    "{at}.methods[{j}]: `{m}` is not upper-case; methods are case-sensitive, so it will not match `{}`",
                    m.to_ascii_uppercase()
                ));
            }
            if !methods.iter().any(|x| **x == **m) {
                methods.push(Box::from(m.as_str()));
            }
        }
        let template = Template::parse(&rc.path).map_err(|e| {
            self.hint(
                f("path"),
                format!("invalid path template `{}`: {e}", rc.path),
                "e.g. `/orders/{id}`, `/files/*/raw` or `/admin/**`",
            )
        })?;
        match (rc.public, rc.rules.is_empty()) {
            (true, false) => {
                return Err(self.hint(
                    f("rules"),
                    "a public route cannot have rules",
                    "remove `public: true` to require the rules, or remove the rules",
                ));
            }
            (false, true) => {
                return Err(self.hint(
                    f("rules"),
                    "the route has no rules and is not public: it would grant nothing",
                    "add a rule, or `public: true` for a route that needs no identity",
                ));
            }
            _ => {}
        }
        if rc.public && template.segs.is_empty() && template.tail {
            self.warnings.push(format!(
                "{at}: route `{}` is public and matches every path: only more specific routes are protected",
                rc.id
            ));
        }
        let mut rules: Vec<CompiledRule> = Vec::with_capacity(rc.rules.len());
        for (j, rule) in rc.rules.iter().enumerate() {
            let compiled = self.rule(at, j, rc, rule, &template, issuers)?;
            if rules.iter().any(|r| r.id == compiled.id) {
                return Err(self.err(
                    format!("{at}.rules[{j}].id"),
                    format!("duplicate rule id `{}` in route `{}`", rule.id, rc.id),
                ));
            }
            rules.push(compiled);
        }
        Ok(CompiledRoute {
            id: Arc::from(rc.id.as_str()),
            hosts,
            methods,
            template,
            public: rc.public,
            rules,
        })
    }

    fn rule(
        &mut self,
        at: &str,
        j: usize,
        rc: &RouteConfig,
        rule: &RuleConfig,
        template: &Template,
        issuers: &HashSet<&str>,
    ) -> Res<CompiledRule> {
        let f = |s: &str| format!("{at}.rules[{j}].{s}");
        if rule.id.trim().is_empty() {
            return Err(self.err(f("id"), "the rule id must not be empty"));
        }
        for (k, name) in rule.issuers.iter().enumerate() {
            // A warning, not an error: removing an issuer from `issuers` is how an identity
            // provider stops being trusted, and refusing that reload kept it trusted. The
            // name stays in the rule, where it matches no caller.
            if !issuers.contains(name.as_str()) {
                let known: Vec<&str> = issuers.iter().copied().collect();
                let hint = match closest(name, &known) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => "use an issuer's `name` (it defaults to its `issuer` URL)".to_string(),
                };
                self.warnings.push(format!(
                    "{}: issuer `{name}` is not configured, so this rule grants its callers \
                     nothing: drop it from the rule if the issuer was removed, else {hint}",
                    f(&format!("issuers[{k}]"))
                ));
            }
        }
        for (k, s) in rule.scopes.iter().enumerate() {
            if s.is_empty() || s.chars().any(char::is_whitespace) {
                return Err(self.hint(
                    f(&format!("scopes[{k}]")),
                    format!("invalid scope `{s}`"),
                    "scopes are single words; list several as separate items",
                ));
            }
        }
        if let Some(k) = rule.roles.iter().position(|r| r.is_empty()) {
            return Err(self.err(f(&format!("roles[{k}]")), "empty role"));
        }
        let mut claims = Vec::with_capacity(rule.claims.len());
        for (k, c) in rule.claims.iter().enumerate() {
            let field = f(&format!("claims[{k}]"));
            if c.claim.trim().is_empty() {
                return Err(self.err(format!("{field}.claim"), "the claim path must not be empty"));
            }
            let test = match (&c.equals, &c.one_of, &c.contains) {
                (Some(v), None, None) => ClaimTest::Equals(v.clone()),
                (None, Some(v), None) if v.is_empty() => {
                    return Err(self.err(
                        format!("{field}.one_of"),
                        "the list is empty: the condition could never hold",
                    ));
                }
                (None, Some(v), None) => ClaimTest::OneOf(v.clone()),
                (None, None, Some(v)) => ClaimTest::Contains(v.clone()),
                _ => {
                    return Err(self.hint(
                        field,
                        "exactly one of `equals`, `one_of` or `contains` is required",
                        "e.g. `{ claim: email_verified, equals: true }`",
                    ));
                }
            };
            claims.push(ClaimCondition {
                claim: c.claim.clone(),
                test,
            });
        }
        let mut bind = Vec::with_capacity(rule.bind.len());
        for (k, b) in rule.bind.iter().enumerate() {
            let field = f(&format!("bind[{k}]"));
            let Some(param) = template.params().find(|p| *p == b.param) else {
                let names: Vec<String> = template.params().map(|p| format!("`{p}`")).collect();
                let hint = if names.is_empty() {
                    format!("the path `{}` has no `{{param}}` segments", rc.path)
                } else {
                    format!("parameters of `{}`: {}", rc.path, names.join(", "))
                };
                return Err(self.hint(
                    format!("{field}.param"),
                    format!("`{}` is not a parameter of the route's path", b.param),
                    hint,
                ));
            };
            let kind = match (&b.equals_claim, &b.in_claim) {
                (Some(c), None) if !c.trim().is_empty() => BindingKind::EqualsClaim(c.clone()),
                (None, Some(c)) if !c.trim().is_empty() => BindingKind::InClaim(c.clone()),
                (Some(_), None) | (None, Some(_)) => {
                    return Err(self.err(field, "the claim path must not be empty"));
                }
                _ => {
                    return Err(self.hint(
                        field,
                        "exactly one of `equals_claim` or `in_claim` is required",
                        "e.g. `{ param: user, equals_claim: sub }`",
                    ));
                }
            };
            bind.push(Binding {
                param: Arc::from(param),
                kind,
            });
        }
        let token_conditions = !rule.issuers.is_empty()
            || !rule.scopes.is_empty()
            || !rule.roles.is_empty()
            || !claims.is_empty();
        let keys = self.api_keys.clone();
        let api_keys = self.rule_api_keys(
            &f("api_keys"),
            &rule.api_keys,
            keys.as_deref(),
            token_conditions,
        )?;
        if let Some(approval) = &rule.approval {
            self.approval(&f("approval"), approval, issuers, &rule.issuers)?;
        }
        let mut principals = Vec::with_capacity(rule.principals.len());
        for (k, p) in rule.principals.iter().enumerate() {
            let pattern = PrincipalPattern::parse(p).map_err(|e| {
                self.hint(
                    f(&format!("principals[{k}]")),
                    format!("invalid principal `{p}`: {e}"),
                    "e.g. `spiffe://example.org/ns/shop/sa/checkout` or `spiffe://example.org/ns/shop/**`",
                )
            })?;
            principals.push(pattern);
        }
        if principals.is_empty()
            && rule.issuers.is_empty()
            && rule.scopes.is_empty()
            && rule.roles.is_empty()
            && claims.is_empty()
            && bind.is_empty()
            && api_keys.is_empty()
        {
            let context = rule.source.is_some()
                || rule.max_session_age.is_some()
                || rule.max_token_lifetime.is_some()
                || rule.time_window.is_some()
                || !rule.posture.is_empty()
                || rule.approval.is_some();
            self.warnings.push(if context {
                format!(
                    "{at}.rules[{j}]: rule `{}` has no conditions on the caller (issuers, scopes, roles, claims, bind): any valid token from any configured issuer that meets its context conditions is allowed",
                    rule.id
                )
            } else {
                format!(
                    "{at}.rules[{j}]: rule `{}` has no conditions: any valid token from any configured issuer is allowed",
                    rule.id
                )
            });
        }
        // Subjects are only unique within an issuer: bound to a claim with several issuers
        // trusted, another issuer's `sub: 42` owns this issuer's `/users/42`.
        if !bind.is_empty() && rule.issuers.is_empty() && issuers.len() > 1 {
            let params: Vec<String> = bind.iter().map(|b| format!("`{{{}}}`", b.param)).collect();
            self.warnings.push(format!(
                "{at}.rules[{j}]: rule `{}` binds {} to a claim but names no `issuers`, and {} \
                 issuers are configured: a token of any of them whose claim matches is granted \
                 the resource (claims such as `sub` are unique only within one issuer); add \
                 `issuers: [name]`",
                rule.id,
                params.join(", "),
                issuers.len()
            ));
        }
        // Claims such as `sub` are unique only within one issuer: with several issuers named,
        // another issuer's `sub: 42` owns this issuer's `/users/42` just the same.
        let named: HashSet<&str> = rule.issuers.iter().map(String::as_str).collect();
        if !bind.is_empty() && named.len() > 1 {
            let params: Vec<String> = bind.iter().map(|b| format!("`{{{}}}`", b.param)).collect();
            self.warnings.push(format!(
                "{at}.rules[{j}]: rule `{}` binds {} to a claim and names {} issuers: a token of \
                 any of them whose claim matches is granted the resource (claims such as `sub` \
                 are unique only within one issuer); write one rule per issuer",
                rule.id,
                params.join(", "),
                named.len()
            ));
        }
        let context = self.context(&f, rule)?;
        self.api_key_rule_warnings(
            &format!("{at}.rules[{j}]"),
            rule,
            rc,
            template,
            &api_keys,
            &context,
        );
        let compiled = CompiledRule {
            context,
            id: Arc::from(rule.id.as_str()),
            issuers: rule.issuers.iter().map(|s| Arc::from(s.as_str())).collect(),
            scopes: rule.scopes.clone(),
            roles: rule.roles.clone(),
            claims,
            bind,
            api_keys,
            principals,
        };
        // A service grant lets a token-less caller in on its peer identity alone, and an
        // approval is asked for and given to a subject: such a caller could never pass the
        // approval (every call a 403 `internal_error`).
        if rule.approval.is_some() && compiled.is_peer_only() {
            return Err(self.hint(
                f("approval"),
                "a rule with only `principals` grants callers without a token, and an \
                 approval needs the caller's subject: a token-less call could never be approved",
                "require a token too (`issuers`, `scopes`, `roles` or `claims`), or move \
                 `approval` to a rule for tokens",
            ));
        }
        Ok(compiled)
    }
}

/// Context conditions and revocation. OWNER: context helper.
impl Compiler {
    fn trusted_headers(&mut self, file: &ConfigFile, issuers: &[Arc<CompiledIssuer>]) -> Res<()> {
        for (k, name) in file.network.trusted_headers.iter().enumerate() {
            let field = format!("network.trusted_headers[{k}]");
            if *name != name.to_ascii_lowercase() {
                return Err(self.hint(
                    field,
                    format!("header name `{name}` must be lower-case"),
                    format!("write `{}`", name.to_ascii_lowercase()),
                ));
            }
            if !valid_header_name(name) {
                return Err(self.err(field, format!("`{name}` is not a valid header name")));
            }
            if FORBIDDEN_IDENTITY_HEADERS.contains(&name.as_str())
                || name == "x-forwarded-for"
                || issuers.iter().any(|i| i.header == *name)
                || self.api_keys.as_ref().is_some_and(|k| k.header == *name)
                || file.upstream.identity_headers.contains_key(name)
            {
                return Err(self.err(
                    field,
                    format!(
                        "`{name}` cannot be a trusted posture header (clients or Portcullis set it)"
                    ),
                ));
            }
            self.trusted_headers.insert(name.clone());
        }
        Ok(())
    }

    fn revocation(&self, file: &ConfigFile) -> Res<Option<PathBuf>> {
        let r = &file.revocation;
        if r.reload.get() < std::time::Duration::from_millis(100) {
            return Err(self.err("revocation.reload", "must be at least 100ms"));
        }
        if r.default_ttl.get().as_secs() == 0 {
            return Err(self.err("revocation.default_ttl", "must be at least 1s"));
        }
        // The admin API refuses an entry that lasts longer (`MAX_TTL_SECS`): above it every
        // call without `expires_at` would be a 400.
        if r.default_ttl.get() > std::time::Duration::from_secs(400 * 24 * 3600) {
            return Err(self.hint(
                "revocation.default_ttl",
                "must be at most 400d",
                "revoke for as long as the tokens live",
            ));
        }
        if let Some(h) = &r.admin_token_sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(self.hint(
                "revocation.admin_token_sha256",
                "must be 64 hex digits",
                "e.g. `printf %s \"$SECRET\" | sha256sum`",
            ));
        }
        let Some(path) = &r.file else {
            return Ok(None);
        };
        let resolved = crate::keys::resolve_path(&self.dir, path);
        if !resolved.is_file() {
            return Err(self.hint(
                "revocation.file",
                format!("revocation file `{}` does not exist", resolved.display()),
                "create it with `revoked: []`; relative paths are resolved against the config file's folder",
            ));
        }
        Ok(Some(resolved))
    }

    fn context(&self, f: &dyn Fn(&str) -> String, rule: &RuleConfig) -> Res<ContextConditions> {
        let mut out = ContextConditions::default();
        if let Some(src) = &rule.source {
            let parse = |list: &[String], name: &str| -> Res<Vec<ipnet::IpNet>> {
                list.iter()
                    .enumerate()
                    .map(|(k, c)| {
                        parse_cidr(c).ok_or_else(|| {
                            self.hint(
                                f(&format!("source.{name}[{k}]")),
                                format!("`{c}` is not an IP network"),
                                "e.g. `10.0.0.0/8`, `2001:db8::/32` or a single address",
                            )
                        })
                    })
                    .collect()
            };
            let cond = SourceCondition {
                cidrs: parse(&src.cidrs, "cidrs")?,
                not_cidrs: parse(&src.not_cidrs, "not_cidrs")?,
            };
            if cond.cidrs.is_empty() && cond.not_cidrs.is_empty() {
                return Err(self.err(f("source"), "give `cidrs`, `not_cidrs` or both"));
            }
            out.source = Some(cond);
        }
        for (name, d, slot) in [
            (
                "max_session_age",
                &rule.max_session_age,
                &mut out.max_session_age,
            ),
            (
                "max_token_lifetime",
                &rule.max_token_lifetime,
                &mut out.max_token_lifetime,
            ),
        ] {
            if let Some(d) = d {
                if d.get().as_secs() == 0 {
                    return Err(self.err(f(name), "must be at least 1s"));
                }
                *slot = Some(d.get().as_secs());
            }
        }
        if let Some(w) = &rule.time_window {
            let mut days = 0u8;
            for (k, d) in w.days.iter().enumerate() {
                let Some(bit) = DaySet::parse_day(d) else {
                    return Err(self.hint(
                        f(&format!("time_window.days[{k}]")),
                        format!("`{d}` is not a day"),
                        "use `mon`, `tue`, `wed`, `thu`, `fri`, `sat`, `sun`",
                    ));
                };
                days |= 1 << bit;
            }
            let (start_min, end_min) = match &w.hours {
                None => (0, 24 * 60),
                Some(h) => TimeWindow::parse_hours(h).ok_or_else(|| {
                    self.hint(
                        f("time_window.hours"),
                        format!("`{h}` is not a time range"),
                        "e.g. `08:00-18:00`, or `22:00-06:00` across midnight",
                    )
                })?,
            };
            let tz_name = w.timezone.clone().unwrap_or_else(|| "UTC".to_string());
            let tz = jiff::tz::TimeZone::get(&tz_name).map_err(|_| {
                self.hint(
                    f("time_window.timezone"),
                    format!("unknown time zone `{tz_name}`"),
                    "use an IANA name such as `Europe/Paris`, `America/New_York` or `UTC`",
                )
            })?;
            out.time_window = Some(TimeWindow {
                days: if w.days.is_empty() {
                    DaySet::ALL
                } else {
                    DaySet(days)
                },
                start_min,
                end_min,
                tz,
                tz_name,
            });
        }
        for (k, p) in rule.posture.iter().enumerate() {
            let field = f(&format!("posture[{k}]"));
            let source = match (&p.claim, &p.header) {
                (Some(c), None) if !c.trim().is_empty() => PostureSource::Claim(c.clone()),
                (None, Some(h)) => {
                    if !self.trusted_headers.contains(h) {
                        return Err(self.hint(
                            format!("{field}.header"),
                            format!("`{h}` is not a trusted header: a client could send it"),
                            format!("list it in `network.trusted_headers` and make Envoy remove `{h}` from client requests"),
                        ));
                    }
                    PostureSource::Header(h.clone())
                }
                _ => {
                    return Err(self.hint(
                        field,
                        "exactly one non-empty `claim` or `header` is required",
                        "e.g. `{ claim: device_trust, one_of: [managed] }`",
                    ));
                }
            };
            let test = match (&p.equals, &p.one_of) {
                (Some(v), None) => PostureTest::Equals(v.clone()),
                (None, Some(v)) if !v.is_empty() => PostureTest::OneOf(v.clone()),
                _ => {
                    return Err(self.hint(
                        field,
                        "exactly one of `equals` or a non-empty `one_of` is required",
                        "e.g. `{ header: x-device-posture, equals: ok }`",
                    ));
                }
            };
            out.posture.push(PostureCondition { source, test });
        }
        Ok(out)
    }
}

/// The DPoP nonce secret of issuers without `secret_file`: random, made once per process, so
/// nonces handed out survive config reloads (the issuer's name in the MAC keeps issuers
/// apart). A restart still retires them: clients get one `use_dpop_nonce` and retry.
fn process_nonce_secret() -> Result<&'static [u8; MIN_SECRET_BYTES], aws_lc_rs::error::Unspecified>
{
    static SECRET: std::sync::OnceLock<[u8; MIN_SECRET_BYTES]> = std::sync::OnceLock::new();
    if let Some(secret) = SECRET.get() {
        return Ok(secret);
    }
    let mut fresh = [0u8; MIN_SECRET_BYTES];
    aws_lc_rs::rand::fill(&mut fresh)?;
    // Two first loads racing keep whichever secret was stored first.
    Ok(SECRET.get_or_init(|| fresh))
}

/// A CIDR, or a single address as its host network.
fn parse_cidr(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    let net = text
        .parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| {
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(ipnet::IpNet::from)
        })?
        .trunc();
    // Client addresses are compared in their IPv4 form (`::ffff:10.1.2.3` is 10.1.2.3), so an
    // IPv4-mapped network, as a dual-stack listener logs it, is its IPv4 network: kept as
    // IPv6 it could never hold a client, and a `not_cidrs` entry would block nobody.
    if let ipnet::IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            .ok()
            .map(ipnet::IpNet::V4);
    }
    Some(net)
}

/// `text` as an absolute `http://` or `https://` URL with a host (the scheme in any case).
/// The prefix check refuses `https:host`, which the URL parser reads as absolute.
fn http_url(text: &str) -> Option<reqwest::Url> {
    let scheme = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    if !(scheme.starts_with("https://") || scheme.starts_with("http://")) {
        return None;
    }
    reqwest::Url::parse(text)
        .ok()
        .filter(|url| url.host_str().is_some_and(|h| !h.is_empty()))
}

impl Compiler {
    /// `server.shutdown_delay` and `server.shutdown_grace`: bounded, so that a SIGTERMed
    /// instance stops within minutes (and within the orchestrator's grace period), and long
    /// enough to let a check in flight finish (it may wait up to `decision_timeout`, checked
    /// before this).
    fn shutdown(&self, file: &ConfigFile) -> Res<()> {
        const MOST: std::time::Duration = std::time::Duration::from_secs(5 * 60);
        let server = &file.server;
        let pod_grace = "Kubernetes' `terminationGracePeriodSeconds` must exceed \
                         `shutdown_delay` plus `shutdown_grace`, or the pod is killed mid-drain";
        if server.shutdown_delay.get() > MOST {
            return Err(self.hint(
                "server.shutdown_delay",
                "must be at most 5m: meanwhile the instance serves on, reported not ready \
                 (load balancers take seconds to stop sending work: `5s` is typical)",
                pod_grace,
            ));
        }
        let (grace, decision) = (server.shutdown_grace.get(), server.decision_timeout.get());
        if grace < decision {
            return Err(self.hint(
                "server.shutdown_grace",
                format!(
                    "must be at least `server.decision_timeout` ({}): a check in flight may \
                     wait that long, and one cut at shutdown is answered with no decision and \
                     no audit line",
                    humantime::format_duration(decision)
                ),
                "leave it out for 10s",
            ));
        }
        if grace > MOST {
            return Err(self.hint(
                "server.shutdown_grace",
                "must be at most 5m: in-flight checks end within `server.decision_timeout` \
                 (at most 60s)",
                pod_grace,
            ));
        }
        Ok(())
    }

    /// `state:` and `approvals:`: a usable Redis URL (never echoed: it may hold a password),
    /// a non-empty key prefix, bounded timeouts and retries, an http(s) webhook and link base.
    fn state_and_approvals(&mut self, file: &ConfigFile) -> Res<()> {
        let state = &file.state;
        if state.backend == schema::StateBackend::Redis {
            let url = state.redis_url.trim();
            let tls = url.starts_with("rediss://");
            if !(tls || url.starts_with("redis://") || url.starts_with("unix://")) {
                return Err(self.hint(
                    "state.redis_url",
                    "the URL must start with `redis://`, `rediss://` (TLS) or `unix://`",
                    "e.g. `redis://127.0.0.1:6379/0`, or `rediss://redis.example.com:6380/0`",
                ));
            }
            // The Redis client reads `#insecure` as "accept any certificate": anyone on the
            // path could then answer for Redis (and so for rate limits and single-use
            // records). Refused whatever the scheme, without echoing the URL.
            if url
                .split_once('#')
                .is_some_and(|(_, f)| f.trim().eq_ignore_ascii_case("insecure"))
            {
                return Err(self.hint(
                    "state.redis_url",
                    "`#insecure` would turn off the verification of the Redis server's \
                     certificate; Portcullis does not connect without it (the URL is not \
                     shown, as it may hold a password)",
                    "remove `#insecure`; for a server certificate from a private CA, set \
                     `state.tls.ca_file` to that CA's PEM file",
                ));
            }
            if let Some(tls_config) = &state.tls {
                if !tls {
                    return Err(self.hint(
                        "state.tls",
                        "TLS settings are set but `state.redis_url` is not a `rediss://` URL: \
                         they would not be used",
                        "use `rediss://host:port/db` for TLS, or remove `state.tls`",
                    ));
                }
                self.state_tls(tls_config)?;
            }
            // What the store will open (it connects later): a URL it cannot parse must fail
            // here, naming the field. Neither the URL nor the parser's message (which may
            // quote it) is shown: it may hold a password.
            if let Err(e) = ::redis::Client::open(state.redis_url.as_str()) {
                return Err(self.hint(
                    "state.redis_url",
                    format!(
                        "the Redis client cannot use this URL ({}); it is not shown, as it may \
                         hold a password",
                        e.category()
                    ),
                    "check the host (an IPv6 address in `[...]`), a port up to 65535 and the \
                     database number, e.g. `redis://:PASSWORD@10.0.0.5:6379/0`",
                ));
            }
        }
        if state.timeout.get().is_zero() {
            return Err(self.err("state.timeout", "must be greater than 0"));
        }
        let decision_timeout = file.server.decision_timeout.get();
        if decision_timeout < std::time::Duration::from_millis(10)
            || decision_timeout > std::time::Duration::from_secs(60)
        {
            return Err(self.err(
                "server.decision_timeout",
                "must be between 10ms and 60s, and below Envoy's ext_authz `timeout` (0.25s in envoy/)",
            ));
        }
        if state.key_prefix.is_empty() {
            return Err(self.hint(
                "state.key_prefix",
                "must not be empty: keys would land in the Redis database's root namespace, \
                 where another application's keys can collide with them",
                "leave it out for `portcullis:`, or give each deployment sharing a Redis its own \
                 prefix",
            ));
        }
        if state
            .key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(self.err(
                "state.key_prefix",
                "must not contain spaces or control characters",
            ));
        }
        let approvals = &file.approvals;
        if approvals.request_ttl.get().as_secs() == 0 {
            return Err(self.err("approvals.request_ttl", "must be at least 1s"));
        }
        if approvals.request_ttl.get() > std::time::Duration::from_secs(30 * 24 * 3600) {
            return Err(self.hint(
                "approvals.request_ttl",
                "must be at most 30d",
                "a request nobody decides within days should be asked again",
            ));
        }
        if approvals.max_new_requests == 0 {
            return Err(self.hint(
                "approvals.max_new_requests",
                "must be at least 1",
                "it caps the approval requests one caller opens per `request_ttl`",
            ));
        }
        if let Some(hook) = &approvals.webhook {
            // Never echoed: chat webhooks carry their secret in the URL.
            if http_url(&hook.url).is_none() {
                return Err(self.hint(
                    "approvals.webhook.url",
                    "the webhook URL must be an absolute `http://` or `https://` URL with a host",
                    "e.g. `https://chat.example.com/hooks/approvals`",
                ));
            }
            let timeout = hook.timeout.get();
            if timeout < std::time::Duration::from_millis(100)
                || timeout > std::time::Duration::from_secs(60)
            {
                return Err(self.hint(
                    "approvals.webhook.timeout",
                    "must be between 100ms and 60s (per attempt)",
                    "leave it out for 5s",
                ));
            }
            if hook.retries > WEBHOOK_RETRIES_MAX {
                return Err(self.hint(
                    "approvals.webhook.retries",
                    format!(
                        "must be at most {WEBHOOK_RETRIES_MAX}: the pauses between attempts \
                         double from 250ms up to 30s, so {WEBHOOK_RETRIES_MAX} retries already \
                         wait about 2 minutes in all"
                    ),
                    "leave it out for 3 (about 2s of pauses)",
                ));
            }
        }
        if let Some(base) = &approvals.link_base {
            self.link_base(base, approvals.webhook.is_some())?;
        }
        Ok(())
    }

    /// `approvals.link_base`: approvers are sent `<link_base>/<id>` as a link, so it must be
    /// an absolute http(s) URL to which a path can be appended (no query, no fragment), and
    /// hold no credentials (the link is posted where every approver reads it).
    fn link_base(&mut self, base: &str, webhook: bool) -> Res<()> {
        const FIELD: &str = "approvals.link_base";
        let example = "e.g. `https://approvals.example.com/requests`";
        // Not echoed: the message names what is wrong, and the field points at the value.
        if base.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.hint(
                FIELD,
                "must not contain spaces or control characters (it is sent as a link)",
                example,
            ));
        }
        let Some(url) = http_url(base) else {
            return Err(self.hint(
                FIELD,
                "must be an absolute `http://` or `https://` URL (approvers are sent \
                 `<link_base>/<id>` as a link)",
                example,
            ));
        };
        if base.contains('?') || base.contains('#') {
            return Err(self.hint(
                FIELD,
                "must not have a query (`?`) or fragment (`#`): `/<id>` is appended to it",
                example,
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.hint(
                FIELD,
                "must not carry a user name or password: the link is sent to every approver",
                example,
            ));
        }
        if !webhook {
            self.warnings.push(format!(
                "{FIELD}: unused without `approvals.webhook` (only the webhook's message \
                 carries the link)"
            ));
        }
        Ok(())
    }

    /// A rule's `approval:`: someone can approve, the grant lasts and can be used.
    fn approval(
        &mut self,
        field: &str,
        a: &schema::ApprovalRuleConfig,
        issuers: &HashSet<&str>,
        rule_issuers: &[String],
    ) -> Res<()> {
        let f = |s: &str| format!("{field}.{s}");
        // A warning, as for a rule's `issuers`: removing an issuer is how it stops being
        // trusted, and the name then makes nobody an approver.
        for (k, name) in a.approvers.issuers.iter().enumerate() {
            if !issuers.contains(name.as_str()) {
                self.warnings.push(format!(
                    "{}: issuer `{name}` is not configured, so none of its tokens makes an \
                     approver: drop it if the issuer was removed, else use an `issuers[].name`",
                    f(&format!("approvers.issuers[{k}]"))
                ));
            }
        }
        // Roles and bare subjects are the approver's issuer's claims: any trusted issuer
        // (a partner's, a test IdP) that puts `dba-lead` in a token would make its holder
        // an approver.
        let by_claims =
            !a.approvers.roles.is_empty() || a.approvers.subjects.iter().any(|s| !s.contains(':'));
        if by_claims
            && a.approvers.issuers.is_empty()
            && rule_issuers.is_empty()
            && issuers.len() > 1
        {
            self.warnings.push(format!(
                "{}: approver roles and subjects are read from the tokens of any of the {} \
                 configured issuers, so any of them can make an approver; add \
                 `approvers.issuers: [name]` (or `issuers` on the rule, which approvers then \
                 default to)",
                f("approvers"),
                issuers.len()
            ));
        }
        // `issuer-name:sub` names one issuer's subject: a prefix that names no issuer would
        // otherwise read as a bare subject matching that text from any issuer.
        let approvers = (a.approvers.subjects.iter().enumerate())
            .map(|(k, s)| (f(&format!("approvers.subjects[{k}]")), s));
        let pre = a.pre_approve.iter().enumerate().flat_map(|(k, p)| {
            (p.subjects.iter().enumerate())
                .map(move |(j, s)| (format!("{field}.pre_approve[{k}].subjects[{j}]"), s))
        });
        // A warning, not an error, for the same reason as a rule's `issuers`: the entry
        // then names nobody (its prefix matches no caller's issuer).
        let unknown: Vec<String> = approvers
            .chain(pre)
            .filter_map(|(at, subject)| {
                let (prefix, _) = subject.split_once(':')?;
                (!issuers.contains(prefix)).then(|| {
                    format!(
                        "{at}: `{subject}`: `{prefix}` is not a configured issuer, so this entry \
                         names nobody (a subject with `:` is `issuer-name:sub`; for a `sub` that \
                         holds `:`, name its issuer first: `corp:urn:x`)"
                    )
                })
            })
            .collect();
        self.warnings.extend(unknown);
        if a.approvers.roles.is_empty() && a.approvers.subjects.is_empty() {
            return Err(self.hint(
                f("approvers"),
                "no approvers: the action could never be approved",
                "e.g. `approvers: { roles: [dba-lead] }`",
            ));
        }
        if a.approvers
            .roles
            .iter()
            .chain(&a.approvers.subjects)
            .any(|s| s.trim().is_empty())
        {
            return Err(self.err(f("approvers"), "empty role or subject"));
        }
        if a.ttl.get().as_secs() == 0 {
            return Err(self.err(f("ttl"), "must be at least 1s"));
        }
        if a.ttl.get() > std::time::Duration::from_secs(30 * 24 * 3600) {
            return Err(self.hint(
                f("ttl"),
                "must be at most 30d",
                "an approval is for one action soon; standing access belongs in a grant",
            ));
        }
        if a.uses == 0 {
            return Err(self.hint(f("uses"), "`0` uses would approve nothing", "use 1 or more"));
        }
        for (k, p) in a.pre_approve.iter().enumerate() {
            let pf = f(&format!("pre_approve[{k}]"));
            if p.roles.is_empty() && p.subjects.is_empty() {
                return Err(self.hint(
                    pf,
                    "a pre-approval needs `roles` or `subjects`",
                    "e.g. `{ roles: [on-call], from: 2026-11-23T06:00:00Z, until: 2026-11-23T10:00:00Z }`",
                ));
            }
            let mut bounds = [None, None];
            for (slot, (name, value)) in [("from", &p.from), ("until", &p.until)]
                .into_iter()
                .enumerate()
            {
                if let Some(v) = value {
                    let (t, offset) = parse_bound_offset(v).ok_or_else(|| {
                        self.hint(
                            format!("{pf}.{name}"),
                            format!("`{v}` is not an RFC 3339 time"),
                            "e.g. `2026-11-23T06:00:00Z` or `2026-11-23T07:00:00+01:00`",
                        )
                    })?;
                    // Read as UTC, as before offsets were accepted; but a local time written
                    // without one moves the window by the local offset, widening a grant in
                    // time where it was meant to be narrow.
                    if !offset {
                        let utc = jiff::Timestamp::from_second(t).map_or_else(
                            |_| t.to_string(),
                            |ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                        );
                        self.warnings.push(format!(
                            "{pf}.{name}: `{v}` has no UTC offset and is read as UTC ({utc}); \
                             write `Z` or the offset you mean (e.g. `+01:00`)"
                        ));
                    }
                    bounds[slot] = Some(t);
                }
            }
            if let [Some(from), Some(until)] = bounds
                && from >= until
            {
                return Err(self.err(format!("{pf}.until"), "the window ends before it starts"));
            }
        }
        Ok(())
    }
}

/// A pre-approval bound (`from`, `until`) as Unix seconds: an RFC 3339 time, with `Z` or a
/// numeric offset (`2026-11-23T07:00:00+01:00`); one without an offset is read as UTC.
/// `None` when it is not a time. Validation here and `approvals::compile` both read bounds with it.
pub fn parse_bound(text: &str) -> Option<i64> {
    parse_bound_offset(text).map(|(t, _)| t)
}

/// `parse_bound`, and whether the text gave its UTC offset (`Z` or `+01:00`).
fn parse_bound_offset(text: &str) -> Option<(i64, bool)> {
    let text = text.trim();
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Some((t.as_second(), true));
    }
    let t = humantime::parse_rfc3339_weak(text).ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    Some((i64::try_from(secs).ok()?, false))
}

/// Whether two listeners could not both bind: the same port (not 0) on the same address,
/// or on a wildcard address that covers the other (`[::]` covers IPv4 too, as Linux binds it).
fn listeners_clash(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    let covers = |w: std::net::SocketAddr, o: std::net::SocketAddr| {
        w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// A lower-case RFC 9110 field name.
fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| is_tchar(b) && !b.is_ascii_uppercase())
}

fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// The routes (as `` `id` ``) that can allow nobody without an issuer or API keys: neither
/// public nor with a service grant (a rule of `principals` alone).
fn closed_without_identity(routes: &[CompiledRoute]) -> Vec<String> {
    routes
        .iter()
        .filter(|r| !r.public && !r.rules.iter().any(|rule| rule.is_peer_only()))
        .map(|r| format!("`{}`", r.id))
        .collect()
}

/// True when a dry-run route is the live route of its id, unchanged (the same text: the
/// schema types derive `Debug`, not `Eq`).
pub fn same_route(live: &RouteConfig, candidate: &RouteConfig) -> bool {
    live.id == candidate.id && format!("{live:?}") == format!("{candidate:?}")
}

#[cfg(test)]
mod tests;
