//! Only trusted callers: API keys with roles, client certificates, TLS, Redis ACLs and
//! TLS, keyed token hashing, and the refusal to run on an evicting Redis.

mod support;

use bb8_redis::redis::{self, AsyncCommands};
use hmac::{Hmac, Mac};
use session_cache::pb::{self, GetOutcome, SetOutcome, session_cache_client::SessionCacheClient};
use sha2::{Digest, Sha256};
use support::{
    Harness, Redis, Server, in_an_hour,
    pki::{Ca, Dir},
    redis_server::{Options, Role, Tls},
    user, wait_health,
};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const READER_KEY: &str = "reader-key-9f2c1e";
const WRITER_KEY: &str = "writer-key-7a0d44";

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn keys_file(dir: &Dir, certificates: &str) -> String {
    dir.write(
        "keys.toml",
        format!(
            "[[keys]]\nname = \"frontend\"\nsha256 = \"{}\"\nroles = [\"reader\"]\n\n\
             [[keys]]\nname = \"auth-service\"\nsha256 = \"{}\"\nroles = [\"writer\"]\n{certificates}",
            sha256_hex(READER_KEY),
            sha256_hex(WRITER_KEY)
        ),
    )
}

fn with_key<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

fn set_request(token: &str) -> pb::SetRequest {
    pb::SetRequest {
        token: token.into(),
        user: Some(user("u1")),
        session_expire: Some(in_an_hour()),
        fence: String::new(),
    }
}

fn get_request(token: &str) -> pb::GetRequest {
    pb::GetRequest {
        token: token.into(),
    }
}

/// A Get of `token` misses, and a Set with the fence it returned stores it.
async fn miss_then_store(client: &mut SessionCacheClient<Channel>, token: &str) {
    let miss = client.get(get_request(token)).await.unwrap().into_inner();
    assert_eq!(miss.outcome(), GetOutcome::Miss);
    let set = client
        .set(pb::SetRequest {
            fence: miss.fence,
            ..set_request(token)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.outcome(), SetOutcome::Stored);
}

/// With a keys file: no key and unknown keys are UNAUTHENTICATED, a reader may Get but
/// not Set or invalidate (PERMISSION_DENIED), a writer may do all, and health and
/// reflection stay open.
#[tokio::test]
async fn api_keys_and_roles() {
    let dir = Dir::new();
    let keys = keys_file(&dir, "");
    let h = Harness::start(support::Backend::Memory, &["--api-keys-file", &keys]).await;
    let mut client = h.client.clone();

    let status = client.get(get_request("tok")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "no key");
    let status = client
        .get(with_key(get_request("tok"), "guessed"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "unknown key");
    assert!(
        !status.message().contains("guessed"),
        "the key is not echoed"
    );
    let mut basic = Request::new(get_request("tok"));
    basic.metadata_mut().insert(
        "authorization",
        format!("Basic {READER_KEY}").parse().unwrap(),
    );
    assert_eq!(
        client.get(basic).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let got = client
        .get(with_key(get_request("tok"), READER_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.outcome(), GetOutcome::Miss);
    let status = client
        .set(with_key(set_request("tok"), READER_KEY))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "a reader cannot mint sessions"
    );
    assert!(status.message().contains("frontend") && status.message().contains("writer"));
    let status = client
        .invalidate_user(with_key(
            pb::InvalidateUserRequest {
                user_id: "u1".into(),
            },
            READER_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .invalidate_token(with_key(
            pb::InvalidateTokenRequest {
                token: "tok".into(),
            },
            READER_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let got = client
        .get(with_key(get_request("tok"), READER_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.outcome(),
        GetOutcome::Miss,
        "the refused Set wrote nothing"
    );

    let set = client
        .set(with_key(set_request("tok"), WRITER_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.outcome(), SetOutcome::Stored);
    let got = client
        .get(with_key(get_request("tok"), WRITER_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.outcome(), GetOutcome::Hit);
    let health = client
        .health(with_key(pb::HealthRequest {}, READER_KEY))
        .await
        .unwrap();
    assert!(health.into_inner().serving);
    assert_eq!(
        client
            .health(pb::HealthRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // Probes need no credentials.
    let mut health = h.server.health().await;
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(status.into_inner().status(), ServingStatus::Serving);
}

/// A keys file with a plain key in it, or a missing file, stops the start (exit 64).
#[tokio::test]
async fn bad_keys_files_stop_the_start() {
    let dir = Dir::new();
    let plain = dir.write(
        "plain.toml",
        "[[keys]]\nname = \"x\"\nkey = \"hunter2\"\nroles = [\"writer\"]\n",
    );
    for path in [plain.as_str(), "/nonexistent/keys.toml"] {
        let config =
            session_cache::Config::load_from(["session-cache", "--api-keys-file", path]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = session_cache::run(config, listener, std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(error.exit_code(), 64, "{error}");
        assert!(error.to_string().contains("--api-keys-file"), "{error}");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }
}

async fn tls_channel(
    server: &Server,
    ca: &Ca,
    identity: Option<&support::pki::Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// TLS with client certificates: a certificate mapped to the writer role may Set with
/// no key; a client without a certificate may still use an API key; a certificate from
/// another CA is refused by the handshake; plaintext is refused.
#[tokio::test]
async fn mutual_tls() {
    let dir = Dir::new();
    let ca = Ca::new("session-cache test CA");
    let server_leaf = ca.server();
    let keys = keys_file(
        &dir,
        "\n[[certificates]]\nname = \"gateway\"\nsubject = \"gateway.internal\"\nroles = [\"writer\"]\n",
    );
    let args = [
        "--api-keys-file".to_string(),
        keys,
        "--tls-cert".into(),
        dir.write("server.pem", &server_leaf.cert),
        "--tls-key".into(),
        dir.write("server.key", &server_leaf.key),
        "--tls-client-ca".into(),
        dir.write("ca.pem", ca.pem()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args).await;
    // The store is ready once its first ping has passed; calls before that are refused.
    let health = HealthClient::new(tls_channel(&server, &ca, None).await.unwrap());
    wait_health(
        health,
        "sessioncache.v1.SessionCache",
        ServingStatus::Serving,
    )
    .await;

    let gateway = ca.client("gateway.internal");
    let mut client =
        SessionCacheClient::new(tls_channel(&server, &ca, Some(&gateway)).await.unwrap());
    let set = client.set(set_request("tok")).await.unwrap().into_inner();
    assert_eq!(
        set.outcome(),
        SetOutcome::Stored,
        "the gateway's certificate is a writer"
    );

    let stranger = ca.client("stranger.internal");
    let mut client =
        SessionCacheClient::new(tls_channel(&server, &ca, Some(&stranger)).await.unwrap());
    assert_eq!(
        client.get(get_request("tok")).await.unwrap_err().code(),
        Code::Unauthenticated,
        "a certificate the keys file does not map"
    );

    let mut client = SessionCacheClient::new(tls_channel(&server, &ca, None).await.unwrap());
    let got = client
        .get(with_key(get_request("tok"), READER_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.outcome(),
        GetOutcome::Hit,
        "an API key over TLS without a certificate"
    );
    let mut health = HealthClient::new(tls_channel(&server, &ca, None).await.unwrap());
    assert!(
        health
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_ok()
    );

    let rogue_ca = Ca::new("rogue CA");
    let rogue = rogue_ca.client("gateway.internal");
    let refused = match tls_channel(&server, &ca, Some(&rogue)).await {
        Err(_) => true,
        Ok(channel) => SessionCacheClient::new(channel)
            .set(set_request("tok2"))
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a certificate from another CA must not get through"
    );

    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => SessionCacheClient::new(channel)
            .get(with_key(get_request("tok"), READER_KEY))
            .await
            .is_err(),
    };
    assert!(refused, "plaintext is refused on a TLS port");
}

/// Redis with an ACL user limited to the service's key patterns and commands, reached
/// over TLS with a private CA: everything works, and that user can write nothing else.
#[tokio::test]
async fn redis_acl_user_over_tls() {
    let dir = Dir::new();
    let ca = Ca::new("redis test CA");
    let leaf = ca.server();
    // The one-Redis user docs/OPERATIONS.md documents.
    let documented = support::acl::documented("redis");
    let acl = format!(
        "user default off\nuser {} {}\n",
        documented.name,
        documented.rules.join(" ")
    );
    let mut options = Options::new(Role::Plain).args(&["--aclfile", &dir.write("users.acl", acl)]);
    options.tls = Some(Tls {
        cert: dir.write("redis.pem", &leaf.cert),
        key: dir.write("redis.key", &leaf.key),
        ca: dir.write("ca.pem", ca.pem()),
    });
    options.auth = Some((Some(documented.name.clone()), support::acl::PASSWORD.into()));
    let redis = Redis::start_as(options).await;
    let url = redis.url();
    let ca_file = dir.path().join("ca.pem").to_string_lossy().into_owned();
    let server = Server::start(&["--redis-url", &url, "--redis-ca-file", &ca_file]).await;
    server
        .wait_health("sessioncache.v1.SessionCache", ServingStatus::Serving)
        .await;
    let mut client = server.client().await;
    miss_then_store(&mut client, "tok").await;
    assert_eq!(
        client
            .get(get_request("tok"))
            .await
            .unwrap()
            .into_inner()
            .outcome(),
        GetOutcome::Hit
    );
    client
        .invalidate_user(pb::InvalidateUserRequest {
            user_id: "u1".into(),
        })
        .await
        .unwrap();
    client
        .invalidate_token(pb::InvalidateTokenRequest {
            token: "tok".into(),
        })
        .await
        .unwrap();

    // The same credentials cannot touch other keys.
    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
    let other = redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.pem().into_bytes()),
        },
    )
    .unwrap();
    let mut conn = other.get_multiplexed_async_connection().await.unwrap();
    let denied: redis::RedisResult<()> = conn.set("other:key", "x").await;
    assert!(
        denied.is_err(),
        "the ACL limits the service's user to its own keys"
    );
    drop(redis);
}

/// Batched lookups read with one `MGET` a round. An ACL without `+mget` (the documented
/// one-Redis user less that right) refuses it; then lookups read key by key, and every
/// answer is still right: a hit, and INVALIDATED once the user's marker is set.
#[tokio::test]
async fn batched_lookups_read_key_by_key_where_the_acl_refuses_mget() {
    let documented = support::acl::documented("redis");
    for mget in [true, false] {
        let dir = Dir::new();
        let rules: Vec<&str> = documented
            .rules
            .iter()
            .map(String::as_str)
            .filter(|rule| mget || *rule != "+mget")
            .collect();
        assert!(
            documented.rules.iter().any(|rule| rule == "+mget"),
            "the documented user reads batches with MGET"
        );
        let acl = format!(
            "user default on nopass ~* +@all\nuser {} {}\n",
            documented.name,
            rules.join(" ")
        );
        let acl_file = dir.write("users.acl", acl);
        let redis = Redis::start_with(&["--aclfile", &acl_file]).await;
        let url = redis.url().replace(
            "redis://",
            &format!("redis://{}:{}@", documented.name, support::acl::PASSWORD),
        );
        // Every lookup as plain commands, so that the first one already tries MGET.
        let server = Server::start(&["--redis-url", &url, "--redis-lookup", "commands"]).await;
        server
            .wait_health("sessioncache.v1.SessionCache", ServingStatus::Serving)
            .await;
        let mut client = server.client().await;
        miss_then_store(&mut client, "tok").await;
        let mut get = async || {
            client
                .get(get_request("tok"))
                .await
                .unwrap()
                .into_inner()
                .outcome()
        };
        for _ in 0..3 {
            assert_eq!(get().await, GetOutcome::Hit, "mget {mget}");
        }
        client
            .invalidate_user(pb::InvalidateUserRequest {
                user_id: "u1".into(),
            })
            .await
            .unwrap();
        assert_eq!(
            client
                .get(get_request("tok"))
                .await
                .unwrap()
                .into_inner()
                .outcome(),
            GetOutcome::Invalidated,
            "mget {mget}"
        );

        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut redis.conn().await)
            .await
            .unwrap();
        let calls = |command: &str, field: &str| -> u64 {
            stats
                .lines()
                .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
                .and_then(|line| {
                    line.split(',')
                        .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
                })
                .map_or(0, |n| n.parse().unwrap())
        };
        if mget {
            assert!(
                calls("mget", "calls") >= 5,
                "lookups read with MGET: {stats}"
            );
            assert_eq!(calls("mget", "rejected_calls"), 0);
        } else {
            // Refused once, then never sent again; the reads went key by key.
            assert_eq!(calls("mget", "rejected_calls"), 1, "{stats}");
            assert_eq!(calls("mget", "calls"), 0);
            assert!(calls("get", "calls") >= 5, "lookups read with GET: {stats}");
        }
    }
}

/// With --token-hmac-secret-file, entry keys are HMAC-SHA256 of the token under the
/// secret, not its plain SHA-256.
#[tokio::test]
async fn keyed_token_hashing() {
    let dir = Dir::new();
    let secret = "a-long-enough-test-secret";
    let secret_file = dir.write("secret", format!("{secret}\n"));
    let redis = Redis::start().await;
    let mut h = Harness::over(Some(redis), &["--token-hmac-secret-file", &secret_file]).await;
    assert_eq!(
        h.set("tok", user("u1"), in_an_hour(), "").await.outcome(),
        SetOutcome::Stored
    );
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Hit);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(b"tok");
    let keyed: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut conn = h.redis().conn().await;
    let keys: Vec<String> = conn.keys("session_cache:*").await.unwrap();
    assert_eq!(keys, vec![format!("session_cache:{keyed}")]);
    assert!(!keys[0].contains(&sha256_hex("tok")[..32]));
}

/// Why the service, given `redis` as --redis-url, refuses to start.
async fn refusal(redis: &Redis) -> session_cache::error::SetupError {
    let config =
        session_cache::Config::load_from(["session-cache", "--redis-url", &redis.url()]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    session_cache::run(config, listener, std::future::pending())
        .await
        .unwrap_err()
}

/// Redis under an allkeys-* eviction policy could evict revocations: the service
/// refuses to start on it (exit 64) unless told to accept that.
#[tokio::test]
async fn evicting_redis_is_refused() {
    let redis =
        Redis::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]).await;
    let error = refusal(&redis).await;
    assert_eq!(error.exit_code(), 64);
    assert!(error.to_string().contains("allkeys-lru"), "{error}");

    let h = Harness::over(Some(redis), &["--allow-evicting-redis"]).await;
    drop(h);
}

/// A Cluster node given as --redis-url would refuse every key of a slot it does not
/// serve: the service refuses to start on it (exit 64) and names the flag to use.
#[tokio::test]
async fn cluster_node_behind_a_url_is_refused() {
    // A bus port of its own: the node's port plus 10000 may be taken or out of range.
    let bus = support::free_port().to_string();
    let node = Options::new(Role::ClusterNode {
        node_timeout_ms: 1000,
    })
    .args(&["--cluster-port", &bus]);
    let redis = Redis::start_as(node).await;
    let error = refusal(&redis).await;
    assert_eq!(error.exit_code(), 64);
    assert!(
        error.to_string().contains("--redis-cluster-nodes"),
        "{error}"
    );
}

/// On a Cluster (three primaries, each with a replica), the documented Cluster user on
/// every node serves everything: the slot map (CLUSTER SLOTS), the health check (CLUSTER
/// INFO), and revocations that wait for a replica (WAIT).
#[tokio::test]
async fn redis_acl_user_on_a_cluster() {
    let mut h = support::acl::harness(support::Backend::Cluster, &[]).await;
    for token in ["tok-1", "tok-2", "tok-3", "tok-4"] {
        let miss = h.get(token).await;
        assert_eq!(miss.outcome(), GetOutcome::Miss);
        let set = h.set(token, user("u1"), in_an_hour(), &miss.fence).await;
        assert_eq!(set.outcome(), SetOutcome::Stored, "{token}");
        assert_eq!(h.get(token).await.outcome(), GetOutcome::Hit, "{token}");
    }
    h.invalidate_token("tok-1")
        .await
        .expect("a logout is acknowledged once a replica has it");
    h.invalidate_user("u1")
        .await
        .expect("a password change is acknowledged once a replica has it");
    for token in ["tok-1", "tok-2", "tok-3", "tok-4"] {
        assert_ne!(h.get(token).await.outcome(), GetOutcome::Hit, "{token}");
    }
}

/// A caller without credentials is refused from its headers alone: the server answers
/// UNAUTHENTICATED while the request's body is still unsent (a raw HTTP/2 client that
/// announces a 1,000-byte message and sends only its 5-byte frame header), so an
/// unauthenticated stream holds nothing but its headers.
#[tokio::test]
async fn callers_are_refused_before_their_message_is_read() {
    let dir = Dir::new();
    let keys = keys_file(&dir, "");
    let h = Harness::start(support::Backend::Memory, &["--api-keys-file", &keys]).await;
    let tcp = tokio::net::TcpStream::connect(h.server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!(
        "http://{}/sessioncache.v1.SessionCache/Set",
        h.server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (reply, mut body) = client.send_request(request, false).unwrap();
    // A gRPC frame header announcing 1,000 bytes, and nothing more: the message never
    // comes.
    let mut frame = vec![0u8];
    frame.extend_from_slice(&1000u32.to_be_bytes());
    body.send_data(bytes::Bytes::from(frame), false).unwrap();
    let reply = tokio::time::timeout(std::time::Duration::from_secs(5), reply)
        .await
        .expect("refused without waiting for the message")
        .unwrap();
    let status = reply
        .headers()
        .get("grpc-status")
        .expect("a trailers-only refusal")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(status, (Code::Unauthenticated as i32).to_string());
}
