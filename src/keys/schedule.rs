//! When to fetch next: pure arithmetic over durations, so the refresh policy can be tested
//! without a clock or a server.

use std::time::Duration;

/// Refresh interval for a JWKS response without a Cache-Control lifetime. Five minutes follows
/// common practice (Envoy's `jwt_authn` defaults to the same); it is then clamped into
/// `[min_refresh, max_refresh]` like any other lifetime.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// The longest `min_refresh`/`max_refresh` the config accepts, and the longest any delay
/// until the next load is taken to be: past `max_stale` (a day by default) a key set that
/// was not refreshed fails closed anyway, and a day keeps `Instant` arithmetic far from its
/// limits.
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// When the next load is due, `delay` after `now`. The delay is capped at `MAX_REFRESH` and
/// the addition checked, so no duration (the config bounds it, but not every caller goes
/// through the config) can panic the load task and leave the refresh loop spinning.
pub(crate) fn due_after(now: std::time::Instant, delay: Duration) -> std::time::Instant {
    now.checked_add(delay.min(MAX_REFRESH)).unwrap_or(now)
}

/// The first retry after a failed fetch; each further failure doubles it, up to `min_refresh`.
pub(crate) const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Delay until the next refresh after a good fetch: 90% of the response's lifetime (so the new
/// set arrives before the old one "expires"), clamped into `[min, max]`. `min` wins when the
/// bounds are inverted, so a misconfiguration can never make us fetch in a tight loop.
pub(crate) fn after_success(max_age: Option<Duration>, min: Duration, max: Duration) -> Duration {
    let ttl = max_age.unwrap_or(DEFAULT_TTL);
    let early = ttl - ttl / 10;
    early.min(max).max(min)
}

/// Takes up to 10% off a refresh delay, never going below `min`, so many replicas started
/// together do not keep fetching from the issuer in lockstep. `random` is any random number.
pub(crate) fn jittered(delay: Duration, min: Duration, random: u64) -> Duration {
    let spread = delay.saturating_sub(min).min(delay / 10);
    let nanos = u64::try_from(spread.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return delay;
    }
    delay - Duration::from_nanos(random % (nanos + 1))
}

/// Delay until the retry after `failures` consecutive failed fetches (1 for the first):
/// exponential from one second, never slower than `min_refresh`, so an outage is noticed to
/// be over within `min_refresh`. When `min_refresh` is below a second (test setups), it is the
/// retry interval.
pub(crate) fn after_failure(failures: u32, min_refresh: Duration) -> Duration {
    let shift = failures.saturating_sub(1).min(20);
    FIRST_RETRY.saturating_mul(1u32 << shift).min(min_refresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_next_load_is_never_more_than_a_day_away_and_never_panics() {
        let now = std::time::Instant::now();
        assert_eq!(due_after(now, s(60)), now + s(60));
        assert_eq!(due_after(now, Duration::MAX), now + MAX_REFRESH);
    }

    #[test]
    fn success_interval_is_clamped_and_early() {
        let (min, max) = (s(60), s(3600));
        assert_eq!(after_success(Some(s(1000)), min, max), s(900));
        assert_eq!(after_success(Some(s(5)), min, max), min);
        assert_eq!(after_success(Some(Duration::ZERO), min, max), min);
        assert_eq!(after_success(Some(s(86_400)), min, max), max);
        assert_eq!(after_success(None, min, max), s(270));
        assert_eq!(after_success(None, s(600), max), s(600));
        assert_eq!(after_success(None, s(1), s(10)), s(10));
        // Inverted bounds: the floor wins.
        assert_eq!(after_success(Some(s(1)), s(100), s(10)), s(100));
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_above_min() {
        for r in [0, 1, 7, u64::MAX / 3, u64::MAX] {
            let d = jittered(s(100), s(10), r);
            assert!(d <= s(100) && d >= s(90), "{d:?}");
            assert_eq!(jittered(s(100), s(100), r), s(100));
            let d = jittered(s(100), s(95), r);
            assert!(d >= s(95), "{d:?}");
        }
        assert_eq!(jittered(s(100), s(10), 0), s(100));
        assert_eq!(jittered(s(100), s(10), 10_000_000_000), s(90));
    }

    #[test]
    fn failure_backoff_doubles_up_to_min_refresh() {
        let min = s(60);
        let got: Vec<u64> = (1..=9).map(|n| after_failure(n, min).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(after_failure(u32::MAX, min), min);
        assert_eq!(
            after_failure(1, Duration::from_millis(200)),
            Duration::from_millis(200)
        );
    }
}
