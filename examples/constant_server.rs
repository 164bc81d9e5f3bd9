//! The floor for benchmarks: a `SessionCache` server that answers every call with a
//! constant reply of the same shape as a real hit, touching no store. Whatever the real
//! service costs beyond this is the cost of caching.
//!
//! `cargo run --release --example constant_server -- 127.0.0.1:50061`

use std::net::SocketAddr;

use prost_types::Timestamp;
use session_cache::pb::{
    self, GetOutcome, SetOutcome, ValidateOutcome,
    session_cache_server::{SessionCache, SessionCacheServer},
};
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

/// The same allocator as the service, so that the floor differs from it only in work.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Constant {
    hit: pb::GetResponse,
}

#[tonic::async_trait]
impl SessionCache for Constant {
    async fn get(&self, _: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        Ok(Response::new(self.hit.clone()))
    }

    async fn set(&self, _: Request<pb::SetRequest>) -> Result<Response<pb::SetResponse>, Status> {
        Ok(Response::new(pb::SetResponse {
            outcome: SetOutcome::Stored.into(),
            ttl_seconds: 300,
        }))
    }

    async fn invalidate_token(
        &self,
        _: Request<pb::InvalidateTokenRequest>,
    ) -> Result<Response<pb::InvalidateTokenResponse>, Status> {
        Ok(Response::new(pb::InvalidateTokenResponse { deleted: true }))
    }

    async fn invalidate_user(
        &self,
        _: Request<pb::InvalidateUserRequest>,
    ) -> Result<Response<pb::InvalidateUserResponse>, Status> {
        Ok(Response::new(pb::InvalidateUserResponse {
            invalidated_at: Some(Timestamp::default()),
        }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            serving: true,
            store: "constant".into(),
            enabled: true,
            store_latency: None,
        }))
    }

    async fn validate(
        &self,
        _: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        Ok(Response::new(pb::ValidateResponse {
            outcome: ValidateOutcome::Valid.into(),
            user: self.hit.user.clone(),
            session_expire: self.hit.session_expire,
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50061".into())
        .parse()?;
    let at = Timestamp {
        seconds: 1_705_314_600,
        nanos: 0,
    };
    // A user of the benchmark's shape (`bench-user-NNN`, bench/bench.py), so replies
    // match the real service's in size.
    let hit = pb::GetResponse {
        outcome: GetOutcome::Hit.into(),
        user: Some(pb::User {
            id: "bench-user-000".into(),
            email: "bench-user-000@example.com".into(),
            name: "Bench User".into(),
            email_verified: true,
            tier: "pro".into(),
            created_at: Some(at),
            updated_at: Some(at),
        }),
        session_expire: Some(Timestamp {
            seconds: 4_102_444_800,
            nanos: 0,
        }),
        fence: String::new(),
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Server::builder()
        .add_service(SessionCacheServer::new(Constant { hit }))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await?;
    Ok(())
}
