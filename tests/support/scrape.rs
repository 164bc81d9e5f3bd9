//! The service's `/metrics`, as Prometheus scrapes it, and the value of one series.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::poll::{PATIENCE, eventually};

/// One `GET /metrics` over `stream`; the whole HTTP answer, headers included.
pub async fn get_metrics(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut text))
        .await
        .expect("the metrics answer in time")
        .unwrap();
    text
}

/// The metrics of the service whose `--metrics-listen` is on `port`, once it accepts.
pub async fn scrape(port: u16) -> String {
    let mut stream = eventually(
        PATIENCE,
        format!("the metrics port {port} to accept"),
        async || TcpStream::connect(("127.0.0.1", port)).await,
    )
    .await;
    get_metrics(&mut stream).await
}

/// The value of the series `name` whose labels include each of `labels`
/// (`rpc="Get"`); `None` when no such series is exported.
pub fn series(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.split(['{', ' ']).next() == Some(name) && labels.iter().all(|label| l.contains(label))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
