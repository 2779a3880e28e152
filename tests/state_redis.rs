//! State-store conformance: every `StateStore` method behaves the same on the in-memory
//! store and on a real `redis-server` (started by the test on a free loopback port), and the
//! Redis store fails closed, quickly, when Redis is down, then recovers by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::state::{MemoryStore, RateLimit, RedisStore, StateError, StateStore};
use support::redis::RedisServer;

const OP_TIMEOUT: Duration = Duration::from_millis(200);

fn redis_store(server: &RedisServer, prefix: &str) -> Arc<dyn StateStore> {
    Arc::new(RedisStore::new(&server.url(), prefix, OP_TIMEOUT).unwrap())
}

/// Runs `check` against a fresh memory store and a Redis store on its own prefix.
async fn both<F, Fut>(check: F)
where
    F: Fn(Arc<dyn StateStore>, &'static str) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    check(Arc::new(MemoryStore::new()), "memory").await;
    let server = RedisServer::start();
    check(redis_store(&server, "test:"), "redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn insert_if_absent_stores_only_the_first_value() {
    both(|s, name| async move {
        let ttl = Duration::from_secs(60);
        assert!(
            s.insert_if_absent("k", "first", ttl).await.unwrap(),
            "{name}"
        );
        assert!(
            !s.insert_if_absent("k", "second", ttl).await.unwrap(),
            "{name}"
        );
        assert_eq!(
            s.get("k").await.unwrap().as_deref(),
            Some("first"),
            "{name}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_set_delete_round_trip() {
    both(|s, name| async move {
        let ttl = Duration::from_secs(60);
        assert_eq!(s.get("missing").await.unwrap(), None, "{name}");
        s.set("k", "v1", ttl).await.unwrap();
        s.set("k", "v2", ttl).await.unwrap();
        assert_eq!(s.get("k").await.unwrap().as_deref(), Some("v2"), "{name}");
        assert!(s.delete("k").await.unwrap(), "{name}");
        assert!(!s.delete("k").await.unwrap(), "{name}");
        assert_eq!(s.get("k").await.unwrap(), None, "{name}");
    })
    .await;
}

/// A compare-and-delete removes a key only while it holds the value given: a caller
/// releasing its own slot never removes one another caller wrote since.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_if_removes_only_the_value_given() {
    both(|s, name| async move {
        let ttl = Duration::from_secs(60);
        assert!(!s.delete_if("k", "mine").await.unwrap(), "{name}: missing");
        s.set("k", "theirs", ttl).await.unwrap();
        assert!(!s.delete_if("k", "mine").await.unwrap(), "{name}");
        assert_eq!(
            s.get("k").await.unwrap().as_deref(),
            Some("theirs"),
            "{name}"
        );
        s.set("k", "mine", ttl).await.unwrap();
        assert!(s.delete_if("k", "mine").await.unwrap(), "{name}");
        assert_eq!(s.get("k").await.unwrap(), None, "{name}");
        assert!(!s.delete_if("k", "mine").await.unwrap(), "{name}: gone");
    })
    .await;
}

/// `ttl_left` reads a key's remaining lifetime; a missing key has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ttl_left_reads_the_remaining_lifetime() {
    both(|s, name| async move {
        assert_eq!(s.ttl_left("missing").await.unwrap(), None, "{name}");
        s.set("k", "v", Duration::from_secs(60)).await.unwrap();
        let left = s.ttl_left("k").await.unwrap().expect("a lifetime");
        assert!(
            left <= Duration::from_secs(60) && left > Duration::from_secs(55),
            "{name}: {left:?}"
        );
        assert!(
            s.insert_if_absent("j", "v", Duration::from_secs(5))
                .await
                .unwrap()
        );
        let left = s.ttl_left("j").await.unwrap().expect("a lifetime");
        assert!(left <= Duration::from_secs(5), "{name}: {left:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_expire_after_their_ttl() {
    both(|s, name| async move {
        s.set("short", "v", Duration::from_millis(150))
            .await
            .unwrap();
        assert!(
            s.insert_if_absent("short2", "v", Duration::from_millis(150))
                .await
                .unwrap()
        );
        assert!(s.get("short").await.unwrap().is_some(), "{name}");
        // Poll until gone (bounded): expiry must happen, and not much later than the ttl.
        let started = Instant::now();
        while s.get("short").await.unwrap().is_some() {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{name}: never expired"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            s.insert_if_absent("short2", "again", Duration::from_secs(5))
                .await
                .unwrap(),
            "{name}: an expired key still blocks insert_if_absent"
        );
        assert_eq!(s.take_one("short").await.unwrap(), None, "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_index_lists_its_live_members_sorted_and_forgets_expired_ones() {
    both(|s, name| async move {
        s.index_add("revoked:index", "sub:bob", 2_000)
            .await
            .unwrap();
        s.index_add("revoked:index", "jti:a*[x]", 3_000)
            .await
            .unwrap();
        s.index_add("revoked:index", "sub:old", 1_000)
            .await
            .unwrap();
        s.index_add("other", "sub:bob", 9_000).await.unwrap();
        assert_eq!(
            s.index_list("revoked:index", 1_500).await.unwrap(),
            vec![
                ("jti:a*[x]".to_string(), 3_000),
                ("sub:bob".to_string(), 2_000)
            ],
            "{name}"
        );
        // Listed at an earlier time, the long-expired member does not come back: it was
        // dropped. One expired for less than INDEX_PRUNE_AFTER is only hidden: a caller
        // whose clock runs fast must not delete it for the others.
        assert_eq!(
            s.index_list("revoked:index", 0).await.unwrap().len(),
            2,
            "{name}"
        );
        s.index_add("revoked:index", "sub:recent", 1_400)
            .await
            .unwrap();
        assert_eq!(
            s.index_list("revoked:index", 1_500).await.unwrap().len(),
            2,
            "{name}"
        );
        assert_eq!(
            s.index_list("revoked:index", 1_350).await.unwrap().len(),
            3,
            "{name}: a fast clock's listing deleted a member expired 100s before it"
        );
        assert!(
            s.index_remove("revoked:index", "sub:recent", 0)
                .await
                .unwrap(),
            "{name}"
        );
        // A second add moves the expiry.
        s.index_add("revoked:index", "sub:bob", 5_000)
            .await
            .unwrap();
        assert_eq!(
            s.index_list("revoked:index", 4_000).await.unwrap(),
            vec![("sub:bob".to_string(), 5_000)],
            "{name}"
        );
        assert!(
            s.index_remove("revoked:index", "sub:bob", 4_000)
                .await
                .unwrap(),
            "{name}"
        );
        assert!(
            !s.index_remove("revoked:index", "sub:bob", 4_000)
                .await
                .unwrap(),
            "{name}: removed twice"
        );
        s.index_add("revoked:index", "sid:s", 4_500).await.unwrap();
        assert!(
            !s.index_remove("revoked:index", "sid:s", 4_500)
                .await
                .unwrap(),
            "{name}: an expired member was reported live"
        );
        assert_eq!(s.index_list("empty", 0).await.unwrap(), vec![], "{name}");
        assert_eq!(
            s.index_list("other", 0).await.unwrap(),
            vec![("sub:bob".to_string(), 9_000)],
            "{name}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_many_reads_each_key_in_order() {
    both(|s, name| async move {
        let ttl = Duration::from_secs(60);
        s.set("m:1", "x", ttl).await.unwrap();
        s.set("m:3", "z", ttl).await.unwrap();
        let keys: Vec<String> = (0..1200).map(|i| format!("m:{i}")).collect();
        let got = s.get_many(&keys).await.unwrap();
        assert_eq!(got.len(), 1200, "{name}");
        assert_eq!(got[1].as_deref(), Some("x"), "{name}");
        assert_eq!(got[3].as_deref(), Some("z"), "{name}");
        assert_eq!(got.iter().flatten().count(), 2, "{name}");
        assert_eq!(s.get_many(&[]).await.unwrap(), Vec::<Option<String>>::new());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn take_one_counts_down_and_a_single_use_is_spent_once_under_concurrency() {
    both(|s, name| async move {
        let ttl = Duration::from_secs(60);
        s.set("uses", "2", ttl).await.unwrap();
        assert_eq!(s.take_one("uses").await.unwrap(), Some(1), "{name}");
        assert_eq!(s.take_one("uses").await.unwrap(), Some(0), "{name}");
        assert_eq!(s.take_one("uses").await.unwrap(), None, "{name}");
        assert_eq!(s.take_one("missing").await.unwrap(), None, "{name}");
        s.set("sub:alice-bad", "not-a-number", ttl).await.unwrap();
        let corrupt = s.take_one("sub:alice-bad").await;
        assert!(matches!(corrupt, Err(StateError::Corrupt(_))), "{name}");
        // What a client reads (the 503's detail) names no key: keys hold callers' names.
        let message = corrupt.unwrap_err().to_string();
        assert!(!message.contains("alice"), "{name}: {message}");

        for round in 0..5 {
            let key = format!("single-{round}");
            s.set(&key, "1", ttl).await.unwrap();
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let (s, key) = (s.clone(), key.clone());
                tasks.push(tokio::spawn(async move { s.take_one(&key).await.unwrap() }));
            }
            let mut spent = 0;
            for t in tasks {
                if t.await.unwrap().is_some() {
                    spent += 1;
                }
            }
            assert_eq!(spent, 1, "{name}: a single use was spent {spent} times");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn take_one_keeps_the_expiry() {
    both(|s, name| async move {
        s.set("uses", "5", Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(s.take_one("uses").await.unwrap(), Some(4), "{name}");
        let started = Instant::now();
        while s.take_one("uses").await.unwrap().is_some() {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{name}: uses outlived their ttl"
            );
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcra_allows_the_burst_then_denies_with_retry_after_then_refills() {
    both(|s, name| async move {
        let limit = limit(10, 1, 3);
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let o = s.rate_check("bucket", limit).await.unwrap();
            assert!(o.allowed, "{name}");
            assert_eq!(o.limit, 3, "{name}");
            remaining.push(o.remaining);
        }
        // Up to a few ms pass between calls, so the count may round up by one.
        assert!(
            remaining[0] >= 1 && remaining[2] <= 1,
            "{name}: {remaining:?}"
        );
        let denied = s.rate_check("bucket", limit).await.unwrap();
        assert!(!denied.allowed, "{name}: the burst was exceeded");
        let retry = denied.retry_after.unwrap();
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_millis(100),
            "{name}: retry_after {retry:?}"
        );
        // Another bucket is independent.
        assert!(
            s.rate_check("other", limit).await.unwrap().allowed,
            "{name}"
        );
        tokio::time::sleep(retry + Duration::from_millis(20)).await;
        assert!(
            s.rate_check("bucket", limit).await.unwrap().allowed,
            "{name}: the bucket did not refill"
        );
    })
    .await;
}

/// The limits that select a request count it together or not at all: a client over its own
/// limit does not drain a shared one listed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_one_limit_refuses_counts_against_none() {
    both(|s, name| async move {
        let shared = limit(1, 3600, 3);
        let own = limit(1, 3600, 1);
        let first = s
            .rate_check_all(&[("shared", shared), ("own", own)])
            .await
            .unwrap();
        assert!(first.iter().all(|o| o.allowed), "{name}: {first:?}");
        for _ in 0..5 {
            let over = s
                .rate_check_all(&[("shared", shared), ("own", own)])
                .await
                .unwrap();
            assert!(over[0].allowed && !over[1].allowed, "{name}: {over:?}");
        }
        // Five refusals later the shared bucket has spent only the one allowed request.
        let after = s.rate_check("shared", shared).await.unwrap();
        assert!(after.allowed, "{name}");
        assert_eq!(after.remaining, 1, "{name}: {after:?}");
    })
    .await;
}

/// A limit raised in place (same bucket key) holds a client the old limit refused for at
/// most one refill of the new limit, not the old limit's remaining wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_raised_limit_frees_clients_within_its_own_refill() {
    both(|s, name| async move {
        let old = limit(1, 86_400, 2);
        assert!(s.rate_check("k", old).await.unwrap().allowed, "{name}");
        assert!(s.rate_check("k", old).await.unwrap().allowed, "{name}");
        let held = s.rate_check("k", old).await.unwrap();
        assert!(
            held.retry_after.unwrap() > Duration::from_secs(80_000),
            "{name}"
        );
        let raised = limit(100, 60, 100);
        let first = s.rate_check("k", raised).await.unwrap();
        assert!(
            !first.allowed && first.retry_after.unwrap() <= Duration::from_millis(600),
            "{name}: {first:?}"
        );
        assert!(first.reset <= Duration::from_secs(60), "{name}: {first:?}");
        tokio::time::sleep(first.retry_after.unwrap() + Duration::from_millis(20)).await;
        assert!(s.rate_check("k", raised).await.unwrap().allowed, "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcra_on_redis_is_shared_by_two_stores() {
    let server = RedisServer::start();
    let a = redis_store(&server, "shared:");
    let b = redis_store(&server, "shared:");
    let limit = limit(1, 60, 2);
    assert!(a.rate_check("k", limit).await.unwrap().allowed);
    assert!(b.rate_check("k", limit).await.unwrap().allowed);
    assert!(!a.rate_check("k", limit).await.unwrap().allowed);
    assert!(!b.rate_check("k", limit).await.unwrap().allowed);
}

/// A replica whose clock runs an hour fast lists an entry as expired, but does not delete it
/// for the replicas whose clocks are right: Redis prunes by the earlier of the two clocks.
/// It used to prune by the caller's clock alone, wiping live revocations for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fast_clock_does_not_prune_live_members_for_the_others() {
    let server = RedisServer::start();
    let s = redis_store(&server, "skew:");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(
        s.index_add("i", "sub:carol", now + 600).await.unwrap(),
        now + 600
    );
    assert_eq!(s.index_list("i", now + 3600).await.unwrap(), vec![]);
    assert_eq!(
        s.index_list("i", now).await.unwrap(),
        vec![("sub:carol".to_string(), now + 600)],
        "the fast replica's listing deleted a live member"
    );
    // A second add keeps the later expiry.
    assert_eq!(
        s.index_add("i", "sub:carol", now + 60).await.unwrap(),
        now + 600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefixes_keep_deployments_apart() {
    let server = RedisServer::start();
    let a = redis_store(&server, "one:");
    let b = redis_store(&server, "two:");
    a.set("k", "a", Duration::from_secs(60)).await.unwrap();
    a.index_add("i", "m", 4_000_000_000).await.unwrap();
    assert_eq!(b.get("k").await.unwrap(), None);
    assert_eq!(b.index_list("i", 0).await.unwrap(), vec![]);
    assert_eq!(a.get("k").await.unwrap().as_deref(), Some("a"));
    assert_eq!(a.index_list("i", 0).await.unwrap().len(), 1);
}

/// Every operation, for the outage checks.
async fn every_op(s: &Arc<dyn StateStore>) -> Vec<Result<(), StateError>> {
    let ttl = Duration::from_secs(60);
    let limit = limit(1, 1, 1);
    vec![
        s.insert_if_absent("x", "1", ttl).await.map(drop),
        s.get("x").await.map(drop),
        s.set("x", "1", ttl).await.map(drop),
        s.delete("x").await.map(drop),
        s.get_many(&["x".to_string()]).await.map(drop),
        s.index_add("i", "x", 1).await.map(drop),
        s.index_remove("i", "x", 0).await.map(drop),
        s.index_list("i", 0).await.map(drop),
        s.take_one("x").await.map(drop),
        s.rate_check("x", limit).await.map(drop),
        s.delete_if("x", "1").await.map(drop),
        s.ttl_left("x").await.map(drop),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_fails_every_operation_quickly_and_recovers_after_restart() {
    let mut server = RedisServer::start();
    let s = redis_store(&server, "outage:");
    s.set("before", "1", Duration::from_secs(60)).await.unwrap();

    server.stop();
    for attempt in 0..3 {
        let started = Instant::now();
        let results = every_op(&s).await;
        let took = started.elapsed();
        for r in &results {
            let e = r
                .as_ref()
                .expect_err("an operation succeeded with Redis down");
            assert!(
                matches!(e, StateError::Unavailable(_) | StateError::Unconfirmed(_)),
                "{e:?}"
            );
            assert!(!e.to_string().contains("127.0.0.1"), "{e}");
        }
        // Each operation bounded by the 200ms timeout (and one reconnect attempt, as long):
        // 400ms each, what the ten operations before `delete_if` and `ttl_left` had.
        let ops = u32::try_from(results.len()).unwrap();
        assert!(
            took < OP_TIMEOUT * 2 * ops,
            "attempt {attempt}: failing took {took:?}"
        );
    }

    server.restart();
    let started = Instant::now();
    loop {
        if every_op(&s).await.iter().all(Result::is_ok) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the store did not recover after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_never_started_is_a_state_error_not_a_hang() {
    let port = support::free_port();
    let s: Arc<dyn StateStore> = Arc::new(
        RedisStore::new(&format!("redis://127.0.0.1:{port}/0"), "p:", OP_TIMEOUT).unwrap(),
    );
    let started = Instant::now();
    assert!(matches!(
        s.take_one("k").await,
        Err(StateError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A wrong password is reported as one (an error category, never the password), not as a
/// timeout that sends the operator after the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_password_is_named_not_reported_as_a_timeout() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right-s3cret")
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = format!("redis://:wrong-s3cret@127.0.0.1:{}/0", server.port);
    let store = RedisStore::new(&url, "pw:", OP_TIMEOUT).unwrap();
    let err = store.get("k").await.unwrap_err().to_string();
    assert!(err.contains("authentication"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

/// `requests` per `per_secs` seconds, bursting to `burst`.
fn limit(requests: u32, per_secs: u64, burst: u32) -> RateLimit {
    RateLimit {
        requests,
        per: Duration::from_secs(per_secs),
        burst,
    }
}
