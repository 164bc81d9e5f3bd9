//! Live reload of the keys file and of the server's TLS: on SIGHUP and on a change on
//! disk, with calls going on.

mod support;

use std::{
    ffi::OsStr,
    ops::RangeInclusive,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use session_cache::pb::{self, session_cache_client::SessionCacheClient};
use sha2::{Digest, Sha256};
use support::{
    PATIENCE, eventually, free_port,
    pki::{Ca, Dir, Leaf},
    process::{self, Process},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

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
    process: Process,
    port: u16,
    metrics_port: u16,
}

impl Service {
    async fn start(keys_file: &Path) -> Service {
        Service::start_with(
            &[OsStr::new("--api-keys-file"), keys_file.as_os_str()],
            "api_keys",
        )
        .await
    }

    /// The binary with `args`, once its metrics answer for the reloads of `config`.
    async fn start_with(args: &[&OsStr], config: &str) -> Service {
        let port = free_port();
        let metrics_port = free_port();
        let process = Process::spawn(
            process::command()
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
                .args(args),
        );
        let service = Service {
            process,
            port,
            metrics_port,
        };
        let what = format!("the metrics to count reloads of {config}");
        eventually(PATIENCE, what, async || {
            service.reloads(config, "ok").await.ok_or("no answer")
        })
        .await;
        service
    }

    async fn client(&self) -> SessionCacheClient<Channel> {
        process::connect(self.port).await
    }

    fn hangup(&mut self) {
        self.process.signal("-HUP");
    }

    /// `session_cache_config_reloads_total{config="api_keys",result}`.
    async fn metric(&self, result: &str) -> Option<u64> {
        self.reloads("api_keys", result).await
    }

    /// `session_cache_config_reloads_total{config,result}`, or `None` when the metrics
    /// do not answer.
    async fn reloads(&self, config: &str, result: &str) -> Option<u64> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        let prefix = format!(
            "session_cache_config_reloads_total{{config=\"{config}\",result=\"{result}\"}} "
        );
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse().ok())
    }

    async fn wait_metric(&self, result: &str, want: u64) {
        self.wait_reloads("api_keys", result, want).await;
    }

    async fn wait_reloads(&self, config: &str, result: &str, want: u64) {
        self.wait_reloads_in(config, result, want..=want).await;
    }

    async fn wait_reloads_in(&self, config: &str, result: &str, want: RangeInclusive<u64>) {
        let what = format!("reloads {{config={config},result={result}}} to be in {want:?}");
        eventually(NOTICE, what, async || {
            match self.reloads(config, result).await {
                Some(seen) if want.contains(&seen) => Ok(()),
                seen => Err(seen),
            }
        })
        .await;
    }

    fn running(&mut self) -> bool {
        self.process.running()
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
async fn wait_for_answer(client: &mut SessionCacheClient<Channel>, key: &str, want: Option<Code>) {
    let what = format!("a call with {key} to get {want:?}");
    eventually(NOTICE, what, async || {
        match get(client, key).await.err().map(|status| status.code()) {
            seen if seen == want => Ok(()),
            seen => Err(seen),
        }
    })
    .await;
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
    wait_for_answer(&mut probe, NEW_KEY, None).await;
    moved.store(true, Ordering::SeqCst);
    eventually(
        PATIENCE,
        "the 16 callers to move to the new key",
        async || match on_new_key.load(Ordering::SeqCst) {
            16.. => Ok(()),
            moved => Err(format!("{moved} moved")),
        },
    )
    .await;
    replace(&path, &keys_toml(&[NEW_KEY]));
    service.hangup();
    wait_for_answer(&mut probe, OLD_KEY, Some(Code::Unauthenticated)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }

    assert_eq!(failed.load(Ordering::SeqCst), 0, "calls failed");
    assert!(calls.load(Ordering::SeqCst) > 16);
    get(&mut probe, NEW_KEY).await.unwrap();
    assert!(service.running(), "SIGHUP stopped the process");
    // Each change is loaded once by the watcher or the SIGHUP, or by both when the
    // watcher's poll sees the file before the signal arrives: a SIGHUP always reloads.
    service.wait_reloads_in("api_keys", "ok", 2..=4).await;
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
    wait_for_answer(&mut client, NEW_KEY, None).await;
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

    wait_for_answer(&mut client, NEW_KEY, None).await;
    assert_eq!(
        get(&mut client, OLD_KEY).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    service.wait_metric("ok", 1).await;
}

/// The first certificate of a PEM, in DER.
fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The certificate a new handshake with the service on `port` gets, trusting `ca`.
async fn served_certificate(port: u16, ca: &Ca) -> Vec<u8> {
    use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One Get on a new TLS connection to `port`, trusting `ca`, presenting `identity`.
async fn tls_get(port: u16, ca: &Ca, identity: Option<&Leaf>) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    get(&mut SessionCacheClient::new(channel), "unused")
        .await
        .map_err(|status| format!("{status:?}"))
}

/// A directory laid out as Kubernetes mounts a TLS Secret: `tls.crt` and `tls.key`
/// are symlinks through `..data`, a symlink to a timestamped directory that an update
/// swaps at once.
struct SecretDir {
    dir: Dir,
    version: u32,
}

impl SecretDir {
    fn new(leaf: &Leaf) -> SecretDir {
        use std::os::unix::fs::symlink;
        let mut secret = SecretDir {
            dir: Dir::new(),
            version: 0,
        };
        let root = secret.dir.path();
        symlink("..data/tls.crt", root.join("tls.crt")).unwrap();
        symlink("..data/tls.key", root.join("tls.key")).unwrap();
        secret.update(leaf);
        secret
    }

    fn update(&mut self, leaf: &Leaf) {
        use std::os::unix::fs::symlink;
        let root = self.dir.path();
        let old = format!("..v{}", self.version);
        self.version += 1;
        let new = format!("..v{}", self.version);
        std::fs::create_dir(root.join(&new)).unwrap();
        std::fs::write(root.join(&new).join("tls.crt"), &leaf.cert).unwrap();
        std::fs::write(root.join(&new).join("tls.key"), &leaf.key).unwrap();
        symlink(&new, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(root.join(old));
    }

    fn args(&self) -> [std::ffi::OsString; 4] {
        let root = self.dir.path();
        [
            "--tls-cert".into(),
            root.join("tls.crt").into(),
            "--tls-key".into(),
            root.join("tls.key").into(),
        ]
    }
}

fn os(args: &[std::ffi::OsString]) -> Vec<&OsStr> {
    args.iter().map(|a| a.as_os_str()).collect()
}

/// A certificate renewed in a Kubernetes-mounted Secret while 16 tasks call, half of
/// them on connections made before the renewal, half on a new connection per call: no
/// call fails, and new handshakes get the new certificate, without a signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_rotated_under_load_fails_no_call() {
    let ca = Arc::new(Ca::new("rotation-ca"));
    let (old, new) = (ca.server(), ca.server());
    let mut secret = SecretDir::new(&old);
    let service = Service::start_with(&os(&secret.args()), "tls").await;
    let port = service.port;
    assert_eq!(served_certificate(port, &ca).await, der(&old.cert));

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (ca, stop, failed, calls) = (ca.clone(), stop.clone(), failed.clone(), calls.clone());
        // Half the tasks keep one connection from before the renewal to the end.
        let kept = if i % 2 == 0 {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.pem()))
                .domain_name("localhost");
            let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            Some(SessionCacheClient::new(channel))
        } else {
            None
        };
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + 4 * NOTICE;
            let mut kept = kept;
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    break;
                }
                let result = match &mut kept {
                    Some(client) => get(client, "unused").await.map_err(|s| format!("{s:?}")),
                    None => tls_get(port, &ca, None).await,
                };
                calls.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = result {
                    eprintln!("a call failed: {e}");
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = calls.load(Ordering::SeqCst);
    secret.update(&new);
    let renewed = der(&new.cert);
    eventually(
        NOTICE,
        "the new certificate to be served",
        async || match served_certificate(port, &ca).await {
            served if served == renewed => Ok(()),
            _ => Err("the old one"),
        },
    )
    .await;
    // Calls go on for a while on both kinds of connection after the swap.
    let swapped = calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }

    let after = calls.load(Ordering::SeqCst);
    eprintln!("calls: {before} before the renewal, {swapped} when served, {after} in all");
    assert_eq!(failed.load(Ordering::SeqCst), 0, "calls failed");
    assert!(before > 16 && after > swapped + 16, "too few calls to tell");
    service.wait_reloads("tls", "ok", 1).await;
    service.wait_reloads("tls", "failed", 0).await;
}

/// A renewal that arrives half-done (a file that is not PEM, then a certificate
/// without its key) is refused and counted; the certificate in force keeps being
/// served. Once the key follows, the new pair is served.
#[tokio::test]
async fn a_bad_certificate_keeps_the_old_one_and_counts_a_failed_reload() {
    let ca = Ca::new("rotation-ca");
    let (old, new) = (ca.server(), ca.server());
    let dir = Dir::new();
    let cert = dir.write("tls.crt", &old.cert);
    let key = dir.write("tls.key", &old.key);
    let args = ["--tls-cert", &cert, "--tls-key", &key].map(OsStr::new);
    let mut service = Service::start_with(&args, "tls").await;
    let port = service.port;

    replace(Path::new(&cert), "-----BEGIN CERTIFICATE-----\nhalf");
    service.hangup();
    service.wait_reloads("tls", "failed", 1).await;
    assert_eq!(served_certificate(port, &ca).await, der(&old.cert));
    tls_get(port, &ca, None).await.unwrap();

    replace(Path::new(&cert), &new.cert);
    service.wait_reloads("tls", "failed", 2).await;
    assert_eq!(served_certificate(port, &ca).await, der(&old.cert));
    assert!(service.running(), "a bad certificate stopped the process");

    replace(Path::new(&key), &new.key);
    service.wait_reloads("tls", "ok", 1).await;
    assert_eq!(served_certificate(port, &ca).await, der(&new.cert));
    tls_get(port, &ca, None).await.unwrap();
}

/// The client CA bundle changed on disk: clients whose certificates the new CA signed
/// are accepted from then on, without a restart, and those of the CA kept still are.
#[tokio::test]
async fn a_client_ca_rotated_live_verifies_the_new_clients() {
    let server_ca = Ca::new("server-ca");
    let (old_ca, new_ca) = (Ca::new("old-client-ca"), Ca::new("new-client-ca"));
    let (old_client, new_client) = (old_ca.client("old.caller"), new_ca.client("new.caller"));
    let dir = Dir::new();
    let leaf = server_ca.server();
    let cert = dir.write("tls.crt", &leaf.cert);
    let key = dir.write("tls.key", &leaf.key);
    let client_ca = dir.write("client-ca.pem", old_ca.pem());
    let args = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &client_ca,
    ]
    .map(OsStr::new);
    let service = Service::start_with(&args, "tls").await;
    let port = service.port;
    tls_get(port, &server_ca, Some(&old_client)).await.unwrap();
    assert!(
        tls_get(port, &server_ca, Some(&new_client)).await.is_err(),
        "a client of an unknown CA was accepted"
    );

    replace(
        Path::new(&client_ca),
        &format!("{}{}", old_ca.pem(), new_ca.pem()),
    );
    eventually(
        NOTICE,
        "a client of the new CA to be accepted",
        async || tls_get(port, &server_ca, Some(&new_client)).await,
    )
    .await;
    tls_get(port, &server_ca, Some(&old_client)).await.unwrap();
    service.wait_reloads("tls", "ok", 1).await;
}
