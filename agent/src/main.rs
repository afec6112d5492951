use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use zklb_agent::{run, Args, Config};

/// The exit code of a command line or configuration that cannot work.
const USAGE: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    // Checked before anything else, ZooKeeper above all, is touched.
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("zklb-agent: {error}");
            return ExitCode::from(USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("zklb-agent: cannot listen on {}: {error}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(address) => println!("listening {address}"),
        Err(error) => {
            eprintln!("zklb-agent: {error}");
            return ExitCode::FAILURE;
        }
    }
    match run(config, listener, termination_signals()).await {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(error) => {
            eprintln!("zklb-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every SIGTERM and SIGINT, as they arrive.
fn termination_signals() -> mpsc::UnboundedReceiver<()> {
    let (sender, signals) = mpsc::unbounded_channel();
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            if sender.send(()).is_err() {
                return;
            }
        }
    });
    signals
}
