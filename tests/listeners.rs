//! What the listeners do when the process runs out of descriptors: accepting fails
//! (EMFILE) for as long as they are used up, and each listener's accept loop backs off
//! instead of retrying at once, which would spin a core; it serves again once
//! descriptors are free. The service runs as its own process, under a low `nofile`
//! limit (util-linux `prlimit`), so that its CPU time can be read from `/proc`.

mod support;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use support::{PATIENCE, eventually, free_port, scrape::get_metrics};
use tokio::net::TcpStream;

/// The descriptors the service may hold: a few dozen, used up by the test's
/// connections.
const NOFILE: u32 = 48;

/// The service, killed when dropped.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The CPU time the process has used, in clock ticks (`/proc/<pid>/stat`: utime and
/// stime).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces: the fields after it start past its ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Descriptors the process holds.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// With its descriptors used up, the metrics listener waits instead of spinning: the
/// process uses under 5% of a core while a scrape waits for a descriptor, and the
/// scrape is answered once descriptors are free again.
#[tokio::test]
async fn the_metrics_listener_backs_off_out_of_descriptors() {
    let grpc = free_port();
    let metrics = free_port();
    let child = Command::new("prlimit")
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg("--")
        .arg(support::process::BIN)
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs the service");
    let service = Service(child);
    let pid = service.0.id();
    eventually(PATIENCE, "the service serves metrics", async || {
        let mut stream = TcpStream::connect(("127.0.0.1", metrics))
            .await
            .map_err(|e| e.to_string())?;
        match get_metrics(&mut stream).await {
            text if text.contains("session_cache_calls_total") => Ok(()),
            text => Err(text),
        }
    })
    .await;

    // Connections to the gRPC port, each accepted (one descriptor each) until none is
    // left; the rest wait in the listen queue.
    let mut held = Vec::new();
    for _ in 0..NOFILE * 2 {
        held.push(TcpStream::connect(("127.0.0.1", grpc)).await.unwrap());
    }
    eventually(
        PATIENCE,
        format_args!("the service holds all {NOFILE} descriptors"),
        async || match descriptors(pid) {
            held if held >= NOFILE as usize => Ok(()),
            held => Err(held),
        },
    )
    .await;
    // A scrape now waits in the metrics port's queue; every accept fails with EMFILE.
    let mut waiting = TcpStream::connect(("127.0.0.1", metrics)).await.unwrap();
    let window = Duration::from_secs(2);
    let before = cpu_ticks(pid);
    tokio::time::sleep(window).await;
    let used = (cpu_ticks(pid) - before) as f64 / ticks_per_second();
    let share = used / window.as_secs_f64();
    eprintln!("out of descriptors: {:.1}% of a core", share * 100.0);
    assert!(
        share < 0.05,
        "the service used {:.0}% of a core while out of descriptors",
        share * 100.0
    );

    drop(held);
    let text = get_metrics(&mut waiting).await;
    assert!(text.contains("session_cache_calls_total"), "{text}");
}
