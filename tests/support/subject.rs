//! The service as a test reaches it: through the real server on port 0, or by calling
//! its handlers directly, with no network, over either store.

use std::sync::Arc;

use prost_types::Timestamp;
use session_cache::{
    Config,
    health::StoreStatus,
    pb::{self, session_cache_client::SessionCacheClient, session_cache_server::SessionCache},
    service::SessionCacheService,
    store::{MemoryStore, RedisStore},
};
use tonic::{Request, Response, Status, transport::Channel};

use super::{Backend, Harness, Redis};

/// Through the network, or straight into the handlers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Network,
    Direct,
}

/// A cloneable way to call the service, whichever the path.
#[derive(Clone)]
pub enum Caller {
    Network(SessionCacheClient<Channel>),
    Redis(Arc<SessionCacheService<RedisStore>>),
    Memory(Arc<SessionCacheService<MemoryStore>>),
}

macro_rules! dispatch {
    ($self:ident, $method:ident, $request:expr) => {
        match $self {
            Caller::Network(client) => client
                .clone()
                .$method($request)
                .await
                .map(Response::into_inner),
            Caller::Redis(service) => SessionCache::$method(&**service, Request::new($request))
                .await
                .map(Response::into_inner),
            Caller::Memory(service) => SessionCache::$method(&**service, Request::new($request))
                .await
                .map(Response::into_inner),
        }
    };
}

impl Caller {
    pub async fn get(&self, request: pb::GetRequest) -> Result<pb::GetResponse, Status> {
        dispatch!(self, get, request)
    }

    pub async fn set(&self, request: pb::SetRequest) -> Result<pb::SetResponse, Status> {
        dispatch!(self, set, request)
    }

    pub async fn invalidate_token(
        &self,
        request: pb::InvalidateTokenRequest,
    ) -> Result<pb::InvalidateTokenResponse, Status> {
        dispatch!(self, invalidate_token, request)
    }

    pub async fn invalidate_user(
        &self,
        request: pb::InvalidateUserRequest,
    ) -> Result<pb::InvalidateUserResponse, Status> {
        dispatch!(self, invalidate_user, request)
    }

    pub async fn health(&self, request: pb::HealthRequest) -> Result<pb::HealthResponse, Status> {
        dispatch!(self, health, request)
    }

    /// Get by token; a failed call fails the test.
    pub async fn get_token(&self, token: &str) -> pb::GetResponse {
        self.get(pb::GetRequest {
            token: token.into(),
        })
        .await
        .expect("Get answers OK")
    }

    /// Set a session; a failed call fails the test.
    pub async fn set_session(
        &self,
        token: &str,
        user: pb::User,
        expire: Timestamp,
        fence: &str,
    ) -> pb::SetResponse {
        self.set(pb::SetRequest {
            token: token.into(),
            user: Some(user),
            session_expire: Some(expire),
            fence: fence.into(),
        })
        .await
        .expect("Set answers OK")
    }

    pub async fn invalidate_user_id(
        &self,
        user_id: &str,
    ) -> Result<pb::InvalidateUserResponse, Status> {
        self.invalidate_user(pb::InvalidateUserRequest {
            user_id: user_id.into(),
        })
        .await
    }

    pub async fn invalidate_token_of(
        &self,
        token: &str,
    ) -> Result<pb::InvalidateTokenResponse, Status> {
        self.invalidate_token(pb::InvalidateTokenRequest {
            token: token.into(),
        })
        .await
    }
}

/// A store, and the service over it reached by one path.
pub struct Subject {
    pub caller: Caller,
    pub backend: Backend,
    // Kept alive for the test's length.
    _harness: Option<Harness>,
    _redis: Option<Redis>,
}

impl Subject {
    /// Starts the store and the service with these flags, reached by `path`.
    pub async fn start(backend: Backend, path: Path, args: &[&str]) -> Subject {
        if path == Path::Network {
            // With replicas (Sentinel, Cluster) every revocation waits for one (WAIT,
            // within the store timeout); 100 ms is short for a replica on a test machine
            // busy with other topologies, and these tests are about answers, not speed.
            let mut args = args.to_vec();
            let replicated = matches!(backend, Backend::Sentinel | Backend::Cluster);
            if replicated && !args.contains(&"--store-timeout-ms") {
                args.extend(["--store-timeout-ms", "1000"]);
            }
            // Redis topologies run as the ACL users docs/OPERATIONS.md documents.
            let harness = super::acl::harness(backend, &args).await;
            return Subject {
                caller: Caller::Network(harness.client.clone()),
                backend,
                _harness: Some(harness),
                _redis: None,
            };
        }
        let argv = std::iter::once("session-cache").chain(args.iter().copied());
        let config = Config::load_from(argv).expect("test flags are valid");
        let status = Arc::new(StoreStatus::new(true));
        let (caller, redis) = match backend {
            Backend::Redis => {
                let redis = Redis::start().await;
                let url = redis.url();
                let argv = ["session-cache", "--redis-url", &url]
                    .into_iter()
                    .chain(args.iter().copied());
                let config = Config::load_from(argv).expect("test flags are valid");
                let redis_config = session_cache::prepare::redis_config(&config)
                    .expect("the test's files are readable")
                    .expect("a Redis topology");
                let store = RedisStore::new(&redis_config).unwrap();
                let service = SessionCacheService::new(Arc::new(store), config.enabled, status);
                (Caller::Redis(Arc::new(service)), Some(redis))
            }
            Backend::Sentinel | Backend::Cluster => {
                unreachable!("the Sentinel and Cluster topologies are tested through the network")
            }
            Backend::Memory => {
                let store = MemoryStore::new(config.limits(), config.memory_bounds());
                let service = SessionCacheService::new(Arc::new(store), config.enabled, status);
                (Caller::Memory(Arc::new(service)), None)
            }
        };
        Subject {
            caller,
            backend,
            _harness: None,
            _redis: redis,
        }
    }

    pub async fn get(&mut self, token: &str) -> pb::GetResponse {
        self.caller.get_token(token).await
    }

    pub async fn set(
        &mut self,
        token: &str,
        user: pb::User,
        expire: Timestamp,
        fence: &str,
    ) -> pb::SetResponse {
        self.caller.set_session(token, user, expire, fence).await
    }

    pub async fn invalidate_user(
        &mut self,
        user_id: &str,
    ) -> Result<pb::InvalidateUserResponse, Status> {
        self.caller.invalidate_user_id(user_id).await
    }

    pub async fn invalidate_token(
        &mut self,
        token: &str,
    ) -> Result<pb::InvalidateTokenResponse, Status> {
        self.caller.invalidate_token_of(token).await
    }
}
