//! The HTTP listener's plumbing (`--http-listen`, SPEC §11-§12) against hostile and
//! careless peers, over real sockets: paths no route claims, heads and bodies past their
//! bounds, a body that stops arriving, connections past the cap or left idle, TLS with
//! the server's certificate, and a port that cannot be bound. Timings are printed, not
//! asserted.

mod support;

use std::{net::SocketAddr, time::Duration};

use support::{
    Backend, Harness, free_port,
    hostile::{ATTACKER, tcp_from},
    http::{self, Reply},
    pki::{Ca, Dir},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

/// The service with the HTTP listener on a free port (and these extra flags); returns
/// the harness and the listener's address.
async fn service(extra: &[&str]) -> (Harness, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let mut args = vec!["--http-listen", &listen];
    args.extend(extra);
    (Harness::start(Backend::Memory, &args).await, addr)
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    http::send(addr, &http::request("GET", path, &[], b""))
        .await
        .unwrap()
}

/// The value of one series in a scrape, by name and labels.
fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .find(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
                && labels.iter().all(|label| l.contains(label))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
}

/// Any path no route claims answers 404, whatever the method; each answer is counted
/// by path `other` and status, a series exported at 0 from start-up.
#[tokio::test]
async fn unknown_paths_answer_404_and_are_counted() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let (_h, addr) = service(&["--metrics-listen", &metrics]).await;
    let metrics: SocketAddr = metrics.parse().unwrap();
    let scrape = async || get(metrics, "/metrics").await.text();
    let before = scrape().await;
    let series = ["path=\"other\"", "status=\"404\""];
    assert_eq!(
        value(&before, "session_cache_http_requests_total", &series),
        0.0
    );
    for status in ["408", "413"] {
        value(
            &before,
            "session_cache_http_requests_total",
            &["path=\"other\"", &format!("status=\"{status}\"")],
        );
    }
    value(
        &before,
        "session_cache_connections_refused_total",
        &["listener=\"http\"", "reason=\"peer\""],
    );

    for (method, path) in [
        ("GET", "/"),
        ("POST", "/webhooks/nowhere"),
        ("PUT", "/authz"),
    ] {
        let reply = http::send(addr, &http::request(method, path, &[], b"{}"))
            .await
            .unwrap();
        assert_eq!(reply.status, 404, "{method} {path}");
    }
    let after = scrape().await;
    assert_eq!(
        value(&after, "session_cache_http_requests_total", &series),
        3.0
    );
    assert!(
        value(
            &after,
            "session_cache_http_request_duration_seconds_count",
            &["path=\"other\""]
        ) >= 3.0
    );
}

/// A body over 64 KiB is answered 413: at once when its Content-Length says so, or
/// once the 64 KiB are read when it comes chunked. A body just under passes.
#[tokio::test]
async fn bodies_over_64_kib_are_refused_with_413() {
    let (_h, addr) = service(&[]).await;
    // Declared too large: answered before a byte of the body is sent.
    let mut tcp = http::connect(addr).await.unwrap();
    let head = "POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 70000\r\n\r\n";
    let reply = http::exchange(&mut tcp, head.as_bytes()).await.unwrap();
    assert_eq!(reply.status, 413);
    assert_eq!(reply.header("connection"), "close");

    // Chunked, no length declared: refused once past the bound.
    let mut raw =
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..70 {
        raw.extend_from_slice(format!("{:x}\r\n", 1024).as_bytes());
        raw.extend_from_slice(&[b'a'; 1024]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let mut tcp = http::connect(addr).await.unwrap();
    // The server may close before every byte is written: only the answer matters.
    let _ = tcp.write_all(&raw).await;
    let reply = http::read_reply(&mut tcp).await.unwrap();
    assert_eq!(reply.status, 413);

    // Just under: read whole, then routed (no route here: 404).
    let body = vec![b'a'; 64 * 1024];
    let reply = http::send(addr, &http::request("POST", "/x", &[], &body))
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
}

/// A head over 16 KiB is answered 431 (hyper's answer to a head past its bound), and
/// nothing is routed.
#[tokio::test]
async fn heads_over_16_kib_are_refused_with_431() {
    let (_h, addr) = service(&[]).await;
    let big = "b".repeat(20 * 1024);
    let reply = http::send(addr, &http::request("GET", "/x", &[("x-big", &big)], b""))
        .await
        .unwrap();
    assert_eq!(reply.status, 431);
    let fine = "b".repeat(8 * 1024);
    let reply = http::send(addr, &http::request("GET", "/x", &[("x-fine", &fine)], b""))
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
}

/// A body that stops arriving is answered 408 once --request-timeout-ms has passed
/// since its head, and the connection is closed.
#[tokio::test]
async fn a_slow_body_is_answered_408() {
    let (_h, addr) = service(&["--request-timeout-ms", "300"]).await;
    let mut tcp = http::connect(addr).await.unwrap();
    let started = Instant::now();
    let head = "POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789";
    let reply = http::exchange(&mut tcp, head.as_bytes()).await.unwrap();
    eprintln!("408 after {:?}", started.elapsed());
    assert_eq!(reply.status, 408);
    assert_eq!(reply.header("connection"), "close");
}

/// Past --http-max-connections a new connection is closed at once, and the open ones
/// are still served; once they close, new connections are served again.
#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    let (_h, addr) = service(&["--http-max-connections", "2"]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(http::connect(addr).await.unwrap());
    }
    // A request on each makes sure the server has accepted both before the third.
    for tcp in &mut held {
        let raw = "GET /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n";
        tcp.write_all(raw.as_bytes()).await.unwrap();
        let mut buf = [0u8; 12];
        tcp.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 404");
    }
    let mut third = http::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(support::PATIENCE, third.read(&mut buf))
        .await
        .expect("the connection past the cap was left open");
    eprintln!("the third connection ended after {:?}", started.elapsed());
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the third connection was answered: {read:?}"
    );
    drop(held);
    let deadline = Instant::now() + support::PATIENCE;
    loop {
        match http::send(addr, &http::request("GET", "/x", &[], b"")).await {
            Ok(reply) if reply.status == 404 => break,
            other => assert!(
                Instant::now() < deadline,
                "no connection served after the cap freed up: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection that sends nothing is closed after --idle-timeout-seconds.
#[tokio::test]
async fn idle_connections_are_closed() {
    let (_h, addr) = service(&["--idle-timeout-seconds", "1"]).await;
    let mut tcp = http::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(support::PATIENCE, tcp.read(&mut buf))
        .await
        .expect("an idle connection was kept past the idle timeout");
    eprintln!("idle connection closed after {:?}", started.elapsed());
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// With --tls-cert the listener speaks TLS with the server's certificate, negotiating
/// HTTP/1.1 (an HTTP client offering h2 too gets http/1.1), and plain HTTP gets no
/// answer.
#[tokio::test]
async fn tls_with_the_servers_certificate() {
    let ca = Ca::new("http-listener-ca");
    let leaf = ca.server();
    let dir = Dir::new();
    let cert = dir.write("server.pem", &leaf.cert);
    let key = dir.write("server.key", &leaf.key);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let args = [
        "--http-listen",
        &listen,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let server = support::Server::start(&args).await;
    for alpn in [&[b"h2".as_slice(), b"http/1.1"][..], &[]] {
        let mut tls = http::connect_tls(addr, &ca.pem(), alpn).await.unwrap();
        if !alpn.is_empty() {
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        }
        let reply = http::exchange(&mut tls, &http::request("GET", "/x", &[], b""))
            .await
            .unwrap();
        assert_eq!(reply.status, 404, "{alpn:?}");
    }
    let plain = http::send(addr, &http::request("GET", "/x", &[], b"")).await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    drop(server);
}

/// A --http-listen port already taken stops the start with exit status 69, naming the
/// flag and the address.
#[tokio::test]
async fn a_taken_port_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let config = session_cache::Config::load_from([
        "session-cache",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        &addr,
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = session_cache::run(config, listener, std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(error.exit_code(), 69, "{error}");
    let text = error.to_string();
    assert!(
        text.contains("--http-listen") && text.contains(&addr),
        "{text}"
    );
}

/// --http-max-connections-per-peer holds one client address to its share: its next
/// connection is closed at accept, while another address is served. (Its count is
/// scraped in tests/listeners.rs: this binary's metrics recorder belongs to another test.)
#[tokio::test]
async fn one_address_holds_at_most_its_share() {
    let (_h, addr) = service(&[
        "--http-max-connections",
        "64",
        "--http-max-connections-per-peer",
        "3",
    ])
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = tcp_from(ATTACKER, addr).await.unwrap();
        let raw = "GET /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n";
        tcp.write_all(raw.as_bytes()).await.unwrap();
        let mut buf = [0u8; 12];
        tcp.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 404");
        held.push(tcp);
    }
    let mut fourth = tcp_from(ATTACKER, addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(support::PATIENCE, fourth.read(&mut buf))
        .await
        .expect("the connection past the share was left open");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the connection past the share was answered: {read:?}"
    );
    // Another address (the test's own, 127.0.0.1) is served meanwhile.
    assert_eq!(get(addr, "/x").await.status, 404);
}
