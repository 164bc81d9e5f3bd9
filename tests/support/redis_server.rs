//! One `redis-server` process of the test's own, in whichever role the test needs: a
//! plain server (or a primary), a replica, a Sentinel or a Cluster node, on a loopback
//! port, persisting nothing, logging into a directory of its own. The test can kill it
//! (as in a crash), freeze and thaw it, and restart it on the same port.
//!
//! A process is ready when *it* answers: the child still runs and `INFO server` on its
//! port names the child's process id, so that another test's server on a port that was
//! free a moment ago is never taken for it. A child that exits while starting fails the
//! test with the end of its log.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use bb8_redis::redis::{self, aio::MultiplexedConnection};

use super::{
    free_port,
    nodes::ANSWER,
    pki::Dir,
    poll::{PATIENCE, eventually},
};

/// What the process is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A server of its own (a primary once replicas follow it).
    Plain,
    /// A replica of the server on this loopback port.
    Replica { of: u16 },
    /// A Sentinel, started from a configuration file with these lines (`sentinel
    /// monitor …`); the Sentinel rewrites the file as it learns the topology.
    Sentinel { config: String },
    /// A Cluster node, not yet in a cluster (`redis-cli --cluster create` joins it), whose
    /// cluster bus listens on its port plus 10000 unless the arguments say
    /// `--cluster-port`.
    ClusterNode { node_timeout_ms: u64 },
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Plain => write!(f, "redis-server"),
            Role::Replica { of } => write!(f, "replica of {of}"),
            Role::Sentinel { .. } => write!(f, "Sentinel"),
            Role::ClusterNode { .. } => write!(f, "Cluster node"),
        }
    }
}

/// Files for a server that speaks only TLS: its certificate and key, and the CA that
/// signed them (which this module trusts when it connects).
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// How to start a process: [`Options::new`] gives a free port, no extra arguments, no
/// password, a directory of its own.
#[derive(Clone, Debug)]
pub struct Options {
    pub role: Role,
    pub port: u16,
    /// The directory under which the process gets its own (`redis-<port>`); `None`: a
    /// temporary directory removed with the process.
    pub parent: Option<PathBuf>,
    /// More `redis-server` arguments, such as `--maxmemory 2mb` or `--requirepass`.
    pub args: Vec<String>,
    /// How this module's connections log in: `(user, password)`, the user `None` for
    /// `default`.
    pub auth: Option<(Option<String>, String)>,
    /// Environment variables of the process (such as `LD_PRELOAD`).
    pub env: Vec<(String, String)>,
    /// TLS only, on `port`.
    pub tls: Option<Tls>,
}

impl Options {
    pub fn new(role: Role) -> Options {
        Options {
            role,
            port: free_port(),
            parent: None,
            args: Vec::new(),
            auth: None,
            env: Vec::new(),
            tls: None,
        }
    }

    /// These options with more `redis-server` arguments.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Options {
        self.args
            .extend(args.iter().map(|arg| arg.as_ref().to_string()));
        self
    }
}

/// A `redis-server` this module started; dropping it kills it.
pub struct Redis {
    options: Options,
    dir: PathBuf,
    /// The directory when it is the process's own (removed on drop).
    _own_dir: Option<Dir>,
    child: Option<Child>,
}

impl Redis {
    /// A plain Redis, once it answers.
    pub async fn start() -> Redis {
        Redis::start_with(&[]).await
    }

    /// A plain Redis with extra `redis-server` arguments, such as `--maxmemory 2mb`,
    /// once it answers.
    pub async fn start_with(extra: &[&str]) -> Redis {
        Redis::start_as(Options::new(Role::Plain).args(extra)).await
    }

    /// A Redis as `options` say, once it answers.
    pub async fn start_as(options: Options) -> Redis {
        let mut redis = Redis::spawn(options);
        redis.wait_until_answers().await;
        redis
    }

    /// A plain Redis that is not running yet, on a port of its own: [`Redis::restart`]
    /// starts it.
    pub fn not_started() -> Redis {
        Redis::prepared(Options::new(Role::Plain))
    }

    /// Starts the process without waiting; [`Redis::wait_until_answers`] waits. (Several
    /// nodes start faster side by side.)
    pub fn spawn(options: Options) -> Redis {
        let mut redis = Redis::prepared(options);
        redis.launch();
        redis
    }

    fn prepared(options: Options) -> Redis {
        let (dir, own) = match &options.parent {
            Some(parent) => (parent.join(format!("redis-{}", options.port)), None),
            None => {
                let own = Dir::new();
                (own.path().to_path_buf(), Some(own))
            }
        };
        fs::create_dir_all(&dir).unwrap();
        Redis {
            options,
            dir,
            _own_dir: own,
            child: None,
        }
    }

    fn launch(&mut self) {
        let port = self.options.port.to_string();
        let mut command = Command::new("redis-server");
        if let Role::Sentinel { config } = &self.options.role {
            // A Sentinel needs a file it can rewrite; it comes first on the command line.
            let file = self.dir.join("sentinel.conf");
            fs::write(&file, config).unwrap();
            command.arg(file).arg("--sentinel");
        }
        match &self.options.tls {
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &port])
                .args(["--tls-cert-file", &tls.cert, "--tls-key-file", &tls.key])
                .args(["--tls-ca-cert-file", &tls.ca, "--tls-auth-clients", "no"]),
            None => command.args(["--port", &port]),
        };
        command
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log_path());
        if !matches!(self.options.role, Role::Sentinel { .. }) {
            // Nothing on disk; diskless full syncs start at once instead of after 5 s.
            command
                .args(["--save", "", "--appendonly", "no"])
                .args(["--repl-diskless-sync-delay", "0"]);
        }
        match &self.options.role {
            Role::Replica { of } => {
                command.args(["--replicaof", "127.0.0.1", &of.to_string()]);
            }
            Role::ClusterNode { node_timeout_ms } => {
                command
                    .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                    .arg(self.dir.join("nodes.conf"))
                    .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
                    .args(["--cluster-announce-ip", "127.0.0.1"]);
            }
            Role::Plain | Role::Sentinel { .. } => {}
        }
        command
            .args(&self.options.args)
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(command.spawn().expect(
            "redis-server must be installed (Debian package redis-server); .ci/run installs it",
        ));
    }

    /// Waits until this process answers on its port as itself (`INFO server`'s
    /// `process_id` is the child's); panics with the end of its log if it exits first.
    pub async fn wait_until_answers(&mut self) {
        let pid = self.pid().to_string();
        let what = Described {
            text: format!(
                "{} on {} to answer as process {pid}",
                self.options.role, self.options.port
            ),
            log: self.log_path(),
        };
        eventually(PATIENCE, what, async || {
            let child = self.child.as_mut().expect("redis-server was started");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                panic!(
                    "redis-server on {} exited with {status}:\n{}",
                    self.options.port,
                    self.log_tail(20)
                );
            }
            let info: String = self.ask_once(redis::cmd("INFO").arg("server")).await?;
            match info_field(&info, "process_id") {
                Some(answered) if answered == pid => Ok(()),
                other => Err(format!("process_id {other:?}")),
            }
        })
        .await;
    }

    /// One command on a connection of its own, bounded by [`ANSWER`].
    async fn ask_once<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        let exchange = async {
            let mut conn = self.client().get_multiplexed_async_connection().await?;
            cmd.query_async::<T>(&mut conn).await
        };
        match tokio::time::timeout(ANSWER, exchange).await {
            Ok(answer) => answer.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {ANSWER:?}")),
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.options.port
    }

    /// What it is.
    pub fn role(&self) -> &Role {
        &self.options.role
    }

    /// Its URL, with the user and password this module logs in with: the service's
    /// `--redis-url` for a plain Redis.
    pub fn url(&self) -> String {
        let (scheme, host) = match self.options.tls {
            Some(_) => ("rediss", "localhost"),
            None => ("redis", "127.0.0.1"),
        };
        let login = match &self.options.auth {
            Some((user, password)) => format!(
                "{}:{}@",
                user.as_deref().map(percent_encoded).unwrap_or_default(),
                percent_encoded(password)
            ),
            None => String::new(),
        };
        format!("{scheme}://{login}{host}:{}", self.options.port)
    }

    /// A client for it (trusting its CA when it speaks TLS).
    pub fn client(&self) -> redis::Client {
        match &self.options.tls {
            Some(tls) => {
                let info = redis::IntoConnectionInfo::into_connection_info(self.url()).unwrap();
                let ca = fs::read(&tls.ca).expect("the CA file");
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(ca),
                    },
                )
                .unwrap()
            }
            None => redis::Client::open(self.url()).unwrap(),
        }
    }

    /// A direct connection, to look at or plant keys as another program would.
    pub async fn conn(&self) -> MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("redis-server on {} answers: {e}", self.options.port))
    }

    /// Whether it runs (it was started and not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// SIGKILL, reaped: it vanishes without a word, as in a crash (a no-op if it is not
    /// running).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty, once it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch();
        self.wait_until_answers().await;
    }

    /// Starts it again on the same port, empty, in another role (a replica back as a
    /// primary of nothing), once it answers.
    pub async fn restart_as(&mut self, role: Role) {
        self.options.role = role;
        self.restart().await;
    }

    /// SIGSTOP: it keeps its connections but answers nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Redis::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {}", self.pid());
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// The last `lines` lines of its log, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A frozen process is thawed first, so that nothing waits on it.
            self.thaw();
        }
        self.kill();
    }
}

/// The value of `field` in INFO or `CLUSTER INFO` text (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim_end)
    })
}

/// The first element of a `ROLE` reply: `master`, `slave` or `sentinel`.
pub fn role_name(reply: Vec<redis::Value>) -> Option<String> {
    redis::from_redis_value(reply.into_iter().next()?).ok()
}

/// `text` as a URL's userinfo may carry it: everything but unreserved characters
/// percent-encoded.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The last `lines` lines of a file, for a failure message.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A wait's description, followed, when the wait fails, by the end of a log.
struct Described {
    text: String,
    log: PathBuf,
}

impl fmt::Display for Described {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n-- its log --\n{}", self.text, tail(&self.log, 20))
    }
}
