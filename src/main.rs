//! The `pullcache` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pullcache::config::Config;
use pullcache_actors::Clock;

#[derive(Parser)]
#[command(
    name = "pullcache",
    version,
    about = "A pull-through cache for container registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default): with no --config, the embedded default configuration.
    Serve {
        /// A TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration and print the effective result, secrets redacted.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write a root CA, an intermediate CA, a server certificate chain and a client
    /// certificate, and print which file goes where (pullcache, Docker, containerd,
    /// Prometheus).
    Certs(pullcache::certs::CertsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve { config: None }) {
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(c) => {
                print!("{}", c.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pullcache: {e}");
                ExitCode::from(2)
            }
        },
        Command::Certs(args) => match pullcache::certs::generate(&args) {
            Ok(w) => {
                print!("{}", pullcache::certs::instructions(&args, &w));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pullcache certs: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => {
            let cfg = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("pullcache: {e}");
                    return ExitCode::from(2);
                }
            };
            // RUST_LOG wins over log.level: it gets the same check.
            if let Ok(v) = std::env::var("RUST_LOG") {
                if let Err(e) = pullcache::telemetry::check_level(&v) {
                    eprintln!("pullcache: RUST_LOG: {e}");
                    return ExitCode::from(2);
                }
            }
            pullcache::telemetry::init(&cfg.log);
            let traces = match pullcache::telemetry::traces::init(&cfg.telemetry) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("pullcache: {e}");
                    return ExitCode::from(2);
                }
            };
            let result = actix_rt::System::new().block_on(serve(cfg));
            if let Some(t) = traces {
                t.shutdown();
            }
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("pullcache: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(cfg: Config) -> Result<(), String> {
    let running = pullcache::server::start(&cfg, Clock::system(), true)?;
    for a in &running.addrs {
        tracing::info!(listen = %a, tls = cfg.server.tls.enabled(), root = %cfg.storage.root.display(), upstreams = cfg.upstreams.len(), "pullcache serving");
    }
    let result = running.server.await.map_err(|e| e.to_string());
    // In-flight responses have finished (or the shutdown timeout passed): make metadata durable.
    if let Err(e) = running.engine.flush().await {
        tracing::error!(error = %e, "flushing metadata at shutdown failed");
    }
    tracing::info!("pullcache stopped");
    result
}
