//! The `session-cache` binary: read the configuration, start logging and tracing, check
//! the files, bind, serve.

// One call into the allocator's C API (see `give_back_free_memory`); nothing else.
#![deny(unsafe_code)]

use std::{
    cell::Cell,
    process::ExitCode,
    time::{Duration, Instant},
};

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

/// How often an idle worker thread hands its free memory back, at most.
const GIVE_BACK_EVERY: Duration = Duration::from_millis(500);

/// Called when a worker thread of the runtime goes idle: at most every
/// [`GIVE_BACK_EVERY`], hands the memory its allocator heap holds free back to the
/// arena, whence it is returned to the OS after mimalloc's purge delay (1 s). mimalloc
/// keeps a thread's free pages for that thread until the thread allocates again, and
/// memory that one thread freed for another until that one looks: after an attack held
/// thousands of streams, a quiet server kept 20 MiB it no longer used; with this, under
/// 1 MiB (docs/RELIABILITY.md, "Hostile peers").
fn give_back_free_memory() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        if last.get().is_none_or(|at| at.elapsed() >= GIVE_BACK_EVERY) {
            last.set(Some(Instant::now()));
            // SAFETY: `mi_collect` takes no pointer and may be called from any thread at
            // any time; it only walks the calling thread's heap and the shared arenas.
            #[allow(unsafe_code)]
            unsafe {
                libmimalloc_sys::mi_collect(false)
            };
        }
    });
}

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(give_back_free_memory)
        .build()
        .map_err(SetupError::Runtime)?;
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
