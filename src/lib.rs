//! docrelay: a WebSocket relay for collaborative documents, thread-per-core on
//! io_uring (glommio).
//!
//! Documents are hashed to pinned cores; each core owns its documents outright,
//! so fan-out takes no lock. See `README.md` for the architecture and
//! `docs/protocol.md` for the wire protocol.
//!
//! Tests and embedders start a relay with [`start`]:
//!
//! ```no_run
//! let mut config = docrelay::Config::default();
//! config.listen = "127.0.0.1:0".parse().unwrap();
//! let relay = docrelay::start(config, Default::default()).unwrap();
//! println!("relay on {}", relay.local_addr());
//! relay.shutdown();
//! relay.join();
//! ```

pub mod auth;
pub mod config;
pub mod document;
pub mod http;
pub mod protocol;
pub mod registry;
pub mod runtime;
pub mod session;
pub mod validate;
pub mod ws;

pub use config::{Config, Cores};
pub use registry::ConnectionManager;
pub use runtime::{fnv1a_64, owner_core, start, RelayHandle, RelayOptions, StartError};
pub use session::Phase;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), coloured only on
/// a terminal. Shared by the relay and the baseline binaries.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
