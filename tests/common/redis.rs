//! A real `redis-server` for the cluster tests (`tests/cluster.rs`): one per
//! test, on a free port of 127.0.0.1, in a temporary directory, durable
//! (`appendonly yes`, `appendfsync always`, no RDB snapshots), so that a stop
//! and [`Redis::start_again`] on the same port and directory keeps every
//! acknowledged write. It can be stopped (SIGTERM), killed (SIGKILL) and
//! started again, and sent raw commands (`FLUSHALL`) over a tiny RESP
//! client. No Redis crate: RESP over a `TcpStream` is all the tests need.
//!
//! The server comes from Debian's `redis-server` package (`.ci/run` installs
//! it); `$REDIS_SERVER` names another binary.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

/// How long the server gets to start (load its append-only file and answer
/// PING) or to exit after SIGTERM.
const PATIENCE: Duration = Duration::from_secs(15);

/// A reply of the Redis protocol (RESP2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nabc` (`None`: the null bulk string `$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...` (`None`: the null array `*-1`).
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text, for assertions and messages: a simple string, an
    /// error (prefixed `-`), an integer or a bulk string; `None` for nulls
    /// and arrays.
    pub fn text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Error(e) => Some(format!("-{e}")),
            Resp::Integer(i) => Some(i.to_string()),
            Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Resp::Bulk(None) | Resp::Array(_) => None,
        }
    }
}

/// Writes one command as a RESP array of bulk strings.
pub fn write_command(out: &mut impl Write, args: &[&[u8]]) -> std::io::Result<()> {
    let mut buf = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
    out.write_all(&buf)?;
    out.flush()
}

/// Reads one RESP reply.
pub fn read_reply(input: &mut impl BufRead) -> std::io::Result<Resp> {
    let bad = |what: String| std::io::Error::new(ErrorKind::InvalidData, what);
    let mut line = Vec::new();
    input.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "redis closed the connection"));
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad(format!("a RESP line without CRLF: {:?}", String::from_utf8_lossy(&line))));
    }
    let body = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let int = |s: &str| s.parse::<i64>().map_err(|_| bad(format!("not a RESP integer: {s:?}")));
    match line[0] {
        b'+' => Ok(Resp::Simple(body)),
        b'-' => Ok(Resp::Error(body)),
        b':' => Ok(Resp::Integer(int(&body)?)),
        b'$' => {
            let n = int(&body)?;
            if n < 0 {
                return Ok(Resp::Bulk(None));
            }
            let mut data = vec![0; n as usize + 2];
            input.read_exact(&mut data)?;
            if !data.ends_with(b"\r\n") {
                return Err(bad("a bulk string without its CRLF".into()));
            }
            data.truncate(n as usize);
            Ok(Resp::Bulk(Some(data)))
        }
        b'*' => {
            let n = int(&body)?;
            if n < 0 {
                return Ok(Resp::Array(None));
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(read_reply(input)?);
            }
            Ok(Resp::Array(Some(items)))
        }
        other => Err(bad(format!("unknown RESP type byte {:?}", other as char))),
    }
}

/// Sends one command to the Redis at `addr` on a new connection (timeouts
/// of `timeout` on connect, read and write) and returns its reply.
pub fn command_at(addr: SocketAddr, args: &[&str], timeout: Duration) -> std::io::Result<Resp> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    write_command(&mut writer, &args)?;
    read_reply(&mut BufReader::new(stream))
}

/// The `redis-server` binary: `$REDIS_SERVER`, else `redis-server` on `PATH`.
fn server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

/// A port of 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A free port whose cluster bus port (+10000) is free as well, taken below
/// the ephemeral range (32768 and up), where connections do not land.
fn free_cluster_port() -> u16 {
    let mut x = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
        ^ std::process::id().rotate_left(16);
    loop {
        // xorshift: a different port each try, and per process.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let port = 20_000 + (x % 12_000) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// A Redis Cluster of primaries only, each a `redis-server` with
/// `--cluster-enabled yes` in its own temporary directory, joined with
/// `redis-cli --cluster create`; every slot is served once it returns.
pub struct RedisCluster {
    pub servers: Vec<Redis>,
}

impl RedisCluster {
    pub fn start(primaries: usize) -> RedisCluster {
        let args =
            ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"];
        let servers: Vec<Redis> = (0..primaries).map(|_| Redis::start_with(&args)).collect();
        let addrs: Vec<String> = servers.iter().map(|r| format!("127.0.0.1:{}", r.port())).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian's redis-tools, installed with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + PATIENCE;
        for r in &servers {
            loop {
                let info = r.command(&["CLUSTER", "INFO"]).text().unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not come up: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { servers }
    }

    /// A seed node's URL, for `cluster.redis_url` with `redis_cluster = true`.
    pub fn url(&self) -> String {
        self.servers[0].url()
    }
}

/// What became of one attempt to start the server.
enum Started {
    Up(Child),
    /// The port was taken (by another test's socket, or a connection that
    /// happened to get it as its local port): try again.
    PortInUse(String),
}

/// A running `redis-server`, killed (SIGKILL) when dropped.
pub struct Redis {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// Arguments beside the usual ones (cluster mode).
    extra: Vec<String>,
}

impl Redis {
    /// Starts a server on a free port in a new temporary directory and
    /// waits until it answers PING with `+PONG`.
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// [`Redis::start`] with more arguments. With `--cluster-enabled`, the
    /// port is one whose cluster bus port (port + 10000) is free too.
    pub fn start_with(extra: &[&str]) -> Redis {
        let dir = TempDir::new("redis");
        let deadline = Instant::now() + PATIENCE;
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let cluster = extra.iter().any(|a| a == "--cluster-enabled");
        loop {
            let port = if cluster { free_cluster_port() } else { free_port() };
            match spawn_server(dir.path(), port, &extra, deadline) {
                Started::Up(child) => return Redis { dir, port, child: Some(child), extra },
                Started::PortInUse(log) => {
                    assert!(Instant::now() < deadline, "redis-server found no free port; its log:\n{log}")
                }
            }
        }
    }

    /// The port it listens on (the same after [`Redis::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:PORT/`, for `cluster.redis_url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its data directory (the append-only files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the server process is running (started and not yet stopped
    /// or killed, and not dead of anything else).
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The server's log so far (all of its runs).
    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    /// Stops the server with SIGTERM (it writes its append-only file and
    /// exits) and waits, bounded, for it to exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("redis-server is running (stop after start)");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(redis-server, SIGTERM): {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for redis-server") {
                assert!(status.success(), "redis-server exited with {status} after SIGTERM; its log:\n{}", self.log());
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server still running {PATIENCE:?} after SIGTERM; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server with SIGKILL (nothing is written on the way out) and
    /// reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("redis-server is running (kill after start)");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on the same port and directory (after
    /// [`Redis::stop`] or [`Redis::kill`]): it loads its append-only file.
    /// Waits until it answers PING. A port still taken for a moment (a
    /// client's connection that got it as its local port while nothing
    /// listened there) is retried for a few seconds.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again: redis-server is still running");
        let deadline = Instant::now() + PATIENCE;
        loop {
            match spawn_server(self.dir.path(), self.port, &self.extra, deadline) {
                Started::Up(child) => {
                    self.child = Some(child);
                    return;
                }
                Started::PortInUse(log) => {
                    assert!(
                        Instant::now() < deadline,
                        "redis-server cannot listen on its port {} again (in use); its log:\n{log}",
                        self.port
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Sends one command (e.g. `["FLUSHALL"]`, `["SET", "k", "v"]`) and
    /// returns the reply; panics if the server cannot be reached.
    #[track_caller]
    pub fn command(&self, args: &[&str]) -> Resp {
        command_at(self.addr(), args, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("redis command {args:?} on port {}: {e}; its log:\n{}", self.port, self.log()))
    }

    /// Whether the server answers PING with `+PONG` right now.
    pub fn ping(&self) -> bool {
        ping(self.addr(), Duration::from_millis(500))
    }
}

/// The server's log file in `dir` (all of its runs there).
fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
}

/// One start: spawns the server on `port` with its data in `dir` and waits
/// until it answers PING, or reports that the port was in use. Panics on any
/// other failure.
fn spawn_server(dir: &Path, port: u16, extra: &[String], deadline: Instant) -> Started {
    let log_before = read_log(dir).len();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let port = port.to_string();
    let dir_s = dir.to_str().expect("a UTF-8 temporary directory").to_string();
    let log_file = dir.join("redis.log").to_str().unwrap().to_string();
    let mut cmd = Command::new(server_binary());
    cmd.args(["--port", &port, "--bind", "127.0.0.1", "--dir", &dir_s])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
        .args(["--daemonize", "no", "--logfile", &log_file])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "`{}` not found: the cluster tests need a real Redis server. Install it \
             (`apt-get install redis-server`, which .ci/run does) or set $REDIS_SERVER to one",
            server_binary()
        ),
        Err(e) => panic!("starting {}: {e}", server_binary()),
    };
    loop {
        if let Some(status) = child.try_wait().expect("waiting for redis-server") {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            let log = read_log(dir);
            let this_run = log.get(log_before..).unwrap_or(&log).to_string();
            if this_run.contains("Address already in use") || stderr.contains("Address already in use") {
                return Started::PortInUse(this_run);
            }
            panic!("redis-server exited at start ({status}); stderr:\n{stderr}\nits log:\n{this_run}");
        }
        if ping(addr, Duration::from_millis(200)) {
            return Started::Up(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-server did not answer PING within {PATIENCE:?}; its log:\n{}", read_log(dir));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the Redis at `addr` answers a raw PING with `+PONG` (a server
/// still loading its data answers `-LOADING`, which is not yet up).
pub fn ping(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(command_at(addr, &["PING"], timeout), Ok(Resp::Simple(s)) if s == "PONG")
}
