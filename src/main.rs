//! The `session-cache` binary: read the configuration, start logging, bind, serve.

use std::process::ExitCode;

use session_cache::{
    Config,
    config::{LoadError, LogFormat},
};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Small allocations dominate a call (protobuf, JSON, Redis replies); the system
/// allocator spent about a quarter of the server's CPU on them under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration that cannot be served (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(LoadError::Parse(e)) if !e.use_stderr() => {
            // --help or --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("session-cache: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = session_cache::signal::shutdown();
        let listener = match TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(listen = %config.listen, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        match session_cache::run(config, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "stopped on an error");
                eprintln!("session-cache: {e}");
                ExitCode::from(e.exit_code())
            }
        }
    })
}
