//! docrelay: a WebSocket relay for collaborative documents, thread-per-core on
//! io_uring (glommio).
//!
//! Documents are hashed to pinned cores; each core owns its documents outright,
//! so fan-out takes no lock. `docs/architecture.md` describes the layers and
//! `docs/protocol.md` the wire protocol.
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

// Layers, bottom to top: each module may use only the modules declared
// before it (scripts/layers.py checks this in CI; docs/architecture.md).
//
// The wire and the contract: pure, no I/O.
pub mod clock;
pub mod close;
pub mod config;
pub mod http;
pub mod placement;
// The files served over plain HTTP (the client, the demo).
pub mod assets;
// WebSocket framing, then the messages carried in frames.
pub mod ws;
// Client and relay messages.
pub mod protocol;
// Per-document and per-relay state: authentication, then where history is
// kept (memory or the local log), then the documents that use it.
pub mod auth;
// History stores.
pub mod store;
// Documents, then the connection registry.
pub mod document;
pub mod registry;
// Cluster mode: the Redis bridge and what the cores exchange with it.
pub mod cluster;
// Connection validation.
pub mod validate;
// One connection, and the per-core shard of them.
pub mod session;
// The process.
pub mod runtime;

pub use config::{Config, Cores};
pub use placement::{fnv1a_64, owner_core};
pub use registry::ConnectionManager;
pub use runtime::{start, RelayHandle, RelayOptions, StartError};
pub use session::Phase;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), coloured only on
/// a terminal. Shared by the relay and the baseline binaries.
pub fn init_logging() {
    use std::io::IsTerminal;
    // glommio's reactor logs one error of its own, when its probe of a
    // device for io_uring polling fails; the log's write-only segments fail
    // it on purpose (src/store/log.rs, `create_segment`). Off unless RUST_LOG
    // names glommio itself.
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let directives =
        if directives.contains("glommio") { directives } else { format!("{directives},glommio::reactor=off") };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,glommio::reactor=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
