//! Why the service could not start, or stopped on a failure: one error type for every
//! step of setting up (flags, the files they name, telemetry, binding, the store's
//! checks) and serving, with the process exit status of each.
//!
//! It sits at the bottom of the module graph: everything that can fail at start-up
//! returns it, and it knows nothing of the modules that do.

use std::{net::SocketAddr, path::Path, path::PathBuf};

/// Exit status for a configuration that cannot be served: a flag, or a file a flag
/// names (EX_USAGE in sysexits.h).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status for a port that cannot be bound (EX_UNAVAILABLE in sysexits.h).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Why the service could not start or stopped on a failure.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The command line did not parse, or asked for `--help` or `--version` (see
    /// [`SetupError::exit_code`]).
    #[error("{0}")]
    Parse(clap::Error),
    /// The flags parse but do not fit together; the text names the flags.
    #[error("{0}")]
    Flags(String),
    /// A file a flag names is missing, unreadable, or does not hold what it should.
    /// `problem` never quotes the file's content.
    #[error("{flag} {}: {problem}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// The HTTP client of the identity provider cannot be built (no trusted roots, say).
    #[error("cannot build the identity provider's HTTP client: {0}")]
    HttpClient(String),
    /// The span exporter cannot be built.
    #[error("--otlp-endpoint: {0}")]
    Telemetry(String),
    /// The async runtime cannot start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The Redis settings are refused by the client (a malformed URL, say).
    #[error("cannot use the Redis URL: {0}")]
    Redis(#[source] bb8_redis::redis::RedisError),
    /// The store answered, and is unfit to keep revocations.
    #[error("refusing the store: {0}")]
    Store(String),
    /// A port the configuration names cannot be bound.
    #[error("{flag} {addr}: cannot listen: {problem}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        problem: String,
    },
    /// A metrics recorder was installed earlier in this process.
    #[error("--metrics-listen: a metrics recorder is already installed in this process")]
    Recorder,
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

impl SetupError {
    /// The process exit status: 0 for `--help` and `--version`, [`EXIT_CONFIG`] for the
    /// flags and their files, [`EXIT_UNAVAILABLE`] for a port that cannot be bound, 1
    /// otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            SetupError::Parse(e) if !e.use_stderr() => 0,
            SetupError::Parse(_)
            | SetupError::Flags(_)
            | SetupError::File { .. }
            | SetupError::HttpClient(_)
            | SetupError::Telemetry(_)
            | SetupError::Redis(_)
            | SetupError::Store(_) => EXIT_CONFIG,
            SetupError::Bind { .. } => EXIT_UNAVAILABLE,
            SetupError::Runtime(_) | SetupError::Recorder | SetupError::Reflection(_) => 1,
        }
    }

    /// A file error: `flag`'s file at `path` has `problem`.
    pub fn file(flag: &'static str, path: &Path, problem: impl Into<String>) -> SetupError {
        SetupError::File {
            flag,
            path: path.to_owned(),
            problem: problem.into(),
        }
    }

    /// A port error: `flag`'s address `addr` cannot be bound.
    pub fn bind(flag: &'static str, addr: SocketAddr, e: &std::io::Error) -> SetupError {
        SetupError::Bind {
            flag,
            addr,
            problem: e.to_string(),
        }
    }
}
