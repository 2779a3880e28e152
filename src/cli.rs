//! The command line: `serve` (default), `check`, `explain`, `test`, `token`, `approvals`,
//! `apikey`. Argument types and the logic of each command live here so they can be tested
//! (`serve` runs in `main.rs`, `approvals` in `approvals::client`); `main.rs` dispatches.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value, json};

use crate::authz::{Decision, RequestView};
use crate::config::{self, Config};
use crate::engine::unix_now;
use crate::grpc::challenge;
use crate::identity::{KeyOrigin, KeySet};

/// The issuer of the checked-in development key. `token` signs only for this issuer.
pub const DEV_ISSUER: &str = "https://dev.portcullis.invalid";
/// The default config path, relative to the working directory.
pub const DEFAULT_CONFIG: &str = "config/portcullis.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Least-privilege authorization service for Envoy (ext_authz)",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Config file, when no subcommand is given (same as `serve --config`).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve ext_authz on the configured listeners (the default command).
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 when valid, non-zero naming file, field and a hint.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Treat warnings (e.g. unreachable routes) as errors.
        #[arg(long)]
        strict: bool,
    },
    /// Show the decision for one request, and which route and rule made it.
    Explain(ExplainArgs),
    /// Run policy tests (YAML: requests, callers, expected decisions): exit 0 when all pass,
    /// 1 when one fails, 2 when a file or the config cannot be used.
    Test(TestArgs),
    /// Mint a DEVELOPMENT-ONLY token with the checked-in dev key (config/dev/).
    Token(TokenArgs),
    /// List, approve or reject just-in-time approval requests (gRPC client).
    Approvals(crate::approvals::client::ApprovalsArgs),
    /// Manage scoped API keys.
    #[command(subcommand)]
    Apikey(ApikeyCommand),
}

#[derive(Debug, Subcommand)]
pub enum ApikeyCommand {
    /// Generate a key: print it once, and the config entry that holds only its hash.
    New(ApikeyNewArgs),
}

#[derive(Debug, Args)]
pub struct ApikeyNewArgs {
    /// Who holds the key (becomes the identity's subject).
    #[arg(long)]
    pub owner: String,
    /// An endpoint the key works on, `METHOD /path/template` (repeatable, at least one).
    #[arg(long = "route", value_name = "METHOD /PATH", required = true)]
    pub routes: Vec<String>,
    /// Lifetime from now, e.g. `30d`, `12h`.
    #[arg(long, default_value = "30d")]
    pub expires: String,
    /// Key id (default: the owner and a random suffix).
    #[arg(long)]
    pub id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// The request path, with any query string, as Portcullis receives it: after Envoy's
    /// normalization (the shipped configs resolve `.`/`..` and merge slashes first, so a
    /// path explain refuses may reach Portcullis already cleaned, and `%2F` never arrives).
    #[arg(long)]
    pub path: String,
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// A bearer token, sent as `authorization: Bearer <token>`.
    #[arg(long)]
    pub token: Option<String>,
    /// Extra request header, `name: value` (repeatable). `x-forwarded-proto: https` makes
    /// the request's scheme `https` (what a DPoP proof's `htu` must name; default `http`).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// The client address Envoy would report.
    #[arg(long)]
    pub source_ip: Option<IpAddr>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The config under test. Default: the one each test file names (`config:`), else
    /// config/portcullis.yaml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Test files (format: `portcullis::policytest`, README "Policy tests").
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Subject (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Scope (repeatable, or space-separated).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Role (repeatable).
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// Extra claim `name=value`; the value is parsed as JSON when it is valid JSON
    /// (`tenants=["acme"]`, `level=3`), else taken as a string (repeatable).
    #[arg(long = "claim", value_name = "NAME=VALUE")]
    pub claims: Vec<String>,
    /// Lifetime, e.g. `15m`, `1h`.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Usage(String),
    // Not named `source`: that would make it the error's cause too, which `main` prints
    // after the message, so the reason was said twice.
    #[error("cannot read `{path}`: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Keys(String),
}

/// `check`: the report to print on success (errors are returned).
pub fn check(path: &Path, strict: bool) -> Result<String, CliError> {
    let config = config::load(path)?;
    // Local key files are part of the config: load them now rather than at first request.
    for (i, issuer) in config.issuers.iter().enumerate() {
        if let Some(file) = &issuer.keys.file {
            let bytes = std::fs::read(file).map_err(|error| CliError::Read {
                path: file.clone(),
                error,
            })?;
            // `serve` reads it under the same cap, and would never be ready.
            let max = issuer.keys.max_bytes.get();
            if bytes.len() as u64 > max {
                return Err(CliError::Keys(format!(
                    "{}: issuers[{i}].keys.file: `{}` is {} bytes, over `keys.max_bytes` ({max}); \
                     raise `max_bytes` (e.g. `1MiB`)",
                    path.display(),
                    file.display(),
                    bytes.len()
                )));
            }
            KeySet::from_jwks(&bytes, KeyOrigin::LocalFile).map_err(|e| {
                CliError::Keys(format!(
                    "{}: issuers[{i}].keys.file: `{}`: {e}",
                    path.display(),
                    file.display()
                ))
            })?;
        }
    }
    // So are the files serve loads at start: the revocation list and the TLS material.
    config::check_revocation_file(&config)?;
    let server = &config.file.server;
    if let Some(tls) = &server.tls {
        crate::tls::check_section(path, "server.tls", tls)?;
    }
    if let Some(tls) = &server.approvals_tls {
        crate::tls::check_section(path, "server.approvals_tls", tls)?;
    }
    crate::state::redis::load_tls(path, &config.file.state)?;
    let dry_run = match &config.file.dry_run {
        Some(d) => {
            let live = |id: &str| config.file.routes.iter().any(|r| r.id == id);
            let replacing = d.routes.iter().filter(|r| live(&r.id)).count();
            let same = d
                .routes
                .iter()
                .filter(|r| config.file.routes.iter().any(|l| config::same_route(l, r)))
                .count();
            let unchanged = if same > 0 {
                format!(", {same} unchanged")
            } else {
                String::new()
            };
            format!(
                ", dry run: {} route(s) changed, {} added, {} removed{unchanged}",
                replacing - same,
                d.routes.len() - replacing,
                d.remove.len()
            )
        }
        None => String::new(),
    };
    let mut out = format!(
        "{}: ok ({} issuer(s), {} route(s){dry_run})\n",
        path.display(),
        config.issuers.len(),
        config.file.routes.len()
    );
    let mut warnings = config.warnings.clone();
    warnings.extend(key_expiry_warnings(&config, unix_now()));
    let listed: String = warnings.iter().map(|w| format!("warning: {w}\n")).collect();
    if strict && !warnings.is_empty() {
        // Never "ok" on the line main prefixes with "error: ".
        return Err(CliError::Usage(format!(
            "{}: fails because of {} warning(s) (--strict treats warnings as errors):\n{}",
            path.display(),
            warnings.len(),
            listed.trim_end()
        )));
    }
    out.push_str(&listed);
    Ok(out)
}

/// API keys that have expired or expire within a week, at `now`.
pub fn key_expiry_warnings(config: &Config, now: i64) -> Vec<String> {
    const WEEK: i64 = 7 * 24 * 3600;
    let Some(keys) = &config.api_keys else {
        return Vec::new();
    };
    keys.keys()
        .iter()
        .filter_map(|k| {
            if k.expires_at <= now {
                Some(format!(
                    "api_keys: key `{}` has expired: it is refused",
                    k.id
                ))
            } else if k.expires_at - now <= WEEK {
                Some(format!(
                    "api_keys: key `{}` expires within a week (in {}h)",
                    k.id,
                    (k.expires_at - now) / 3600
                ))
            } else {
                None
            }
        })
        .collect()
}

/// A new API key and its config entry.
pub struct NewApiKey {
    /// The key: shown once, never stored.
    pub key: String,
    /// The YAML entry for `api_keys.keys` (or the key file): id, owner, hash, expiry, routes.
    pub entry: String,
    /// What `check` will warn about in the entry (a method not in upper case).
    pub warnings: Vec<String>,
    /// What else the config needs before the key is of any use.
    pub next: String,
}

/// `apikey new`: generates 32 random bytes from the system CSPRNG.
pub fn apikey_new(args: &ApikeyNewArgs) -> Result<NewApiKey, CliError> {
    let mut random = [0u8; 32];
    aws_lc_rs::rand::fill(&mut random)
        .map_err(|_| CliError::Keys("the system random generator failed".into()))?;
    let mut suffix = [0u8; 3];
    aws_lc_rs::rand::fill(&mut suffix)
        .map_err(|_| CliError::Keys("the system random generator failed".into()))?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let ttl = humantime::parse_duration(&args.expires).map_err(|e| {
        CliError::Usage(format!(
            "--expires `{}`: {e} (use e.g. `30d`, `12h`)",
            args.expires
        ))
    })?;
    build_api_key(args, &random, &suffix, unix_now(), ttl.as_secs() as i64)
}

/// Builds the key and its entry from given randomness (deterministic, for tests).
pub fn build_api_key(
    args: &ApikeyNewArgs,
    random: &[u8; 32],
    suffix: &str,
    now: i64,
    ttl_secs: i64,
) -> Result<NewApiKey, CliError> {
    use crate::identity::apikey;
    let owner = args.owner.trim();
    if owner.is_empty() || owner.chars().any(char::is_control) {
        return Err(CliError::Usage("--owner must be a non-empty name".into()));
    }
    if ttl_secs <= 0 {
        return Err(CliError::Usage("--expires must be in the future".into()));
    }
    let id = match &args.id {
        Some(id) => id.clone(),
        None => format!("{}-{suffix}", id_base(owner)),
    };
    if !apikey::valid_id(&id) {
        return Err(CliError::Usage(format!(
            "--id `{id}`: use 1 to 64 letters, digits, `.`, `_` or `-`"
        )));
    }
    let mut routes = Vec::with_capacity(args.routes.len());
    let mut warnings = Vec::new();
    for r in &args.routes {
        let ep = apikey::KeyEndpoint::parse(r)
            .map_err(|e| CliError::Usage(format!("--route: {e} (e.g. `GET /orders/{{id}}`)")))?;
        let m = &*ep.method;
        if m.bytes().any(|b| b.is_ascii_lowercase()) {
            warnings.push(format!(
                "--route `{ep}`: `{m}` is not upper-case; methods are case-sensitive, so it \
                 will not match `{}`",
                m.to_ascii_uppercase()
            ));
        }
        routes.push(ep.to_string());
    }
    let key = apikey::encode_key(random);
    let expires = std::time::UNIX_EPOCH + std::time::Duration::from_secs((now + ttl_secs) as u64);
    // JSON strings are valid YAML scalars: the owner and routes are quoted safely whatever
    // they contain.
    let q = |s: &str| Value::String(s.to_string()).to_string();
    let entry = format!(
        "- id: {}\n  owner: {}\n  hash: {}\n  expires: {}\n  routes: [{}]\n",
        q(&id),
        q(owner),
        q(&apikey::format_hash(&apikey::hash_key(&key))),
        humantime::format_rfc3339_seconds(expires),
        routes.iter().map(|r| q(r)).collect::<Vec<_>>().join(", ")
    );
    // A key works only where a rule of the route names it too: without that step it is
    // refused everywhere, which the entry alone did not say.
    let next = format!(
        "# Then name it in a rule of each route it may call (`api_keys: [{}]`): a key is \
         refused where no rule names it. Run `portcullis check` after.",
        q(&id)
    );
    Ok(NewApiKey {
        key,
        entry,
        warnings,
        next,
    })
}

/// The result of `explain`, printable as text or JSON.
pub struct Explanation {
    pub decision: Decision,
    /// Ids of the rate limits that would count this request (explain spends no budget).
    pub rate_limits: Vec<String>,
}

impl Explanation {
    pub fn to_json(&self) -> Value {
        let d = &self.decision;
        let mut v = json!({
            "decision": if d.is_allow() { "allow" } else { "deny" },
            "status": d.http_status(),
            "reason": d.code.as_str(),
            "detail": d.detail,
            "route": d.route.as_deref(),
            "rule": d.rule.as_deref(),
            "subject": d.identity.as_ref().map(|i| i.subject.as_str()),
            "issuer": d.identity.as_ref().map(|i| &*i.issuer_name),
            "api_key": d.identity.as_ref().and_then(|i| i.api_key_id()),
            "rate_limits": self.rate_limits,
            "www_authenticate": challenge(d),
        });
        if let Some(w) = d.dry_run.as_deref() {
            v["dry_run"] = json!({
                "decision": if w.is_allow() { "allow" } else { "deny" },
                "status": w.code.http_status(),
                "reason": w.code.as_str(),
                "detail": w.detail,
                "route": w.route.as_deref(),
                "rule": w.rule.as_deref(),
            });
        }
        v
    }

    pub fn to_text(&self) -> String {
        let d = &self.decision;
        let mut out = format!(
            "decision: {}\nstatus:   {}\nreason:   {} ({})\nroute:    {}\nrule:     {}\n",
            if d.is_allow() { "ALLOW" } else { "DENY" },
            d.http_status(),
            d.code.as_str(),
            d.detail,
            d.route.as_deref().unwrap_or("-"),
            d.rule.as_deref().unwrap_or("-"),
        );
        if let Some(id) = &d.identity {
            out.push_str(&format!(
                "subject:  {} (issuer {})\n",
                id.subject, id.issuer_name
            ));
            if let Some(key) = id.api_key_id() {
                out.push_str(&format!("api key:  {key}\n"));
            }
        }
        if !self.rate_limits.is_empty() {
            out.push_str(&format!("rate limits: {}\n", self.rate_limits.join(", ")));
        }
        if let Some(c) = challenge(d) {
            out.push_str(&format!("www-authenticate: {c}\n"));
        }
        if let Some(w) = d.dry_run.as_deref() {
            out.push_str(&format!(
                "dry run:  {} {} {} ({}), route {}, rule {}\n",
                if w.is_allow() { "ALLOW" } else { "DENY" },
                w.code.http_status(),
                w.code.as_str(),
                w.detail,
                w.route.as_deref().unwrap_or("-"),
                w.rule.as_deref().unwrap_or("-"),
            ));
        }
        out
    }
}

/// `explain`: decides the described request against the config, with keys loaded as the
/// server would (files read, URLs fetched).
pub async fn explain(args: &ExplainArgs) -> Result<Explanation, CliError> {
    let config = config::load(&args.config)?;
    let mut headers: HashMap<String, String> = HashMap::new();
    for (n, raw) in args.headers.iter().enumerate() {
        // Not echoed: a header written without its `:` is likely `authorization Bearer ...`.
        let (name, value) = raw.split_once(':').ok_or_else(|| {
            CliError::Usage(format!(
                "--header number {} (of {}) has no `:`: write it `name: value` (it is not \
                 shown: it may hold a credential)",
                n + 1,
                args.headers.len()
            ))
        })?;
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        // Repeated headers reach Portcullis joined with `,`, exactly as Envoy sends them.
        headers
            .entry(name)
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    if let Some(token) = &args.token {
        // Beside an `authorization` given with `--header`: two credentials, joined as Envoy
        // joins repeated headers (the server answers `multiple_credentials`). It replaced it.
        let bearer = format!("Bearer {token}");
        headers
            .entry("authorization".into())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&bearer);
            })
            .or_insert(bearer);
    }
    // The live server's own steps on an engine of its own: the revocation file is checked,
    // and a rule with `approval:` answers `approval_required` (unless a pre-approval holds),
    // on in-memory state that is thrown away, with no webhook, so nothing is spent or asked.
    let config = Arc::new(config);
    let engine = crate::engine::Engine::offline(config.clone());
    engine.keys.start().await;
    // The scheme a DPoP proof's `htu` names, stated as Envoy's HTTP ext_authz API states it:
    // always `http` made every proof for an `https` URL a 401 `htu` mismatch here.
    let scheme =
        crate::grpc::http::forwarded_scheme(headers.get("x-forwarded-proto").map(String::as_str))
            .unwrap_or("http");
    let view = RequestView {
        method: &args.method,
        host: &args.host,
        path: &args.path,
        headers: &headers,
        source_ip: args.source_ip,
        source_principal: "",
        scheme,
        peer_certificate: None,
    };
    let decision = engine.check_at(&view, unix_now()).await;
    let decision = match decision
        .body_fields
        .iter()
        .any(|(k, _)| *k == "approval_id")
    {
        // The approval request just opened exists nowhere else: name no id.
        true => unopened_approval(&engine, decision),
        false => decision,
    };
    let rate_limits = match (&decision.route, decision.is_allow()) {
        (Some(route), true) => {
            crate::ratelimit::applicable(&config, &view, route, decision.identity.as_deref())
                .into_iter()
                .map(|(l, _)| l.id.to_string())
                .collect()
        }
        _ => Vec::new(),
    };
    Ok(Explanation {
        decision,
        rate_limits,
    })
}

/// An `approval_required` deny of `explain` without the approval request the engine opened
/// on its throw-away state: the detail says who must approve, and no id is named.
fn unopened_approval(engine: &crate::engine::Engine, decision: Decision) -> Decision {
    let policy = match (&decision.route, &decision.rule) {
        (Some(route), Some(rule)) => engine.approvals.policy(route, rule),
        _ => None,
    };
    let who = policy.map_or_else(|| "an approver".to_string(), |p| p.approvers_text());
    Decision {
        detail: format!(
            "this action needs approval by {who}: the server opens an approval request (explain \
             opens none)"
        )
        .into(),
        response_headers: Vec::new(),
        body_fields: Box::default(),
        ..decision
    }
}

/// `test`: every file's report, in order. A failing case is in its report; `Err` is a file
/// or config that cannot be used.
pub async fn test(args: &TestArgs) -> Result<Vec<crate::policytest::Report>, CliError> {
    let mut reports = Vec::with_capacity(args.files.len());
    for file in &args.files {
        let (cases, named) =
            crate::policytest::load(file).map_err(|e| CliError::Usage(e.to_string()))?;
        let path = args
            .config
            .clone()
            .or(named)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        let config = Arc::new(config::load(&path)?);
        let report = crate::policytest::run(&config, &cases, file, unix_now())
            .await
            .map_err(|e| CliError::Usage(e.to_string()))?;
        reports.push(report);
    }
    Ok(reports)
}

/// `token`: a signed development token for the dev issuer of the config.
pub fn token(args: &TokenArgs) -> Result<String, CliError> {
    let config = config::load(&args.config)?;
    let ttl = humantime::parse_duration(&args.ttl).map_err(|e| {
        CliError::Usage(format!("--ttl `{}`: {e} (use e.g. `15m`, `1h`)", args.ttl))
    })?;
    // `0s` (or `500ms`) minted a token expired at its issue: refused at its first use.
    if ttl.as_secs() == 0 {
        return Err(CliError::Usage(format!(
            "--ttl `{}`: a token must live at least 1s (for an expired one, `--claim exp=...`)",
            args.ttl
        )));
    }
    mint_dev_token(&config, args, unix_now(), ttl.as_secs() as i64)
}

/// Signs a token with the dev key for the config's dev issuer. Refuses any other issuer.
pub fn mint_dev_token(
    config: &Config,
    args: &TokenArgs,
    now: i64,
    ttl_secs: i64,
) -> Result<String, CliError> {
    let issuer = config
        .issuers
        .iter()
        .find(|i| i.rules.issuer == DEV_ISSUER)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{}: no issuer `{DEV_ISSUER}`: `portcullis token` signs only for the development \
                 issuer, never for a real one",
                args.config.display()
            ))
        })?;
    let jwks_path = issuer.keys.file.as_ref().ok_or_else(|| {
        CliError::Usage("the dev issuer must use a local key file (keys.file)".into())
    })?;
    let key_path = jwks_path.with_file_name("signing-key.pem");
    let pem = std::fs::read(&key_path).map_err(|error| CliError::Read {
        path: key_path.clone(),
        error,
    })?;
    let jwks: Value = std::fs::read(jwks_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let kid = jwks["keys"][0]["kid"].as_str().map(str::to_string);

    let mut claims = Map::new();
    claims.insert("iss".into(), json!(DEV_ISSUER));
    claims.insert("sub".into(), json!(args.sub));
    let aud = issuer.rules.audiences.first().cloned().unwrap_or_default();
    claims.insert("aud".into(), json!(aud));
    claims.insert("iat".into(), json!(now));
    claims.insert("nbf".into(), json!(now));
    claims.insert("exp".into(), json!(now + ttl_secs));
    claims.insert("jti".into(), json!(uuid::Uuid::new_v4().to_string()));
    let scopes: Vec<&str> = args
        .scopes
        .iter()
        .flat_map(|s| s.split_whitespace())
        .collect();
    if !scopes.is_empty() {
        claims.insert(issuer.claims.scopes.clone(), json!(scopes.join(" ")));
    }
    if !args.roles.is_empty() {
        claims.insert(issuer.claims.roles.clone(), json!(args.roles));
    }
    for raw in &args.claims {
        let (name, value) = raw
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--claim `{raw}`: expected `name=value`")))?;
        // The token is the dev issuer's, for the `--sub` subject: a claim replacing either
        // made a token other than the one announced (and `iss` one no issuer takes).
        match name {
            "iss" => {
                return Err(CliError::Usage(format!(
                    "--claim `iss`: `portcullis token` signs for `{DEV_ISSUER}` only, and the \
                     token says so"
                )));
            }
            "sub" => {
                return Err(CliError::Usage(
                    "--claim `sub`: the subject is `--sub`'s".into(),
                ));
            }
            _ => {}
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| json!(value));
        claims.insert(name.to_string(), value);
    }

    let alg = jsonwebtoken::Algorithm::RS256;
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid;
    header.typ = Some(
        issuer
            .rules
            .required_typ
            .clone()
            .unwrap_or_else(|| "JWT".to_string()),
    );
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem)
        .map_err(|e| CliError::Keys(format!("`{}`: {e}", key_path.display())))?;
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| CliError::Keys(format!("cannot sign the token: {e}")))
}

/// The readable start of a generated key id: the owner's letters and digits (`.`, `_` and
/// `-` kept), every other run of characters one `-`, no `-` at either end; `key` when
/// nothing is left (`élan` gives `lan`, `!!!` gives `key`).
fn id_base(owner: &str) -> String {
    let mut base = String::new();
    for c in owner.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
            base.push(c);
        } else if !base.is_empty() && !base.ends_with('-') {
            base.push('-');
        }
        if base.len() >= 40 {
            break;
        }
    }
    let base = base.trim_end_matches('-');
    if base.is_empty() {
        "key".to_string()
    } else {
        base.to_string()
    }
}

#[cfg(test)]
mod apikey_tests {
    use super::*;

    /// A generated id reads as its owner: no `-` at the start or doubled, never empty.
    #[test]
    fn generated_ids_start_with_the_owners_name() {
        for (owner, base) in [
            ("team orders", "team-orders"),
            ("élan", "lan"),
            ("!!!", "key"),
            ("  a -- b  ", "a-b"),
            ("ops.team_1", "ops.team_1"),
        ] {
            assert_eq!(id_base(owner), base, "{owner}");
            assert!(crate::identity::apikey::valid_id(&format!(
                "{}-abc123",
                id_base(owner)
            )));
        }
        assert!(id_base(&"x".repeat(100)).len() <= 40);
    }

    fn args(routes: &[&str], id: Option<&str>) -> ApikeyNewArgs {
        ApikeyNewArgs {
            owner: "team orders".into(),
            routes: routes.iter().map(|r| r.to_string()).collect(),
            expires: "30d".into(),
            id: id.map(str::to_string),
        }
    }

    #[test]
    fn the_printed_entry_compiles_and_accepts_the_printed_key_only() {
        let now = 1_800_000_000;
        let new = build_api_key(
            &args(&["GET /orders/{id}", "POST  /orders"], None),
            &[9u8; 32],
            "abc123",
            now,
            30 * 86_400,
        )
        .unwrap();
        assert!(new.key.starts_with("pck_"));
        assert!(
            !new.entry.contains(&new.key),
            "the entry must hold only the hash"
        );
        let indented: String = new.entry.lines().map(|l| format!("    {l}\n")).collect();
        let text = format!(
            "api_keys:\n  keys:\n{indented}routes:\n  - {{id: o, methods: [GET], path: \"/orders/{{id}}\", rules: [{{id: r, api_keys: [\"*\"]}}]}}\n"
        );
        let config = config::from_str(&text, Path::new("test.yaml")).unwrap();
        let keys = config.api_keys.as_ref().unwrap();
        let key = keys.verify(&new.key, now).unwrap();
        assert_eq!(&*key.id, "team-orders-abc123");
        assert_eq!(key.owner, "team orders");
        assert_eq!(key.expires_at, now + 30 * 86_400);
        let routes: Vec<String> = key.endpoints.iter().map(ToString::to_string).collect();
        assert_eq!(routes, ["GET /orders/{id}", "POST /orders"]);
        assert!(keys.verify(&new.key, now + 30 * 86_400).is_err(), "expired");
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        let lower = build_api_key(&args(&["get /o"], None), &[0; 32], "x", 0, 60).unwrap();
        assert_eq!(
            lower.warnings,
            vec![
                "--route `get /o`: `get` is not upper-case; methods are case-sensitive, so it \
                 will not match `GET`"
                    .to_string()
            ]
        );
        let upper = build_api_key(&args(&["GET /o"], None), &[0; 32], "x", 0, 60).unwrap();
        assert!(upper.warnings.is_empty(), "{:?}", upper.warnings);
        let r = |a: &ApikeyNewArgs| build_api_key(a, &[0; 32], "x", 0, 60).map(|_| ());
        assert!(r(&args(&["GET orders"], None)).is_err());
        assert!(r(&args(&["* /orders"], None)).is_err());
        assert!(r(&args(&["GET /orders"], Some("bad id"))).is_err());
        assert!(build_api_key(&args(&["GET /o"], None), &[0; 32], "x", 0, 0).is_err());
    }

    #[test]
    fn different_randomness_gives_different_keys() {
        let a = build_api_key(&args(&["GET /o"], None), &[1; 32], "x", 0, 60).unwrap();
        let b = build_api_key(&args(&["GET /o"], None), &[2; 32], "x", 0, 60).unwrap();
        assert_ne!(a.key, b.key);
    }
}
