//! Drives the service past what it can serve and reports what callers saw: how many
//! calls were admitted (hits) or shed (RESOURCE_EXHAUSTED), the latency of each, and the
//! server's memory. Loopback only; bounded by its duration.
//!
//! `cargo run --release --example overload -- ADDR PID CONNECTIONS CALLS_PER_CONNECTION SECONDS`
//!
//! ADDR is a session-cache serving `overload-token` (this tool Sets it first), PID the
//! server's process id (for its RSS), and CONNECTIONS x CALLS_PER_CONNECTION the calls
//! kept in flight.

use std::time::Duration;

use prost_types::Timestamp;
use session_cache::pb::{self, GetOutcome, session_cache_client::SessionCacheClient};
use tokio::time::Instant;
use tonic::{Code, transport::Channel};

fn rss_mib(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, pid, connections, per_connection, seconds] = &args[..] else {
        return Err("usage: overload ADDR PID CONNECTIONS CALLS_PER_CONNECTION SECONDS".into());
    };
    let (connections, per_connection): (usize, usize) =
        (connections.parse()?, per_connection.parse()?);
    let duration = Duration::from_secs(seconds.parse()?);
    let endpoint = format!("http://{addr}");

    let mut client = SessionCacheClient::connect(endpoint.clone()).await?;
    let at = Timestamp {
        seconds: 1_705_314_600,
        nanos: 0,
    };
    client
        .set(pb::SetRequest {
            token: "overload-token".into(),
            user: Some(pb::User {
                id: "overload-user".into(),
                email: "overload@example.com".into(),
                name: "Overload".into(),
                email_verified: true,
                tier: "pro".into(),
                created_at: Some(at),
                updated_at: Some(at),
            }),
            session_expire: Some(Timestamp {
                seconds: 4_102_444_800,
                nanos: 0,
            }),
            fence: String::new(),
        })
        .await?;

    let rss_before = rss_mib(pid);
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let channel = Channel::from_shared(endpoint.clone())?.connect().await?;
        for _ in 0..per_connection {
            let mut client = SessionCacheClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                let (mut admitted, mut shed, mut other) = (Vec::new(), Vec::new(), 0usize);
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let reply = client
                        .get(pb::GetRequest {
                            token: "overload-token".into(),
                        })
                        .await;
                    let took = started.elapsed();
                    match reply {
                        Ok(r) if r.get_ref().outcome() == GetOutcome::Hit => admitted.push(took),
                        Err(s) if s.code() == Code::ResourceExhausted => shed.push(took),
                        _ => other += 1,
                    }
                }
                (admitted, shed, other)
            }));
        }
    }
    let mut peak = rss_before;
    let (mut admitted, mut shed, mut other) = (Vec::new(), Vec::new(), 0);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss_mib(pid));
    }
    for task in tasks {
        let (a, s, o) = task.await?;
        admitted.extend(a);
        shed.extend(s);
        other += o;
    }
    admitted.sort_unstable();
    shed.sort_unstable();
    let secs = duration.as_secs_f64();
    println!(
        "{} calls in flight for {secs:.0} s: admitted {} ({:.0}/s) p50 {:?} p99 {:?} max {:?}; \
         shed {} ({:.0}/s) p50 {:?} p99 {:?}; other {other}; server RSS {rss_before:.1} MiB before, \
         peak {peak:.1} MiB",
        connections * per_connection,
        admitted.len(),
        admitted.len() as f64 / secs,
        quantile(&admitted, 0.5),
        quantile(&admitted, 0.99),
        admitted.last().copied().unwrap_or_default(),
        shed.len(),
        shed.len() as f64 / secs,
        quantile(&shed, 0.5),
        quantile(&shed, 0.99),
    );
    Ok(())
}
