//! The listening sockets: one per core on the same port (SO_REUSEPORT), so
//! the kernel spreads new connections over the cores.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use super::StartError;

/// Pending connections the kernel queues per core before `accept`.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds one listener per core on the same port. The listeners use
/// SO_REUSEPORT, which would also let another process using it share the
/// port silently: a configured port is therefore first bound once without
/// it, which fails if anyone holds the address. Port 0 needs no such check;
/// the first listener picks the port and holds it while the others join, so
/// nothing can take it in between.
pub fn bind_listeners(addr: SocketAddr, cores: usize) -> Result<(SocketAddr, Vec<OwnedFd>), StartError> {
    let in_use = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::AddrInUse => StartError::AddressInUse { addr },
        _ => StartError::Listen { addr, source: e },
    };
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr).map_err(in_use)?);
    }
    let (first, bound) = bind_listener(addr, true).map_err(in_use)?;
    let mut fds = vec![first];
    for _ in 1..cores {
        fds.push(bind_listener(bound, true).map_err(in_use)?.0);
    }
    Ok((bound, fds))
}

/// Binds the one listener of `metrics.listen` (served by one core). Without
/// SO_REUSEPORT, so an address anyone listens on (the main address
/// included) fails at start.
pub fn bind_metrics_listener(addr: SocketAddr) -> Result<(SocketAddr, OwnedFd), StartError> {
    let (fd, bound) = bind_listener(addr, false).map_err(|source| StartError::MetricsListen { addr, source })?;
    Ok((bound, fd))
}

/// A listening socket on `addr`, sharing the port with the other cores when
/// `shared`. Returns its fd, which stays ours so that shutdown can stop the
/// kernel from accepting on it.
fn bind_listener(addr: SocketAddr, shared: bool) -> std::io::Result<(OwnedFd, SocketAddr)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(shared)?;
    socket.set_cloexec(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one
    // setsockopt here instead of one per connection.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    let bound = socket.local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    // SAFETY: into_raw_fd gives up the socket's ownership of a valid fd,
    // which the OwnedFd takes over.
    Ok((unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) }, bound))
}
