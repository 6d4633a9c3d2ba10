//! `chorus`: the server binary. Reads `WS_*` variables, refuses a bad one with exit
//! code 2 before binding anything, serves until SIGTERM or SIGINT, then drains.
//! `chorus token ...` mints a development token instead (see [`token`]).

use std::process::ExitCode;

use chorus_server::{Config, logging, start};

mod health;
mod token;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("token") => return token::run(&args[1..]),
        Some("health") => return health::run(&args[1..]),
        Some("-h" | "--help") => {
            println!("{}", token::USAGE);
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("chorus: unknown argument {other:?}\n{}", token::USAGE);
            return ExitCode::from(2);
        }
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("chorus: {err}");
            return ExitCode::from(2);
        }
    };
    logging::init(&config);
    let open_files = chorus_server::limits::raise_open_files();
    tracing::info!(?open_files, "open-file limit (each connection is one)");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("chorus: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Listening for the signals before the port is bound: a SIGTERM that comes
        // right after the first connection must drain, not kill.
        let signals = match ShutdownSignals::new() {
            Ok(signals) => signals,
            Err(err) => {
                tracing::error!(%err, "cannot listen for shutdown signals");
                return ExitCode::FAILURE;
            }
        };
        let server = match start(config).await {
            Ok(server) => server,
            Err(err) => {
                tracing::error!(%err, "start-up failed");
                eprintln!("chorus: {err}");
                return ExitCode::from(1);
            }
        };
        signals.received().await;
        server.shutdown().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// SIGTERM and SIGINT, listened for from creation on.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn received(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
        }
    }
}
