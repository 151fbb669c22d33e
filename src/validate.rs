//! Connection validation (the VALIDATING state), after Babl's design.
//!
//! A [`ConnectionValidator`] is called on the core's event loop right after the
//! 101, with the request head borrowed (nothing is copied for it). It must not
//! block: it writes its verdict into the [`ValidationResult`] it is given and
//! hands that to the thread-safe [`ValidationResultPublisher`], either at once
//! or later from another thread. The session awaits the verdict without holding
//! up anything else on its core.
//!
//! The documented pattern for a validator that needs I/O (a database, an auth
//! service): copy what it needs from the request, send that with the result and
//! a clone of the publisher to a worker thread, return at once; the worker calls
//! [`ValidationResultPublisher::publish`], retrying after a short wait while it
//! answers [`PublishError::Full`].
//!
//! ```
//! use docrelay::validate::*;
//! struct TokenChecker { work: std::sync::mpsc::Sender<(String, ValidationResult, ValidationResultPublisher)> }
//! impl ConnectionValidator for TokenChecker {
//!     fn validate(&self, req: &ValidationRequest<'_>, result: ValidationResult, publisher: &ValidationResultPublisher) {
//!         let token = req.query_param("token").unwrap_or("").to_string();
//!         // Off the event loop: the worker decides and publishes.
//!         let _ = self.work.send((token, result, publisher.clone()));
//!     }
//! }
//! ```

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::close;
use crate::config::Config;
use crate::registry::ConnectionManager;

/// What a validator sees of the upgrade request. Everything is borrowed from
/// the connection's read buffer; copy what must outlive the call.
#[derive(Debug, Clone, Copy)]
pub struct ValidationRequest<'a> {
    pub headers: &'a [httparse::Header<'a>],
    /// The request path, e.g. `/ws/documents/d1`.
    pub path: &'a str,
    /// The raw query string after `?`, if any.
    pub query: Option<&'a str>,
    pub peer: SocketAddr,
    pub document_id: &'a str,
}

impl<'a> ValidationRequest<'a> {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }

    /// Every header as (name, value), in request order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        self.headers.iter().map(|h| (h.name, h.value))
    }

    /// A query parameter's raw (not percent-decoded) value.
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        crate::http::query_param(self.query, name)
    }
}

/// The verdict a validator reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not decided yet (publishing this counts as a failure with
    /// [`close::VALIDATION_FAILED`]).
    Pending,
    Accept,
    /// Close with this code (4000..=4999) and reason.
    Reject {
        code: u16,
        reason: String,
    },
}

/// The verdict for one connection, addressed to the core that waits for it.
#[derive(Debug)]
pub struct ValidationResult {
    ticket: u64,
    verdict: Verdict,
}

impl ValidationResult {
    /// Accepts the connection: it moves on to CONNECTED.
    pub fn validation_success(&mut self) {
        self.verdict = Verdict::Accept;
    }

    /// Refuses the connection with a close code in 4000..=4999 (anything else
    /// is replaced by 4000) and a reason (cut to fit a Close frame).
    pub fn validation_failure(&mut self, code: u16, reason: impl Into<String>) {
        let code = if close::is_validator_code(code) { code } else { close::VALIDATION_FAILED };
        self.verdict = Verdict::Reject { code, reason: reason.into() };
    }

    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }
}

/// Why [`ValidationResultPublisher::publish`] did not take a result.
#[derive(Debug)]
pub enum PublishError {
    /// The core's verdict queue is full: retry after a short wait.
    Full(ValidationResult),
    /// The relay is shutting down; the connection is gone.
    Closed,
}

/// Thread-safe sink for verdicts; cheap to clone and send to other threads.
#[derive(Debug, Clone)]
pub struct ValidationResultPublisher {
    tx: flume::Sender<ValidationResult>,
}

impl ValidationResultPublisher {
    /// Hands a verdict to the core that waits for it. Never blocks.
    pub fn publish(&self, result: ValidationResult) -> Result<(), PublishError> {
        self.tx.try_send(result).map_err(|e| match e {
            flume::TrySendError::Full(r) => PublishError::Full(r),
            flume::TrySendError::Disconnected(_) => PublishError::Closed,
        })
    }
}

/// Decides whether a connection may proceed; see the module documentation.
pub trait ConnectionValidator: Send + Sync + 'static {
    fn validate(
        &self,
        request: &ValidationRequest<'_>,
        result: ValidationResult,
        publisher: &ValidationResultPublisher,
    );
}

/// The per-core side: issues tickets, collects published verdicts, and wakes
/// the session waiting for each.
pub(crate) struct Verdicts {
    publisher: ValidationResultPublisher,
    /// Taken at shutdown: with every receiver gone, publishing answers Closed.
    rx: RefCell<Option<flume::Receiver<ValidationResult>>>,
    next: Cell<u64>,
    waiting: RefCell<HashMap<u64, Rc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    verdict: RefCell<Option<Verdict>>,
    waker: Cell<Option<Waker>>,
}

impl Verdicts {
    pub(crate) fn new(capacity: usize) -> Verdicts {
        let (tx, rx) = flume::bounded(capacity);
        Verdicts {
            publisher: ValidationResultPublisher { tx },
            rx: RefCell::new(Some(rx)),
            next: Cell::new(1),
            waiting: Default::default(),
        }
    }

    /// Runs `validator` for one connection and returns a future for its verdict.
    pub(crate) fn start(&self, validator: &dyn ConnectionValidator, request: &ValidationRequest<'_>) -> VerdictFuture {
        let ticket = self.next.get();
        self.next.set(ticket + 1);
        let slot = Rc::new(Slot::default());
        self.waiting.borrow_mut().insert(ticket, slot.clone());
        validator.validate(request, ValidationResult { ticket, verdict: Verdict::Pending }, &self.publisher);
        // A verdict published synchronously is already in the queue.
        self.drain();
        VerdictFuture { slot, ticket }
    }

    /// Forgets a ticket whose session stopped waiting (timeout or drop);
    /// a late verdict for it is then discarded.
    pub(crate) fn cancel(&self, ticket: u64) {
        self.waiting.borrow_mut().remove(&ticket);
    }

    fn drain(&self) {
        let Some(rx) = self.rx.borrow().clone() else { return };
        while let Ok(r) = rx.try_recv() {
            self.deliver(r);
        }
    }

    /// Stops taking verdicts (shutdown); the collector task must be gone too.
    pub(crate) fn close(&self) {
        self.rx.borrow_mut().take();
        self.waiting.borrow_mut().clear();
    }

    fn deliver(&self, r: ValidationResult) {
        if let Some(slot) = self.waiting.borrow_mut().remove(&r.ticket) {
            *slot.verdict.borrow_mut() = Some(r.verdict);
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }

    /// The core's collector task: delivers verdicts published from any thread.
    pub(crate) async fn run(self: Rc<Self>) {
        let Some(rx) = self.rx.borrow().clone() else { return };
        while let Ok(r) = rx.recv_async().await {
            self.deliver(r);
            self.drain();
        }
    }
}

/// Resolves to the verdict for one ticket.
pub(crate) struct VerdictFuture {
    slot: Rc<Slot>,
    pub(crate) ticket: u64,
}

impl Future for VerdictFuture {
    type Output = Verdict;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Verdict> {
        if let Some(v) = self.slot.verdict.borrow_mut().take() {
            return Poll::Ready(v);
        }
        self.slot.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

/// A connection refused by a built-in validator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: &'static str,
}

/// The built-in validators (`docs/protocol.md`, "Session lifecycle"), all on together. On
/// success, says whether the connection was counted against its IP (it must
/// then be uncounted when it ends).
pub(crate) fn builtin(
    config: &Config,
    registry: &ConnectionManager,
    request: &ValidationRequest<'_>,
) -> Result<bool, Refusal> {
    let allowed = &config.validation.allowed_origins;
    if !allowed.is_empty() {
        if let Some(origin) = request.header("origin") {
            let origin = origin.trim_ascii();
            if !allowed.iter().any(|a| a.as_bytes().eq_ignore_ascii_case(origin)) {
                return Err(Refusal { code: close::ORIGIN_NOT_ALLOWED, reason: "origin not allowed" });
            }
        }
    }
    // The connection is already registered, so it counts itself.
    // `start` fills in the derived limit, so None only means "no limit".
    if registry.active() > config.limits.max_connections.unwrap_or(usize::MAX) {
        return Err(Refusal { code: close::TOO_MANY_CONNECTIONS, reason: "relay full" });
    }
    let per_ip = config.validation.max_connections_per_ip;
    if per_ip > 0 {
        if !registry.try_add_ip(request.peer.ip(), per_ip) {
            return Err(Refusal { code: close::TOO_MANY_CONNECTIONS, reason: "too many connections" });
        }
        return Ok(true);
    }
    Ok(false)
}
