//! The configuration file's shape, exactly as written in YAML.
//!
//! Every struct denies unknown fields so a misspelt key is an error that names the field.
//! Defaults live here, next to the field they belong to, so the schema documents itself.
//! Nothing here validates cross-field rules: that is `compile`'s job.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::bytes::ByteSize;
use super::duration::HumanDuration;

/// The message of a list key written with nothing under it; `parse` adds the hint.
pub(super) const EMPTY_LIST: &str = "is empty (every item commented out?)";

/// A list whose absence means "any" or otherwise lifts a restriction (a rule's `issuers`,
/// a route's `hosts`, ...). YAML reads the key with nothing under it (every item commented
/// out) as null, which would otherwise be the same empty list and widen access in silence:
/// it is an error instead. An absent key keeps its meaning (`#[serde(default)]`), and so
/// does an explicit `[]`.
fn restricting<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<Vec<T>>::deserialize(d)?.ok_or_else(|| serde::de::Error::custom(EMPTY_LIST))
}

/// `upstream.identity_headers` written with every entry commented out (YAML null): an error,
/// where it would otherwise be an empty map, so that nothing sets or strips the identity
/// headers and a client-sent `x-portcullis-subject` reaches the upstream. An absent key means
/// the default headers, and an explicit `{}` means none.
fn identity_headers<'de, D>(d: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: Deserializer<'de>,
{
    Option::<BTreeMap<String, String>>::deserialize(d)?.ok_or_else(|| {
        serde::de::Error::custom(
            "is empty (every entry commented out?): remove the key for the default identity \
             headers, or write `{}` for none (then nothing sets or strips them)",
        )
    })
}

/// The message of a restricting section written with nothing under it; `parse` adds the
/// hint.
pub(super) const EMPTY_SECTION: &str = "has no value (everything under it commented out?)";

/// A section or value that adds a restriction (a rule's `source`, `time_window`,
/// `approval`, an issuer's `max_lifetime`, `server.tls`, ...). YAML reads the key with
/// nothing under it as null, which would otherwise read as absent and drop the restriction
/// in silence: it is an error instead. An absent key keeps its meaning.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)?
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(EMPTY_SECTION))
}

/// `restricting` for a list whose absence means a default (`algorithms`).
fn restricting_opt<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    restricting(d).map(Some)
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub tokens: TokenConfig,
    /// Token issuers Portcullis trusts. An empty list means no bearer token is ever accepted.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// Headers added to allowed requests for the upstream, and the spoof protection around them.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// How the client address is derived.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Audit log settings.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The routes, most specific wins; a request that matches none is denied.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// A candidate policy tried on live traffic and never enforced.
    #[serde(default)]
    pub dry_run: Option<DryRunConfig>,
    /// Where shared state (approvals, revocations, rate limits, DPoP replay) lives.
    #[serde(default)]
    pub state: StateConfig,
    /// Just-in-time approvals: how long requests wait, and who is told about them.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// Scoped API keys (stored as hashes only). Absent: no API key is ever accepted.
    #[serde(default)]
    pub api_keys: Option<ApiKeysConfig>,
    /// Token-bucket rate limits, all of which apply to every request they select.
    #[serde(default, deserialize_with = "restricting")]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Revoked tokens (`jti`), sessions (`sid`) and subjects (`sub`).
    #[serde(default)]
    pub revocation: RevocationConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listener for Envoy's ext_authz Check calls.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Admin HTTP listener: /healthz, /readyz, /metrics.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Listener for Envoy's HTTP ext_authz API (`http_service`, see envoy/envoy-http.yaml).
    /// Absent: not served. Uses `tls` too when that is set.
    #[serde(default)]
    pub http_listen: Option<String>,
    /// The most connections each ext_authz listener (`listen`, `http_listen`) holds open at
    /// once; past it a new connection is closed on arrival (counted in
    /// `portcullis_connections_refused_total`). Envoy needs a handful per worker thread.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long in-flight checks may take to finish after SIGTERM/SIGINT.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// How long to go on serving after SIGTERM/SIGINT, reporting not ready meanwhile, before
    /// the listeners close: the time load balancers (Kubernetes endpoints, Envoy's health
    /// checks) take to stop sending new connections here. A second signal ends it.
    #[serde(default = "default_shutdown_delay")]
    pub shutdown_delay: HumanDuration,
    /// The longest a Check waits for a key fetch triggered by an unknown `kid`.
    #[serde(default = "default_key_wait")]
    pub key_fetch_wait: HumanDuration,
    /// The longest a decision may wait in all (shared state, key fetches) before it is a
    /// 503 deny. Keep it below Envoy's ext_authz `timeout`, so that Envoy always gets an
    /// explained answer (and the decision its audit line) rather than timing out itself.
    #[serde(default = "default_decision_timeout")]
    pub decision_timeout: HumanDuration,
    /// TLS (and client-certificate verification) on the gRPC listener. Absent: plaintext.
    #[serde(default, deserialize_with = "present")]
    pub tls: Option<TlsConfig>,
    /// A gRPC listener of its own for the approvals API (and health, reflection). Set: the
    /// approvals API is served here and no longer on `listen`, so approvers and Envoy need
    /// not share one listener (nor one client-certificate allow-list). Absent: on `listen`.
    #[serde(default)]
    pub approvals_listen: Option<String>,
    /// TLS for `approvals_listen`, with its own client CA and allowed principals (your
    /// approvers'). Required there when `tls` is set. Absent: plaintext.
    #[serde(default, deserialize_with = "present")]
    pub approvals_tls: Option<TlsConfig>,
}

/// TLS for the gRPC listener, so only a client with a certificate from `client_ca` (your
/// Envoy) can ask for decisions. Files are PEM, resolved against the config file's folder,
/// and reloaded when they change (checked every second, and on SIGHUP).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain (leaf first).
    pub cert: PathBuf,
    /// The server private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client certificates.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `client_ca` (default true).
    #[serde(default = "default_true")]
    pub require_client_cert: bool,
    /// When set, the client certificate must also carry one of these URI SANs (exact, or
    /// `prefix/*` / `prefix/**`), e.g. Envoy's SPIFFE ID.
    #[serde(default, deserialize_with = "restricting")]
    pub allowed_client_principals: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            http_listen: None,
            max_connections: default_max_connections(),
            shutdown_grace: default_shutdown_grace(),
            shutdown_delay: default_shutdown_delay(),
            key_fetch_wait: default_key_wait(),
            decision_timeout: default_decision_timeout(),
            tls: None,
            approvals_listen: None,
            approvals_tls: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9191".to_string()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9192".to_string()
}
fn default_max_connections() -> usize {
    4096
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_shutdown_delay() -> HumanDuration {
    HumanDuration::from_secs(0)
}
fn default_key_wait() -> HumanDuration {
    HumanDuration::from_millis(100)
}

fn default_decision_timeout() -> HumanDuration {
    HumanDuration::from_millis(200)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Tokens longer than this are rejected before any parsing.
    #[serde(default = "default_max_token_bytes")]
    pub max_bytes: usize,
    #[serde(default)]
    pub cache: TokenCacheConfig,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_max_token_bytes(),
            cache: TokenCacheConfig::default(),
        }
    }
}

fn default_max_token_bytes() -> usize {
    8 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCacheConfig {
    /// Maximum number of verified tokens kept; 0 disables the cache.
    #[serde(default = "default_cache_capacity")]
    pub capacity: u64,
    /// A verified token is kept at most this long (and never past its `exp`).
    #[serde(default = "default_cache_ttl")]
    pub max_ttl: HumanDuration,
    /// Memory budget for cached tokens (estimated bytes of token plus identity); least
    /// recently useful entries are evicted beyond it, whatever `capacity` says.
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: ByteSize,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        Self {
            capacity: default_cache_capacity(),
            max_ttl: default_cache_ttl(),
            max_bytes: default_cache_max_bytes(),
        }
    }
}

fn default_cache_capacity() -> u64 {
    100_000
}
fn default_cache_max_bytes() -> ByteSize {
    ByteSize::mib(64)
}
fn default_cache_ttl() -> HumanDuration {
    HumanDuration::from_secs(300)
}

/// One trusted token issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Short name used in logs, metrics and decisions. Defaults to the issuer URL.
    #[serde(default)]
    pub name: Option<String>,
    /// The exact `iss` value.
    pub issuer: String,
    /// The token's `aud` (string or list) must contain one of these.
    pub audiences: Vec<String>,
    /// Allowed `alg` values. Default: every asymmetric algorithm.
    #[serde(default, deserialize_with = "restricting_opt")]
    pub algorithms: Option<Vec<String>>,
    /// Where the verification keys come from: exactly one of `file`, `url`, `discovery`.
    pub keys: KeySourceConfig,
    /// Where the token is carried.
    #[serde(default)]
    pub token: TokenLocationConfig,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway: HumanDuration,
    /// Optional maximum for `exp - iat`.
    #[serde(default, deserialize_with = "present")]
    pub max_lifetime: Option<HumanDuration>,
    /// Optional required `typ` header, e.g. `at+jwt` (RFC 9068).
    #[serde(default, deserialize_with = "present")]
    pub required_typ: Option<String>,
    /// Which claims carry scopes and roles.
    #[serde(default)]
    pub claims: ClaimPathsConfig,
    /// DPoP (RFC 9449): `disabled` (default), `optional` or `required`.
    #[serde(default)]
    pub dpop: crate::identity::dpop::DpopMode,
    /// Allowed DPoP proof algorithms. Default: ES256, ES384, EdDSA, RS256, PS256.
    #[serde(default, deserialize_with = "restricting_opt")]
    pub dpop_algorithms: Option<Vec<String>>,
    /// How far a proof's `iat` may be from now, either way; `jti`s are remembered twice as long.
    #[serde(default = "default_dpop_window")]
    pub dpop_window: HumanDuration,
    /// Server-provided DPoP nonces (RFC 9449 9): proofs must carry a recent one.
    #[serde(default, deserialize_with = "present")]
    pub dpop_nonce: Option<DpopNonceConfig>,
    /// Certificate-bound tokens (RFC 8705): every token must carry `cnf.x5t#S256` matching the
    /// client certificate Envoy forwards. (A token that carries it is always checked.)
    #[serde(default)]
    pub cert_bound: bool,
}

/// `issuers[].dpop_nonce`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpopNonceConfig {
    /// File holding the secret nonces are made with (at least 32 bytes), relative to the
    /// config file. Every replica must read the same one. Absent: a random secret per
    /// process (and per config load).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// How long a nonce is the current one; it is accepted for one period more.
    #[serde(default = "default_dpop_nonce_lifetime")]
    pub lifetime: HumanDuration,
}

fn default_dpop_nonce_lifetime() -> HumanDuration {
    HumanDuration::from_secs(300)
}

fn default_dpop_window() -> HumanDuration {
    HumanDuration::from_secs(60)
}

fn default_leeway() -> HumanDuration {
    HumanDuration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySourceConfig {
    /// A local JWKS file (may hold any key type, it is trusted as configured).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// A JWKS URL fetched over HTTPS (HTTP only on loopback or with `allow_http`).
    #[serde(default)]
    pub url: Option<String>,
    /// Use OIDC discovery from `<issuer>/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery: bool,
    /// Allow plain HTTP to a non-loopback host. Only for test setups.
    #[serde(default)]
    pub allow_http: bool,
    /// Refresh interval bounds: Cache-Control max-age is clamped into [min_refresh, max_refresh].
    #[serde(default = "default_min_refresh")]
    pub min_refresh: HumanDuration,
    #[serde(default = "default_max_refresh")]
    pub max_refresh: HumanDuration,
    /// After the last good fetch, keys stay usable this long while fetches fail.
    #[serde(default = "default_max_stale")]
    pub max_stale: HumanDuration,
    /// An unknown `kid` triggers at most one refetch per this interval.
    #[serde(default = "default_unknown_kid_interval")]
    pub unknown_kid_interval: HumanDuration,
    /// Timeout of one fetch.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout: HumanDuration,
    /// Largest accepted JWKS document (fetched or read from `file`).
    #[serde(default = "default_max_jwks_bytes")]
    pub max_bytes: ByteSize,
}

fn default_min_refresh() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_max_refresh() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_max_stale() -> HumanDuration {
    HumanDuration::from_secs(24 * 3600)
}
fn default_unknown_kid_interval() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_fetch_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_max_jwks_bytes() -> ByteSize {
    ByteSize(256 * 1024)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenLocationConfig {
    /// Header carrying the token (lower-case compared).
    #[serde(default = "default_token_header")]
    pub header: String,
    /// Scheme before the token, compared case-insensitively; empty for the bare header value.
    #[serde(default = "default_token_scheme")]
    pub scheme: String,
}

impl Default for TokenLocationConfig {
    fn default() -> Self {
        Self {
            header: default_token_header(),
            scheme: default_token_scheme(),
        }
    }
}

fn default_token_header() -> String {
    "authorization".to_string()
}
fn default_token_scheme() -> String {
    "Bearer".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimPathsConfig {
    /// Claim holding scopes: a space-separated string or a list (dotted path).
    #[serde(default = "default_scope_claim")]
    pub scopes: String,
    /// Claim holding roles: a list or a single string (dotted path, e.g. `realm_access.roles`).
    #[serde(default = "default_roles_claim")]
    pub roles: String,
}

impl Default for ClaimPathsConfig {
    fn default() -> Self {
        Self {
            scopes: default_scope_claim(),
            roles: default_roles_claim(),
        }
    }
}

fn default_scope_claim() -> String {
    "scope".to_string()
}
fn default_roles_claim() -> String {
    "roles".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Header name -> claim path. Each is set on allowed requests and always removed from the
    /// client's request first, so the upstream can trust them.
    #[serde(
        default = "default_identity_headers",
        deserialize_with = "identity_headers"
    )]
    pub identity_headers: BTreeMap<String, String>,
    /// Remove the credential header before the request reaches the upstream.
    #[serde(default)]
    pub strip_authorization: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            identity_headers: default_identity_headers(),
            strip_authorization: false,
        }
    }
}

fn default_identity_headers() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("x-portcullis-subject".to_string(), "sub".to_string()),
        ("x-portcullis-issuer".to_string(), "iss".to_string()),
        ("x-portcullis-scopes".to_string(), "scope".to_string()),
    ])
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Number of trusted proxies in front of Envoy that append to X-Forwarded-For.
    /// 0 (default): the client address is the source address Envoy reports.
    #[serde(default)]
    pub trusted_proxy_hops: u32,
    /// Request headers that only a trusted component sets (Envoy, a device-trust proxy), so
    /// rules may read posture from them. Envoy MUST remove each of them from client requests.
    #[serde(default)]
    pub trusted_headers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// One JSON line per decision on stdout.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

fn default_true() -> bool {
    true
}

/// One route: where it applies and who may use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique id, reported in decisions, logs and metrics.
    pub id: String,
    /// Hosts this route applies to (case-insensitive, port and trailing dot ignored).
    /// Absent or empty: any host. `*.example.com` matches one or more labels below.
    #[serde(default, deserialize_with = "restricting")]
    pub hosts: Vec<String>,
    /// Methods, case-sensitive. HEAD is not implied by GET.
    pub methods: Vec<String>,
    /// Path template: `/exact`, `/users/{id}`, `*` for one segment, trailing `/**` for any tail.
    pub path: String,
    /// No identity needed.
    #[serde(default)]
    pub public: bool,
    /// Alternatives: the request is allowed when any rule holds.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// One grant; all of its conditions must hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub id: String,
    /// Restrict to these issuer names (default: any configured issuer).
    #[serde(default, deserialize_with = "restricting")]
    pub issuers: Vec<String>,
    /// All of these scopes.
    #[serde(default, deserialize_with = "restricting")]
    pub scopes: Vec<String>,
    /// Any of these roles.
    #[serde(default, deserialize_with = "restricting")]
    pub roles: Vec<String>,
    /// All of these claim conditions.
    #[serde(default, deserialize_with = "restricting")]
    pub claims: Vec<ClaimConditionConfig>,
    /// Resource binding: path parameters tied to claims.
    #[serde(default, deserialize_with = "restricting")]
    pub bind: Vec<BindingConfig>,
    /// API keys this rule grants, by id (`"*"`: any configured key). A rule with `api_keys`
    /// is for API keys only (it never holds for a bearer token, and may not also name
    /// issuers, scopes, roles or claims); a rule without it never holds for an API key.
    #[serde(default, deserialize_with = "restricting")]
    pub api_keys: Vec<String>,
    /// The client address must be in `cidrs` (when given) and in none of `not_cidrs`.
    #[serde(default, deserialize_with = "present")]
    pub source: Option<SourceConfig>,
    /// `now - auth_time` (or `iat` when there is no `auth_time`) at most this.
    #[serde(default, deserialize_with = "present")]
    pub max_session_age: Option<HumanDuration>,
    /// `exp - iat` at most this (short-lived credentials for this rule).
    #[serde(default, deserialize_with = "present")]
    pub max_token_lifetime: Option<HumanDuration>,
    /// Local days and hours in a time zone.
    #[serde(default, deserialize_with = "present")]
    pub time_window: Option<TimeWindowConfig>,
    /// Device posture signals, all of which must hold.
    #[serde(default, deserialize_with = "restricting")]
    pub posture: Vec<PostureConfig>,
    /// Any of these peer principals (SPIFFE IDs from Envoy's `source.principal` or the
    /// forwarded client certificate's URI SANs): exact, `prefix/*` (one segment) or
    /// `prefix/**` (any depth). A rule with ONLY `principals` is a service grant: the peer
    /// identity alone satisfies it, no token needed.
    #[serde(default, deserialize_with = "restricting")]
    pub principals: Vec<String>,
    /// Just-in-time approval: a granted request is still refused until an approver approves
    /// this one action for this subject.
    #[serde(default, deserialize_with = "present")]
    pub approval: Option<ApprovalRuleConfig>,
}

/// A source-network condition.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(default, deserialize_with = "restricting")]
    pub cidrs: Vec<String>,
    #[serde(default, deserialize_with = "restricting")]
    pub not_cidrs: Vec<String>,
}

/// A time window: `days` (default every day), `hours` `HH:MM-HH:MM` (default all day),
/// `timezone` an IANA name (default `UTC`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindowConfig {
    #[serde(default, deserialize_with = "restricting")]
    pub days: Vec<String>,
    #[serde(default, deserialize_with = "present")]
    pub hours: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub timezone: Option<String>,
}

/// A posture condition: exactly one of `claim`, `header`; exactly one of `equals`, `one_of`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostureConfig {
    #[serde(default)]
    pub claim: Option<String>,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub equals: Option<serde_json::Value>,
    #[serde(default)]
    pub one_of: Option<Vec<serde_json::Value>>,
}

/// The revocation list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// A YAML file of revoked `jti`/`sid`/`sub` values, reloaded on change and on SIGHUP.
    #[serde(default, deserialize_with = "present")]
    pub file: Option<PathBuf>,
    /// How often the file is checked for changes.
    #[serde(default = "default_revocation_reload")]
    pub reload: HumanDuration,
    /// Lifetime of an entry added through the admin API without `expires_at`.
    #[serde(default = "default_revocation_ttl")]
    pub default_ttl: HumanDuration,
    /// Hex SHA-256 of the bearer secret the admin API's `/revocations` endpoints require.
    /// Without it, they answer only when the admin listener is bound to loopback.
    #[serde(default)]
    pub admin_token_sha256: Option<String>,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            file: None,
            reload: default_revocation_reload(),
            default_ttl: default_revocation_ttl(),
            admin_token_sha256: None,
        }
    }
}

fn default_revocation_reload() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_revocation_ttl() -> HumanDuration {
    HumanDuration::from_secs(24 * 3600)
}

/// A claim condition: exactly one of `equals`, `one_of`, `contains`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimConditionConfig {
    /// Dotted claim path.
    pub claim: String,
    #[serde(default)]
    pub equals: Option<serde_json::Value>,
    #[serde(default)]
    pub one_of: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub contains: Option<serde_json::Value>,
}

/// Resource binding: exactly one of `equals_claim`, `in_claim`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    /// Path parameter name from the route template (`{user}` -> `user`).
    pub param: String,
    /// The parameter must equal this (string) claim, e.g. `sub`.
    #[serde(default)]
    pub equals_claim: Option<String>,
    /// The parameter must be a member of this list claim, e.g. `tenants`.
    #[serde(default)]
    pub in_claim: Option<String>,
}

/// The `api_keys:` section: where keys are read from and where they are stored (as hashes).
///
/// A key works only when BOTH hold: a rule of the matched route names it (`api_keys: [id]`
/// or `["*"]`), and the request's method and path match one of the key's own `routes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    /// Request header carrying the key, lower-case (default `x-api-key`). A key in the URL
    /// query is always refused.
    #[serde(default = "default_api_key_header")]
    pub header: String,
    /// Optional separate key file (YAML `keys: [...]`, same entries as below), relative to
    /// the config file. Read when the config is loaded, and watched with it. An empty file is
    /// an error (`keys: []` holds no keys).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Keys stored inline.
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
}

fn default_api_key_header() -> String {
    "x-api-key".to_string()
}

/// A separate API key file: `keys: [...]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyFileConfig {
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
}

/// One API key. `portcullis apikey new` prints a ready entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Unique id (letters, digits, `.`, `_`, `-`): named by rules, logs and the audit log.
    pub id: String,
    /// Who holds the key; becomes the identity's subject (`sub`).
    pub owner: String,
    /// `sha256:<64 hex digits>` of the key. The key itself is never stored.
    pub hash: String,
    /// RFC 3339 UTC timestamp (`2027-01-31T00:00:00Z`) from which the key is refused.
    pub expires: String,
    /// Endpoints the key works on: `METHOD /path/template` (same template syntax as routes).
    pub routes: Vec<String>,
}

/// One token-bucket limit: `burst` requests at once, refilled at `requests` per `per`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Unique id, reported in the 429 and its `RateLimit-Policy` header.
    pub id: String,
    /// What one bucket belongs to.
    pub by: RateLimitBy,
    /// Sustained rate: this many requests ...
    pub requests: u32,
    /// ... per this long (at least 1s).
    pub per: super::duration::HumanDuration,
    /// Requests allowed at once (the bucket size). Default: `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Route ids this limit applies to. Empty (default): every route.
    #[serde(default, deserialize_with = "restricting")]
    pub routes: Vec<String>,
    /// `by: client_ip` only: how many leading bits of an IPv6 client address one bucket
    /// covers (32 to 128). Default: 64, one subnet, every address of which a single host can
    /// use. An IPv4 address is always a bucket of its own.
    #[serde(default)]
    pub ipv6_prefix: Option<u32>,
}

/// The bucket a request is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitBy {
    /// One bucket per verified subject (issuer + `sub`; an API key's owner). Requests without
    /// an identity (public routes) are not counted.
    Subject,
    /// One bucket per API key id. Requests without an API key are not counted.
    ApiKey,
    /// One bucket per client address (see `network.trusted_proxy_hops`): per IPv4 address,
    /// per IPv6 network of `ipv6_prefix` bits.
    ClientIp,
    /// One bucket per route, shared by every caller.
    Route,
}

/// Which store holds shared state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// In-process: one replica only.
    #[default]
    Memory,
    /// A Redis server shared by every replica.
    Redis,
}

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    #[serde(default)]
    pub backend: StateBackend,
    /// `redis://[:password@]host:port/db`, or `rediss://...` for TLS. Never logged (it may
    /// hold a password).
    #[serde(default = "default_redis_url")]
    pub redis_url: String,
    /// TLS settings of a `rediss://` URL: a private CA, a client certificate.
    #[serde(default)]
    pub tls: Option<StateTlsConfig>,
    /// Prefix of every key this Portcullis writes, so several deployments can share a Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Longest one state operation may take; past it the decision fails closed.
    #[serde(default = "default_state_timeout")]
    pub timeout: HumanDuration,
}

/// Debug output never shows the Redis URL: it may hold a password.
impl std::fmt::Debug for StateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateConfig")
            .field("backend", &self.backend)
            .field("redis_url", &"<redacted>")
            .field("tls", &self.tls)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `state.tls`: how a `rediss://` connection is verified and authenticated. Without it the
/// server certificate is verified against the system's trusted roots.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateTlsConfig {
    /// PEM CA bundle the Redis server's certificate must chain to, instead of the system's
    /// roots (a private CA, e.g. GCP Memorystore's server CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM, leaf first) for a Redis that requires mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            backend: StateBackend::Memory,
            redis_url: default_redis_url(),
            tls: None,
            key_prefix: default_key_prefix(),
            timeout: default_state_timeout(),
        }
    }
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/0".to_string()
}
fn default_key_prefix() -> String {
    "portcullis:".to_string()
}
fn default_state_timeout() -> HumanDuration {
    HumanDuration::from_millis(200)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// How long a request waits for a decision before it expires (and a retry asks anew).
    #[serde(default = "default_request_ttl")]
    pub request_ttl: HumanDuration,
    /// Told about every new request.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// Base URL of a page showing one request, for the webhook's link (`<base>/<id>`).
    #[serde(default)]
    pub link_base: Option<String>,
    /// How many new requests one caller (issuer and `sub`) may open per `request_ttl`;
    /// beyond that a new action is a 429 and opens nothing (no record, no webhook), so a
    /// client varying its query string cannot flood approvers or the store.
    #[serde(default = "default_max_new_requests")]
    pub max_new_requests: u32,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            request_ttl: default_request_ttl(),
            webhook: None,
            link_base: None,
            max_new_requests: default_max_new_requests(),
        }
    }
}

fn default_max_new_requests() -> u32 {
    20
}

fn default_request_ttl() -> HumanDuration {
    HumanDuration::from_secs(3600)
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Receives a JSON POST per new request.
    pub url: String,
    /// Per attempt.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: HumanDuration,
    /// Further attempts after a failure, with exponential backoff.
    #[serde(default = "default_webhook_retries")]
    pub retries: u32,
}

/// Debug output never shows the webhook URL: chat webhooks carry their secret in it.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

fn default_webhook_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_webhook_retries() -> u32 {
    3
}

/// `approval:` on a rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRuleConfig {
    /// Who may approve: any of these roles or subjects (never the requester).
    pub approvers: ApproversConfig,
    /// How long an approval stays usable.
    #[serde(default = "default_approval_ttl")]
    pub ttl: HumanDuration,
    /// How many requests one approval allows.
    #[serde(default = "default_approval_uses")]
    pub uses: u32,
    /// Conditions under which approval is granted automatically (recorded as such).
    #[serde(default)]
    pub pre_approve: Vec<PreApproveConfig>,
}

fn default_approval_ttl() -> HumanDuration {
    HumanDuration::from_secs(15 * 60)
}
fn default_approval_uses() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproversConfig {
    #[serde(default)]
    pub roles: Vec<String>,
    /// Subjects (`sub`), optionally `issuer-name:sub`.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Issuers (`issuers[].name`) whose tokens `roles` and unqualified `subjects` are read
    /// from. Empty: the rule's `issuers`, else any configured issuer.
    #[serde(default)]
    pub issuers: Vec<String>,
}

/// Automatic approval: the requester holds one of `roles` (or is one of `subjects`) and
/// `now` is inside [`from`, `until`) when those are set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreApproveConfig {
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub subjects: Vec<String>,
    /// RFC 3339 start of the window, e.g. `2026-11-23T06:00:00Z`.
    #[serde(default, deserialize_with = "present")]
    pub from: Option<String>,
    /// RFC 3339 end of the window (exclusive).
    #[serde(default, deserialize_with = "present")]
    pub until: Option<String>,
}

/// `dry_run`: a candidate policy decided beside the live one on every request, reported
/// (audit event, metrics, `explain`) and never enforced, to see what a policy change would
/// do before it goes live. The candidate is the live `routes` with these changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DryRunConfig {
    /// Routes that replace the live route with the same `id`, or are added (same schema as
    /// the top-level `routes`).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Ids of live routes the candidate drops.
    #[serde(default)]
    pub remove: Vec<String>,
}
