//! The service's binary as a child process, as an operator runs it: flags and a clean
//! environment, signals, an exit status; killed and reaped if the test fails half-way.
//! For what only the process shows (exit codes, logs, signals, reloads on SIGHUP); the
//! other tests serve the library on port 0 (`Server`).

use std::{
    io::Read,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use session_cache::pb::session_cache_client::SessionCacheClient;
use tonic::transport::Channel;

use super::poll::{PATIENCE, eventually};

/// The binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_session-cache");

/// The binary with a clean environment and no output: add flags, then [`Process::spawn`].
pub fn command() -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// A running binary.
pub struct Process(Child);

impl Process {
    /// The binary with `args`, a clean environment and no output.
    pub fn start(args: &[&str]) -> Process {
        Process::spawn(command().args(args))
    }

    /// `command` (see [`command`]) started.
    pub fn spawn(command: &mut Command) -> Process {
        Process(command.spawn().expect("the binary starts"))
    }

    /// Sends `signal` (`-TERM`, `-HUP`, …).
    pub fn signal(&self, signal: &str) {
        let pid = self.0.id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Waits (at most `patience`) until the process exits; its status.
    pub async fn wait(&mut self, patience: Duration) -> ExitStatus {
        eventually(patience, "the process to exit", async || {
            self.0.try_wait().unwrap().ok_or("still running")
        })
        .await
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Its resident memory, in MiB (`/proc/<pid>/status`, VmRSS).
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib / 1024.0
    }

    /// The CPU time it has used, user and system, in seconds (`/proc/<pid>/stat`).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.id())).unwrap();
        // The command name may hold spaces: the fields after it start past its ')'.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / clock_ticks_per_second()
    }

    /// Descriptors it holds.
    pub fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.id()))
            .map(|dir| dir.count())
            .unwrap_or(0)
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    /// All it wrote on its standard output (piped by the caller), once it has exited.
    pub fn stdout(&mut self) -> String {
        let mut text = String::new();
        self.0
            .stdout
            .take()
            .expect("stdout was piped")
            .read_to_string(&mut text)
            .unwrap();
        text
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A client of the service on loopback `port`, once it listens.
pub async fn connect(port: u16) -> SessionCacheClient<Channel> {
    let url = format!("http://127.0.0.1:{port}");
    eventually(
        PATIENCE,
        format!("the service to listen on {port}"),
        async || SessionCacheClient::connect(url.clone()).await,
    )
    .await
}
