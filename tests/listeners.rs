//! Every listener (gRPC on `--listen`, HTTP on `--http-listen`, metrics on
//! `--metrics-listen`) takes the same bounds on what a peer can hold of it:
//!
//! - out of descriptors (EMFILE), each accept loop backs off instead of retrying at
//!   once, which would spin a core, and serves again once descriptors are free;
//! - one client address holds at most its share of a listener's connections: past it
//!   its connections are closed at accept, while another address is served.
//!
//! The service runs as its own process, under a low `nofile` limit (util-linux
//! `prlimit`) where descriptors must run out, so that its CPU time can be read from
//! `/proc`.

mod support;

use std::{net::SocketAddr, process::Command, time::Duration};

use session_cache::pb;
use support::{
    PATIENCE, eventually, free_port,
    hostile::{ATTACKER, CALLER, frame, grpc_request, tcp_from},
    http::{self, Reply},
    process::{self, Process},
    scrape::get_metrics,
};
use tokio::{io::AsyncReadExt, net::TcpStream};

/// The descriptors the service may hold: a few dozen, used up by the test's
/// connections.
const NOFILE: u32 = 48;

/// The service's three listeners.
struct Ports {
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
}

impl Ports {
    fn free() -> Ports {
        let port = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        Ports {
            grpc: port(),
            http: port(),
            metrics: port(),
        }
    }

    /// The flags that open all three.
    fn flags(&self) -> Vec<String> {
        vec![
            "--listen".into(),
            self.grpc.to_string(),
            "--http-listen".into(),
            self.http.to_string(),
            "--metrics-listen".into(),
            self.metrics.to_string(),
        ]
    }

    /// Waits until all three serve.
    async fn serving(&self) {
        process::connect(self.grpc.port()).await;
        eventually(
            PATIENCE,
            "the metrics and HTTP ports to answer",
            async || {
                let mut stream = TcpStream::connect(self.metrics)
                    .await
                    .map_err(|e| e.to_string())?;
                if !get_metrics(&mut stream)
                    .await
                    .contains("session_cache_calls_total")
                {
                    return Err("no metrics yet".to_string());
                }
                http::send(self.http, &http::request("GET", "/", &[], b""))
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        )
        .await;
    }
}

/// One Get over a raw HTTP/2 connection already open on `tcp`: the gRPC listener
/// serves it (its answer's headers arrive).
async fn grpc_get(tcp: TcpStream, addr: SocketAddr) -> Result<(), String> {
    let (client, connection) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let (reply, mut body) = client
        .send_request(grpc_request(addr, "Get"), false)
        .map_err(|e| e.to_string())?;
    let get = frame(&pb::GetRequest {
        token: "waiting".into(),
    });
    body.send_data(get, true).map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(PATIENCE, reply)
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?;
    match reply.status().as_u16() {
        200 => Ok(()),
        status => Err(format!("answered {status}")),
    }
}

/// With its descriptors used up, every listener waits instead of spinning: the process
/// uses under 5% of a core while a connection to each waits for a descriptor, and each
/// is served once descriptors are free again.
#[tokio::test]
async fn every_listener_backs_off_out_of_descriptors() {
    let ports = Ports::free();
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg("--")
        .arg(process::BIN)
        .args(ports.flags());
    let service = Process::spawn(
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    ports.serving().await;

    // Connections to the gRPC port, each accepted (one descriptor each) until none is
    // left; the rest wait in the listen queue.
    let mut held = Vec::new();
    for _ in 0..NOFILE * 2 {
        held.push(TcpStream::connect(ports.grpc).await.unwrap());
    }
    eventually(
        PATIENCE,
        format_args!("the service holds all {NOFILE} descriptors"),
        async || match service.descriptors() {
            held if held >= NOFILE as usize => Ok(()),
            held => Err(held),
        },
    )
    .await;
    // A connection now waits in each port's queue; every accept fails with EMFILE.
    let grpc_waiting = TcpStream::connect(ports.grpc).await.unwrap();
    let mut http_waiting = TcpStream::connect(ports.http).await.unwrap();
    let mut metrics_waiting = TcpStream::connect(ports.metrics).await.unwrap();
    let window = Duration::from_secs(2);
    let before = service.cpu_seconds();
    // A measurement window, not a wait for a condition.
    tokio::time::sleep(window).await;
    let share = (service.cpu_seconds() - before) / window.as_secs_f64();
    eprintln!("out of descriptors: {:.1}% of a core", share * 100.0);
    assert!(
        share < 0.05,
        "the service used {:.0}% of a core while out of descriptors",
        share * 100.0
    );

    drop(held);
    let text = get_metrics(&mut metrics_waiting).await;
    assert!(text.contains("session_cache_calls_total"), "{text}");
    let reply: Reply = http::exchange(
        &mut http_waiting,
        &http::request("GET", "/nothing", &[], b""),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 404);
    grpc_get(grpc_waiting, ports.grpc).await.unwrap();
}

/// Opens `count` connections to `addr` from `from` and keeps those the listener keeps;
/// how many it closed at once (an HTTP/1.1 server sends nothing first, so a connection
/// that ends unasked was refused).
async fn closed_at_accept(
    from: std::net::IpAddr,
    addr: SocketAddr,
    count: usize,
) -> (usize, Vec<TcpStream>) {
    let mut kept = Vec::new();
    for _ in 0..count {
        kept.push(tcp_from(from, addr).await.unwrap());
    }
    let mut closed = 0;
    let mut open = Vec::new();
    for mut tcp in kept {
        let mut byte = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            _ => open.push(tcp),
        }
    }
    (closed, open)
}

/// One client address holds at most its share of the HTTP and metrics listeners'
/// connections (a quarter of each cap); past it its connections are closed at accept,
/// and another address is still served.
#[tokio::test]
async fn each_listener_gives_a_peer_at_most_its_share() {
    let ports = Ports::free();
    let mut flags = ports.flags();
    flags.extend(["--http-max-connections".into(), "16".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let _service = Process::start(&flags);
    ports.serving().await;

    // HTTP: a quarter of 16.
    let (closed, _held_http) = closed_at_accept(ATTACKER, ports.http, 12).await;
    eprintln!("HTTP listener: 12 connections from one address, {closed} closed at accept");
    assert_eq!(closed, 12 - 4);
    let reply = http::send(ports.http, &http::request("GET", "/", &[], b""))
        .await
        .unwrap();
    assert_eq!(reply.status, 404);

    // Metrics: a quarter of 64.
    let (closed, _held_metrics) = closed_at_accept(ATTACKER, ports.metrics, 24).await;
    eprintln!("metrics listener: 24 connections from one address, {closed} closed at accept");
    assert_eq!(closed, 24 - 16);
    let mut stream = tcp_from(CALLER, ports.metrics).await.unwrap();
    let text = get_metrics(&mut stream).await;
    for listener in ["http", "metrics"] {
        let refused = support::scrape::series(
            &text,
            "session_cache_connections_refused_total",
            &[&format!("listener=\"{listener}\""), "reason=\"peer\""],
        );
        assert!(refused.is_some_and(|n| n >= 8.0), "{listener}: {refused:?}");
    }
}
