//! The `docrelay` command: `serve` and `print-config` (README, "Run it").

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use docrelay::{Config, Cores, RelayOptions};
use signal_hook::consts::{SIGINT, SIGTERM};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings: a background thread gives freed pages back to the
/// system within about a second, off the cores' threads.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[derive(Parser)]
#[command(name = "docrelay", version, about = "WebSocket relay for collaborative documents")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve {
        /// TOML configuration file; flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on: 127.0.0.1:9001, [::1]:9001 or localhost:9001.
        #[arg(long)]
        listen: Option<String>,
        /// CPUs to run on: `all`, or a list like `0,2-3`.
        #[arg(long)]
        cores: Option<String>,
        /// Allow `dev` authentication on a non-loopback address.
        #[arg(long)]
        allow_insecure: bool,
    },
    /// Print the full default configuration as commented TOML.
    PrintConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve { config: None, listen: None, cores: None, allow_insecure: false }) {
        Command::PrintConfig => {
            print!("{}", docrelay::config::DEFAULT_CONFIG_TOML);
            ExitCode::SUCCESS
        }
        Command::Serve { config, listen, cores, allow_insecure } => {
            docrelay::init_logging();
            match serve(config, listen, cores, allow_insecure) {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    eprintln!("docrelay: {message}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(
    file: Option<PathBuf>,
    listen: Option<String>,
    cores: Option<String>,
    allow_insecure: bool,
) -> Result<(), String> {
    let mut config = match &file {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(addr) = listen {
        config.listen = docrelay::config::parse_listen(&addr).map_err(|e| e.to_string())?;
    }
    if let Some(c) = cores {
        config.cores = Cores::parse(&c).map_err(|e| e.to_string())?;
    }
    // Register for signals before the relay starts, so none is lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(|e| e.to_string())?;
    let relay = docrelay::start(config, RelayOptions { allow_insecure, ..RelayOptions::default() })
        .map_err(|e| e.to_string())?;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down: closing sessions with 1001");
    }
    relay.shutdown();
    relay.join();
    tracing::info!("stopped");
    Ok(())
}
