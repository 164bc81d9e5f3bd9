//! Hostile peers hold bounded resources: connections past --max-connections are closed
//! at accept, idle connections are closed, slow requests are answered CANCELLED, and a
//! peer that does not read its answers loses its connection; meanwhile other callers
//! are served. Raw HTTP/2 clients play the peers. Timings are printed, not asserted.

mod support;

use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use prost::Message;
use session_cache::pb;
use support::{Harness, eventually};
use tokio::{io::AsyncReadExt, net::TcpStream, task::JoinHandle, time::Instant};
use tonic::Code;

/// The tests measure the process's memory: one runs at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The process's resident memory, in MiB, from /proc/self/status.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// An HTTP/2 connection to the server; `window` is the stream window the client
/// announces (0: no answer's DATA can be sent to it).
async fn connect(
    addr: std::net::SocketAddr,
    window: Option<u32>,
) -> (SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut builder = h2::client::Builder::new();
    if let Some(window) = window {
        builder.initial_window_size(window);
    }
    let (client, connection) = builder.handshake(tcp).await.unwrap();
    (client, tokio::spawn(connection))
}

fn grpc_request(addr: std::net::SocketAddr, method: &str) -> http::Request<()> {
    http::Request::post(format!(
        "http://{addr}/sessioncache.v1.SessionCache/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap()
}

/// One gRPC message frame.
fn frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Bytes::from(frame)
}

/// A legitimate Get on the harness's own connection: it must succeed; its latency is
/// printed.
async fn legitimate_get(h: &mut Harness, during: &str) {
    let started = Instant::now();
    let reply = h
        .client
        .get(pb::GetRequest {
            token: "legitimate".into(),
        })
        .await;
    eprintln!("{during}: a legitimate Get took {:?}", started.elapsed());
    reply.expect("a legitimate Get is served");
}

/// The gRPC status of a response's headers (a trailers-only answer), if any.
fn grpc_status(response: &http::Response<h2::RecvStream>) -> Option<i32> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Waits (at most `patience`) until every connection task has ended, calling
/// `meanwhile` at each look (to follow the RSS).
async fn wait_all_closed(
    tasks: &[JoinHandle<Result<(), h2::Error>>],
    patience: Duration,
    mut meanwhile: impl FnMut(),
) {
    let what = format!("the {} connections to be closed", tasks.len());
    eventually(patience, what, async || {
        meanwhile();
        match tasks.iter().filter(|t| t.is_finished()).count() {
            ended if ended == tasks.len() => Ok(()),
            ended => Err(format!("{ended} closed")),
        }
    })
    .await;
}

/// Connections past --max-connections are closed as soon as they are accepted; the
/// established caller keeps being served.
#[tokio::test]
async fn connections_past_the_cap_are_closed_at_accept() {
    let _serial = SERIAL.lock().await;
    let mut h = Harness::start(support::Backend::Memory, &["--max-connections", "16"]).await;
    let before = rss_mib();
    let started = Instant::now();
    let mut peers = Vec::new();
    for _ in 0..64 {
        peers.push(TcpStream::connect(h.server.addr).await.unwrap());
    }
    let mut closed = 0;
    for peer in &mut peers {
        let mut byte = [0u8; 1024];
        // An accepted connection sends its SETTINGS or stays open; a refused one ends.
        let read = tokio::time::timeout(Duration::from_millis(500), peer.read(&mut byte)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            closed += 1;
        }
    }
    eprintln!(
        "64 connections at --max-connections 16: {closed} closed at accept in {:?}; RSS {:+.1} MiB",
        started.elapsed(),
        rss_mib() - before
    );
    // The harness's own connection holds one place at least.
    assert!(closed >= 64 - 15, "only {closed} of 64 were closed");
    legitimate_get(&mut h, "at the connection cap").await;
    drop(peers);
}

/// A connection with no request in flight is closed after --idle-timeout-seconds, even
/// while its peer sends keepalive PINGs; a client that was idle reconnects and is served.
#[tokio::test]
async fn idle_connections_are_closed_despite_pings() {
    let _serial = SERIAL.lock().await;
    let mut h = Harness::start(support::Backend::Memory, &["--idle-timeout-seconds", "1"]).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut pingers = Vec::new();
    for _ in 0..20 {
        let tcp = TcpStream::connect(h.server.addr).await.unwrap();
        let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
        let mut ping_pong = connection.ping_pong().unwrap();
        tasks.push(tokio::spawn(connection));
        pingers.push(tokio::spawn(async move {
            let _client = client;
            while ping_pong.ping(h2::Ping::opaque()).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    wait_all_closed(&tasks, Duration::from_secs(5), || {}).await;
    eprintln!(
        "20 pinging idle connections at --idle-timeout-seconds 1: closed after {:?}",
        started.elapsed()
    );
    legitimate_get(&mut h, "after idle connections were closed").await;
    for pinger in pingers {
        pinger.abort();
    }
}

/// Opens `connections` x `streams` calls that announce a message and never send it.
async fn slow_requests(
    addr: std::net::SocketAddr,
    connections: usize,
    streams: usize,
) -> (Vec<h2::client::ResponseFuture>, Vec<h2::SendStream<Bytes>>) {
    let mut replies = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..connections {
        let (client, _task) = connect(addr, None).await;
        for _ in 0..streams {
            let mut client = client.clone().ready().await.unwrap();
            let (reply, mut body) = client
                .send_request(grpc_request(addr, "Set"), false)
                .unwrap();
            // A message of 1,000 bytes announced; one byte of it sent.
            let mut start = vec![0u8];
            start.extend_from_slice(&1000u32.to_be_bytes());
            start.push(0x0a);
            body.send_data(Bytes::from(start), false).unwrap();
            replies.push(reply);
            bodies.push(body);
        }
    }
    (replies, bodies)
}

/// Runs the slow-request attack and returns the peak RSS growth, in MiB.
async fn slow_request_attack(h: &mut Harness, connections: usize, streams: usize) -> f64 {
    let before = rss_mib();
    let started = Instant::now();
    let (replies, bodies) = slow_requests(h.server.addr, connections, streams).await;
    let opened = started.elapsed();
    let mut peak = rss_mib();
    legitimate_get(h, "during the slow-request attack").await;
    let answers = tokio::spawn(async move {
        let mut codes = Vec::new();
        for reply in replies {
            let reply = tokio::time::timeout(Duration::from_secs(15), reply).await;
            codes.push(
                reply
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|r| grpc_status(&r)),
            );
        }
        codes
    });
    // Each answer is awaited for at most 15 s, and they come together.
    eventually(
        Duration::from_secs(30),
        "every slow request to be answered",
        async || {
            peak = peak.max(rss_mib());
            if answers.is_finished() {
                Ok(())
            } else {
                Err("not yet")
            }
        },
    )
    .await;
    let codes = answers.await.unwrap();
    let cancelled = codes
        .iter()
        .filter(|c| **c == Some(Code::Cancelled as i32))
        .count();
    eprintln!(
        "{} slow requests ({connections} x {streams}) opened in {opened:?}; {cancelled} answered \
         CANCELLED, all after {:?}; peak RSS {:+.1} MiB, now {:+.1} MiB",
        codes.len(),
        started.elapsed(),
        peak - before,
        rss_mib() - before
    );
    assert_eq!(cancelled, codes.len(), "statuses: {codes:?}");
    drop(bodies);
    peak - before
}

/// A request whose message never arrives is answered CANCELLED after
/// --request-timeout-ms, not held.
#[tokio::test]
async fn slow_requests_are_answered_cancelled() {
    let _serial = SERIAL.lock().await;
    let mut h = Harness::start(support::Backend::Memory, &["--request-timeout-ms", "500"]).await;
    slow_request_attack(&mut h, 4, 64).await;
}

/// At the default flags, 3,072 slow requests grow the process by less than 128 MiB and
/// are all answered CANCELLED.
#[tokio::test]
async fn slow_requests_at_the_defaults_stay_under_128_mib() {
    let _serial = SERIAL.lock().await;
    let mut h = Harness::start(support::Backend::Memory, &[]).await;
    let growth = slow_request_attack(&mut h, 12, 256).await;
    assert!(growth < 128.0, "RSS grew by {growth:.1} MiB");
}

/// Sends `connections` x `streams` Gets on connections whose window is 0, so that no
/// answer can be delivered; returns the connection tasks and the answers' headers.
async fn unread_gets(
    addr: std::net::SocketAddr,
    connections: usize,
    streams: usize,
) -> (
    Vec<JoinHandle<Result<(), h2::Error>>>,
    Vec<h2::client::ResponseFuture>,
) {
    let mut tasks = Vec::new();
    let mut replies = Vec::new();
    let get = frame(&pb::GetRequest {
        token: "unread".into(),
    });
    for _ in 0..connections {
        let (client, task) = connect(addr, Some(0)).await;
        tasks.push(task);
        for _ in 0..streams {
            let Ok(mut client) = client.clone().ready().await else {
                break;
            };
            let Ok((reply, mut body)) = client.send_request(grpc_request(addr, "Get"), false)
            else {
                break;
            };
            let _ = body.send_data(get.clone(), true);
            replies.push(reply);
        }
    }
    (tasks, replies)
}

/// A peer that never reads its answers loses its connection after
/// --stall-timeout-seconds, while another caller is served.
#[tokio::test]
async fn connections_whose_answers_are_unread_are_closed() {
    let _serial = SERIAL.lock().await;
    let mut h = Harness::start(support::Backend::Memory, &["--stall-timeout-seconds", "1"]).await;
    let started = Instant::now();
    let (tasks, _replies) = unread_gets(h.server.addr, 8, 200).await;
    legitimate_get(&mut h, "during the unread-answer attack").await;
    wait_all_closed(&tasks, Duration::from_secs(5), || {}).await;
    eprintln!(
        "8 x 200 unread Gets at --stall-timeout-seconds 1: 8 connections closed after {:?}",
        started.elapsed()
    );
}

/// Past --max-open-calls undelivered answers, further calls are refused at once with
/// RESOURCE_EXHAUSTED.
#[tokio::test]
async fn calls_past_the_open_call_bound_are_refused() {
    let _serial = SERIAL.lock().await;
    let h = Harness::start(support::Backend::Memory, &["--max-open-calls", "64"]).await;
    let (_tasks, replies) = unread_gets(h.server.addr, 1, 128).await;
    let mut refused = 0;
    for reply in replies {
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), reply).await
            && grpc_status(&reply) == Some(Code::ResourceExhausted as i32)
        {
            refused += 1;
        }
    }
    eprintln!("128 unread Gets at --max-open-calls 64: {refused} refused");
    assert!(refused >= 64, "only {refused} refused");
}

/// At the default flags, 3,072 unread Gets grow the process by less than 128 MiB, and
/// their connections are closed.
#[tokio::test]
async fn unread_answers_at_the_defaults_stay_under_128_mib() {
    let _serial = SERIAL.lock().await;
    let mut h = Harness::start(support::Backend::Memory, &[]).await;
    let before = rss_mib();
    let started = Instant::now();
    let (tasks, replies) = unread_gets(h.server.addr, 12, 256).await;
    let opened = started.elapsed();
    let mut peak = rss_mib();
    legitimate_get(&mut h, "during the unread-answer attack").await;
    wait_all_closed(&tasks, Duration::from_secs(20), || {
        peak = peak.max(rss_mib())
    })
    .await;
    eprintln!(
        "{} unread Gets (12 x 256) sent in {opened:?}; 12 connections closed after {:?}; peak \
         RSS {:+.1} MiB, now {:+.1} MiB",
        replies.len(),
        started.elapsed(),
        peak - before,
        rss_mib() - before
    );
    assert!(
        peak - before < 128.0,
        "RSS grew by {:.1} MiB",
        peak - before
    );
}
