//! JWT (JWS compact) verification. OWNER: identity helper.
//!
//! Parses the token itself, strictly (segments, base64url without padding, JSON without
//! duplicate keys, `crit`, `b64`), checks time claims against the caller's `now`, and uses
//! `jsonwebtoken::crypto::verify` only for the signature. Pure: no I/O, no clock.
//!
//! Order of checks: size, structure, header (alg, crit, b64, embedded keys, typ), key
//! selection and signature, then claims. Claims are only judged once the signature holds, so
//! a forged token learns nothing about which claims would have passed.
//!
//! Embedded key headers: `jku`, `x5u` and `jwk` make a token point at its own key. We never
//! use them, and we REJECT tokens that carry them: no legitimate access token needs them, and
//! their presence means a client is probing for the classic "trust the token's own key" bug.
//! `x5c`/`x5t` are ignored (some identity providers include them); they are never used for
//! key selection either.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::jwk::{KeySet, VerifyKey};
use super::strict_json::{self, StrictJsonError};

/// Time claims must lie in `0..=MAX_TIME` (9999-12-31T23:59:59Z): anything else is garbage
/// or an attempt at overflow.
pub const MAX_TIME: i64 = 253_402_300_799;

/// The largest signature any supported algorithm produces (RSA 8192 bits).
pub(crate) const MAX_SIGNATURE_BYTES: usize = 1024;

/// Kids longer than this are shortened in error messages.
const MAX_KID_IN_MESSAGE: usize = 64;

/// What a token from one issuer must satisfy. Built by `config` from an issuer entry.
#[derive(Debug, Clone)]
pub struct JwtRules {
    /// Exact `iss`.
    pub issuer: String,
    /// `aud` (string or list) must contain one of these.
    pub audiences: Vec<String>,
    /// Allowed algorithms (never `none`).
    pub algorithms: Vec<Algorithm>,
    pub leeway_secs: u64,
    pub max_lifetime_secs: Option<u64>,
    pub required_typ: Option<String>,
    pub max_token_bytes: usize,
}

/// The result of a successful verification.
#[derive(Debug, Clone)]
pub struct VerifiedJwt {
    pub claims: Map<String, Value>,
    pub kid: Option<String>,
    pub alg: Algorithm,
    /// Fingerprint of the key that verified the signature.
    pub key_fingerprint: Arc<str>,
    pub exp: i64,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
}

/// One of the three parts of a compact JWS, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Header,
    Claims,
    Signature,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Header => "header",
            Part::Claims => "claims",
            Part::Signature => "signature",
        })
    }
}

/// Why a token was rejected. Messages are lower-case, name the problem, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("token must have 3 dot-separated segments, found {found}{}", if *.found == 5 { " (encrypted tokens are not accepted)" } else { "" })]
    SegmentCount { found: usize },
    #[error("token {0} segment is empty")]
    EmptySegment(Part),
    #[error("token {0} segment has base64 padding (`=`); JWTs use unpadded base64url")]
    Padding(Part),
    #[error("token {0} segment has characters outside the base64url alphabet")]
    InvalidCharacter(Part),
    #[error("token {0} segment is not valid base64url")]
    BadBase64(Part),
    #[error("token {0} is not valid JSON")]
    InvalidJson(Part),
    #[error("token {0} is not a JSON object")]
    NotObject(Part),
    #[error("token {0} has a duplicate member")]
    DuplicateMember(Part),
    #[error("token header has no `alg`")]
    MissingAlg,
    #[error("unsigned tokens (`alg` none) are never accepted")]
    AlgNone,
    #[error("token `alg` is not a supported algorithm")]
    UnsupportedAlg,
    #[error("token `alg` {0:?} is not allowed for this issuer")]
    AlgNotAllowed(Algorithm),
    #[error("token header member `{0}` has the wrong type")]
    InvalidHeaderMember(&'static str),
    #[error("token header `crit` names extensions this verifier does not understand")]
    CritPresent,
    #[error("token header `b64` (unencoded payload) is not supported")]
    B64Present,
    #[error("token header `{0}` (an embedded or remote key) is not accepted")]
    EmbeddedKey(&'static str),
    #[error("token `typ` must be `{expected}`")]
    WrongTyp { expected: String },
    #[error("no key with kid `{}` in the issuer's key set", printable(.0))]
    UnknownKid(String),
    #[error("no key in the issuer's key set fits `alg` {0:?}")]
    NoFittingKey(Algorithm),
    #[error("token signature is invalid")]
    BadSignature,
    #[error(
        "{0} keys in the issuer's key set could have signed this token, more than the {MAX_CANDIDATE_KEYS} tried: a token without a `kid` needs a `kid` naming one key, and a `kid` the issuer gives to more keys than that cannot be checked"
    )]
    TooManyCandidateKeys(usize),
    #[error("token has no `{0}` claim")]
    MissingClaim(&'static str),
    #[error("token `{0}` claim must be a whole number of seconds between 0 and {MAX_TIME}")]
    InvalidTimeClaim(&'static str),
    #[error("token `iss` claim is not a string")]
    IssuerNotString,
    #[error("token `aud` claim must be a string or a list of strings")]
    AudienceNotStrings,
    /// `sub`, `jti` or `sid` that is not a string.
    #[error("token `{0}` claim is not a string")]
    ClaimNotString(&'static str),
    #[error("token `iss` is not this issuer")]
    WrongIssuer,
    #[error("token `aud` does not name an accepted audience")]
    WrongAudience,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (`nbf` is in the future)")]
    NotYetValid,
    #[error("token was issued in the future (`iat`)")]
    IssuedInFuture,
    #[error("token login time (`auth_time`) is in the future")]
    AuthTimeInFuture,
    #[error("token has no `iat` claim, which the issuer's `max_lifetime` requires")]
    LifetimeNeedsIat,
    #[error("token lifetime (`exp` - `iat`) is longer than {max} seconds")]
    LifetimeTooLong { max: u64 },
}

/// A header value made safe for a message: printable ASCII only, shortened.
fn printable(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_KID_IN_MESSAGE)
        .map(|c| {
            if c.is_ascii_graphic() && c != '`' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().count() > MAX_KID_IN_MESSAGE {
        out.push_str("...");
    }
    out
}

impl JwtError {
    /// True when a key-set refetch could change the outcome.
    pub fn is_unknown_kid(&self) -> bool {
        matches!(self, JwtError::UnknownKid(_))
    }
}

/// A structurally valid token: decoded header and claims, and where the signature is.
/// Shared with `dpop`, whose proofs are compact JWS parsed just as strictly.
pub(crate) struct Parsed<'t> {
    pub(crate) header: Map<String, Value>,
    pub(crate) claims: Map<String, Value>,
    /// `header.claims`, the signed bytes.
    pub(crate) message: &'t str,
    /// The signature segment, still base64url (checked to be well-formed).
    pub(crate) signature: &'t str,
}

/// Size, segments, base64url, strict JSON objects. Nothing here trusts the token.
pub(crate) fn parse(token: &str, max_bytes: usize) -> Result<Parsed<'_>, JwtError> {
    // INVARIANT: the size check comes before any other work on the token.
    if token.len() > max_bytes {
        return Err(JwtError::TooLarge { max: max_bytes });
    }
    let mut segments = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        let found = token.bytes().filter(|b| *b == b'.').count() + 1;
        return Err(JwtError::SegmentCount { found });
    };
    let header_bytes = decode_segment(h, Part::Header)?;
    let claims_bytes = decode_segment(c, Part::Claims)?;
    check_signature_segment(s)?;
    let header = json_object(&header_bytes, Part::Header)?;
    let claims = json_object(&claims_bytes, Part::Claims)?;
    Ok(Parsed {
        header,
        claims,
        message: &token[..h.len() + 1 + c.len()],
        signature: s,
    })
}

/// Checks the alphabet first so each kind of bad encoding gets its own error.
fn check_alphabet(segment: &str, part: Part) -> Result<(), JwtError> {
    if segment.is_empty() {
        return Err(JwtError::EmptySegment(part));
    }
    if segment.contains('=') {
        return Err(JwtError::Padding(part));
    }
    if !segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(JwtError::InvalidCharacter(part));
    }
    Ok(())
}

fn decode_segment(segment: &str, part: Part) -> Result<Vec<u8>, JwtError> {
    check_alphabet(segment, part)?;
    // The engine also rejects impossible lengths and non-zero trailing bits, so every token
    // has exactly one encoding.
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtError::BadBase64(part))
}

/// The signature is decoded again by `VerifyKey::verify`; here it is only checked to be
/// canonical base64url, into a stack buffer, so a malformed one is reported as such rather
/// than as a bad signature.
fn check_signature_segment(segment: &str) -> Result<(), JwtError> {
    check_alphabet(segment, Part::Signature)?;
    let mut buf = [0u8; MAX_SIGNATURE_BYTES];
    match URL_SAFE_NO_PAD.decode_slice(segment, &mut buf) {
        Ok(_) => Ok(()),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => Err(JwtError::Malformed(
            "the signature is longer than any supported algorithm's",
        )),
        Err(base64::DecodeSliceError::DecodeError(_)) => Err(JwtError::BadBase64(Part::Signature)),
    }
}

fn json_object(bytes: &[u8], part: Part) -> Result<Map<String, Value>, JwtError> {
    strict_json::parse_object(bytes).map_err(|e| match e {
        StrictJsonError::DuplicateKey(_) => JwtError::DuplicateMember(part),
        StrictJsonError::NotObject => JwtError::NotObject(part),
        StrictJsonError::Syntax(_) => JwtError::InvalidJson(part),
    })
}

/// A token that passed the structural checks (size, segments, base64url, strict JSON) but
/// is not verified yet. Parsed once per request: its `iss` picks the issuer, then `verify`
/// checks it against that issuer's rules and keys.
pub struct Unverified<'t>(Parsed<'t>);

impl<'t> Unverified<'t> {
    pub fn parse(token: &'t str, max_bytes: usize) -> Result<Self, JwtError> {
        parse(token, max_bytes).map(Self)
    }

    /// The untrusted `iss`: it only chooses which issuer's rules and keys `verify` uses.
    pub fn issuer(&self) -> Result<&str, JwtError> {
        match self.0.claims.get("iss") {
            None => Err(JwtError::MissingClaim("iss")),
            Some(Value::String(iss)) => Ok(iss),
            Some(_) => Err(JwtError::IssuerNotString),
        }
    }

    /// Verifies the token fully against one issuer's rules and key set at `now` (unix
    /// seconds).
    pub fn verify(
        self,
        rules: &JwtRules,
        keys: &KeySet,
        now: i64,
    ) -> Result<VerifiedJwt, JwtError> {
        let parsed = self.0;
        // The signed part, the dot and the signature: the whole token.
        let len = parsed.message.len() + 1 + parsed.signature.len();
        if len > rules.max_token_bytes {
            return Err(JwtError::TooLarge {
                max: rules.max_token_bytes,
            });
        }
        let header = &parsed.header;

        let alg = check_header(header, rules)?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.as_str()),
            Some(_) => return Err(JwtError::InvalidHeaderMember("kid")),
        };

        let key = verify_signature(&parsed, alg, kid, keys)?;
        let kid = kid.map(str::to_string);

        let claims = parsed.claims;
        let ClaimTimes { exp, nbf, iat } = check_claims(&claims, rules, now)?;

        Ok(VerifiedJwt {
            kid,
            alg,
            key_fingerprint: key.fingerprint.clone(),
            exp,
            nbf,
            iat,
            claims,
        })
    }
}

/// The time claims of a token whose claims passed `check_claims`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimTimes {
    pub exp: i64,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
}

/// Every check on a token's claims (`iss`, `aud`, the types of `sub`/`jti`/`sid`, the time
/// claims and `auth_time`) at `now`, as `Unverified::verify` runs them once the signature
/// holds. Public so that policy tests hold the claims of a caller they take as verified to
/// exactly these rules.
pub fn check_claims(
    claims: &Map<String, Value>,
    rules: &JwtRules,
    now: i64,
) -> Result<ClaimTimes, JwtError> {
    check_issuer(claims, rules)?;
    check_audience(claims, rules)?;
    // RFC 7519 4.1.2, 4.1.7 and OIDC: `sub`, `jti` and `sid` are strings. Identity and
    // resource bindings read `sub` as one, so a list or number there must not quietly
    // become an empty subject; revocation matches `jti` and `sid` as strings, so a
    // numeric one could never be revoked.
    for name in ["sub", "jti", "sid"] {
        if claims.get(name).is_some_and(|v| !v.is_string()) {
            return Err(JwtError::ClaimNotString(name));
        }
    }
    let exp = time_claim(claims, "exp")?.ok_or(JwtError::MissingClaim("exp"))?;
    let nbf = time_claim(claims, "nbf")?;
    let iat = time_claim(claims, "iat")?;
    check_times(exp, nbf, iat, rules, now)?;
    check_auth_time(claims, rules, now)?;
    Ok(ClaimTimes { exp, nbf, iat })
}

/// OIDC `auth_time`, when it is a whole number of seconds, must not lie in the future (beyond
/// the issuer's leeway), like `iat`: a login that has not happened yet is a broken or forged
/// claim, and `max_session_age` would otherwise read it as a session of age zero. Not
/// re-checked on token-cache hits: only a token that passed is cached, and `now` only grows.
/// An `auth_time` of another type is left to `max_session_age`, which refuses it (it is not
/// otherwise read).
fn check_auth_time(
    claims: &Map<String, Value>,
    rules: &JwtRules,
    now: i64,
) -> Result<(), JwtError> {
    let leeway = i64::try_from(rules.leeway_secs).unwrap_or(i64::MAX);
    match claims.get("auth_time").and_then(Value::as_i64) {
        Some(t) if t.saturating_sub(leeway) > now => Err(JwtError::AuthTimeInFuture),
        _ => Ok(()),
    }
}

/// Reads `iss` from an unverified token, after the structural checks, to pick the issuer.
/// The result is untrusted: it only chooses which issuer's rules and keys `verify` uses.
pub fn peek_issuer(token: &str, max_bytes: usize) -> Result<String, JwtError> {
    Unverified::parse(token, max_bytes)?
        .issuer()
        .map(str::to_string)
}

/// Verifies a token fully against one issuer's rules and key set at time `now` (unix seconds).
pub fn verify(
    token: &str,
    rules: &JwtRules,
    keys: &KeySet,
    now: i64,
) -> Result<VerifiedJwt, JwtError> {
    Unverified::parse(token, rules.max_token_bytes)?.verify(rules, keys, now)
}

/// The header rules; returns the (allowed) algorithm.
fn check_header(header: &Map<String, Value>, rules: &JwtRules) -> Result<Algorithm, JwtError> {
    // We implement no JWS extensions, so any `crit` (even an empty one, which RFC 7515
    // forbids) means the token relies on semantics we would silently ignore.
    if header.contains_key("crit") {
        return Err(JwtError::CritPresent);
    }
    // RFC 7797: with `b64` the payload is not base64url-encoded and the signing input
    // differs; `b64: true` is pointless, so any `b64` is refused.
    if header.contains_key("b64") {
        return Err(JwtError::B64Present);
    }
    for name in ["jku", "x5u", "jwk"] {
        if header.contains_key(name) {
            return Err(JwtError::EmbeddedKey(name));
        }
    }

    let alg = match header.get("alg") {
        None => return Err(JwtError::MissingAlg),
        Some(Value::String(alg)) => alg.as_str(),
        Some(_) => return Err(JwtError::InvalidHeaderMember("alg")),
    };
    if alg.eq_ignore_ascii_case("none") {
        return Err(JwtError::AlgNone);
    }
    // `FromStr` is case-sensitive, as JOSE algorithm names are.
    let alg: Algorithm = alg.parse().map_err(|_| JwtError::UnsupportedAlg)?;
    if !rules.algorithms.contains(&alg) {
        return Err(JwtError::AlgNotAllowed(alg));
    }

    let typ = match header.get("typ") {
        None => None,
        Some(Value::String(typ)) => Some(typ.as_str()),
        Some(_) => return Err(JwtError::InvalidHeaderMember("typ")),
    };
    if let Some(expected) = &rules.required_typ
        && !typ.is_some_and(|typ| media_type_eq(typ, expected))
    {
        return Err(JwtError::WrongTyp {
            expected: expected.clone(),
        });
    }
    Ok(alg)
}

/// RFC 7515 4.1.9: `typ` is a media type compared case-insensitively, and `application/`
/// may be omitted when the rest has no `/`.
fn media_type_eq(a: &str, b: &str) -> bool {
    fn short(t: &str) -> &str {
        match t.get(..12) {
            Some(prefix)
                if prefix.eq_ignore_ascii_case("application/") && !t[12..].contains('/') =>
            {
                &t[12..]
            }
            _ => t,
        }
    }
    short(a).eq_ignore_ascii_case(short(b))
}

/// The most keys one token's signature is checked against. A token without `kid` (or a set
/// with many keys under one kid) could otherwise make every request cost a signature check
/// per key, and a failed token is never cached: a set of a thousand RSA keys would make one
/// forged request cost tens of milliseconds. Real issuers publish a handful.
pub const MAX_CANDIDATE_KEYS: usize = 8;

/// Picks the keys that may have signed the token and returns the one that verifies it.
fn verify_signature<'k>(
    parsed: &Parsed<'_>,
    alg: Algorithm,
    kid: Option<&str>,
    keys: &'k KeySet,
) -> Result<&'k Arc<VerifyKey>, JwtError> {
    if let Some(kid) = kid
        && !keys.has_kid(kid)
    {
        // The shell refetches the issuer's keys on this one: the issuer may have rotated.
        return Err(JwtError::UnknownKid(kid.to_string()));
    }
    let candidates = keys.candidates(kid, alg).count();
    if candidates > MAX_CANDIDATE_KEYS {
        return Err(JwtError::TooManyCandidateKeys(candidates));
    }
    let mut tried = false;
    for key in keys.candidates(kid, alg) {
        tried = true;
        // An `Err` here means the key could not be used with this algorithm (which `fits`
        // rules out) or the signature did not decode (which `parse` rules out); either way it
        // is not a match, so it is treated like a failed verification.
        if key.verify(alg, parsed.message.as_bytes(), parsed.signature) {
            return Ok(key);
        }
    }
    if tried {
        Err(JwtError::BadSignature)
    } else {
        Err(JwtError::NoFittingKey(alg))
    }
}

fn check_issuer(claims: &Map<String, Value>, rules: &JwtRules) -> Result<(), JwtError> {
    match claims.get("iss") {
        None => Err(JwtError::MissingClaim("iss")),
        Some(Value::String(iss)) if *iss == rules.issuer => Ok(()),
        Some(Value::String(_)) => Err(JwtError::WrongIssuer),
        Some(_) => Err(JwtError::IssuerNotString),
    }
}

fn check_audience(claims: &Map<String, Value>, rules: &JwtRules) -> Result<(), JwtError> {
    let accepted = |aud: &str| rules.audiences.iter().any(|a| a == aud);
    let ok = match claims.get("aud") {
        None => return Err(JwtError::MissingClaim("aud")),
        Some(Value::String(aud)) => accepted(aud),
        Some(Value::Array(auds)) => {
            // Every entry must be a string, even when another one matches: a list with junk
            // in it is not a well-formed `aud`.
            let mut any = false;
            for aud in auds {
                let Value::String(aud) = aud else {
                    return Err(JwtError::AudienceNotStrings);
                };
                any |= accepted(aud);
            }
            any
        }
        Some(_) => return Err(JwtError::AudienceNotStrings),
    };
    if ok {
        Ok(())
    } else {
        Err(JwtError::WrongAudience)
    }
}

/// A NumericDate claim: a JSON integer (or a number without a fraction, `1.8e9`) within
/// `0..=MAX_TIME`. Strings, fractions, negatives and huge values are refused.
fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let invalid = JwtError::InvalidTimeClaim(name);
    let Value::Number(n) = value else {
        return Err(invalid);
    };
    let secs = if let Some(i) = n.as_i64() {
        i
    } else if n.is_u64() {
        // Larger than i64::MAX: far beyond MAX_TIME.
        return Err(invalid);
    } else {
        let f = n.as_f64().ok_or(invalid.clone())?;
        if f.fract() != 0.0 || !(0.0..=MAX_TIME as f64).contains(&f) {
            return Err(invalid);
        }
        // In range and whole, so the conversion is exact.
        f as i64
    };
    if !(0..=MAX_TIME).contains(&secs) {
        return Err(invalid);
    }
    Ok(Some(secs))
}

/// The time checks alone (`exp`, `nbf`, `iat`, lifetime), re-applied on token-cache hits.
pub fn check_times(
    exp: i64,
    nbf: Option<i64>,
    iat: Option<i64>,
    rules: &JwtRules,
    now: i64,
) -> Result<(), JwtError> {
    let leeway = i64::try_from(rules.leeway_secs).unwrap_or(i64::MAX);
    if exp.saturating_add(leeway) <= now {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = nbf
        && nbf.saturating_sub(leeway) > now
    {
        return Err(JwtError::NotYetValid);
    }
    if let Some(iat) = iat
        && iat.saturating_sub(leeway) > now
    {
        return Err(JwtError::IssuedInFuture);
    }
    if let Some(max) = rules.max_lifetime_secs {
        let iat = iat.ok_or(JwtError::LifetimeNeedsIat)?;
        let max_i = i64::try_from(max).unwrap_or(i64::MAX);
        if exp.saturating_sub(iat) > max_i {
            return Err(JwtError::LifetimeTooLong { max });
        }
    }
    Ok(())
}
