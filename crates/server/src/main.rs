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
