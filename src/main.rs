//! The `vibe` command line: serve, migrate, mint tokens.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vibe::auth::{Scope, TokenAuthority};
use vibe::config::Config;

/// mimalloc: a node holds hundreds of thousands of small, long-lived objects (live queries,
/// subscriptions); glibc malloc's per-thread arenas fragment them (benches/live_queries.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Vibe: a realtime backend on PostgreSQL — documents, live queries, identity and calls in one
/// server.
///
/// Configuration comes from built-in defaults, then `--config FILE`, then `VIBE_*` environment
/// variables (e.g. VIBE_LISTEN, VIBE_DATABASE_URL, VIBE_DATA_DIR; DATABASE_URL is honoured too).
/// With no database URL, `vibe serve` runs a private PostgreSQL inside the data dir.
#[derive(Debug, Parser)]
#[command(name = "vibe", version, propagate_version = true)]
struct Cli {
    /// A TOML file layered over the defaults (see config/default.toml for every key).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server until SIGINT or SIGTERM.
    Serve,
    /// Apply pending database migrations, then exit.
    Migrate,
    /// Manage capability tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new token signed with this node's root key (the operator's way in).
    Mint {
        /// Subject: the DID the token acts as, e.g. did:key:z6Mk...
        #[arg(long, value_name = "DID")]
        sub: String,
        /// A scope: `*`, `read:<type>`, `write:<type>`, `read:*`, `write:*`, or `admin` (the
        /// /v1/admin routes and app registration). Repeat for more.
        #[arg(long = "scope", value_name = "SCOPE", required = true)]
        scopes: Vec<Scope>,
        /// Lifetime, e.g. `30m`, `12h`, `7d` (default: tokens.default_ttl).
        #[arg(long, value_parser = token_ttl, value_name = "DURATION")]
        ttl: Option<Duration>,
    },
}

/// A `--ttl`: a duration, not zero (a token expired at birth is a mistake, not a request).
fn token_ttl(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(ttl) if ttl.is_zero() => Err("a token's lifetime must be longer than 0".to_owned()),
        Ok(ttl) => Ok(ttl),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match start(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line (with causes), not a debug dump with a backtrace.
            eprintln!("vibe: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many messages already end with their
/// cause's text (`cannot listen on …: Address already in use`), which `{:#}` would repeat.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.ends_with(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

fn start(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    vibe::telemetry::init_logging(&config.log);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run(cli.command, config))
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            vibe::server::prepare_data_dir(&config)?;
            let db = vibe::server::Database::open(&config, true).await?;
            let result = db.store.migrate().await;
            db.close().await?;
            result?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Token(TokenCommand::Mint { sub, scopes, ttl }) => {
            vibe::server::prepare_data_dir(&config)?;
            let key = config.data_dir.join(vibe::auth::ROOT_KEY_FILE);
            if !key.exists() {
                // Most likely the wrong data dir: a running server would refuse this token.
                tracing::warn!(
                    path = %key.display(),
                    "no root key in this data dir: creating one; only a server on this data dir \
                     accepts the token (set VIBE_DATA_DIR or data_dir to the server's)"
                );
            }
            let authority = TokenAuthority::load_or_create(&config.data_dir)?;
            let token = authority.mint(&sub, &scopes, ttl.unwrap_or(config.tokens.default_ttl))?;
            #[allow(clippy::print_stdout)] // the token is this command's output
            {
                println!("{token}");
            }
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = vibe::server::start(config).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down (a second SIGINT or SIGTERM stops at once)");
    // A second signal cuts the grace periods short; the embedded database is still stopped.
    // Were the signal handler unable to wait again, the orderly shutdown simply runs on.
    let again = async {
        if wait_for_signal().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match server.shutdown_unless(again).await? {
        vibe::server::Shutdown::Orderly => {
            tracing::info!("stopped");
            Ok(())
        }
        // A supervisor must be able to tell this from a clean stop.
        vibe::server::Shutdown::CutShort => {
            anyhow::bail!("stopped at a second signal: in-flight work was cut off")
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
