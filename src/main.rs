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
    /// Manage the users of an htpasswd file (`[auth] htpasswd`): bcrypt entries only. A
    /// running pullcache reloads the file by itself.
    Htpasswd {
        #[command(subcommand)]
        action: HtpasswdAction,
    },
}

#[derive(Subcommand)]
enum HtpasswdAction {
    /// Add a user, or set a new password for one. The password is read from standard input
    /// (its first line), or prompted for on a terminal.
    Add {
        #[arg(long, short)]
        file: PathBuf,
        user: String,
    },
    /// Remove a user.
    Remove {
        #[arg(long, short)]
        file: PathBuf,
        user: String,
    },
    /// List the users.
    List {
        #[arg(long, short)]
        file: PathBuf,
    },
}

/// `pullcache htpasswd ...`.
fn htpasswd(action: HtpasswdAction) -> Result<(), String> {
    use pullcache::auth::file;
    match action {
        HtpasswdAction::Add { file: f, user } => {
            use std::io::{BufRead, IsTerminal, Write};
            let stdin = std::io::stdin();
            // On a terminal: a prompt, and the password not echoed.
            let echo = if stdin.is_terminal() {
                eprint!("password for {user}: ");
                let _ = std::io::stderr().flush();
                rustix::termios::tcgetattr(&stdin).ok().inspect(|t| {
                    let mut quiet = t.clone();
                    quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
                    let _ = rustix::termios::tcsetattr(
                        &stdin,
                        rustix::termios::OptionalActions::Now,
                        &quiet,
                    );
                })
            } else {
                None
            };
            let mut password = String::new();
            let read = stdin.lock().read_line(&mut password);
            if let Some(t) = echo {
                let _ =
                    rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &t);
                eprintln!();
            }
            read.map_err(|e| format!("reading the password: {e}"))?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err("empty password".into());
            }
            let replaced = file::add(&f, &user, password)?;
            eprintln!(
                "{} {user} in {}",
                if replaced { "updated" } else { "added" },
                f.display()
            );
            Ok(())
        }
        HtpasswdAction::Remove { file: f, user } => match file::remove(&f, &user)? {
            true => {
                eprintln!("removed {user} from {}", f.display());
                Ok(())
            }
            false => Err(format!("{user} is not in {}", f.display())),
        },
        HtpasswdAction::List { file: f } => {
            for u in file::list(&f)? {
                println!("{u}");
            }
            Ok(())
        }
    }
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
        Command::Htpasswd { action } => match htpasswd(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pullcache htpasswd: {e}");
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

/// Raises the soft limit of open files to the hard one, as nginx (`worker_rlimit_nofile`)
/// and Go programs do: every connection, fill and blob being sent holds descriptors, and
/// the usual soft limit of 1024 runs out long before `server.max_connections`. Warns when
/// even the hard limit is below what the configured caps can use.
fn raise_open_files_limit(cfg: &Config) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let want = lim.maximum;
    let now = match want {
        Some(max) if lim.current.is_some_and(|c| c < max) => {
            match setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(max),
                    maximum: lim.maximum,
                },
            ) {
                Ok(()) => Some(max),
                Err(_) => lim.current,
            }
        }
        _ => lim.current,
    };
    // A connection is one descriptor, plus the blob file it sends; a fill holds a socket,
    // a temporary file and a pipe; sled and the listeners take a few dozen more.
    let needed = (2 * cfg.server.max_connections + 4 * cfg.limits.max_fills + 256) as u64;
    match now {
        Some(n) if n < needed => tracing::warn!(
            open_files = n,
            needed,
            "the open-files limit (ulimit -n) is below what server.max_connections and limits.max_fills can use: raise it (LimitNOFILE= in systemd) or lower them; running out gives 503s"
        ),
        _ => tracing::debug!(open_files = ?now, "open-files limit"),
    }
}

async fn serve(cfg: Config) -> Result<(), String> {
    raise_open_files_limit(&cfg);
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
