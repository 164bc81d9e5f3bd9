//! The `session-cache` binary: read the configuration, start logging and tracing, check
//! the files, bind, serve.

use std::process::ExitCode;

use session_cache::{
    Config, config::LogFormat, error::SetupError, prepare::prepare, server, telemetry::Telemetry,
};
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

/// Small allocations dominate a call (protobuf, JSON, Redis replies); the system
/// allocator spent about a quarter of the server's CPU on them under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match launch() {
        Ok(()) => ExitCode::SUCCESS,
        // --help and --version
        Err(SetupError::Parse(e)) if !e.use_stderr() => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "stopped on an error");
            eprintln!("session-cache: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Everything the binary does, up to the end of serving.
fn launch() -> Result<(), SetupError> {
    let config = Config::load()?;
    let runtime = tokio::runtime::Runtime::new().map_err(SetupError::Runtime)?;
    // The exporter's connection lives on the runtime; it is built lazily, so a collector
    // that is down at start-up is not an error.
    let telemetry = match &config.otlp_endpoint {
        Some(endpoint) => {
            let _entered = runtime.enter();
            Some(Telemetry::start(endpoint, &config.otlp_service_name)?)
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

    // Every file the configuration names is read and checked before any port is bound.
    let served = prepare(config).and_then(|prepared| {
        runtime.block_on(async {
            let shutdown = session_cache::signal::shutdown();
            let listener = server::listen(prepared.config().listen).await?;
            server::serve(prepared, listener, shutdown).await
        })
    });
    // After the runtime's last call, while it still runs the exporter's connection.
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    served
}
