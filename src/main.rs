//! The `session-cache` binary: read the configuration, start logging, bind, serve.

use std::process::ExitCode;

use session_cache::{
    Config,
    config::{LoadError, LogFormat},
    server::{self, EXIT_CONFIG},
};
use tracing_subscriber::EnvFilter;

/// Small allocations dominate a call (protobuf, JSON, Redis replies); the system
/// allocator spent about a quarter of the server's CPU on them under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

    // Every file the configuration names is read and checked before any port is bound.
    let prepared = match server::prepare(config) {
        Ok(prepared) => prepared,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = session_cache::signal::shutdown();
        let listener = match server::listen(prepared.config().listen).await {
            Ok(listener) => listener,
            Err(e) => return fail(&e),
        };
        match server::serve(prepared, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    })
}

/// Logs and prints why the service stopped, and returns its exit status.
fn fail(e: &server::Error) -> ExitCode {
    tracing::error!(error = %e, "stopped on an error");
    eprintln!("session-cache: {e}");
    ExitCode::from(e.exit_code())
}
