//! Hostile peers and the legitimate callers beside them. The service runs as its own
//! process ([`Service`]), so that its memory and CPU are read alone from `/proc`; the
//! attackers (raw HTTP/2 clients of the `h2` crate, which can do what no gRPC client
//! would) and the legitimate callers (tonic clients, [`Legit`]) run in the test. A
//! client picks its source address on loopback (the whole 127/8 is local on Linux), so
//! that the attacker ([`ATTACKER`]) and the caller ([`CALLER`]) are different peers, or
//! the same one.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use prost::Message;
use session_cache::pb::{self, session_cache_client::SessionCacheClient};
use tokio::{
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
    time::Instant,
};
use tonic::transport::{Channel, Endpoint};

use super::{
    PATIENCE, free_port,
    process::{self, Process},
};

/// The attacker's address.
pub const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The legitimate caller's address.
pub const CALLER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

/// The service as its own process on a free loopback port, over the memory store.
pub struct Service {
    pub process: Process,
    pub addr: SocketAddr,
}

impl Service {
    /// Starts the binary with these flags and waits until it serves (behind a proxy,
    /// with `--proxy-protocol`: until it listens).
    pub async fn start(args: &[&str]) -> Service {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut argv = vec!["--listen", &listen];
        argv.extend(args);
        let process = Process::start(&argv);
        if args.contains(&"--proxy-protocol") {
            super::eventually(PATIENCE, "the service to listen", async || {
                TcpStream::connect(("127.0.0.1", port)).await
            })
            .await;
        } else {
            process::connect(port).await;
        }
        Service {
            process,
            addr: ([127, 0, 0, 1], port).into(),
        }
    }

    /// Its resident memory, in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.process.rss_mib()
    }
}

/// A TCP connection to `addr` from `from`.
pub async fn tcp_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind((from, 0).into())?;
    socket.connect(addr).await
}

/// An HTTP/2 connection to `addr` from `from`; `window` is the stream window the client
/// announces (0: no answer's DATA can be sent to it). `None` when the server refused
/// the connection (closed it at accept).
pub async fn h2_from(
    from: IpAddr,
    addr: SocketAddr,
    window: Option<u32>,
) -> Option<(SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>)> {
    let tcp = tcp_from(from, addr).await.ok()?;
    let mut builder = h2::client::Builder::new();
    if let Some(window) = window {
        builder.initial_window_size(window);
    }
    let (client, connection) = tokio::time::timeout(PATIENCE, builder.handshake(tcp))
        .await
        .ok()?
        .ok()?;
    Some((client, tokio::spawn(connection)))
}

/// The headers of a call of `method` of `sessioncache.v1.SessionCache`.
pub fn grpc_request(addr: SocketAddr, method: &str) -> http::Request<()> {
    http::Request::post(format!(
        "http://{addr}/sessioncache.v1.SessionCache/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap()
}

/// One gRPC message frame.
pub fn frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Bytes::from(frame)
}

/// The first bytes of a Set that announces a 1,000-byte message and never sends the
/// rest: a request that stays open until the request timeout.
pub fn slow_start() -> Bytes {
    let mut start = vec![0u8];
    start.extend_from_slice(&1000u32.to_be_bytes());
    start.push(0x0a);
    Bytes::from(start)
}

/// The gRPC status of a response's headers (a trailers-only answer), if any.
pub fn grpc_status(response: &http::Response<h2::RecvStream>) -> Option<i32> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A tonic channel to `addr` from `from`.
pub async fn channel_from(
    from: IpAddr,
    addr: SocketAddr,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(Some(from))
        .connect_timeout(PATIENCE)
        .connect()
        .await
}

/// How a legitimate caller reaches the service.
pub enum Reach {
    /// Over a connection it opened before the attack, kept throughout.
    Kept(SessionCacheClient<Channel>),
    /// Over a new connection from this address for every call, so that the service must
    /// still accept its connections.
    Fresh(IpAddr, SocketAddr),
}

impl Reach {
    /// A connection from `from`, opened now.
    pub async fn kept(from: IpAddr, addr: SocketAddr) -> Reach {
        let channel = channel_from(from, addr).await.expect("the caller connects");
        Reach::Kept(SessionCacheClient::new(channel))
    }
}

/// A legitimate caller: one Get after another, a few tens a second, until stopped.
pub struct Legit {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicUsize>,
    task: JoinHandle<Report>,
}

/// What a legitimate caller saw.
#[derive(Debug)]
pub struct Report {
    pub calls: usize,
    /// Each failed call's error.
    pub failures: Vec<String>,
    pub p50: Duration,
    pub p99: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} legitimate Gets, {} failed, p50 {:.1} ms, p99 {:.1} ms",
            self.calls,
            self.failures.len(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3
        )
    }
}

/// The longest a legitimate caller runs, whatever the test does.
const LEGIT_AT_MOST: Duration = Duration::from_secs(120);
/// A legitimate call answered later than this failed (the request timeout is 5 s).
const LEGIT_PATIENCE: Duration = Duration::from_secs(10);

impl Legit {
    /// Starts calling through `reach`, one Get every `every`.
    pub fn start(reach: Reach, every: Duration) -> Legit {
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicUsize::new(0));
        let (stopped, counted) = (stop.clone(), made.clone());
        let task = tokio::spawn(async move {
            let began = Instant::now();
            let mut pace = tokio::time::interval(every);
            let mut latencies = Vec::new();
            let mut failures = Vec::new();
            while !stopped.load(Ordering::Relaxed) && began.elapsed() < LEGIT_AT_MOST {
                pace.tick().await;
                let started = Instant::now();
                let answer = tokio::time::timeout(LEGIT_PATIENCE, get(&reach)).await;
                match answer {
                    Ok(Ok(())) => latencies.push(started.elapsed()),
                    Ok(Err(e)) => failures.push(e),
                    Err(_) => failures.push(format!("no answer within {LEGIT_PATIENCE:?}")),
                }
                counted.fetch_add(1, Ordering::Relaxed);
            }
            latencies.sort();
            let at = |q: f64| {
                latencies
                    .get(
                        ((latencies.len() as f64 * q) as usize)
                            .min(latencies.len().saturating_sub(1)),
                    )
                    .copied()
                    .unwrap_or_default()
            };
            Report {
                calls: latencies.len() + failures.len(),
                p50: at(0.5),
                p99: at(0.99),
                failures,
            }
        });
        Legit { stop, made, task }
    }

    /// Calls made so far.
    pub fn calls(&self) -> usize {
        self.made.load(Ordering::Relaxed)
    }

    /// Waits until `more` calls were made from now (at most a minute), then stops and
    /// reports.
    pub async fn after(self, more: usize) -> Report {
        let until = self.calls() + more;
        super::eventually(
            Duration::from_secs(60),
            format_args!("{more} more legitimate calls"),
            async || match self.calls() {
                made if made >= until => Ok(()),
                made => Err(made),
            },
        )
        .await;
        self.stop().await
    }

    /// Stops calling and reports.
    pub async fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the legitimate caller's task")
    }
}

async fn get(reach: &Reach) -> Result<(), String> {
    let mut client = match reach {
        Reach::Kept(client) => client.clone(),
        Reach::Fresh(from, addr) => SessionCacheClient::new(
            channel_from(*from, *addr)
                .await
                .map_err(|e| format!("connect: {e:?}"))?,
        ),
    };
    client
        .get(pb::GetRequest {
            token: "legitimate".into(),
        })
        .await
        .map(drop)
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
}
