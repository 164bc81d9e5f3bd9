//! The `session-cache` binary: read the configuration, start logging and tracing, bind,
//! serve.

use std::process::ExitCode;

use session_cache::telemetry::Telemetry;
use session_cache::{
    Config,
    config::{LoadError, LogFormat},
    server::{self, EXIT_CONFIG},
};
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("session-cache: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The exporter's connection lives on the runtime; it is built lazily, so a collector
    // that is down at start-up is not an error.
    let telemetry = match &config.otlp_endpoint {
        Some(endpoint) => {
            let _entered = runtime.enter();
            match Telemetry::start(endpoint, &config.otlp_service_name) {
                Ok(telemetry) => Some(telemetry),
                Err(e) => {
                    eprintln!("session-cache: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        None => None,
    };
    // Each layer has its own filter: RUST_LOG (default info) for the logs, and the
    // traced spans at debug level for OpenTelemetry whatever the logs show.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(telemetry.as_ref().map(Telemetry::layer))
        .init();

    let status = serve(config, &runtime);
    // After the runtime's last call, while it still runs the exporter's connection.
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    status
}

/// Checks every file the configuration names, binds, and serves until a signal.
fn serve(config: Config, runtime: &tokio::runtime::Runtime) -> ExitCode {
    // Every file the configuration names is read and checked before any port is bound.
    let prepared = match server::prepare(config) {
        Ok(prepared) => prepared,
        Err(e) => return fail(&e),
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
