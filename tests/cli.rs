//! The binary as an operator meets it: flags, exit codes, logs, and signals.

mod support;

use std::process::{Command, Stdio};

use session_cache::pb;
use support::{
    PATIENCE, eventually, free_port, in_an_hour, pki,
    process::{BIN, Process, command, connect},
    user,
};

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .output()
        .expect("the binary runs")
}

/// A configuration that cannot be served exits 64 with a message naming the flag.
#[test]
fn bad_configuration_exits_64() {
    let cases: &[(&[&str], &str)] = &[
        (&["--ttl-seconds", "zero"], "--ttl-seconds"),
        (&["--listen", "0.0.0.0:50051"], "--allow-unauthenticated"),
        (&["--redis-url", "mysql://user:hunter2@db"], "--redis-url"),
        (&["--no-such-flag"], "--no-such-flag"),
        // SPEC §8: one topology, and each Sentinel flag with the other.
        (
            &[
                "--redis-url",
                "redis://127.0.0.1:6379",
                "--redis-sentinels",
                "127.0.0.1:26379",
                "--redis-sentinel-master",
                "m",
            ],
            "--redis-sentinels",
        ),
        (
            &["--redis-sentinels", "127.0.0.1:26379"],
            "--redis-sentinel-master",
        ),
        (&["--redis-sentinel-master", "m"], "--redis-sentinels"),
        (
            &[
                "--redis-sentinels",
                "127.0.0.1:26379",
                "--redis-sentinel-master",
                "",
            ],
            "--redis-sentinel-master",
        ),
        (
            &[
                "--redis-sentinels",
                "no-port",
                "--redis-sentinel-master",
                "m",
            ],
            "--redis-sentinels",
        ),
        (
            &[
                "--redis-url",
                "redis://127.0.0.1:6379",
                "--redis-cluster-nodes",
                "127.0.0.1:7000",
            ],
            "--redis-url and --redis-cluster-nodes",
        ),
        (
            &[
                "--redis-sentinels",
                "127.0.0.1:26379",
                "--redis-sentinel-master",
                "m",
                "--redis-cluster-nodes",
                "127.0.0.1:7000",
            ],
            "--redis-sentinels and --redis-cluster-nodes",
        ),
        (
            &["--redis-cluster-nodes", "127.0.0.1:7000,nowhere"],
            "--redis-cluster-nodes",
        ),
        (
            &[
                "--redis-cluster-nodes",
                "127.0.0.1:7000",
                "--redis-sentinel-username",
                "u",
            ],
            "--redis-sentinel-username",
        ),
        (&["--revocation-replicas", "1"], "--revocation-replicas"),
        (&["--otlp-endpoint", "collector:4317"], "--otlp-endpoint"),
        (&["--otlp-endpoint", "http://[::1"], "--otlp-endpoint"),
        (
            &["--redis-url", "redis://127.0.0.1:6379", "--redis-tls"],
            "--redis-tls",
        ),
        (
            &[
                "--redis-sentinels",
                "127.0.0.1:26379",
                "--redis-sentinel-master",
                "m",
                "--redis-password-file",
                "/nonexistent/password",
                "--listen",
                "127.0.0.1:0",
            ],
            "--redis-password-file",
        ),
        // SPEC §9: provider flags need --idp, and each provider its own flags.
        (
            &["--appwrite-endpoint", "https://cloud.appwrite.io/v1"],
            "--idp",
        ),
        (
            &[
                "--idp",
                "appwrite",
                "--appwrite-endpoint",
                "https://admin:hunter2@appwrite.example/v1",
                "--appwrite-project",
                "p",
            ],
            "--appwrite-endpoint",
        ),
        (
            &[
                "--idp",
                "introspection",
                "--introspection-url",
                "https://idp.example/introspect",
                "--introspection-client-id",
                "c",
            ],
            "--introspection-client-secret-file",
        ),
    ];
    for (args, flag) in cases {
        let out = run(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "a password was echoed: {stderr}"
        );
    }
}

/// `--help` documents every flag and its environment variable, and exits 0.
#[test]
fn help_documents_every_flag() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--redis-url",
        "--ttl-seconds",
        "--marker-ttl-seconds",
        "--enabled",
        "--store-timeout-ms",
        "--shutdown-grace-seconds",
        "--redis-sentinels",
        "--redis-sentinel-master",
        "--redis-cluster-nodes",
        "--revocation-replicas",
        "--clock-skew-ms",
        "--idp",
        "--idp-timeout-ms",
        "--idp-max-in-flight",
        "--negative-ttl-seconds",
        "--idp-ca-file",
        "--appwrite-endpoint",
        "--appwrite-project",
        "--appwrite-tier-pref",
        "--introspection-url",
        "--introspection-client-id",
        "--introspection-client-secret-file",
        "--introspection-tier-claim",
        "--otlp-endpoint",
        "--otlp-service-name",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(help.contains("SESSION_CACHE_REDIS_URL"));
    assert!(help.contains("SESSION_CACHE_OTLP_ENDPOINT"));
    assert!(help.contains("SESSION_CACHE_INTROSPECTION_CLIENT_SECRET"));
}

/// The introspection client secret may come from the environment, never from a flag,
/// and is never echoed: giving it twice is refused without showing it.
#[test]
fn introspection_secret_from_the_environment_is_never_shown() {
    let out = Command::new(BIN)
        .args([
            "--idp",
            "introspection",
            "--introspection-url",
            "https://idp.example/introspect",
            "--introspection-client-id",
            "c",
            "--introspection-client-secret-file",
            "/nonexistent/secret",
        ])
        .env_clear()
        .env("SESSION_CACHE_INTROSPECTION_CLIENT_SECRET", "hunter2-env")
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SESSION_CACHE_INTROSPECTION_CLIENT_SECRET"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2-env"), "{stderr}");
    let out = run(&["--introspection-client-secret", "hunter2"]);
    assert_eq!(out.status.code(), Some(64), "no such flag");
}

/// JSON logs: one object per line, and the start-up line states the effective
/// configuration without the Redis password.
#[tokio::test]
async fn json_logs_state_the_configuration_without_secrets() {
    let port = free_port();
    let mut process = Process::spawn(
        command()
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--log-format",
                "json",
            ])
            .args(["--redis-url", "redis://cache:hunter2@127.0.0.1:1"])
            .stdout(Stdio::piped()),
    );
    connect(port).await;
    process.signal("-TERM");
    assert!(process.wait(PATIENCE).await.success());
    let logs = process.stdout();
    assert!(!logs.contains("hunter2"), "{logs}");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let serving = lines
        .iter()
        .find(|l| l["fields"]["message"] == "serving")
        .expect("a start-up line");
    assert_eq!(
        serving["fields"]["redis_url"],
        "redis://cache:***@127.0.0.1:1"
    );
    assert_eq!(serving["fields"]["ttl_seconds"], 300);
}

/// Started with no store flags, the binary serves from memory and says so at WARN; on
/// SIGTERM it exits 0; at debug level its logs never carry a token.
#[tokio::test]
async fn serves_then_exits_cleanly_on_sigterm_without_logging_tokens() {
    let port = free_port();
    let mut process = Process::spawn(
        command()
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped()),
    );
    let mut client = connect(port).await;
    let token = "tok-in-the-clear-4c1d";
    let get = |token: &str| pb::GetRequest {
        token: token.into(),
    };
    client.get(get(token)).await.unwrap();
    let stored = client
        .set(pb::SetRequest {
            token: token.into(),
            user: Some(user("u1")),
            session_expire: Some(in_an_hour()),
            fence: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.outcome(), pb::SetOutcome::Stored);
    client.get(get(token)).await.unwrap();
    client
        .invalidate_token(pb::InvalidateTokenRequest {
            token: token.into(),
        })
        .await
        .unwrap();
    let _ = client.get(get("")).await; // an error path too

    process.signal("-TERM");
    assert!(
        process.wait(PATIENCE).await.success(),
        "exit status 0 on SIGTERM"
    );
    let logs = process.stdout();
    assert!(
        logs.contains("WARN") && logs.contains("in this process only"),
        "{logs}"
    );
    assert!(logs.contains("stopped"), "{logs}");
    assert!(!logs.contains(token), "a token reached the logs:\n{logs}");
}

/// What a misconfigured file case runs with and must report.
struct FileCase {
    args: Vec<String>,
    flag: &'static str,
    /// The file the message must name.
    path: String,
    /// Words the message must carry, saying what is wrong.
    problem: &'static str,
}

/// Every file the configuration names is read and checked before any port is bound:
/// a bad one exits 64 naming the flag and the file, without echoing a secret, whether
/// `--listen` is free or taken.
#[test]
fn bad_files_exit_64_naming_the_flag_before_binding() {
    let dir = pki::Dir::new();
    let ca = pki::Ca::new("files-ca");
    let server = ca.server();
    let other = ca.server();
    let cert = dir.write("cert.pem", &server.cert);
    let key = dir.write("key.pem", &server.key);
    let other_key = dir.write("other-key.pem", &other.key);
    let not_pem = dir.write("not.pem", "hunter2 is not a certificate\n");
    let bad_der = dir.write(
        "bad-der.pem",
        "-----BEGIN CERTIFICATE-----\naHVudGVyMg==\n-----END CERTIFICATE-----\n",
    );
    let plain_keys = dir.write(
        "plain.toml",
        "[[keys]]\nname = \"x\"\nkey = \"hunter2\"\nroles = [\"writer\"]\n",
    );
    let short_secret = dir.write("short-secret", "hunter2\n");
    let missing = dir.path().join("missing").to_string_lossy().into_owned();
    let tls = |cert: &str, key: &str| {
        vec![
            "--tls-cert".into(),
            cert.into(),
            "--tls-key".into(),
            key.into(),
        ]
    };
    let with = |mut base: Vec<String>, more: &[&str]| {
        base.extend(more.iter().map(|s| s.to_string()));
        base
    };
    let case = |args: Vec<String>, flag, path: &str, problem| FileCase {
        args,
        flag,
        path: path.to_owned(),
        problem,
    };
    let cases = [
        case(
            tls(&not_pem, &key),
            "--tls-cert",
            &not_pem,
            "no CERTIFICATE",
        ),
        case(tls(&bad_der, &key), "--tls-cert", &bad_der, "certificate 1"),
        case(tls(&missing, &key), "--tls-cert", &missing, "cannot read"),
        case(tls(&cert, &not_pem), "--tls-key", &not_pem, "PRIVATE KEY"),
        case(tls(&cert, &cert), "--tls-key", &cert, "PRIVATE KEY"),
        case(
            tls(&cert, &other_key),
            "--tls-key",
            &other_key,
            "not the key",
        ),
        case(tls(&cert, &missing), "--tls-key", &missing, "cannot read"),
        case(
            with(tls(&cert, &key), &["--tls-client-ca", &not_pem]),
            "--tls-client-ca",
            &not_pem,
            "no CERTIFICATE",
        ),
        case(
            with(tls(&cert, &key), &["--tls-client-ca", &missing]),
            "--tls-client-ca",
            &missing,
            "cannot read",
        ),
        case(
            with(
                vec![],
                &[
                    "--idp",
                    "introspection",
                    "--introspection-url",
                    "https://idp.example/introspect",
                    "--introspection-client-id",
                    "session-cache",
                    "--introspection-client-secret-file",
                    &missing,
                ],
            ),
            "--introspection-client-secret-file",
            &missing,
            "cannot read",
        ),
        case(
            with(
                vec![],
                &[
                    "--idp",
                    "appwrite",
                    "--appwrite-endpoint",
                    "https://appwrite.example/v1",
                    "--appwrite-project",
                    "p1",
                    "--idp-ca-file",
                    &bad_der,
                ],
            ),
            "--idp-ca-file",
            &bad_der,
            "certificate 1",
        ),
        case(
            with(vec![], &["--api-keys-file", &plain_keys]),
            "--api-keys-file",
            &plain_keys,
            "line 3",
        ),
        case(
            with(vec![], &["--api-keys-file", &missing]),
            "--api-keys-file",
            &missing,
            "cannot read",
        ),
        case(
            with(vec![], &["--token-hmac-secret-file", &short_secret]),
            "--token-hmac-secret-file",
            &short_secret,
            "at least 16",
        ),
        case(
            with(vec![], &["--token-hmac-secret-file", &missing]),
            "--token-hmac-secret-file",
            &missing,
            "cannot read",
        ),
        case(
            with(
                vec![],
                &[
                    "--redis-url",
                    "rediss://127.0.0.1:1",
                    "--redis-ca-file",
                    &bad_der,
                ],
            ),
            "--redis-ca-file",
            &bad_der,
            "certificate 1",
        ),
        case(
            with(
                vec![],
                &[
                    "--redis-url",
                    "rediss://127.0.0.1:1",
                    "--redis-ca-file",
                    &missing,
                ],
            ),
            "--redis-ca-file",
            &missing,
            "cannot read",
        ),
        case(
            with(
                vec![],
                &[
                    "--redis-url",
                    "redis://127.0.0.1:1",
                    "--redis-password-file",
                    &missing,
                ],
            ),
            "--redis-password-file",
            &missing,
            "cannot read",
        ),
        case(
            with(
                vec![],
                &[
                    "--redis-sentinels",
                    "127.0.0.1:1",
                    "--redis-sentinel-master",
                    "m",
                    "--redis-sentinel-password-file",
                    &missing,
                ],
            ),
            "--redis-sentinel-password-file",
            &missing,
            "cannot read",
        ),
    ];
    let key_body = server.key.lines().nth(1).unwrap().to_owned();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let free = format!("127.0.0.1:{}", free_port());
    for case in &cases {
        for listen in [&free, &taken] {
            let mut args: Vec<&str> = case.args.iter().map(String::as_str).collect();
            args.extend(["--listen", listen]);
            let out = run(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
            let line = format!("{} {}: ", case.flag, case.path);
            assert!(stderr.contains(&line), "{args:?}: {stderr}");
            assert!(stderr.contains(case.problem), "{args:?}: {stderr}");
            assert!(!stderr.contains("cannot listen"), "{args:?}: {stderr}");
            assert!(!stderr.contains("hunter2"), "a secret was echoed: {stderr}");
            assert!(!stderr.contains(&key_body), "a key was echoed: {stderr}");
        }
    }
}

/// A port that cannot be bound exits 69 and names its flag, `--listen` and
/// `--metrics-listen` alike, once the files were found good.
#[test]
fn taken_ports_exit_69_naming_the_flag() {
    let dir = pki::Dir::new();
    let secret = dir.write("secret", "0123456789abcdef0123456789abcdef\n");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let free = format!("127.0.0.1:{}", free_port());
    let cases: [(&[&str], &str); 2] = [
        (&["--listen", &taken], "--listen"),
        (
            &["--listen", &free, "--metrics-listen", &taken],
            "--metrics-listen",
        ),
    ];
    for (args, flag) in cases {
        let mut args = args.to_vec();
        args.extend(["--token-hmac-secret-file", &secret]);
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{flag} {taken}: cannot listen")),
            "{args:?}: {stderr}"
        );
    }
}

/// A `run` that fails at start-up leaves no task behind: not the health pinger, the
/// metrics exporter, the connection sweeper, the Get batcher nor the Sentinel watchers.
#[test]
fn no_task_outlives_a_failed_run() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = taken.local_addr().unwrap().to_string();
        let evicting = support::Redis::start_with(&[
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "allkeys-lru",
        ])
        .await;
        let dead = format!("127.0.0.1:{}", free_port());
        let cases: Vec<(Vec<String>, u8)> = vec![
            (vec!["--metrics-listen".into(), taken.clone()], 69),
            (
                vec![
                    "--redis-url".into(),
                    format!("redis://{dead}"),
                    "--metrics-listen".into(),
                    taken.clone(),
                ],
                69,
            ),
            (
                vec![
                    "--redis-sentinels".into(),
                    dead.clone(),
                    "--redis-sentinel-master".into(),
                    "m".into(),
                    "--metrics-listen".into(),
                    taken.clone(),
                ],
                69,
            ),
            (vec!["--redis-url".into(), evicting.url()], 64),
        ];
        let alive = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        for (args, code) in cases {
            // Tasks of the test's own (a Redis connection's driver) are not counted.
            let before = alive();
            let config = session_cache::Config::load_from(
                std::iter::once("session-cache".to_string()).chain(args.iter().cloned()),
            )
            .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let error = session_cache::run(config, listener, std::future::pending())
                .await
                .unwrap_err();
            assert_eq!(error.exit_code(), code, "{args:?}: {error}");
            // Cancelled tasks end at their next poll: wait for that, boundedly.
            let what = format!("the tasks of {args:?} to end ({before} alive before)");
            eventually(PATIENCE, what, async || match alive() {
                after if after <= before => Ok(()),
                after => Err(format!("{after} tasks alive")),
            })
            .await;
        }
    });
}
