//! Client and relay messages (PROTOCOL.md sections 4 and 5).
//!
//! A client message is parsed once, with every field kept as raw JSON
//! (`serde_json::value::RawValue`), so that the checks can run in the order the
//! protocol fixes (shape, type, state, fields) and a `payload` can be relayed
//! byte for byte without ever being re-serialised.

use std::cell::Cell;
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::AuthError;
use crate::document::{DocumentHub, Participant, Sync};
use crate::runtime::CoreCtx;
use crate::session::{Conn, Subscription};
use crate::ws::{Kind, OutFrame, SharedFrame};

/// Close code when no `authenticate` succeeded within `limits.auth_timeout_ms`.
pub const AUTH_TIMEOUT: u16 = 4008;

/// Error codes of `{"type":"error"}` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadMessage,
    UnknownType,
    AuthRequired,
    AlreadyAuthenticated,
    NotJoined,
    AlreadyJoined,
    BadSnapshot,
    HistoryUnavailable,
    RateLimited,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "BAD_MESSAGE",
            ErrorCode::UnknownType => "UNKNOWN_TYPE",
            ErrorCode::AuthRequired => "AUTH_REQUIRED",
            ErrorCode::AlreadyAuthenticated => "ALREADY_AUTHENTICATED",
            ErrorCode::NotJoined => "NOT_JOINED",
            ErrorCode::AlreadyJoined => "ALREADY_JOINED",
            ErrorCode::BadSnapshot => "BAD_SNAPSHOT",
            ErrorCode::HistoryUnavailable => "HISTORY_UNAVAILABLE",
            ErrorCode::RateLimited => "RATE_LIMITED",
        }
    }
}

/// Every message type a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientType {
    Authenticate,
    JoinDocument,
    LeaveDocument,
    Operation,
    Cursor,
    SyncRequest,
    Snapshot,
    Ping,
}

impl ClientType {
    fn from_name(name: &str) -> Option<ClientType> {
        Some(match name {
            "authenticate" => ClientType::Authenticate,
            "join_document" => ClientType::JoinDocument,
            "leave_document" => ClientType::LeaveDocument,
            "operation" => ClientType::Operation,
            "cursor" => ClientType::Cursor,
            "sync_request" => ClientType::SyncRequest,
            "snapshot" => ClientType::Snapshot,
            "ping" => ClientType::Ping,
            _ => return None,
        })
    }
}

/// A client message with its fields still as raw JSON.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    pub kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub since: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub payload: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub client_op_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub seq: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub state: Option<&'a RawValue>,
}

/// A field that is present, `null` included (plain `Option` would read a
/// JSON `null` as absent, but `"payload": null` is a payload like any other).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses a message's shape and type: check 1 (`BAD_MESSAGE`) and check 2
/// (`UNKNOWN_TYPE`) of PROTOCOL.md section 4.
pub fn parse(data: &[u8]) -> Result<(ClientType, Envelope<'_>), (ErrorCode, &'static str)> {
    let bad = |m| Err((ErrorCode::BadMessage, m));
    let Ok(text) = std::str::from_utf8(data) else {
        return bad("message is not UTF-8");
    };
    if text.trim_start().as_bytes().first() != Some(&b'{') {
        return bad("message is not a JSON object");
    }
    let Ok(env) = serde_json::from_str::<Envelope<'_>>(text) else {
        return bad("message is not valid JSON");
    };
    let Some(kind) = env.kind.and_then(|k| serde_json::from_str::<&str>(k.get()).ok()) else {
        return bad("message has no string `type`");
    };
    match ClientType::from_name(kind) {
        Some(t) => Ok((t, env)),
        None => Err((ErrorCode::UnknownType, "unknown message type")),
    }
}

/// Builds `{"type":"error","code":...,"message":...}` as a frame payload.
pub fn error_reply(code: ErrorCode, message: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct ErrorReply<'a> {
        r#type: &'static str,
        code: &'static str,
        message: &'a str,
    }
    let mut buf = crate::ws::OutFrame::payload_buffer(64 + message.len());
    let _ = serde_json::to_writer(&mut buf, &ErrorReply { r#type: "error", code: code.as_str(), message });
    buf
}

/// Builds `{"type":"pong"}` as a frame payload.
pub fn pong_reply() -> Vec<u8> {
    let mut buf = crate::ws::OutFrame::payload_buffer(16);
    buf.extend_from_slice(br#"{"type":"pong"}"#);
    buf
}

/// A frame payload for a relay message: serialised straight into the frame's
/// buffer from borrowed fields (no intermediate `serde_json::Value`, whose
/// maps cost dozens of allocations per reply on the connect path).
fn json_payload(value: &impl Serialize) -> Vec<u8> {
    let mut buf = OutFrame::payload_buffer(128);
    let _ = serde_json::to_writer(&mut buf, value);
    buf
}

/// `auth_result` on success.
#[derive(Serialize)]
struct AuthOk<'a> {
    r#type: &'static str,
    success: bool,
    user_id: &'a str,
    user_name: &'a str,
    session_id: &'a str,
    connection_id: u64,
    color: &'a str,
}

/// `auth_result` on failure.
#[derive(Serialize)]
struct AuthFailed<'a> {
    r#type: &'static str,
    success: bool,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

/// `user_joined` (presence).
#[derive(Serialize)]
struct UserJoined<'a> {
    r#type: &'static str,
    #[serde(flatten)]
    participant: &'a Participant,
}

/// `user_left` (presence).
#[derive(Serialize)]
struct UserLeft<'a> {
    r#type: &'static str,
    connection_id: u64,
    user_id: &'a str,
}

/// `joined_document`, with the participants written from the document.
#[derive(Serialize)]
struct Joined<'a> {
    r#type: &'static str,
    document_id: &'a str,
    seq: u64,
    #[serde(serialize_with = "participants")]
    participants: &'a DocumentHub,
}

fn participants<S: serde::Serializer>(hub: &&DocumentHub, s: S) -> Result<S::Ok, S::Error> {
    hub.serialize_participants(s)
}

/// `left_document`.
#[derive(Serialize)]
struct Left<'a> {
    r#type: &'static str,
    document_id: &'a str,
}

/// The `lagged` notice for a subscriber that missed `[from, to]`.
pub(crate) fn lagged(from: u64, to: u64) -> SharedFrame {
    let mut buf = OutFrame::payload_buffer(64);
    let _ = write!(buf, r#"{{"type":"lagged","missed_from":{from},"missed_to":{to}}}"#);
    Rc::new(OutFrame::finish(Kind::Text, buf))
}

/// Per-connection rate limits (`limits.max_ops_per_sec`,
/// `limits.max_cursor_per_sec`): fixed one-second windows.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    ops: Window,
    cursors: Window,
}

#[derive(Debug, Default)]
struct Window {
    start: Cell<Option<Instant>>,
    count: Cell<u32>,
    /// Since when the client has been over its limit without a break.
    over_since: Cell<Option<Instant>>,
}

/// What a rate check decided.
#[derive(Debug, PartialEq, Eq)]
enum Rate {
    Allow,
    Drop,
    /// Over the limit for longer than the grace: close 1008.
    Close,
}

impl Window {
    fn check(&self, now: Instant, limit: u32, grace: Duration) -> Rate {
        if limit == 0 {
            return Rate::Allow;
        }
        let second = Duration::from_secs(1);
        match self.start.get() {
            Some(t) if now - t < second => {}
            Some(t) => {
                // A window passed; was the previous one over the limit?
                if self.count.get() <= limit || now - t >= 2 * second {
                    self.over_since.set(None);
                }
                self.start.set(Some(now));
                self.count.set(0);
            }
            None => self.start.set(Some(now)),
        }
        self.count.set(self.count.get() + 1);
        if self.count.get() <= limit {
            return Rate::Allow;
        }
        let since = *self.over_since.get().get_or_insert(now);
        self.over_since.set(Some(since));
        if now - since >= grace {
            Rate::Close
        } else {
            Rate::Drop
        }
    }
}

/// Check 3 of PROTOCOL.md section 4: whether a message may be sent in the
/// session's state (authenticated, joined). The one statement of those rules.
pub fn check_state(kind: ClientType, authenticated: bool, joined: bool) -> Option<(ErrorCode, &'static str)> {
    match kind {
        ClientType::Ping => None,
        ClientType::Authenticate if authenticated => Some((ErrorCode::AlreadyAuthenticated, "already authenticated")),
        ClientType::Authenticate => None,
        _ if !authenticated => Some((ErrorCode::AuthRequired, "authenticate first")),
        ClientType::JoinDocument if joined => Some((ErrorCode::AlreadyJoined, "already joined")),
        ClientType::JoinDocument => None,
        _ if !joined => Some((ErrorCode::NotJoined, "join the document first")),
        _ => None,
    }
}

/// A field check (step 4 of PROTOCOL.md section 4).
fn field<'a, T: serde::Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    name: &str,
    required: bool,
) -> Result<Option<T>, String> {
    match raw {
        None if required => Err(format!("missing field `{name}`")),
        None => Ok(None),
        Some(r) => serde_json::from_str(r.get()).map(Some).map_err(|_| format!("field `{name}` has the wrong type")),
    }
}

/// Handles one complete client message on the session's core.
pub(crate) fn handle(ctx: &CoreCtx, conn: &Conn, data: &[u8]) {
    let (kind, env) = match parse(data) {
        Ok(m) => m,
        Err((code, message)) => return reply_error(ctx, conn, code, message),
    };
    // Step 3: state.
    let (authenticated, joined) = {
        let st = conn.state.borrow();
        (st.is_authenticated(), st.document_joined)
    };
    if let Some((code, message)) = check_state(kind, authenticated, joined) {
        return reply_error(ctx, conn, code, message);
    }
    // Steps 4 and 5, then the effect.
    let result = match kind {
        ClientType::Ping => {
            conn.send_text(ctx, pong_reply());
            Ok(())
        }
        ClientType::Authenticate => authenticate(ctx, conn, &env),
        ClientType::JoinDocument => join(ctx, conn, &env),
        ClientType::LeaveDocument => {
            leave(ctx, conn);
            let reply = Left { r#type: "left_document", document_id: &conn.info.document };
            conn.send_text(ctx, json_payload(&reply));
            Ok(())
        }
        ClientType::Operation => operation(ctx, conn, &env),
        ClientType::Cursor => cursor(ctx, conn, &env),
        ClientType::SyncRequest => field::<u64>(env.since, "since", true).map(|since| {
            sync_response(ctx, conn, since.unwrap_or(0));
        }),
        ClientType::Snapshot => snapshot(ctx, conn, &env),
    };
    if let Err(message) = result {
        reply_error(ctx, conn, ErrorCode::BadMessage, &message);
    }
}

fn reply_error(ctx: &CoreCtx, conn: &Conn, code: ErrorCode, message: &str) {
    conn.send_text(ctx, error_reply(code, message));
}

/// Applies a rate limit; returns false when the message is dropped.
fn rate_ok(ctx: &CoreCtx, conn: &Conn, window: &Window, limit: u32) -> bool {
    let grace = Duration::from_millis(ctx.config.limits.rate_limit_grace_ms);
    match window.check(Instant::now(), limit, grace) {
        Rate::Allow => true,
        Rate::Drop => {
            ctx.stats().rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            reply_error(ctx, conn, ErrorCode::RateLimited, "rate limit exceeded; message dropped");
            false
        }
        Rate::Close => {
            conn.begin_close(ctx, crate::ws::close::POLICY, "rate limit exceeded");
            false
        }
    }
}

fn authenticate(ctx: &CoreCtx, conn: &Conn, env: &Envelope<'_>) -> Result<(), String> {
    let token: String = field(env.token, "token", true)?.unwrap_or_default();
    match ctx.auth.authenticate(&token, &conn.info.document) {
        Ok(identity) => {
            let color =
                conn.info.color.clone().unwrap_or_else(|| crate::auth::palette_color(&identity.user_id).to_string());
            let session_id = session_id(ctx.session_nonce, conn.info.id);
            let reply = json_payload(&AuthOk {
                r#type: "auth_result",
                success: true,
                user_id: &identity.user_id,
                user_name: &identity.user_name,
                session_id: &session_id,
                connection_id: conn.info.id,
                color: &color,
            });
            {
                let mut st = conn.state.borrow_mut();
                st.user_id_json = serde_json::to_string(&identity.user_id).unwrap_or_default();
                st.user_id = Some(identity.user_id);
                st.user_name = Some(identity.user_name);
                st.session_id = Some(session_id);
                st.color = color;
                st.authenticated = true;
            }
            conn.send_text(ctx, reply);
        }
        Err(e) => {
            ctx.registry.count_auth_failure();
            let message = e.to_string();
            let reply = AuthFailed {
                r#type: "auth_result",
                success: false,
                error: ErrorBody { code: e.code(), message: &message },
            };
            conn.send_text(ctx, json_payload(&reply));
            let reason = match e {
                AuthError::Failed(_) => "authentication failed",
                AuthError::Forbidden(_) => "forbidden",
            };
            conn.begin_close(ctx, e.close_code(), reason);
        }
    }
    Ok(())
}

/// A session id unique across connections, relays and restarts: a random
/// nonce drawn when the relay started, and the connection id.
fn session_id(nonce: u64, connection_id: u64) -> String {
    format!("{nonce:016x}-{connection_id:x}")
}

fn join(ctx: &CoreCtx, conn: &Conn, env: &Envelope<'_>) -> Result<(), String> {
    let since: Option<u64> = field(env.since, "since", false)?;
    let hub = ctx.document(&conn.info.document);
    let (participant, user_joined) = {
        let mut st = conn.state.borrow_mut();
        st.document_joined = true;
        let p = Participant {
            connection_id: conn.info.id,
            user_id: st.user_id.clone().unwrap_or_default(),
            user_name: st.user_name.clone().unwrap_or_default(),
            color: st.color.clone(),
        };
        let user_joined = json_payload(&UserJoined { r#type: "user_joined", participant: &p });
        (p, user_joined)
    };
    // Broadcasts from now on: the cursors start at the rings' heads.
    *conn.sub.borrow_mut() =
        Some(Subscription { hub: hub.clone(), ops_cursor: hub.ops.head(), presence_cursor: hub.presence.head() });
    hub.subscribe(participant, conn.writer_waker.clone());
    let reply =
        Joined { r#type: "joined_document", document_id: &conn.info.document, seq: hub.seq(), participants: &hub };
    conn.send_text(ctx, json_payload(&reply));
    publish_presence(ctx, &hub, conn.info.id, user_joined);
    if let Some(since) = since {
        sync_response(ctx, conn, since);
    }
    Ok(())
}

fn publish_presence(ctx: &CoreCtx, hub: &DocumentHub, origin: u64, payload: Vec<u8>) {
    let frame = Rc::new(OutFrame::finish(Kind::Binary, payload));
    ctx.stats().broadcasts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    hub.publish_presence(origin, frame);
}

/// Leaves the session's document if joined: unsubscribes and broadcasts
/// `user_left`. Used by `leave_document` and when a joined session ends.
pub(crate) fn leave(ctx: &CoreCtx, conn: &Conn) {
    let Some(sub) = conn.sub.borrow_mut().take() else { return };
    let user_left = {
        let mut st = conn.state.borrow_mut();
        st.document_joined = false;
        json_payload(&UserLeft {
            r#type: "user_left",
            connection_id: conn.info.id,
            user_id: st.user_id.as_deref().unwrap_or(""),
        })
    };
    sub.hub.unsubscribe(conn.info.id);
    publish_presence(ctx, &sub.hub, conn.info.id, user_left);
}

fn operation(ctx: &CoreCtx, conn: &Conn, env: &Envelope<'_>) -> Result<(), String> {
    let Some(payload) = env.payload else { return Err("missing field `payload`".into()) };
    if let Some(id) = env.client_op_id {
        let first = id.get().as_bytes().first();
        if !matches!(first, Some(b'"' | b'-' | b'0'..=b'9')) {
            return Err("field `client_op_id` must be a string or a number".into());
        }
    }
    if !rate_ok(ctx, conn, &conn.rates.ops, ctx.config.limits.max_ops_per_sec) {
        return Ok(());
    }
    let Some(hub) = conn.sub.borrow().as_ref().map(|s| s.hub.clone()) else {
        return Ok(()); // joined implies subscribed
    };
    let seq = hub.seq() + 1;
    // The broadcast, encoded once: header room, fixed fields, raw payload.
    let payload = payload.get().as_bytes();
    let frame = {
        let st = conn.state.borrow();
        let mut buf = OutFrame::payload_buffer(96 + st.user_id_json.len() + payload.len());
        let _ = write!(
            buf,
            r#"{{"type":"operation","seq":{seq},"connection_id":{},"user_id":{},"payload":"#,
            conn.info.id, st.user_id_json
        );
        buf.extend_from_slice(payload);
        buf.push(b'}');
        Rc::new(OutFrame::finish(Kind::Binary, buf))
    };
    let stats = ctx.stats();
    stats.operations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    stats.broadcasts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    hub.publish_op(seq, conn.info.id, frame);
    let mut ack = OutFrame::payload_buffer(64);
    let _ = write!(ack, r#"{{"type":"ack","seq":{seq}"#);
    if let Some(id) = env.client_op_id {
        ack.extend_from_slice(br#","client_op_id":"#);
        ack.extend_from_slice(id.get().as_bytes());
    }
    ack.push(b'}');
    conn.send_text(ctx, ack);
    Ok(())
}

fn cursor(ctx: &CoreCtx, conn: &Conn, env: &Envelope<'_>) -> Result<(), String> {
    let Some(payload) = env.payload else { return Err("missing field `payload`".into()) };
    if !rate_ok(ctx, conn, &conn.rates.cursors, ctx.config.limits.max_cursor_per_sec) {
        return Ok(());
    }
    let Some(hub) = conn.sub.borrow().as_ref().map(|s| s.hub.clone()) else { return Ok(()) };
    let frame = {
        let st = conn.state.borrow();
        let payload = payload.get().as_bytes();
        let mut buf = OutFrame::payload_buffer(112 + st.user_id_json.len() + payload.len());
        let _ = write!(
            buf,
            r#"{{"type":"cursor","connection_id":{},"user_id":{},"color":"{}","payload":"#,
            conn.info.id, st.user_id_json, st.color
        );
        buf.extend_from_slice(payload);
        buf.push(b'}');
        Rc::new(OutFrame::finish(Kind::Binary, buf))
    };
    ctx.stats().broadcasts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    hub.publish_presence(conn.info.id, frame);
    Ok(())
}

fn sync_response(ctx: &CoreCtx, conn: &Conn, since: u64) {
    let Some(hub) = conn.sub.borrow().as_ref().map(|s| s.hub.clone()) else { return };
    let write_ops = |buf: &mut Vec<u8>, ops: &[SharedFrame]| {
        buf.extend_from_slice(br#","ops":["#);
        for (i, op) in ops.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(op.payload());
        }
        buf.extend_from_slice(b"]}");
    };
    let mut buf = OutFrame::payload_buffer(256);
    let _ = write!(buf, r#"{{"type":"sync_response","seq":{}"#, hub.seq());
    match hub.sync(since) {
        Sync::History { ops } => {
            buf.extend_from_slice(br#","snapshot":null"#);
            write_ops(&mut buf, &ops);
        }
        Sync::Snapshot { snapshot, ops } => {
            let _ = write!(buf, r#","snapshot":{{"seq":{},"state":{}}}"#, snapshot.seq, snapshot.state.get());
            drop(snapshot);
            write_ops(&mut buf, &ops);
        }
        Sync::Unavailable => {
            return reply_error(ctx, conn, ErrorCode::HistoryUnavailable, "the history no longer covers `since`");
        }
    }
    conn.send_text(ctx, buf);
}

fn snapshot(ctx: &CoreCtx, conn: &Conn, env: &Envelope<'_>) -> Result<(), String> {
    let seq: u64 = field(env.seq, "seq", true)?.unwrap_or(0);
    let Some(state) = env.state else { return Err("missing field `state`".into()) };
    let Some(hub) = conn.sub.borrow().as_ref().map(|s| s.hub.clone()) else { return Ok(()) };
    if seq > hub.seq() {
        reply_error(ctx, conn, ErrorCode::BadSnapshot, "snapshot seq is ahead of the document");
        return Ok(());
    }
    hub.store_snapshot(seq, state.to_owned());
    let mut ack = OutFrame::payload_buffer(32);
    let _ = write!(ack, r#"{{"type":"ack","seq":{seq}}}"#);
    conn.send_text(ctx, ack);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_run_in_protocol_order() {
        let code = |s: &[u8]| parse(s).map(|(t, _)| t).map_err(|(c, _)| c);
        assert_eq!(code(br#"{"type":"ping"}"#), Ok(ClientType::Ping));
        assert_eq!(code(b"\xff\xfe"), Err(ErrorCode::BadMessage));
        assert_eq!(code(b"not json"), Err(ErrorCode::BadMessage));
        assert_eq!(code(br#"["ping"]"#), Err(ErrorCode::BadMessage));
        assert_eq!(code(br#"{"type":1}"#), Err(ErrorCode::BadMessage));
        assert_eq!(code(br#"{"typo":"ping"}"#), Err(ErrorCode::BadMessage));
        assert_eq!(code(br#"{"type":"ping""#), Err(ErrorCode::BadMessage));
        assert_eq!(code(br#"{"type":"dance"}"#), Err(ErrorCode::UnknownType));
        assert_eq!(code(br#" {"type":"operation","payload":{"a":[1,2]}}"#), Ok(ClientType::Operation));
    }

    #[test]
    fn null_is_a_present_value() {
        let (_, env) = parse(br#"{"type":"operation","payload":null}"#).unwrap();
        assert_eq!(env.payload.map(|p| p.get()), Some("null"));
        let (_, env) = parse(br#"{"type":"operation"}"#).unwrap();
        assert!(env.payload.is_none());
    }

    #[test]
    fn payload_stays_raw() {
        let (_, env) = parse(br#"{"type":"operation","payload": {"b" : 1.50,"a":"\u00e9"}}"#).unwrap();
        assert_eq!(env.payload.unwrap().get(), r#"{"b" : 1.50,"a":"\u00e9"}"#);
    }

    #[test]
    fn error_reply_is_json() {
        let buf = error_reply(ErrorCode::UnknownType, "x \"y\"");
        let v: serde_json::Value = serde_json::from_slice(&buf[10..]).unwrap();
        assert_eq!(v["code"], "UNKNOWN_TYPE");
        assert_eq!(v["message"], "x \"y\"");
    }
}
