//! The decision corpus: data-driven cases, each a request (and optionally a token minted from
//! a test key) decided by `portcullis::decide::decide` against a config, compared with the
//! expected decision. Adding a case is adding YAML; the runner never changes for it.
//!
//! Every `tests/corpus/*.yaml` file is run. All cases run; every mismatch is collected (file,
//! case name, expected vs got) and the test fails once at the end listing them all.
//!
//! # File format
//!
//! ```yaml
//! config: ../../config/portcullis.yaml   # relative to this yaml file (default: the shipped config)
//! cases:
//!   - name: alice reads an order           # unique within the file
//!     now: 1800000000                      # optional; default 1_800_000_000
//!     request:
//!       method: GET                        # default GET
//!       path: /orders/42                   # required; raw :path, query included
//!       host: api.example.com              # default api.example.com
//!       headers: {x-request-id: abc}       # lower-case names
//!       source_ip: 10.1.2.3                # optional
//!       source_principal: spiffe://x/y     # optional; default ""
//!       scheme: https                      # optional; default https (DPoP `htu`)
//!       peer_certificate: ../fixtures/mtls/checkout.crt  # optional; the client certificate
//!                                          # Envoy forwards (PEM file, relative to this yaml)
//!     token:                               # optional; minted and sent in a header
//!       key: dev                           # dev = config/dev/signing-key.pem (kid portcullis-dev-1),
//!                                          # or a fixture: rsa2048, ec-p256, ec-p384, ed25519
//!                                          # (tests/fixtures/keys/<name>.pem, kid = name)
//!       secret: some-shared-secret         # instead of `key`: sign with HMAC over these bytes
//!       secret_file: ../../config/dev/jwks.json   # ... or over this file's bytes (relative)
//!       alg: RS256                         # signing alg; default: the key's natural alg
//!                                          # (RS256, ES256, ES384, EdDSA; HS256 for secrets)
//!       kid: portcullis-dev-1              # default: the key's kid; `~` (null) = no kid header
//!       header: {typ: at+jwt}              # extra/override header members; a `~` value removes
//!                                          # the member (e.g. `{alg: ~}`). `alg` here changes
//!                                          # only the header, the token is still signed with `alg`
//!       claims: {sub: alice, scope: orders:read}  # merged over the defaults: iss/aud of the
//!                                          # config's FIRST issuer, iat=now, exp=now+600
//!       omit: [exp]                        # default claims to drop
//!       header_json: '{"alg":"RS256","alg":"none"}'  # raw header JSON text, replaces header
//!       claims_json: '{"sub":"a","sub":"b"}'         # raw claims JSON text, replaces claims
//!                                          # (no defaults)
//!       raw: 'not.a.token'                 # a literal token string, nothing minted
//!       tamper: true                       # flip a bit in the signature
//!       send_as: 'Bearer {token}'          # header value; `{token}` is replaced (default shown)
//!       send_in: authorization             # header name (default authorization)
//!                                          # In `claims`, the string `{jkt:<key>}` becomes the
//!                                          # RFC 7638 thumbprint of fixture key <key>, and
//!                                          # `{x5t:<file>}` the x5t#S256 of a PEM certificate
//!                                          # (relative to this yaml).
//!     dpop:                                # optional; a DPoP proof sent in the `dpop` header
//!       key: ec-p256                       # fixture key signing it; its public JWK is embedded
//!       alg: ES256                         # default: the key's natural alg
//!       header: {typ: JWT}                 # overrides of {typ: dpop+jwt, alg, jwk}; `~` removes
//!       claims: {htm: POST}                # overrides of jti (from the case name), htm (the
//!                                          # method), htu (scheme://host/path), iat (now) and
//!                                          # ath (hash of the token); `~` removes
//!       raw: 'not.a.proof'                 # a literal proof instead
//!     expect:
//!       decision: deny                     # allow | deny (required)
//!       status: 401                        # optional
//!       reason: invalid_token              # optional; ReasonCode::as_str()
//!       route: orders-read                 # optional
//!       rule: orders-reader                # optional
//!       detail_contains: expired           # optional substring of Decision.detail
//!       dry_run:                           # optional; what the config's `dry_run` routes
//!         decision: deny                   # would answer (required), and optionally its
//!         reason: insufficient_scope       # status, reason, route and rule
//! ```
//!
//! Key sets: each issuer with a `keys.file` gets `KeySet::from_jwks(file, LocalFile)`; an
//! issuer with fetched keys (url/discovery) has none, so its tokens decide `keys_unavailable`.
//!
//! Invariant checked on every case: a decision's detail never contains the token, nor any
//! API key (a `pck_...` value in a header or the query).
//!
//! API keys need no runner support: send them as a header (`headers: {x-api-key: pck_...}`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use portcullis::authz::{Decision, RequestView};
use portcullis::config::Config;
use portcullis::identity::peer::PeerCertificate;
use portcullis::identity::{KeyOrigin, KeySet};
use portcullis::keys::KeyError;
use serde::Deserialize;
use serde_json::{Map, Value};

const DEFAULT_NOW: i64 = 1_800_000_000;
const DEFAULT_HOST: &str = "api.example.com";
const DEFAULT_LIFETIME: i64 = 600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CorpusFile {
    #[serde(default)]
    config: Option<String>,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    now: Option<i64>,
    request: RequestSpec,
    #[serde(default)]
    token: Option<TokenSpec>,
    #[serde(default)]
    dpop: Option<DpopSpec>,
    expect: Expect,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DpopSpec {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    header: Option<Map<String, Value>>,
    #[serde(default)]
    claims: Option<Map<String, Value>>,
    #[serde(default)]
    raw: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestSpec {
    #[serde(default = "default_method")]
    method: String,
    path: String,
    #[serde(default = "default_host")]
    host: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    source_ip: Option<IpAddr>,
    #[serde(default)]
    source_principal: String,
    #[serde(default = "default_scheme")]
    scheme: String,
    #[serde(default)]
    peer_certificate: Option<String>,
}

fn default_scheme() -> String {
    "https".into()
}

fn default_method() -> String {
    "GET".into()
}
fn default_host() -> String {
    DEFAULT_HOST.into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSpec {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_file: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    /// Absent: the key's kid. `~`: no kid header. A string: that kid.
    #[serde(default, deserialize_with = "present")]
    kid: Option<Option<String>>,
    #[serde(default)]
    header: Option<Map<String, Value>>,
    #[serde(default)]
    claims: Option<Map<String, Value>>,
    #[serde(default)]
    omit: Vec<String>,
    #[serde(default)]
    header_json: Option<String>,
    #[serde(default)]
    claims_json: Option<String>,
    #[serde(default)]
    raw: Option<String>,
    #[serde(default)]
    tamper: bool,
    #[serde(default)]
    send_as: Option<String>,
    #[serde(default)]
    send_in: Option<String>,
}

/// Tells a present `~` (Some(None)) from an absent field (None, via `default`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    decision: Outcome,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    detail_contains: Option<String>,
    /// What the config's `dry_run` routes must report (never what is enforced).
    #[serde(default)]
    dry_run: Option<DryRunExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunExpect {
    decision: Outcome,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    rule: Option<String>,
}

/// The fields a case can expect of a decision (or of its dry run), and what came.
struct Want<'a> {
    decision: Outcome,
    status: Option<u16>,
    reason: Option<&'a str>,
    route: Option<&'a str>,
    rule: Option<&'a str>,
}

struct Got<'a> {
    allow: bool,
    status: u16,
    reason: &'a str,
    route: Option<&'a str>,
    rule: Option<&'a str>,
}

/// What in `got` differs from `want`, each prefixed with `what` (`""` or `"dry-run "`).
fn differences(what: &str, want: &Want<'_>, got: &Got<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let outcome = if got.allow {
        Outcome::Allow
    } else {
        Outcome::Deny
    };
    if outcome != want.decision {
        out.push(format!("expected {what}{:?}", want.decision));
    }
    if let Some(status) = want.status
        && status != got.status
    {
        out.push(format!("expected {what}status {status}"));
    }
    let fields = [
        ("reason", want.reason, Some(got.reason)),
        ("route", want.route, got.route),
        ("rule", want.rule, got.rule),
    ];
    for (name, want, got) in fields {
        if let Some(want) = want
            && Some(want) != got
        {
            out.push(format!("expected {what}{name} `{want}`"));
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Allow,
    Deny,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A config with the key sets of its file-backed issuers.
struct Loaded {
    config: Config,
    keys: HashMap<String, Arc<KeySet>>,
}

fn load_config(path: &Path) -> Result<Loaded, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config `{}`: {e}", path.display()))?;
    let config = portcullis::config::from_str(&text, path).map_err(|e| e.to_string())?;
    let mut keys = HashMap::new();
    for issuer in &config.issuers {
        if let Some(file) = &issuer.keys.file {
            let bytes = std::fs::read(file)
                .map_err(|e| format!("cannot read key file `{}`: {e}", file.display()))?;
            let loaded = KeySet::from_jwks(&bytes, KeyOrigin::LocalFile)
                .map_err(|e| format!("key file `{}`: {e}", file.display()))?;
            keys.insert(issuer.name.to_string(), Arc::new(loaded.set));
        }
    }
    Ok(Loaded { config, keys })
}

/// A signing key and its defaults.
struct Signer {
    key: EncodingKey,
    kid: Option<String>,
    alg: Algorithm,
}

fn signer(spec: &TokenSpec, yaml_dir: &Path) -> Result<Signer, String> {
    if let Some(secret) = &spec.secret {
        return Ok(Signer {
            key: EncodingKey::from_secret(secret.as_bytes()),
            kid: None,
            alg: Algorithm::HS256,
        });
    }
    if let Some(file) = &spec.secret_file {
        let path = yaml_dir.join(file);
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("cannot read secret_file `{}`: {e}", path.display()))?;
        return Ok(Signer {
            key: EncodingKey::from_secret(&bytes),
            kid: None,
            alg: Algorithm::HS256,
        });
    }
    let name = spec.key.as_deref().unwrap_or("dev");
    let (pem_path, kid) = if name == "dev" {
        (
            root().join("config/dev/signing-key.pem"),
            "portcullis-dev-1".to_string(),
        )
    } else {
        (
            root().join(format!("tests/fixtures/keys/{name}.pem")),
            name.to_string(),
        )
    };
    let pem = std::fs::read(&pem_path)
        .map_err(|e| format!("unknown key `{name}` ({}): {e}", pem_path.display()))?;
    let (key, alg) = match name {
        "ec-p256" => (EncodingKey::from_ec_pem(&pem), Algorithm::ES256),
        "ec-p384" => (EncodingKey::from_ec_pem(&pem), Algorithm::ES384),
        "ed25519" => (EncodingKey::from_ed_pem(&pem), Algorithm::EdDSA),
        _ => (EncodingKey::from_rsa_pem(&pem), Algorithm::RS256),
    };
    Ok(Signer {
        key: key.map_err(|e| format!("key `{name}`: {e}"))?,
        kid: Some(kid),
        alg,
    })
}

/// Builds the token a case sends.
fn mint(spec: &TokenSpec, config: &Config, now: i64, yaml_dir: &Path) -> Result<String, String> {
    if let Some(raw) = &spec.raw {
        return Ok(raw.clone());
    }
    let signer = signer(spec, yaml_dir)?;
    let alg = match &spec.alg {
        Some(a) => a
            .parse::<Algorithm>()
            .map_err(|_| format!("unknown signing alg `{a}`"))?,
        None => signer.alg,
    };

    let header_text = match &spec.header_json {
        Some(text) => text.clone(),
        None => {
            let mut header = Map::new();
            header.insert("alg".into(), Value::String(alg_name(alg)));
            let kid = match &spec.kid {
                Some(explicit) => explicit.clone(),
                None => signer.kid.clone(),
            };
            if let Some(kid) = kid {
                header.insert("kid".into(), Value::String(kid));
            }
            for (k, v) in spec.header.iter().flatten() {
                if v.is_null() {
                    header.remove(k);
                } else {
                    header.insert(k.clone(), v.clone());
                }
            }
            Value::Object(header).to_string()
        }
    };

    let claims_text = match &spec.claims_json {
        Some(text) => text.clone(),
        None => {
            let mut claims = Map::new();
            if let Some(first) = config.issuers.first() {
                claims.insert("iss".into(), Value::String(first.rules.issuer.clone()));
                if let Some(aud) = first.rules.audiences.first() {
                    claims.insert("aud".into(), Value::String(aud.clone()));
                }
            }
            claims.insert("iat".into(), now.into());
            claims.insert("exp".into(), (now + DEFAULT_LIFETIME).into());
            for name in &spec.omit {
                claims.remove(name);
            }
            for (k, v) in spec.claims.iter().flatten() {
                claims.insert(k.clone(), substitute(v, yaml_dir)?);
            }
            Value::Object(claims).to_string()
        }
    };

    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_text.as_bytes()),
        URL_SAFE_NO_PAD.encode(claims_text.as_bytes())
    );
    let mut signature = jsonwebtoken::crypto::sign(message.as_bytes(), &signer.key, alg)
        .map_err(|e| format!("signing failed: {e}"))?;
    if spec.tamper {
        let mut bytes = URL_SAFE_NO_PAD.decode(&signature).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        signature = URL_SAFE_NO_PAD.encode(bytes);
    }
    Ok(format!("{message}.{signature}"))
}

/// Replaces `{jkt:<key>}` and `{x5t:<file>}` strings (at any depth) by the thumbprints they name.
fn substitute(v: &Value, yaml_dir: &Path) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => {
            if let Some(key) = s.strip_prefix("{jkt:").and_then(|r| r.strip_suffix('}')) {
                Value::String(jkt(key)?)
            } else if let Some(file) = s.strip_prefix("{x5t:").and_then(|r| r.strip_suffix('}')) {
                Value::String(peer_certificate(file, yaml_dir)?.thumbprint_s256)
            } else {
                v.clone()
            }
        }
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                out.insert(k.clone(), substitute(v, yaml_dir)?);
            }
            Value::Object(out)
        }
        _ => v.clone(),
    })
}

/// The public JWK of a fixture key (`kid`, `use`, `alg` removed, as a DPoP proof carries it).
fn public_jwk(name: &str) -> Result<Value, String> {
    let path = root().join(format!("tests/fixtures/keys/{name}.jwks.json"));
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("unknown key `{name}` ({}): {e}", path.display()))?;
    let set: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut jwk = set["keys"][0].clone();
    let obj = jwk.as_object_mut().ok_or("not a JWK set")?;
    for m in ["kid", "use", "alg"] {
        obj.remove(m);
    }
    Ok(jwk)
}

/// RFC 7638 thumbprint of a fixture key, computed here independently of the code under test.
fn jkt(name: &str) -> Result<String, String> {
    let jwk = public_jwk(name)?;
    let s = |m: &str| jwk[m].as_str().unwrap_or_default().to_string();
    let canonical = match s("kty").as_str() {
        "EC" => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            s("crv"),
            s("x"),
            s("y")
        ),
        "OKP" => format!(r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#, s("crv"), s("x")),
        "RSA" => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, s("e"), s("n")),
        other => return Err(format!("no thumbprint for kty `{other}`")),
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    Ok(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

fn peer_certificate(file: &str, yaml_dir: &Path) -> Result<PeerCertificate, String> {
    let path = yaml_dir.join(file);
    let pem = std::fs::read(&path)
        .map_err(|e| format!("cannot read certificate `{}`: {e}", path.display()))?;
    PeerCertificate::from_pem(&pem).map_err(|e| format!("`{}`: {e}", path.display()))
}

/// Builds the DPoP proof a case sends.
fn mint_proof(spec: &DpopSpec, case: &Case, token: &str, now: i64) -> Result<String, String> {
    if let Some(raw) = &spec.raw {
        return Ok(raw.clone());
    }
    let name = spec.key.as_deref().unwrap_or("ec-p256");
    let pem_path = root().join(format!("tests/fixtures/keys/{name}.pem"));
    let pem = std::fs::read(&pem_path).map_err(|e| format!("unknown key `{name}`: {e}"))?;
    let (key, natural) = match name {
        "ec-p256" => (EncodingKey::from_ec_pem(&pem), Algorithm::ES256),
        "ec-p384" => (EncodingKey::from_ec_pem(&pem), Algorithm::ES384),
        "ed25519" => (EncodingKey::from_ed_pem(&pem), Algorithm::EdDSA),
        _ => (EncodingKey::from_rsa_pem(&pem), Algorithm::RS256),
    };
    let key = key.map_err(|e| e.to_string())?;
    let alg = match &spec.alg {
        Some(a) => a
            .parse::<Algorithm>()
            .map_err(|_| format!("unknown alg `{a}`"))?,
        None => natural,
    };
    let mut header = Map::new();
    header.insert("typ".into(), "dpop+jwt".into());
    header.insert("alg".into(), Value::String(alg_name(alg)));
    header.insert("jwk".into(), public_jwk(name)?);
    let r = &case.request;
    let path = r.path.split(['?', '#']).next().unwrap_or_default();
    let ath = URL_SAFE_NO_PAD
        .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref());
    let mut claims = Map::new();
    claims.insert("jti".into(), Value::String(format!("corpus:{}", case.name)));
    claims.insert("htm".into(), Value::String(r.method.clone()));
    claims.insert(
        "htu".into(),
        Value::String(format!("{}://{}{path}", r.scheme, r.host)),
    );
    claims.insert("iat".into(), now.into());
    claims.insert("ath".into(), Value::String(ath));
    for (target, extra) in [(&mut header, &spec.header), (&mut claims, &spec.claims)] {
        for (k, v) in extra.iter().flatten() {
            if v.is_null() {
                target.remove(k);
            } else {
                target.insert(k.clone(), v.clone());
            }
        }
    }
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(Value::Object(header).to_string()),
        URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string())
    );
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg)
        .map_err(|e| format!("signing the proof failed: {e}"))?;
    Ok(format!("{message}.{sig}"))
}

/// The JOSE name of an algorithm (`Algorithm`'s Debug form is exactly that).
fn alg_name(alg: Algorithm) -> String {
    format!("{alg:?}")
}

/// What a decision looked like, for messages.
fn describe(d: &Decision) -> String {
    format!(
        "{} {} {} (route {:?}, rule {:?}, detail `{}`)",
        if d.is_allow() { "allow" } else { "deny" },
        d.http_status(),
        d.code.as_str(),
        d.route.as_deref(),
        d.rule.as_deref(),
        d.detail
    )
}

/// Runs one case; returns its mismatches.
fn run_case(case: &Case, loaded: &Loaded, yaml_dir: &Path) -> Vec<String> {
    let now = case.now.unwrap_or(DEFAULT_NOW);
    let mut headers: HashMap<String, String> = case
        .request
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let token = match &case.token {
        None => None,
        Some(spec) => match mint(spec, &loaded.config, now, yaml_dir) {
            Ok(t) => {
                let value = spec
                    .send_as
                    .as_deref()
                    .unwrap_or("Bearer {token}")
                    .replace("{token}", &t);
                let name = spec.send_in.as_deref().unwrap_or("authorization");
                headers.insert(name.to_ascii_lowercase(), value);
                Some(t)
            }
            Err(e) => return vec![format!("cannot build the token: {e}")],
        },
    };
    if let Some(spec) = &case.dpop {
        let proof = match mint_proof(spec, case, token.as_deref().unwrap_or_default(), now) {
            Ok(p) => p,
            Err(e) => return vec![format!("cannot build the DPoP proof: {e}")],
        };
        headers.insert("dpop".into(), proof);
    }
    let peer = match &case.request.peer_certificate {
        None => None,
        Some(file) => match peer_certificate(file, yaml_dir) {
            Ok(p) => Some(p),
            Err(e) => return vec![e],
        },
    };
    let req = RequestView {
        method: &case.request.method,
        host: &case.request.host,
        path: &case.request.path,
        headers: &headers,
        source_ip: case.request.source_ip,
        source_principal: &case.request.source_principal,
        scheme: &case.request.scheme,
        peer_certificate: peer.as_ref(),
    };
    let keys = |name: &str| -> Result<Arc<KeySet>, KeyError> {
        if let Some(set) = loaded.keys.get(name) {
            return Ok(set.clone());
        }
        if loaded.config.issuers.iter().any(|i| &*i.name == name) {
            Err(KeyError::NotLoaded {
                issuer: name.to_string(),
                reason: "the corpus loads only file-backed key sets".to_string(),
            })
        } else {
            Err(KeyError::UnknownIssuer(name.to_string()))
        }
    };
    let d = portcullis::decide::decide(&loaded.config, &req, &keys, now);

    let e = &case.expect;
    let mut problems = Vec::new();
    let want = Want {
        decision: e.decision,
        status: e.status,
        reason: e.reason.as_deref(),
        route: e.route.as_deref(),
        rule: e.rule.as_deref(),
    };
    let got = Got {
        allow: d.is_allow(),
        status: d.http_status(),
        reason: d.code.as_str(),
        route: d.route.as_deref(),
        rule: d.rule.as_deref(),
    };
    problems.extend(differences("", &want, &got));
    if let Some(fragment) = &e.detail_contains
        && !d.detail.contains(fragment.as_str())
    {
        problems.push(format!("expected detail containing `{fragment}`"));
    }
    if let Some(want) = &e.dry_run {
        match d.dry_run.as_deref() {
            None => problems.push("expected a dry-run decision, got none".to_string()),
            Some(would) => {
                let want = Want {
                    decision: want.decision,
                    status: want.status,
                    reason: want.reason.as_deref(),
                    route: want.route.as_deref(),
                    rule: want.rule.as_deref(),
                };
                let got = Got {
                    allow: would.is_allow(),
                    status: would.code.http_status(),
                    reason: would.code.as_str(),
                    route: would.route.as_deref(),
                    rule: would.rule.as_deref(),
                };
                problems.extend(differences("dry-run ", &want, &got));
            }
        }
    }
    // INVARIANT: no decision ever echoes the credential.
    if let Some(t) = &token {
        let leaked = t
            .split('.')
            .filter(|s| s.len() >= 16)
            .any(|segment| d.detail.contains(segment));
        if leaked {
            problems.push("the decision detail contains the token".to_string());
        }
    }
    // INVARIANT: no decision ever echoes an API key (generated keys start with `pck_`), from a
    // header or from the query.
    let mut keys: Vec<&str> = headers
        .values()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    keys.extend(case.request.path.split(['?', '&', '=']));
    if keys
        .iter()
        .any(|k| k.starts_with("pck_") && k.len() >= 16 && d.detail.contains(k))
    {
        problems.push("the decision detail contains an API key".to_string());
    }
    if problems.is_empty() {
        Vec::new()
    } else {
        vec![format!("{}; got {}", problems.join(", "), describe(&d))]
    }
}

#[test]
fn corpus() {
    let dir = root().join("tests/corpus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());

    let mut configs: HashMap<PathBuf, Result<Loaded, String>> = HashMap::new();
    let mut failures = Vec::new();
    let mut passed = 0usize;
    let mut ran = 0usize;
    for file in &files {
        let label = file
            .strip_prefix(root())
            .unwrap_or(file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(file).unwrap();
        let corpus: CorpusFile = match serde_yaml::from_str(&text) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{label}: not a corpus file: {e}"));
                continue;
            }
        };
        let yaml_dir = file.parent().unwrap().to_path_buf();
        let config_path = match &corpus.config {
            Some(rel) => yaml_dir.join(rel),
            None => root().join("config/portcullis.yaml"),
        };
        let loaded = configs
            .entry(config_path.clone())
            .or_insert_with(|| load_config(&config_path));
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                failures.push(format!(
                    "{label}: config `{}` does not load: {e}",
                    config_path.display()
                ));
                continue;
            }
        };
        let mut names = std::collections::HashSet::new();
        for case in &corpus.cases {
            ran += 1;
            if !names.insert(case.name.as_str()) {
                failures.push(format!("{label} :: {}: duplicate case name", case.name));
                continue;
            }
            let problems = run_case(case, loaded, &yaml_dir);
            if problems.is_empty() {
                passed += 1;
            }
            for p in problems {
                failures.push(format!("{label} :: {}: {p}", case.name));
            }
        }
    }

    assert!(ran > 0, "the corpus holds no cases");
    if !failures.is_empty() {
        panic!(
            "corpus: {} of {ran} cases failed:\n  {}",
            ran - passed,
            failures.join("\n  ")
        );
    }
    println!("corpus: {passed} cases passed");
}
