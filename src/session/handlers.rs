//! The command handlers: what each client message does, after the checks in
//! the order `docs/protocol.md`, "Client messages", fixes (shape and type,
//! state, fields, rate). Replies and broadcasts are encoded by
//! `protocol::encode`.

use std::time::Duration;

use serde_json::value::RawValue;

use std::rc::Rc;

use super::rates::{Rate, Window};
use super::shard::{Commit, Committed, JoinWaiter};
use super::state::{Auth, User};
use super::{Session, Shard, Subscription};
use crate::auth::AuthError;
use crate::close;
use crate::cluster::{JoinReply, Request};
use crate::document::{DocumentHub, Sync};
use crate::protocol::{self, check_depth, check_state, encode, field, ClientType, Envelope, ErrorCode, Participant};
use crate::store::record::Kind;

/// Handles one complete Text message (UTF-8 already checked).
pub(super) fn handle_text(shard: &Shard, session: &Session, text: &str) {
    handle(shard, session, protocol::parse_text(text))
}

/// Handles one complete Binary message, which must hold UTF-8 JSON.
pub(super) fn handle_binary(shard: &Shard, session: &Session, data: &[u8]) {
    handle(shard, session, protocol::parse(data))
}

fn handle(shard: &Shard, session: &Session, parsed: Result<(ClientType, Envelope<'_>), (ErrorCode, &'static str)>) {
    let (kind, env) = match parsed {
        Ok(m) => m,
        Err((code, message)) => return reply_error(shard, session, code, message),
    };
    // An error in reply to an operation names it by its `client_op_id`.
    let op_id = if kind == ClientType::Operation { client_op_id(&env) } else { None };
    // Step 3: state.
    let authenticated = session.auth.borrow().is_authenticated();
    let joined = session.sub.borrow().is_some();
    if let Some((code, message)) = check_state(kind, authenticated, joined) {
        session.send_text(shard, encode::op_error(code, message, op_id));
        return;
    }
    // Steps 4 and 5, then the effect.
    let result = match kind {
        ClientType::Ping => {
            session.send_text(shard, encode::pong());
            Ok(())
        }
        ClientType::Authenticate => authenticate(shard, session, &env),
        ClientType::JoinDocument => join(shard, session, &env),
        ClientType::LeaveDocument => {
            leave(shard, session);
            session.send_text(shard, encode::left(&session.info.document));
            Ok(())
        }
        ClientType::Operation => operation(shard, session, &env),
        ClientType::Cursor => cursor(shard, session, &env),
        ClientType::SyncRequest => field::<u64>(env.since, "since", true).and_then(|since| {
            let epoch: Option<String> = field(env.epoch, "epoch", false)?;
            if let Some(hub) = joined_hub(session) {
                sync_response(shard, session, &hub, since.unwrap_or(0), epoch.as_deref());
            }
            Ok(())
        }),
        ClientType::Snapshot => snapshot(shard, session, &env),
        ClientType::ListParticipants => field::<u64>(env.after, "after", false).map(|after| {
            if let Some(hub) = joined_hub(session) {
                let max = shard.config.documents.max_participants_listed;
                let count = hub.participant_count();
                let reply = hub.with_participants(after, max, |ps, next| encode::participants(ps, count, next));
                session.send_text(shard, reply);
            }
        }),
    };
    if let Err(message) = result {
        session.send_text(shard, encode::op_error(ErrorCode::BadMessage, &message, op_id));
    }
}

/// An operation's `client_op_id` as the client wrote it, when it is one (a
/// string or a number).
fn client_op_id<'a>(env: &Envelope<'a>) -> Option<&'a str> {
    env.client_op_id.map(RawValue::get).filter(|id| matches!(id.as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9')))
}

fn reply_error(shard: &Shard, session: &Session, code: ErrorCode, message: &str) {
    session.send_text(shard, encode::error(code, message));
}

/// Applies a rate limit; returns false when the message is dropped (the
/// `RATE_LIMITED` error carries the operation's `op_id`, if any).
fn rate_ok(shard: &Shard, session: &Session, window: &Window, limit: u32, op_id: Option<&str>) -> bool {
    let grace = Duration::from_millis(shard.config.limits.rate_limit_grace_ms);
    match window.check(shard.clock.now(), limit, grace) {
        Rate::Allow => true,
        Rate::Drop => {
            shard.stats().rate_limited.add(1);
            let reply = encode::op_error(ErrorCode::RateLimited, "rate limit exceeded; message dropped", op_id);
            session.send_text(shard, reply);
            false
        }
        Rate::Close => {
            session.begin_close(shard, close::POLICY, "rate limit exceeded");
            false
        }
    }
}

fn authenticate(shard: &Shard, session: &Session, env: &Envelope<'_>) -> Result<(), String> {
    let token: String = field(env.token, "token", true)?.unwrap_or_default();
    match shard.auth.authenticate(&token, &session.info.document) {
        Ok(identity) => {
            let color =
                session.info.color.clone().unwrap_or_else(|| crate::auth::palette_color(&identity.user_id).to_string());
            // The token's expiry on the monotonic clock the ticker reads; one
            // too far to represent never comes.
            let expires_at = identity.expires_at.and_then(|at| {
                let left = at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
                std::time::Instant::now().checked_add(left)
            });
            let user = User {
                user_id_json: serde_json::to_string(&identity.user_id).unwrap_or_default(),
                session_id: session_id(shard.session_nonce, session.info.id),
                user_id: identity.user_id,
                user_name: identity.user_name,
                color,
                expires_at,
            };
            let reply = encode::auth_ok(&user.user_id, &user.user_name, &user.session_id, session.info.id, &user.color);
            *session.auth.borrow_mut() = Auth::Authenticated(user);
            session.send_text(shard, reply);
        }
        Err(e) => {
            shard.registry.count_auth_failure();
            // The client gets the short fixed message; the log the details.
            tracing::info!(id = session.info.id, code = e.code(), detail = %e.detail(), "authentication failed");
            session.send_text(shard, encode::auth_failed(e.code(), &e.to_string()));
            let reason = match e {
                AuthError::Failed { .. } => "authentication failed",
                AuthError::Forbidden(_) => "forbidden",
            };
            session.begin_close(shard, e.close_code(), reason);
        }
    }
    Ok(())
}

/// A session id unique across connections, relays and restarts: a random
/// nonce drawn when the relay started, and the connection id.
fn session_id(nonce: u64, connection_id: u64) -> String {
    format!("{nonce:016x}-{connection_id:x}")
}

fn join(shard: &Shard, session: &Session, env: &Envelope<'_>) -> Result<(), String> {
    let since: Option<u64> = field(env.since, "since", false)?;
    let epoch: Option<String> = field(env.epoch, "epoch", false)?;
    let waiter = || JoinWaiter {
        session: shard.session(session.info.id).expect("a handled session is registered"),
        since,
        epoch: epoch.clone(),
    };
    match shard.open_document(&session.info.document, waiter) {
        Some(hub) => {
            finish_join(shard, session, hub, since, epoch.as_deref());
        }
        // Loading from the store: the reader holds this session's next
        // messages until `finish_join` ran.
        None => session.join_pending(),
    }
    Ok(())
}

/// Joins a session to its loaded document: subscribe, `joined_document`,
/// `user_joined` to the others, then the `sync_response` a `since` asked for.
/// Returns false when the join waits for Redis (cluster mode: the session is
/// listed there first, and `joined` finishes it); the session then holds its
/// next messages.
pub(super) fn finish_join(
    shard: &Shard,
    session: &Session,
    hub: Rc<DocumentHub>,
    since: Option<u64>,
    epoch: Option<&str>,
) -> bool {
    if !session.is_open() || session.sub.borrow().is_some() {
        return true;
    }
    let participant = {
        let auth = session.auth.borrow();
        let Some(user) = auth.user() else { return true }; // checked before
        Participant {
            connection_id: session.info.id,
            user_id: user.user_id.clone(),
            user_name: user.user_name.clone(),
            color: user.color.clone(),
        }
    };
    let max_sessions = shard.config.documents.max_sessions;
    if hub.subscriber_count() >= max_sessions {
        let message = format!("the document has {max_sessions} sessions joined, the most it may have");
        reply_error(shard, session, ErrorCode::DocumentFull, &message);
        return true;
    }
    if let Some(cluster) = &shard.cluster {
        let reply = JoinReply { core: shard.index, session: session.info.id, since, epoch: epoch.map(Into::into) };
        cluster.send(Request::Join { document: hub.id.clone(), participant, announce: true, reply: Some(reply) });
        session.join_pending();
        return false;
    }
    joined(shard, session, &hub, participant, since, epoch);
    true
}

/// The second half of a join: subscribe, `joined_document`, `user_joined`,
/// and the sync a `since` asked for.
pub(super) fn joined(
    shard: &Shard,
    session: &Session,
    hub: &Rc<DocumentHub>,
    participant: Participant,
    since: Option<u64>,
    epoch: Option<&str>,
) {
    let user_joined = encode::user_joined(&participant);
    *session.sub.borrow_mut() = Some(Subscription::new(hub.clone()));
    hub.subscribe(participant, session.writer_waker.clone());
    let listed = shard.config.documents.max_participants_listed;
    let count = hub.participant_count();
    let reply = hub.with_participants(None, listed, |ps, _| {
        encode::joined(&session.info.document, hub.seq(), &hub.epoch_text, ps, count)
    });
    session.send_text(shard, reply);
    shard.stats().broadcasts.add(1);
    hub.publish_presence(session.info.id, user_joined);
    match since {
        Some(since) => sync_response(shard, session, hub, since, epoch),
        None if epoch.is_some_and(|e| e != &*hub.epoch_text) => {
            session.send_text(shard, encode::epoch_changed(&hub.epoch_text));
        }
        None => {}
    }
}

/// Leaves the session's document if joined: unsubscribes and broadcasts
/// `user_left`. Used by `leave_document` and when a joined session ends.
pub(super) fn leave(shard: &Shard, session: &Session) {
    let Some(sub) = session.sub.borrow_mut().take() else { return };
    let user_left = {
        let auth = session.auth.borrow();
        encode::user_left(session.info.id, auth.user().map_or("", |u| &u.user_id))
    };
    sub.hub.unsubscribe(session.info.id);
    if let Some(cluster) = &shard.cluster {
        cluster.send(Request::Leave { document: sub.hub.id.clone(), connection_id: session.info.id });
    }
    shard.stats().broadcasts.add(1);
    sub.hub.publish_presence(session.info.id, user_left);
}

/// The hub of the session's document (the caller checked it is joined).
fn joined_hub(session: &Session) -> Option<std::rc::Rc<crate::document::DocumentHub>> {
    session.sub.borrow().as_ref().map(|s| s.hub.clone())
}

fn operation(shard: &Shard, session: &Session, env: &Envelope<'_>) -> Result<(), String> {
    let Some(payload) = env.payload else { return Err("missing field `payload`".into()) };
    check_depth(payload, "payload", shard.config.limits.max_json_depth)?;
    if env.client_op_id.is_some() && client_op_id(env).is_none() {
        return Err("field `client_op_id` must be a string or a number".into());
    }
    let client_op_id = client_op_id(env);
    if !rate_ok(shard, session, &session.rates.ops, shard.config.limits.max_ops_per_sec, client_op_id) {
        return Ok(());
    }
    let Some(hub) = joined_hub(session) else { return Ok(()) };
    if let Some(cluster) = &shard.cluster {
        // Redis gives the seq; the ack and every node's broadcast follow.
        let suffix = {
            let auth = session.auth.borrow();
            let user_id_json = auth.user().map_or("\"\"", |u| &u.user_id_json);
            encode::operation_suffix(session.info.id, user_id_json, payload.get().as_bytes())
        };
        cluster.send(Request::Append {
            document: hub.id.clone(),
            epoch: hub.epoch,
            origin: session.info.id,
            suffix: suffix.into(),
            core: shard.index,
            session: session.info.id,
            client_op_id: client_op_id.map(Into::into),
        });
        return Ok(());
    }
    let seq = hub.assign_seq();
    let frame = {
        let auth = session.auth.borrow();
        let user_id_json = auth.user().map_or("\"\"", |u| &u.user_id_json);
        encode::operation(seq, session.info.id, user_id_json, payload.get().as_bytes())
    };
    let ticket = match shard.store.append(&hub.id, hub.epoch, Kind::Op, seq, frame.payload()) {
        Ok(t) => t,
        Err(e) => {
            hub.unassign_last(seq);
            shard.stats().store_refusals.add(1);
            session.send_text(shard, encode::op_error(ErrorCode::Unavailable, &e.to_string(), client_op_id));
            return Ok(());
        }
    };
    hub.last_ticket.set(ticket);
    let what = Committed::Op { seq, frame, client_op_id: client_op_id.map(Into::into) };
    commit_or_defer(shard, session, hub, ticket, what);
    Ok(())
}

/// Publishes and acknowledges at once what the store already holds (memory,
/// `fsync = "never"`), else queues it until its record is stored.
pub(super) fn commit_or_defer(shard: &Shard, session: &Session, hub: Rc<DocumentHub>, ticket: u64, what: Committed) {
    if shard.store.stored() >= ticket && !shard.commits_pending() {
        return publish(shard, session, &hub, what);
    }
    let session = shard.session(session.info.id).expect("a handled session is registered");
    shard.defer(Commit { ticket, hub, session, what });
}

fn publish(shard: &Shard, session: &Session, hub: &DocumentHub, what: Committed) {
    match what {
        Committed::Op { seq, frame, client_op_id } => {
            shard.stats().operations.add(1);
            shard.stats().broadcasts.add(1);
            // The ack first: its writer is woken before the subscribers',
            // so after a group commit the senders hear back before the
            // core is busy with the batch's fan-out.
            session.send_text(shard, encode::ack(seq, client_op_id.as_deref()));
            hub.publish_op(seq, session.info.id, frame);
        }
        Committed::Snapshot { seq, state } => {
            hub.store_snapshot(seq, state);
            session.send_text(shard, encode::ack(seq, None));
        }
        Committed::Update { seq, frame, .. } => {
            shard.stats().operations.add(1);
            shard.stats().broadcasts.add(1);
            hub.publish_op(seq, session.info.id, frame);
        }
    }
}

/// A deferred operation or snapshot whose record is stored.
pub(super) fn committed(shard: &Shard, c: Commit) {
    publish(shard, &c.session, &c.hub, c.what)
}

/// A deferred operation or snapshot whose record could not be stored:
/// nothing was broadcast or acknowledged; the client is told `UNAVAILABLE`.
pub(super) fn not_committed(shard: &Shard, c: Commit, why: &str) {
    let reply = match c.what {
        Committed::Op { client_op_id, .. } => {
            shard.stats().store_refusals.add(1);
            c.hub.unassign();
            encode::op_error(ErrorCode::Unavailable, why, client_op_id.as_deref())
        }
        Committed::Snapshot { .. } => {
            shard.stats().store_refusals.add(1);
            encode::error(ErrorCode::Unavailable, why)
        }
        Committed::Update { room, seq, frame } => {
            // Passed on all the same (the room has it); its state is stored later.
            super::yjs::not_stored(shard, &c.session, &room, why);
            return publish(shard, &c.session, &c.hub, Committed::Update { room, seq, frame });
        }
    };
    c.session.send_text(shard, reply);
}

fn cursor(shard: &Shard, session: &Session, env: &Envelope<'_>) -> Result<(), String> {
    let Some(payload) = env.payload else { return Err("missing field `payload`".into()) };
    check_depth(payload, "payload", shard.config.limits.max_json_depth)?;
    if !rate_ok(shard, session, &session.rates.cursors, shard.config.limits.max_cursor_per_sec, None) {
        return Ok(());
    }
    let Some(hub) = joined_hub(session) else { return Ok(()) };
    let frame = {
        let auth = session.auth.borrow();
        let (user_id_json, color) = auth.user().map_or(("\"\"", ""), |u| (&u.user_id_json, &u.color));
        encode::cursor(session.info.id, user_id_json, color, payload.get().as_bytes())
    };
    if let Some(cluster) = &shard.cluster {
        let f = frame.payload().into();
        cluster.send(Request::Cursor { document: hub.id.clone(), connection_id: session.info.id, frame: f });
    }
    shard.stats().broadcasts.add(1);
    hub.publish_presence(session.info.id, frame);
    Ok(())
}

/// Answers a sync (`sync_request`, or `join_document` with `since`): the
/// history after `since`, or `EPOCH_CHANGED` when the client's epoch is not
/// the document's.
fn sync_response(shard: &Shard, session: &Session, hub: &DocumentHub, since: u64, epoch: Option<&str>) {
    if epoch.is_some_and(|e| e != &*hub.epoch_text) {
        session.send_text(shard, encode::epoch_changed(&hub.epoch_text));
        return;
    }
    let max = shard.config.limits.max_sync_bytes;
    let reply = match hub.sync(since, max) {
        Sync::History { ops } => {
            encode::sync_response(hub.seq(), &hub.epoch_text, None, ops.ops.iter().map(|op| op.payload()), ops.more)
        }
        Sync::Snapshot { snapshot, ops } => encode::sync_response(
            hub.seq(),
            &hub.epoch_text,
            Some((snapshot.seq, snapshot.state.get())),
            ops.ops.iter().map(|op| op.payload()),
            ops.more,
        ),
        Sync::Ahead => {
            let message = format!("`since` {since} is ahead of the document (its seq is {})", hub.seq());
            return reply_error(shard, session, ErrorCode::HistoryUnavailable, &message);
        }
        Sync::Gone => {
            return reply_error(shard, session, ErrorCode::HistoryUnavailable, "the history no longer covers `since`");
        }
    };
    session.send_text(shard, reply);
}

fn snapshot(shard: &Shard, session: &Session, env: &Envelope<'_>) -> Result<(), String> {
    let seq: u64 = field(env.seq, "seq", true)?.unwrap_or(0);
    let Some(state) = env.state else { return Err("missing field `state`".into()) };
    check_depth(state, "state", shard.config.limits.max_json_depth)?;
    let Some(hub) = joined_hub(session) else { return Ok(()) };
    // In cluster mode Redis knows the document's seq (this node may not have
    // received the last operations yet) and checks it.
    if seq > hub.seq() && shard.cluster.is_none() {
        reply_error(shard, session, ErrorCode::BadSnapshot, "snapshot seq is ahead of the document");
        return Ok(());
    }
    if !hub.newer_snapshot(seq) {
        // An equal or older one is held: acknowledged and ignored.
        session.send_text(shard, encode::ack(seq, None));
        return Ok(());
    }
    if let Some(cluster) = &shard.cluster {
        cluster.send(Request::Snapshot {
            document: hub.id.clone(),
            epoch: hub.epoch,
            seq,
            state: state.get().into(),
            core: shard.index,
            session: session.info.id,
        });
        return Ok(());
    }
    let ticket = match shard.store.append(&hub.id, hub.epoch, Kind::Snapshot, seq, state.get().as_bytes()) {
        Ok(t) => t,
        Err(e) => {
            shard.stats().store_refusals.add(1);
            reply_error(shard, session, ErrorCode::Unavailable, &e.to_string());
            return Ok(());
        }
    };
    hub.last_ticket.set(ticket);
    commit_or_defer(shard, session, hub, ticket, Committed::Snapshot { seq, state: state.to_owned() });
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn session_ids_carry_the_nonce_and_the_connection() {
        assert_eq!(super::session_id(0xab, 0x11), "00000000000000ab-11");
    }
}
