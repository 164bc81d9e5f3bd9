//! What only the embedded store has to prove, at the handler level with no network: its
//! size bound drops sessions but never revocations, and it reclaims expired items with
//! no caller touching them.

mod support;

use std::{sync::Arc, time::Duration};

use session_cache::{
    clock::Micros,
    health::StoreStatus,
    pb::{self, GetOutcome, SetOutcome, session_cache_server::SessionCache},
    service::SessionCacheService,
    store::{Limits, MemoryStore, Store},
};
use support::{in_an_hour, user};
use tonic::Request;

fn service(store: Arc<MemoryStore>) -> SessionCacheService<MemoryStore> {
    SessionCacheService::new(store, true, Arc::new(StoreStatus::new(true)))
}

async fn get(svc: &SessionCacheService<MemoryStore>, token: &str) -> pb::GetResponse {
    svc.get(Request::new(pb::GetRequest {
        token: token.into(),
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn set(
    svc: &SessionCacheService<MemoryStore>,
    token: &str,
    user_id: &str,
    fence: &str,
) -> SetOutcome {
    svc.set(Request::new(pb::SetRequest {
        token: token.into(),
        user: Some(user(user_id)),
        session_expire: Some(in_an_hour()),
        fence: fence.into(),
    }))
    .await
    .unwrap()
    .into_inner()
    .outcome()
}

/// A flood of Sets past --memory-max-entries keeps the store near its bound, and the
/// user markers and logout tombstones written before the flood all survive it.
#[tokio::test]
async fn size_bound_drops_sessions_never_revocations() {
    let limits = Limits {
        ttl_seconds: 300,
        marker_ttl_seconds: 3600,
        clock_skew: Micros(0),
    };
    let store = Arc::new(MemoryStore::new(limits, 100));
    let svc = service(store.clone());

    let mut fences = Vec::new();
    for i in 0..20 {
        let miss = get(&svc, &format!("revoked-{i}")).await;
        fences.push(miss.fence);
        svc.invalidate_user(Request::new(pb::InvalidateUserRequest {
            user_id: format!("victim-{i}"),
        }))
        .await
        .unwrap();
        svc.invalidate_token(Request::new(pb::InvalidateTokenRequest {
            token: format!("logged-out-{i}"),
        }))
        .await
        .unwrap();
    }
    for i in 0..5_000 {
        assert_eq!(
            set(&svc, &format!("flood-{i}"), "flooder", "").await,
            SetOutcome::Stored
        );
    }
    let held = store.len();
    assert!(held <= 110, "the bound holds: {held} entries");
    for (i, fence) in fences.iter().enumerate() {
        let stale = set(&svc, &format!("revoked-{i}"), &format!("victim-{i}"), fence).await;
        assert_eq!(stale, SetOutcome::Stale, "marker {i} survived the flood");
        let revoked = set(&svc, &format!("logged-out-{i}"), "someone", "").await;
        assert_eq!(
            revoked,
            SetOutcome::Revoked,
            "tombstone {i} survived the flood"
        );
    }
}

/// Expired entries are reclaimed by the store's upkeep, with no Get for them.
#[tokio::test]
async fn expired_entries_are_reclaimed_without_callers() {
    let limits = Limits {
        ttl_seconds: 1,
        marker_ttl_seconds: 1,
        clock_skew: Micros(0),
    };
    let store = Arc::new(MemoryStore::new(limits, 1_000));
    let svc = service(store.clone());
    for i in 0..50 {
        assert_eq!(
            set(&svc, &format!("t-{i}"), "u", "").await,
            SetOutcome::Stored
        );
    }
    assert_eq!(store.len(), 50);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    store.upkeep();
    assert!(store.is_empty(), "{} entries left", store.len());
    assert_eq!(get(&svc, "t-0").await.outcome(), GetOutcome::Miss);
}
