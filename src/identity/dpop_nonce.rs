//! Server-provided DPoP nonces (RFC 9449 section 9): with an issuer's `dpop_nonce` set, a
//! proof must carry a `nonce` this server handed out recently, so a proof made in advance
//! (say, on a compromised client for later use elsewhere) expires with the nonce, whatever
//! its `iat` says.
//!
//! Stateless, so every replica agrees without shared state: a nonce is the number of the
//! `lifetime`-long period it was made in, followed by an HMAC-SHA256 tag over that number and
//! the issuer's name, keyed with a secret the replicas share (`secret_file`). A nonce is
//! accepted during its own period and the next one: between one and two lifetimes.
//!
//! Pure: the caller passes `now`. The secret never leaves this type (`Debug` omits it).

use std::path::PathBuf;

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Bytes of the HMAC tag kept in a nonce: 128 bits, beyond guessing.
const TAG_BYTES: usize = 16;
/// A nonce: the period number (8 bytes, big-endian), then the tag.
const NONCE_BYTES: usize = 8 + TAG_BYTES;
/// Domain separation: these HMACs sign nothing else.
const LABEL: &[u8] = b"portcullis dpop nonce v1\0";

/// Fewest secret bytes accepted from `secret_file`.
pub const MIN_SECRET_BYTES: usize = 32;

/// How one issuer makes and checks nonces.
pub struct NonceRules {
    key: hmac::Key,
    /// The issuer's name, so one issuer's nonces are not another's.
    issuer: String,
    lifetime_secs: u64,
    /// Where the secret came from (watched for changes), or `None` when it is random.
    pub source: Option<PathBuf>,
}

/// What a presented nonce is worth at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Made in the current period.
    Current,
    /// Made in the previous period: still accepted, and a newer one should be handed out.
    Previous,
    /// Not one of ours, or too old.
    Rejected,
}

impl std::fmt::Debug for NonceRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceRules")
            .field("issuer", &self.issuer)
            .field("lifetime_secs", &self.lifetime_secs)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl NonceRules {
    /// Nonces of `issuer` from `secret`, each current for `lifetime_secs` (at least 1).
    pub fn new(secret: &[u8], issuer: &str, lifetime_secs: u64, source: Option<PathBuf>) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            issuer: issuer.to_string(),
            lifetime_secs: lifetime_secs.max(1),
            source,
        }
    }

    /// The nonce to hand out at `now`.
    pub fn issue(&self, now: i64) -> String {
        let period = self.period(now);
        let mut nonce = [0u8; NONCE_BYTES];
        nonce[..8].copy_from_slice(&period.to_be_bytes());
        nonce[8..].copy_from_slice(&self.tag(period).as_ref()[..TAG_BYTES]);
        URL_SAFE_NO_PAD.encode(nonce)
    }

    /// Whether `nonce` (from a proof's `nonce` claim) is one of ours and still accepted.
    pub fn check(&self, nonce: &str, now: i64) -> NonceCheck {
        let mut bytes = [0u8; NONCE_BYTES];
        match URL_SAFE_NO_PAD.decode_slice(nonce.as_bytes(), &mut bytes) {
            Ok(NONCE_BYTES) if nonce.len() == URL_SAFE_NO_PAD.encode(bytes).len() => {}
            _ => return NonceCheck::Rejected,
        }
        let mut period = [0u8; 8];
        period.copy_from_slice(&bytes[..8]);
        let period = u64::from_be_bytes(period);
        let current = self.period(now);
        let age = if period == current {
            NonceCheck::Current
        } else if Some(period) == current.checked_sub(1) {
            NonceCheck::Previous
        } else {
            return NonceCheck::Rejected;
        };
        let tag = self.tag(period);
        let matches = tag.as_ref()[..TAG_BYTES]
            .iter()
            .zip(&bytes[8..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if matches { age } else { NonceCheck::Rejected }
    }

    fn period(&self, now: i64) -> u64 {
        u64::try_from(now).unwrap_or(0) / self.lifetime_secs
    }

    fn tag(&self, period: u64) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(LABEL);
        ctx.update(self.issuer.as_bytes());
        ctx.update(b"\0");
        ctx.update(&period.to_be_bytes());
        ctx.sign()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn rules() -> NonceRules {
        NonceRules::new(SECRET, "corp", 300, None)
    }

    #[test]
    fn a_nonce_is_current_in_its_period_and_accepted_in_the_next_only() {
        let r = rules();
        // The first second of a period: 1_800_000_000 is a multiple of 300.
        let start: i64 = 1_800_000_000;
        assert_eq!(start % 300, 0);
        let nonce = r.issue(start);
        assert_eq!(nonce.len(), 32, "{nonce}");
        assert_eq!(r.check(&nonce, start), NonceCheck::Current);
        assert_eq!(r.check(&nonce, start + 299), NonceCheck::Current);
        assert_eq!(r.check(&nonce, start + 300), NonceCheck::Previous);
        assert_eq!(r.check(&nonce, start + 599), NonceCheck::Previous);
        assert_eq!(r.check(&nonce, start + 600), NonceCheck::Rejected);
        // Made "in the future" (a clock ahead, or a forged period): refused.
        assert_eq!(r.check(&nonce, start - 1), NonceCheck::Rejected);
        assert_ne!(r.issue(start + 300), nonce);
    }

    #[test]
    fn only_a_nonce_made_with_the_same_secret_for_the_same_issuer_is_accepted() {
        let now = 1_800_000_000;
        let nonce = rules().issue(now);
        // Another replica with the same secret agrees.
        assert_eq!(
            NonceRules::new(SECRET, "corp", 300, None).check(&nonce, now),
            NonceCheck::Current
        );
        let other_secret = NonceRules::new(b"another secret, also 32 bytes...", "corp", 300, None);
        assert_eq!(other_secret.check(&nonce, now), NonceCheck::Rejected);
        let other_issuer = NonceRules::new(SECRET, "partners", 300, None);
        assert_eq!(other_issuer.check(&nonce, now), NonceCheck::Rejected);
    }

    #[test]
    fn forged_and_malformed_nonces_are_rejected() {
        let r = rules();
        let now = 1_800_000_000;
        let nonce = r.issue(now);
        // The current period with a made-up tag.
        let mut bytes = URL_SAFE_NO_PAD.decode(&nonce).unwrap_or_default();
        bytes[NONCE_BYTES - 1] ^= 1;
        assert_eq!(
            r.check(&URL_SAFE_NO_PAD.encode(&bytes), now),
            NonceCheck::Rejected
        );
        for bad in [
            "",
            "x",
            &nonce[..31],
            &format!("{nonce}A"),
            &format!("{nonce}="),
        ] {
            assert_eq!(r.check(bad, now), NonceCheck::Rejected, "{bad:?}");
        }
        // Negative time (a broken clock) neither panics nor accepts a forged period.
        assert_eq!(r.check(&nonce, -5), NonceCheck::Rejected);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let shown = format!("{:?}", rules());
        assert!(
            shown.contains("corp") && !shown.contains("0123456789"),
            "{shown}"
        );
    }
}
