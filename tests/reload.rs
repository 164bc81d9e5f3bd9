//! Live reload of the keys file: on SIGHUP and on a change on disk, with calls going on.

mod support;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use session_cache::pb::{self, session_cache_client::SessionCacheClient};
use sha2::{Digest, Sha256};
use support::{PATIENCE, free_port, pki::Dir};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};
use tonic::{Code, Request, transport::Channel};

const BIN: &str = env!("CARGO_BIN_EXE_session-cache");
const OLD_KEY: &str = "old-key-5b7e21";
const NEW_KEY: &str = "new-key-c30f98";
/// A change on disk is noticed within this long (the promise is 10 s).
const NOTICE: Duration = Duration::from_secs(15);

/// A keys file giving each key the reader role.
fn keys_toml(keys: &[&str]) -> String {
    keys.iter()
        .enumerate()
        .map(|(i, key)| {
            let sha256: String = Sha256::digest(key.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!(
                "[[keys]]\nname = \"caller-{i}\"\nsha256 = \"{sha256}\"\nroles = [\"reader\"]\n\n"
            )
        })
        .collect()
}

/// Replaces `path` at once, as an editor or a deploy tool would (write, then rename).
fn replace(path: &Path, content: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, content).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// The binary, killed if the test fails half-way.
struct Service {
    child: Child,
    port: u16,
    metrics_port: u16,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    async fn start(keys_file: &Path) -> Service {
        let port = free_port();
        let metrics_port = free_port();
        let child = Command::new(BIN)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .arg("--api-keys-file")
            .arg(keys_file)
            .env_clear()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let service = Service {
            child,
            port,
            metrics_port,
        };
        let deadline = Instant::now() + PATIENCE;
        while service.metric("ok").await.is_none() {
            assert!(Instant::now() < deadline, "the service never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        service
    }

    async fn client(&self) -> SessionCacheClient<Channel> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(client) =
                SessionCacheClient::connect(format!("http://127.0.0.1:{}", self.port)).await
            {
                return client;
            }
            assert!(Instant::now() < deadline, "the service never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn hangup(&mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// `session_cache_config_reloads_total{result}`, or `None` when the metrics do not
    /// answer.
    async fn metric(&self, result: &str) -> Option<u64> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        let prefix = format!("session_cache_config_reloads_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse().ok())
    }

    async fn wait_metric(&self, result: &str, want: u64) {
        let deadline = Instant::now() + NOTICE;
        loop {
            let seen = self.metric(result).await;
            if seen == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "reloads {{result={result}}}: {seen:?}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

async fn get(client: &mut SessionCacheClient<Channel>, key: &str) -> Result<(), tonic::Status> {
    let mut request = Request::new(pb::GetRequest {
        token: "reload-probe".into(),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    client.get(request).await.map(drop)
}

/// Waits until a call with `key` gets `want` (`None`: the call succeeds).
async fn wait_for(client: &mut SessionCacheClient<Channel>, key: &str, want: Option<Code>) {
    let deadline = Instant::now() + NOTICE;
    loop {
        let seen = get(client, key).await.err().map(|status| status.code());
        if seen == want {
            return;
        }
        assert!(Instant::now() < deadline, "{key}: {seen:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A key rotated while 16 tasks call: the new key is added (SIGHUP), callers move to
/// it, the old one is removed (SIGHUP). No call fails; the old key is refused at the
/// end; the process never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_rotated_under_load_fails_no_call() {
    let dir = Dir::new();
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, keys_toml(&[OLD_KEY])).unwrap();
    let mut service = Service::start(&path).await;
    let client = service.client().await;

    let moved = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let on_new_key = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut client = client.clone();
            let (moved, stop, on_new_key, failed, calls) = (
                moved.clone(),
                stop.clone(),
                on_new_key.clone(),
                failed.clone(),
                calls.clone(),
            );
            tokio::spawn(async move {
                let deadline = Instant::now() + 4 * NOTICE;
                let mut counted = false;
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                        break;
                    }
                    let new = moved.load(Ordering::SeqCst);
                    let result = get(&mut client, if new { NEW_KEY } else { OLD_KEY }).await;
                    calls.fetch_add(1, Ordering::SeqCst);
                    if let Err(status) = result {
                        eprintln!("a call failed: {status:?}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    } else if new && !counted {
                        counted = true;
                        on_new_key.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();

    let mut probe = client.clone();
    replace(&path, &keys_toml(&[OLD_KEY, NEW_KEY]));
    service.hangup();
    wait_for(&mut probe, NEW_KEY, None).await;
    moved.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + PATIENCE;
    while on_new_key.load(Ordering::SeqCst) < 16 {
        assert!(Instant::now() < deadline, "the callers did not move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replace(&path, &keys_toml(&[NEW_KEY]));
    service.hangup();
    wait_for(&mut probe, OLD_KEY, Some(Code::Unauthenticated)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }

    assert_eq!(failed.load(Ordering::SeqCst), 0, "calls failed");
    assert!(calls.load(Ordering::SeqCst) > 16);
    get(&mut probe, NEW_KEY).await.unwrap();
    assert!(service.running(), "SIGHUP stopped the process");
    service.wait_metric("ok", 2).await;
    service.wait_metric("failed", 0).await;
}

/// A keys file that fails its checks (a bad line, then an empty file) is refused: the
/// keys in force stay, and each refusal is counted. Fixed on disk, it is loaded without
/// a signal.
#[tokio::test]
async fn a_bad_keys_file_keeps_the_old_keys_and_counts_a_failed_reload() {
    let dir = Dir::new();
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, keys_toml(&[OLD_KEY])).unwrap();
    let mut service = Service::start(&path).await;
    let mut client = service.client().await;
    assert_eq!(service.metric("failed").await, Some(0));
    assert_eq!(service.metric("ok").await, Some(0));

    replace(&path, "[[keys]]\nname = \"half-written");
    service.hangup();
    service.wait_metric("failed", 1).await;
    get(&mut client, OLD_KEY).await.unwrap();
    replace(&path, "");
    service.wait_metric("failed", 2).await;
    get(&mut client, OLD_KEY).await.unwrap();
    assert!(service.running(), "SIGHUP stopped the process");

    replace(&path, &keys_toml(&[NEW_KEY]));
    wait_for(&mut client, NEW_KEY, None).await;
    assert_eq!(
        get(&mut client, OLD_KEY).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(service.metric("ok").await, Some(1));
}

/// Kubernetes mounts a Secret as a directory whose files are symlinks through `..data`,
/// itself a symlink swapped at once to a new timestamped directory on update. The swap
/// is picked up without a signal.
#[tokio::test]
async fn a_symlink_swapped_secret_directory_is_picked_up_without_a_signal() {
    use std::os::unix::fs::symlink;
    let dir = Dir::new();
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_01_01")).unwrap();
    std::fs::write(root.join("..2026_01_01/keys.toml"), keys_toml(&[OLD_KEY])).unwrap();
    symlink("..2026_01_01", root.join("..data")).unwrap();
    symlink("..data/keys.toml", root.join("keys.toml")).unwrap();
    let service = Service::start(&root.join("keys.toml")).await;
    let mut client = service.client().await;
    get(&mut client, OLD_KEY).await.unwrap();

    std::fs::create_dir(root.join("..2026_02_01")).unwrap();
    std::fs::write(root.join("..2026_02_01/keys.toml"), keys_toml(&[NEW_KEY])).unwrap();
    symlink("..2026_02_01", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_01_01")).unwrap();

    wait_for(&mut client, NEW_KEY, None).await;
    assert_eq!(
        get(&mut client, OLD_KEY).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    service.wait_metric("ok", 1).await;
}
