//! The Redis layout shared with the Python service (SPEC §3): what it writes is read
//! here, and what this service writes is what the Python code reads. The fixtures are
//! the exact text Python's `json.dumps`, `str(time.time())` and `isoformat()` produce.

mod support;

use bb8_redis::redis::{self, AsyncCommands};
use chrono::{Duration, Utc};
use session_cache::{
    keys::TokenHash,
    pb::{GetOutcome, SetOutcome},
};
use support::{Backend, Harness, in_an_hour, user};

fn entry_key(token: &str) -> String {
    TokenHash::of(token).entry_key()
}

/// Python's `json.dumps(cache_data)` for a session, with the given instant texts.
fn python_entry(user_id: &str, created_at: &str, session_expire: &str, cached_at: &str) -> String {
    format!(
        r#"{{"user_id": "{user_id}", "email": "{user_id}@example.com", "name": "Jos\u00e9", "email_verified": false, "tier": "free", "created_at": "{created_at}", "updated_at": "2024-01-15T10:30:00.123456+00:00", "session_expire": "{session_expire}", "cached_at": {cached_at}}}"#
    )
}

/// Python's `str(time.time())`, `seconds` from now.
fn python_time(seconds: i64) -> String {
    let t = Utc::now() + Duration::seconds(seconds);
    format!("{}.{:07}", t.timestamp(), t.timestamp_subsec_nanos() / 100)
}

/// Entries in every instant form Python writes are read as hits, naive ones as UTC.
#[tokio::test]
async fn reads_python_entries() {
    let mut h = Harness::start(Backend::Redis, &[]).await;
    let expire = Utc::now() + Duration::hours(1);
    let forms = [
        expire.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        expire.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string(),
        expire.format("%Y-%m-%dT%H:%M:%S.000+00:00").to_string(),
        (expire + Duration::hours(2))
            .format("%Y-%m-%dT%H:%M:%S+02:00")
            .to_string(),
    ];
    let mut conn = h.redis().conn().await;
    for (i, form) in forms.iter().enumerate() {
        let token = format!("python-{i}");
        let value = python_entry("u1", "2024-01-15T10:30:00", form, &python_time(-5));
        let _: () = conn.set_ex(entry_key(&token), value, 300).await.unwrap();
        let got = h.get(&token).await;
        assert_eq!(got.outcome(), GetOutcome::Hit, "{form}");
        let user = got.user.unwrap();
        assert_eq!(user.id, "u1");
        assert_eq!(user.name, "José");
        assert!(!user.email_verified);
        assert_eq!(user.tier, "free");
        // "2024-01-15T10:30:00" naive is 10:30 UTC.
        assert_eq!(user.created_at.unwrap().seconds, 1_705_314_600);
        assert_eq!(user.updated_at.unwrap().nanos, 123_456_000);
        let seconds = got.session_expire.unwrap().seconds;
        assert!((seconds - expire.timestamp()).abs() <= 1, "{form}");
    }
}

/// A Python marker newer than an entry hides it (and the entry is removed); an older
/// one does not. A user id that Python escapes in JSON still finds its marker.
#[tokio::test]
async fn python_markers_hide_entries() {
    let mut h = Harness::start(Backend::Redis, &[]).await;
    let expire = (Utc::now() + Duration::hours(1)).to_rfc3339();
    let mut conn = h.redis().conn().await;
    let cases = [
        (
            "old",
            "u-old",
            python_time(-60),
            python_time(-10),
            GetOutcome::Hit,
        ),
        (
            "new",
            "u-new",
            python_time(-1),
            python_time(-10),
            GetOutcome::Invalidated,
        ),
        (
            "esc",
            "us\\u00e9r",
            python_time(-1),
            python_time(-10),
            GetOutcome::Invalidated,
        ),
    ];
    for (token, json_id, marker, cached_at, want) in cases {
        let value = python_entry(json_id, "2024-01-15T10:30:00", &expire, &cached_at);
        let _: () = conn.set_ex(entry_key(token), value, 300).await.unwrap();
        let user_id = json_id.replace("\\u00e9", "é");
        let _: () = conn
            .set(format!("user_invalidated:{user_id}"), marker)
            .await
            .unwrap();
        assert_eq!(h.get(token).await.outcome(), want, "{token}");
        let exists: bool = conn.exists(entry_key(token)).await.unwrap();
        assert_eq!(
            exists,
            want == GetOutcome::Hit,
            "{token}: removed unless a hit"
        );
    }
}

/// What this service writes is the Python layout, with Python's instant forms and a
/// `cached_at` from the store's clock; Redis holds it for the TTL applied.
#[tokio::test]
async fn writes_python_layout() {
    let mut h = Harness::start(Backend::Redis, &[]).await;
    let set = h.set("tok", user("u1"), in_an_hour(), "").await;
    assert_eq!(set.outcome(), SetOutcome::Stored);
    let mut conn = h.redis().conn().await;
    let raw: String = conn.get(entry_key("tok")).await.unwrap();
    let value: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let object = value.as_object().unwrap();
    let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "cached_at",
            "created_at",
            "email",
            "email_verified",
            "name",
            "session_expire",
            "tier",
            "updated_at",
            "user_id"
        ]
    );
    assert_eq!(object["user_id"], "u1");
    assert_eq!(object["email"], "u1@example.com");
    assert_eq!(object["email_verified"], true);
    assert_eq!(object["created_at"], "2024-01-15T10:30:00+00:00");
    assert_eq!(object["updated_at"], "2024-01-15T10:30:00.123456+00:00");
    let expire = object["session_expire"].as_str().unwrap();
    assert!(
        expire.ends_with("+00:00") && expire.len() == "2024-01-15T10:30:00.123456+00:00".len(),
        "{expire}"
    );
    let cached_at = object["cached_at"].as_f64().unwrap();
    let now = Utc::now().timestamp_micros() as f64 / 1e6;
    assert!(
        (now - cached_at).abs() < 5.0,
        "cached_at {cached_at} is now"
    );

    let pttl: i64 = redis::cmd("PTTL")
        .arg(entry_key("tok"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 290_000 && pttl <= 300_000, "PTTL {pttl}");
}

/// InvalidateUser writes the Python marker: `str(time.time())`-like seconds, with the
/// marker TTL; and it never moves an existing later marker back or shortens its life.
#[tokio::test]
async fn writes_python_markers() {
    let mut h = Harness::start(Backend::Redis, &["--marker-ttl-seconds", "3600"]).await;
    let at = h
        .invalidate_user("u1")
        .await
        .unwrap()
        .invalidated_at
        .unwrap();
    let mut conn = h.redis().conn().await;
    let marker: String = conn.get("user_invalidated:u1").await.unwrap();
    assert_eq!(marker, format!("{}.{:06}", at.seconds, at.nanos / 1000));
    let pttl: i64 = redis::cmd("PTTL")
        .arg("user_invalidated:u1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 3_590_000 && pttl <= 3_600_000, "PTTL {pttl}");

    // A later marker (another replica's, say) and a longer life both stay.
    let _: () = redis::cmd("SET")
        .arg("user_invalidated:u2")
        .arg("9999999999.5")
        .arg("PX")
        .arg(9_000_000_000i64)
        .query_async(&mut conn)
        .await
        .unwrap();
    let at = h
        .invalidate_user("u2")
        .await
        .unwrap()
        .invalidated_at
        .unwrap();
    assert_eq!((at.seconds, at.nanos), (9_999_999_999, 500_000_000));
    let marker: String = conn.get("user_invalidated:u2").await.unwrap();
    assert_eq!(marker, "9999999999.500000");
    let pttl: i64 = redis::cmd("PTTL")
        .arg("user_invalidated:u2")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 8_000_000_000, "PTTL {pttl}");
}

/// InvalidateToken leaves a tombstone that lives as long as an entry could, in its
/// entry's Cluster slot, and under its old name too for a release from before the rename.
#[tokio::test]
async fn logout_leaves_a_tombstone() {
    let mut h = Harness::start(
        Backend::Redis,
        &["--ttl-seconds", "120", "--marker-ttl-seconds", "120"],
    )
    .await;
    h.set("tok", user("u1"), in_an_hour(), "").await;
    assert!(h.invalidate_token("tok").await.unwrap().deleted);
    let mut conn = h.redis().conn().await;
    let hash = TokenHash::of("tok");
    for key in [
        format!("session_revoked:{{session_cache:{}}}", hash.as_str()),
        format!("session_revoked:{}", hash.as_str()),
    ] {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(pttl > 110_000 && pttl <= 120_000, "{key}: PTTL {pttl}");
    }
    let exists: bool = conn.exists(entry_key("tok")).await.unwrap();
    assert!(!exists);
}

/// A tombstone under its old name, left by a release from before the rename, still
/// refuses a late Set for as long as it lives.
#[tokio::test]
async fn old_tombstones_still_refuse() {
    let mut h = Harness::start(Backend::Redis, &[]).await;
    let mut conn = h.redis().conn().await;
    let _: () = redis::cmd("SET")
        .arg(TokenHash::of("tok").legacy_tombstone_key())
        .arg("1732780000.5")
        .arg("EX")
        .arg(300)
        .query_async(&mut conn)
        .await
        .unwrap();
    let set = h.set("tok", user("u1"), in_an_hour(), "").await;
    assert_eq!(set.outcome(), SetOutcome::Revoked);
    let set = h.set("other", user("u1"), in_an_hour(), "").await;
    assert_eq!(set.outcome(), SetOutcome::Stored);
}

/// A value that is not a session answers CORRUPT with a fence and is removed.
#[tokio::test]
async fn corrupt_entries_are_removed() {
    let mut h = Harness::start(Backend::Redis, &[]).await;
    let mut conn = h.redis().conn().await;
    let values = [
        "not json".to_string(),
        r#"{"user_id": "u1"}"#.to_string(),
        python_entry("u1", "yesterday", "2030-01-01T00:00:00", "1.0"),
    ];
    for (i, value) in values.into_iter().enumerate() {
        let token = format!("corrupt-{i}");
        let _: () = conn.set_ex(entry_key(&token), value, 300).await.unwrap();
        let got = h.get(&token).await;
        assert_eq!(got.outcome(), GetOutcome::Corrupt, "{token}");
        assert!(!got.fence.is_empty());
        assert!(got.user.is_none());
        let exists: bool = conn.exists(entry_key(&token)).await.unwrap();
        assert!(!exists, "{token} was removed");
    }
}

/// No key in Redis carries a token in clear: entries and tombstones name its hash.
#[tokio::test]
async fn tokens_never_reach_redis_in_clear() {
    let mut h = Harness::start(Backend::Redis, &[]).await;
    let token = "secret-token-7f3a9c";
    h.set(token, user("u1"), in_an_hour(), "").await;
    h.get(token).await;
    h.invalidate_token(token).await.unwrap();
    h.set(token, user("u1"), in_an_hour(), "").await;
    let mut conn = h.redis().conn().await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(!key.contains(token), "{key}");
        let value: Option<String> = conn.get(key).await.unwrap();
        assert!(!value.unwrap_or_default().contains(token), "value of {key}");
    }
}

/// One Python service's password change with its host's clock 300 ms slow, during this
/// service's validation: the marker reads 300 ms before the fence although it was
/// written after it. Without a margin the late Set is stored and the revoked session
/// served; with `--clock-skew-ms 500` (SPEC §8) the Set is STALE, and an entry cached
/// just before such a marker is INVALIDATED.
#[tokio::test]
async fn python_markers_from_a_slow_clock_need_the_margin() {
    async fn race(h: &mut Harness, user_id: &str) -> (SetOutcome, GetOutcome) {
        let token = format!("slow-clock-{user_id}");
        let miss = h.get(&token).await;
        // The Python service: `redis.set(f"user_invalidated:{user_id}", str(time.time()))`
        // on a host whose clock runs 300 ms behind.
        let mut conn = h.redis().conn().await;
        let at = Utc::now() - Duration::milliseconds(300);
        let marker = format!("{}.{:06}", at.timestamp(), at.timestamp_subsec_micros());
        let _: () = conn
            .set_ex(format!("user_invalidated:{user_id}"), marker, 3600)
            .await
            .unwrap();
        let set = h
            .set(&token, user(user_id), in_an_hour(), &miss.fence)
            .await;
        (set.outcome(), h.get(&token).await.outcome())
    }
    // The race is about clocks, not time: a loaded machine must not turn a call
    // UNAVAILABLE within the default store timeout of 100 ms.
    let slack = ["--store-timeout-ms", "2000"];
    let mut h = Harness::start(Backend::Redis, &slack).await;
    assert_eq!(
        race(&mut h, "u-no-margin").await,
        (SetOutcome::Stored, GetOutcome::Hit),
        "without a margin the slow clock revives the session"
    );
    let mut h = Harness::start(
        Backend::Redis,
        &[slack[0], slack[1], "--clock-skew-ms", "500"],
    )
    .await;
    assert_eq!(
        race(&mut h, "u-margin").await,
        (SetOutcome::Stale, GetOutcome::Miss)
    );

    // An entry cached, then a slow-clock marker: INVALIDATED with the margin.
    h.set("cached-then-revoked", user("u-cached"), in_an_hour(), "")
        .await;
    let mut conn = h.redis().conn().await;
    let at = Utc::now() - Duration::milliseconds(300);
    let marker = format!("{}.{:06}", at.timestamp(), at.timestamp_subsec_micros());
    let _: () = conn
        .set_ex("user_invalidated:u-cached", marker, 3600)
        .await
        .unwrap();
    assert_eq!(
        h.get("cached-then-revoked").await.outcome(),
        GetOutcome::Invalidated
    );
}
