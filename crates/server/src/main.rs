//! `chorus`: the server binary. Reads `WS_*` variables, refuses a bad one with exit
//! code 2 before binding anything, serves until SIGTERM or SIGINT, then drains.

use std::process::ExitCode;

use chorus_server::{Config, logging, start};

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("chorus: {err}");
            return ExitCode::from(2);
        }
    };
    logging::init(&config);
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
        let server = match start(config).await {
            Ok(server) => server,
            Err(err) => {
                tracing::error!(%err, "start-up failed");
                eprintln!("chorus: {err}");
                return ExitCode::from(1);
            }
        };
        if let Err(err) = shutdown_signal().await {
            tracing::error!(%err, "cannot listen for shutdown signals");
            return ExitCode::FAILURE;
        }
        server.shutdown().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
