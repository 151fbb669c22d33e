//! The relay's configuration: a TOML file, overridden by command-line flags,
//! over built-in defaults. Every queue, buffer and timeout the relay uses has a
//! named limit here, so an operator can see and bound all of them in one place.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The full default configuration, as `docrelay print-config` prints it.
///
/// A unit test parses this text and checks that it equals `Config::default()`,
/// so the printed defaults can never drift from the real ones.
pub const DEFAULT_CONFIG_TOML: &str = r#"# docrelay configuration. Every key is optional; these are the defaults.
# Flags given to `docrelay serve` override this file.

# Address the relay listens on (HTTP/1.1 and WebSocket on one port): an IP
# address or a host name such as "localhost:9001" (resolved at start; an IPv4
# address is preferred when the name has several).
listen = "127.0.0.1:9001"
# CPUs to run on, one pinned executor per CPU: "all", or a list such as [0, 1].
cores = "all"

[limits]
# Largest WebSocket message (all fragments together); larger closes with 1009.
max_message_bytes = 1048576
# Largest HTTP request head; larger is answered 431.
max_head_bytes = 8192
# The request head must arrive within this time, or the connection is closed.
handshake_timeout_ms = 5000
# A session must authenticate within this time, or it is closed with 4008.
auth_timeout_ms = 10000
# No frame from the client for this long: close 1001 "idle timeout".
idle_timeout_ms = 60000
# The relay pings a client that has sent nothing for this long.
ping_interval_ms = 20000
# Connections open at once on the whole relay; more are closed with 4029.
# Not set: derived at start from the open-file limit (ulimit -n, raised to its
# hard limit), less a reserve for the relay's own files. A value set here that
# the limit cannot hold is kept, and a warning says so.
# max_connections = 100000
# Operations and cursor updates per second per connection; 0 = unlimited.
max_ops_per_sec = 0
max_cursor_per_sec = 0
# A client over its rate for this long is closed with 1008.
rate_limit_grace_ms = 5000
# Bytes of direct replies queued for one client before the relay stops
# reading from it; a queue that still grows past twice this closes with 1008.
max_send_buffer_bytes = 1048576
# Payload bytes of operations in one sync_response page (at least one
# operation per page, a snapshot not counted): a longer history comes in
# pages that the client asks for one at a time ("more": true).
max_sync_bytes = 1048576
# Deepest nesting of arrays and objects inside an operation payload, a cursor
# payload or a snapshot state; deeper is refused with BAD_MESSAGE.
max_json_depth = 64
# Connections waiting to move to their document's core, per core.
handoff_queue = 4096
# Time a connection validator may take to deliver its verdict (then 1011).
validation_timeout_ms = 5000
# Verdicts waiting to be collected, per core; a full queue makes publish fail.
validation_queue = 1024
# After the relay sends Close, how long it waits for the client's Close.
close_timeout_ms = 1000
# On SIGINT/SIGTERM, how long sessions get to finish their close handshake.
shutdown_grace_ms = 2000

[documents]
# Operations kept in a document's broadcast ring.
ring_capacity = 1024
# Cursor and join/leave updates kept in a document's presence ring.
presence_ring_capacity = 256
# Operations kept in memory per document for sync_request.
history_ops = 10000
# A document with no sessions frees its memory after this long.
idle_unload_ms = 30000
# Participants listed in joined_document; the rest are paged with
# list_participants.
max_participants_listed = 100
# Sessions joined to one document at once; one more gets DOCUMENT_FULL.
max_sessions = 10000
# Largest state of a Yjs room (/yjs/{document}, docs/yjs.md), as its merged
# update; an update that would make it larger is refused, and the room goes on.
max_room_bytes = 67108864
# With storage.dir: a Yjs room's updates are stored one by one, and after
# this many (or more bytes than its state and 1 MiB) its whole state is
# stored as one merged update, and the updates before it are reclaimed.
yjs_compact_after = 1000

[auth]
# "dev" accepts any non-empty token (never on a public address), or "jwt".
mode = "dev"
# The HS256 secret (at least 32 bytes), or where to read it from instead, so
# that it need not sit in this file: a file (its content, without a trailing
# newline) or an environment variable (its name). At most one of the three.
jwt_secret = ""
jwt_secret_file = ""
jwt_secret_env = ""
# RS256 or ES256 public key (PEM) instead of a secret.
jwt_public_key_file = ""
# Seconds of clock difference allowed when checking exp, nbf and iat.
jwt_leeway_secs = 30

[validation]
# Browser origins allowed to connect; empty = any. No Origin header passes.
allowed_origins = []
# Connections at once from one IP address; 0 = unlimited.
max_connections_per_ip = 0

[storage]
# Directory of the write-ahead log (docs/storage.md); empty = history in memory
# only, lost on restart or when a document is unloaded. Created if missing;
# one relay per directory (it holds dir/LOCK).
dir = ""
# When an operation counts as stored, and is acknowledged and broadcast:
# "always" = after its own write, synced (operations arriving during a
# sync share the next one); "batch" = after a group commit that waits up to
# batch_ms to gather records under one sync; "never" = at once, written
# within batch_ms without a sync (README, "Durability": what a crash loses).
fsync = "batch"
# Longest a record waits for its group commit (0..=1000).
batch_ms = 2
# A log segment is closed and a new one started at about this size; segments
# without live records are deleted (65536..=4294967296).
segment_bytes = 67108864
# Make each core's next segment ahead of need (from its second since start)
# full of zeros (synced), so that the log's writes overwrite allocated blocks
# and their syncs flush only data: faster syncs, and a core's disk use includes
# up to two whole segments (the current one and the next). false = segments
# grow as they are written.
preallocate = true

[http]
# Serve the JavaScript client at GET /docrelay.js and a live demo board at
# GET /demo (README, "The demo"). Not set: on when auth.mode = "dev", off in
# "jwt" mode. The relay logs the demo's address at start when it is on.
# demo = true

[cluster]
# Redis that the nodes of a cluster share (docs/cluster.md), e.g.
# "redis://10.0.0.5:6379/0"; empty = a single node, as without it. With it,
# every operation is sequenced in Redis, and clients of one document on any
# node see one order, one history and everyone's presence. Not together with
# storage.dir (the history is Redis's).
redis_url = ""
# redis_url names one node of a Redis Cluster (sharded): commands go to the
# primary of each document's slot (every key of a document shares its slot).
redis_cluster = false
# This node's name in Redis (presence, heartbeats). Empty: host name and pid.
node_id = ""
# A node that stops without a goodbye is taken for dead this long after its
# last heartbeat: its sessions leave their documents on the other nodes.
node_timeout_ms = 10000
# Operations kept in each document's Redis stream, for catch-up and sync.
# Not set: documents.history_ops.
# stream_max_ops = 10000
# Requests waiting for the Redis bridge, per core; while full, sessions on
# that core are not read from (back-pressure), nothing is buffered beyond.
queue = 4096

[metrics]
# A separate address for /metrics, e.g. "127.0.0.1:9100", so that it need not
# be reachable where clients connect; then the main address does not serve it.
# Empty = /metrics on the main address.
listen = ""

[testing]
# A route such as "/ws/echo" that echoes every message, for the Autobahn
# conformance suite; empty = no such route.
echo_path = ""
"#;

/// Which CPUs run relay executors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cores {
    /// Every CPU this process may run on.
    All,
    /// These CPU ids, one executor pinned to each, in this order.
    List(Vec<usize>),
}

impl Cores {
    /// Parses the command-line form: `all`, or ids and ranges like `0,2-3`.
    pub fn parse(text: &str) -> Result<Cores, ConfigError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("all") {
            return Ok(Cores::All);
        }
        let bad = || ConfigError::Invalid(format!("cores: `{text}` is not `all` or a CPU list like `0,2-3`"));
        let mut ids = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => {
                    let a: usize = a.trim().parse().map_err(|_| bad())?;
                    let b: usize = b.trim().parse().map_err(|_| bad())?;
                    if a > b || b - a > 4096 {
                        return Err(bad());
                    }
                    ids.extend(a..=b);
                }
                None => ids.push(part.parse().map_err(|_| bad())?),
            }
        }
        Cores::from_list(ids)
    }

    fn from_list(ids: Vec<usize>) -> Result<Cores, ConfigError> {
        if ids.is_empty() {
            return Err(ConfigError::Invalid("cores: the list is empty".into()));
        }
        let mut seen = ids.clone();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid(format!("cores: CPU {} is listed twice", w[0])));
        }
        Ok(Cores::List(ids))
    }

    /// Resolves to concrete CPU ids, checking each against the CPUs this
    /// process is allowed to run on.
    pub fn resolve(&self) -> Result<Vec<usize>, ConfigError> {
        let allowed = allowed_cpus()?;
        match self {
            Cores::All => Ok(allowed),
            Cores::List(ids) => {
                for id in ids {
                    if !allowed.contains(id) {
                        return Err(ConfigError::Invalid(format!(
                            "cores: CPU {id} does not exist or is not available to this process (available: {})",
                            format_cpu_list(&allowed)
                        )));
                    }
                }
                Ok(ids.clone())
            }
        }
    }
}

/// The CPUs this process may run on (its affinity mask).
fn allowed_cpus() -> Result<Vec<usize>, ConfigError> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into the set we own, for this process (pid 0).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(ConfigError::Invalid(format!(
                "cannot read the CPU affinity of this process: {}",
                std::io::Error::last_os_error()
            )));
        }
        set
    };
    // SAFETY: CPU_ISSET only reads the set, for ids below CPU_SETSIZE.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect();
    Ok(cpus)
}

fn format_cpu_list(cpus: &[usize]) -> String {
    cpus.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
}

/// Resolves a listen address: `IP:PORT`, or `HOST:PORT` through the system
/// resolver (an IPv4 address is preferred when the name has several).
pub fn parse_listen(text: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = |why: String| ConfigError::Invalid(format!("listen: `{text}` {why}"));
    if text.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
        return Err(bad("is not HOST:PORT (e.g. 127.0.0.1:9001 or localhost:9001)".into()));
    }
    let addrs: Vec<SocketAddr> = text.to_socket_addrs().map_err(|e| bad(format!("cannot be resolved: {e}")))?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| bad("resolves to no address".into()))
}

fn listen_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

impl<'de> Deserialize<'de> for Cores {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            List(Vec<usize>),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => Cores::parse(&t).map_err(serde::de::Error::custom),
            Raw::List(l) => Cores::from_list(l).map_err(serde::de::Error::custom),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    pub cores: Cores,
    pub limits: Limits,
    pub documents: Documents,
    pub auth: Auth,
    pub validation: Validation,
    pub storage: Storage,
    pub http: Http,
    pub cluster: Cluster,
    pub metrics: Metrics,
    pub testing: Testing,
}

/// Limits on every per-connection and per-core resource.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_head_bytes: usize,
    pub handshake_timeout_ms: u64,
    pub auth_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub ping_interval_ms: u64,
    /// `None`: derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    pub max_ops_per_sec: u32,
    pub max_cursor_per_sec: u32,
    pub rate_limit_grace_ms: u64,
    pub max_send_buffer_bytes: usize,
    pub max_sync_bytes: usize,
    pub max_json_depth: usize,
    pub handoff_queue: usize,
    pub validation_timeout_ms: u64,
    pub validation_queue: usize,
    pub close_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
}

/// Per-document buffers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Documents {
    pub ring_capacity: usize,
    pub presence_ring_capacity: usize,
    pub history_ops: usize,
    pub idle_unload_ms: u64,
    pub max_participants_listed: usize,
    pub max_sessions: usize,
    pub max_room_bytes: usize,
    pub yjs_compact_after: u64,
}

/// How `authenticate` checks tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Dev,
    Jwt,
}

#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub mode: AuthMode,
    pub jwt_secret: String,
    pub jwt_secret_file: String,
    pub jwt_secret_env: String,
    pub jwt_public_key_file: String,
    pub jwt_leeway_secs: u64,
}

/// `Debug` without the secret: a formatted or logged configuration shows
/// only whether `jwt_secret` is set (the file and variable are names).
impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = if self.jwt_secret.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .field("jwt_secret", &secret)
            .field("jwt_secret_file", &self.jwt_secret_file)
            .field("jwt_secret_env", &self.jwt_secret_env)
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwt_leeway_secs", &self.jwt_leeway_secs)
            .finish()
    }
}

/// The built-in connection validators.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Validation {
    pub allowed_origins: Vec<String>,
    pub max_connections_per_ip: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    Always,
    Batch,
    Never,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    pub dir: String,
    pub fsync: Fsync,
    pub batch_ms: u64,
    pub segment_bytes: u64,
    pub preallocate: bool,
}

/// Cluster mode on Redis (`docs/cluster.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// Empty: a single node.
    pub redis_url: String,
    /// `redis_url` is a seed node of a Redis Cluster.
    pub redis_cluster: bool,
    /// Empty: [`Cluster::node_name`] makes one of the host name and pid.
    pub node_id: String,
    pub node_timeout_ms: u64,
    /// `None`: `documents.history_ops`.
    pub stream_max_ops: Option<usize>,
    pub queue: usize,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            redis_url: String::new(),
            redis_cluster: false,
            node_id: String::new(),
            node_timeout_ms: 10_000,
            stream_max_ops: None,
            queue: 4096,
        }
    }
}

impl Cluster {
    /// Whether the relay runs as a node of a cluster.
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }

    /// The node's name: `node_id`, else `HOST-PID`.
    pub fn node_name(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        format!("{}-{}", if host.is_empty() { "node" } else { host }, std::process::id())
    }
}

/// What the main address serves beside the WebSocket routes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// `GET /docrelay.js` and `GET /demo`; `None`: see [`Http::demo_enabled`].
    pub demo: Option<bool>,
}

impl Http {
    /// Whether the client and the demo are served: as set, else on in `dev`
    /// mode (loopback only, where anyone may join anyway) and off in `jwt` mode.
    pub fn demo_enabled(&self, mode: AuthMode) -> bool {
        self.demo.unwrap_or(mode == AuthMode::Dev)
    }
}

/// Where `/metrics` is served.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Empty: on the main address. Resolved by [`Metrics::address`].
    pub listen: String,
}

impl Metrics {
    /// The separate metrics address, if one is set.
    pub fn address(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        parse_listen(&self.listen).map(Some).map_err(|e| {
            ConfigError::Invalid(format!("metrics.{}", e.to_string().trim_start_matches("invalid configuration: ")))
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Testing {
    pub echo_path: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            cores: Cores::All,
            limits: Limits::default(),
            documents: Documents::default(),
            auth: Auth::default(),
            validation: Validation::default(),
            storage: Storage::default(),
            http: Http::default(),
            cluster: Cluster::default(),
            metrics: Metrics::default(),
            testing: Testing::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1 << 20,
            max_head_bytes: 8192,
            handshake_timeout_ms: 5000,
            auth_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            ping_interval_ms: 20_000,
            max_connections: None,
            max_ops_per_sec: 0,
            max_cursor_per_sec: 0,
            rate_limit_grace_ms: 5000,
            max_send_buffer_bytes: 1 << 20,
            max_sync_bytes: 1 << 20,
            max_json_depth: 64,
            handoff_queue: 4096,
            validation_timeout_ms: 5000,
            validation_queue: 1024,
            close_timeout_ms: 1000,
            shutdown_grace_ms: 2000,
        }
    }
}

impl Default for Documents {
    fn default() -> Self {
        Documents {
            ring_capacity: 1024,
            presence_ring_capacity: 256,
            history_ops: 10_000,
            idle_unload_ms: 30_000,
            max_participants_listed: 100,
            max_sessions: 10_000,
            max_room_bytes: 64 << 20,
            yjs_compact_after: 1000,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            mode: AuthMode::Dev,
            jwt_secret: String::new(),
            jwt_secret_file: String::new(),
            jwt_secret_env: String::new(),
            jwt_public_key_file: String::new(),
            jwt_leeway_secs: 30,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage { dir: String::new(), fsync: Fsync::Batch, batch_ms: 2, segment_bytes: 64 << 20, preallocate: true }
    }
}

/// What can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses TOML text; unknown keys are errors so a typo never goes unnoticed.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Checks the values against each other and against sane bounds. Called by
    /// the relay at start, so a bad value is an error message, never a panic.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if l.max_message_bytes == 0 {
            return invalid("limits.max_message_bytes must be at least 1");
        }
        if l.max_head_bytes < 256 || l.max_head_bytes > 1 << 20 {
            return invalid("limits.max_head_bytes must be between 256 and 1048576");
        }
        for (name, v) in [
            ("limits.handshake_timeout_ms", l.handshake_timeout_ms),
            ("limits.auth_timeout_ms", l.auth_timeout_ms),
            ("limits.idle_timeout_ms", l.idle_timeout_ms),
            ("limits.ping_interval_ms", l.ping_interval_ms),
            ("limits.validation_timeout_ms", l.validation_timeout_ms),
            ("limits.close_timeout_ms", l.close_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if l.max_connections == Some(0) {
            return invalid("limits.max_connections must be at least 1 (or not set, to derive it from ulimit -n)");
        }
        if l.max_send_buffer_bytes < 1024 {
            return invalid("limits.max_send_buffer_bytes must be at least 1024");
        }
        if l.handoff_queue == 0 || l.validation_queue == 0 {
            return invalid("limits.handoff_queue and limits.validation_queue must be at least 1");
        }
        if l.max_sync_bytes == 0 {
            return invalid("limits.max_sync_bytes must be at least 1");
        }
        if !(1..=100_000).contains(&l.max_json_depth) {
            return invalid("limits.max_json_depth must be between 1 and 100000");
        }
        let d = &self.documents;
        if d.ring_capacity == 0 || d.presence_ring_capacity == 0 {
            return invalid("documents.ring_capacity and documents.presence_ring_capacity must be at least 1");
        }
        if d.max_participants_listed == 0 || d.max_sessions == 0 {
            return invalid("documents.max_participants_listed and documents.max_sessions must be at least 1");
        }
        let a = &self.auth;
        let sources = [&a.jwt_secret, &a.jwt_secret_file, &a.jwt_secret_env, &a.jwt_public_key_file];
        if sources.iter().filter(|s| !s.is_empty()).count() > 1 {
            return invalid(
                "auth: set only one of jwt_secret, jwt_secret_file, jwt_secret_env and jwt_public_key_file",
            );
        }
        if a.mode == AuthMode::Jwt && sources.iter().all(|s| s.is_empty()) {
            return invalid(
                "auth.mode = \"jwt\" needs auth.jwt_secret, auth.jwt_secret_file, auth.jwt_secret_env or auth.jwt_public_key_file",
            );
        }
        if a.jwt_leeway_secs > 86_400 {
            return invalid("auth.jwt_leeway_secs must be between 0 and 86400");
        }
        self.metrics.address()?;
        let st = &self.storage;
        if st.batch_ms > 1000 {
            return invalid("storage.batch_ms must be between 0 and 1000");
        }
        if !(65536..=1 << 32).contains(&st.segment_bytes) {
            return invalid("storage.segment_bytes must be between 65536 and 4294967296");
        }
        let c = &self.cluster;
        if c.enabled() {
            if !self.storage.dir.is_empty() {
                return invalid(
                    "cluster.redis_url and storage.dir cannot be set together: in cluster mode the history \
                     lives in Redis (make Redis durable with appendonly, docs/cluster.md); leave storage.dir empty",
                );
            }
            if !(c.redis_url.starts_with("redis://") || c.redis_url.starts_with("unix://")) {
                return invalid("cluster.redis_url must start with redis:// (or unix://)");
            }
            if !(1000..=600_000).contains(&c.node_timeout_ms) {
                return invalid("cluster.node_timeout_ms must be between 1000 and 600000");
            }
            if c.queue == 0 {
                return invalid("cluster.queue must be at least 1");
            }
            if c.node_id.len() > 128 || c.node_id.bytes().any(|b| !b.is_ascii_graphic() || b == b'|') {
                return invalid(
                    "cluster.node_id must be at most 128 printable ASCII characters, without spaces or '|'",
                );
            }
        }
        let echo = &self.testing.echo_path;
        if !echo.is_empty()
            && (!echo.starts_with('/')
                || echo.starts_with("/ws/documents")
                || echo.starts_with("/yjs/")
                || ["/healthz", "/metrics", "/docrelay.js", "/demo"].contains(&echo.as_str()))
        {
            return invalid("testing.echo_path must start with '/' and not shadow another route");
        }
        Ok(())
    }

    pub(crate) fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_defaults_are_the_real_defaults() {
        let parsed = Config::from_toml(DEFAULT_CONFIG_TOML, "default").unwrap();
        assert_eq!(parsed, Config::default());
        parsed.validate().unwrap();
    }

    #[test]
    fn core_lists() {
        assert_eq!(Cores::parse("all").unwrap(), Cores::All);
        assert_eq!(Cores::parse("1").unwrap(), Cores::List(vec![1]));
        assert_eq!(Cores::parse("0,2-3").unwrap(), Cores::List(vec![0, 2, 3]));
        assert!(Cores::parse("").is_err());
        assert!(Cores::parse("1,1").is_err());
        assert!(Cores::parse("3-1").is_err());
        assert!(Cores::parse("x").is_err());
        let c: Config = Config::from_toml("cores = [0]", "t").unwrap();
        assert_eq!(c.cores, Cores::List(vec![0]));
        assert!(Config::from_toml("cores = []", "t").is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Config::from_toml("lisen = \"127.0.0.1:1\"", "t").is_err());
        assert!(Config::from_toml("[limits]\nmax_mesage_bytes = 1", "t").is_err());
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        assert_eq!(parse_listen("127.0.0.1:9001").unwrap(), "127.0.0.1:9001".parse().unwrap());
        assert_eq!(parse_listen("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        let local = parse_listen("localhost:9001").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 9001, "{local}");
        for bad in ["localhost", ":9001", "localhost:x", "localhost:70000"] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
        let c = Config::from_toml("listen = \"localhost:0\"", "t").unwrap();
        assert!(c.listen.ip().is_loopback());
    }

    #[test]
    fn storage_bounds_are_checked() {
        let mut c = Config::default();
        c.storage.dir = "/var/lib/docrelay".into();
        assert!(c.validate().is_ok());
        c.storage.segment_bytes = 1000;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("storage.segment_bytes"), "{err}");
    }

    #[test]
    fn max_connections_is_derived_unless_set() {
        assert_eq!(Config::default().limits.max_connections, None);
        let c = Config::from_toml("[limits]\nmax_connections = 50", "t").unwrap();
        assert_eq!(c.limits.max_connections, Some(50));
        let c = Config::from_toml("[limits]\nmax_connections = 0", "t").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_demo_follows_the_auth_mode_unless_set() {
        let c = Config::default();
        assert_eq!(c.http.demo, None);
        assert!(c.http.demo_enabled(AuthMode::Dev));
        assert!(!c.http.demo_enabled(AuthMode::Jwt));
        let c = Config::from_toml("[http]\ndemo = false", "t").unwrap();
        assert!(!c.http.demo_enabled(AuthMode::Dev));
        let c = Config::from_toml("[http]\ndemo = true", "t").unwrap();
        assert!(c.http.demo_enabled(AuthMode::Jwt));
        // print-config names the key and says what "not set" means.
        assert!(DEFAULT_CONFIG_TOML.contains("[http]\n"));
        assert!(DEFAULT_CONFIG_TOML.contains("# demo = true"));
        assert!(DEFAULT_CONFIG_TOML.contains(r#"on when auth.mode = "dev""#));
    }

    #[test]
    fn missing_cpu_is_an_error() {
        let err = Cores::List(vec![100_000]).resolve().unwrap_err();
        assert!(err.to_string().contains("CPU 100000 does not exist"), "{err}");
    }
}
