//! The binary as an operator meets it: flags, exit codes, logs, and signals.

mod support;

use std::{
    io::Read,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use session_cache::pb::{self, session_cache_client::SessionCacheClient};
use support::{PATIENCE, free_port, in_an_hour, user};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_session-cache");

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
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(help.contains("SESSION_CACHE_REDIS_URL"));
}

/// JSON logs: one object per line, and the start-up line states the effective
/// configuration without the Redis password.
#[tokio::test]
async fn json_logs_state_the_configuration_without_secrets() {
    let port = free_port();
    let mut process = Process(
        Command::new(BIN)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--log-format",
                "json",
            ])
            .args(["--redis-url", "redis://cache:hunter2@127.0.0.1:1"])
            .env_clear()
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    connect(port).await;
    process.signal("-TERM");
    assert!(process.wait().await.success());
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

/// The process under test; killed if the test fails half-way.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    fn signal(&self, signal: &str) {
        let pid = self.0.id().to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the process did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stdout(&mut self) -> String {
        let mut text = String::new();
        self.0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    }
}

async fn connect(port: u16) -> SessionCacheClient<tonic::transport::Channel> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(client) = SessionCacheClient::connect(format!("http://127.0.0.1:{port}")).await {
            return client;
        }
        assert!(Instant::now() < deadline, "the service never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Started with no store flags, the binary serves from memory and says so at WARN; on
/// SIGTERM it exits 0; at debug level its logs never carry a token.
#[tokio::test]
async fn serves_then_exits_cleanly_on_sigterm_without_logging_tokens() {
    let port = free_port();
    let mut process = Process(
        Command::new(BIN)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_clear()
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
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
    assert!(process.wait().await.success(), "exit status 0 on SIGTERM");
    let logs = process.stdout();
    assert!(
        logs.contains("WARN") && logs.contains("in this process only"),
        "{logs}"
    );
    assert!(logs.contains("stopped"), "{logs}");
    assert!(!logs.contains(token), "a token reached the logs:\n{logs}");
}
