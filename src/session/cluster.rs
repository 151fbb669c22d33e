//! Cluster mode on a core (`docs/cluster.md`): what the Redis bridge sends
//! this core. Operations arrive in `seq` order, gaps already filled, and are
//! fanned out exactly as a single node fans out its own: one frame, the
//! document's rings, `lagged` for a subscriber that falls behind.

use std::collections::HashSet;
use std::rc::Rc;

use serde_json::value::RawValue;

use super::{yjs, Mode, Shard, Subscription};
use crate::cluster::{Event, JoinReply, Presence, Refusal, Request};
use crate::document::{DocumentHub, Restored, Snapshot};
use crate::protocol::{encode, ErrorCode, Participant};
use crate::store::index::{is_merged, yjs_room_of};
use crate::store::Epoch;
use crate::ws::{Kind, OutFrame};

impl Shard {
    /// Handles what the bridge sends this core; runs for the life of the
    /// core in cluster mode.
    pub async fn cluster_loop(self: Rc<Self>) {
        let Some(cluster) = &self.cluster else { return };
        while let Ok(event) = cluster.events.recv_async().await {
            self.on_cluster_event(event);
        }
    }

    fn on_cluster_event(&self, event: Event) {
        if let Some(event) = self.on_room_event(event) {
            self.on_document_event(event);
        }
    }

    /// An event of a Yjs room (its key names it) goes to the room
    /// (`session/yjs.rs`); any other is given back.
    fn on_room_event(&self, event: Event) -> Option<Event> {
        match event {
            Event::Loaded { document, result } if is_merged(&document) => {
                yjs::cluster_loaded(self, yjs_room_of(&document)?, result)
            }
            Event::Op { document, epoch, seq, origin, frame } if is_merged(&document) => {
                yjs::cluster_update(self, yjs_room_of(&document)?, epoch, seq, origin, frame)
            }
            Event::Gap { document, epoch, to } if is_merged(&document) => {
                yjs::cluster_gap(self, yjs_room_of(&document)?, epoch, to)
            }
            Event::Reset { document, epoch } if is_merged(&document) => {
                yjs::cluster_reset(self, yjs_room_of(&document)?, epoch)
            }
            Event::Presence { document, origin, change } if is_merged(&document) => {
                // Rooms have no members; awareness is their presence.
                if let Presence::Cursor(message) = change {
                    yjs::cluster_awareness(self, yjs_room_of(&document)?, origin, &message);
                }
            }
            Event::Members { document, .. } if is_merged(&document) => {}
            Event::Snapshot { document, epoch, state, .. } if is_merged(&document) => {
                yjs::cluster_merged_state(self, yjs_room_of(&document)?, epoch, &state)
            }
            Event::Appended { session, result, .. } if self.yjs_session(session) => {
                if let (Some(session), Err(r)) = (self.session(session), result) {
                    yjs::cluster_refused(self, &session, &refusal_text(&r));
                }
            }
            Event::SnapshotStored { session, result, .. } if self.yjs_session(session) => {
                if let Err(r) = result {
                    tracing::debug!(session, why = %refusal_text(&r), "yjs: Redis did not store a room's merged state");
                }
            }
            event => return Some(event),
        }
        None
    }

    fn yjs_session(&self, id: u64) -> bool {
        self.session(id).is_some_and(|s| s.info.mode == Mode::Yjs)
    }

    fn on_document_event(&self, event: Event) {
        match event {
            Event::Loaded { document, result } => self.cluster_loaded(&document, result),
            Event::Op { document, epoch, seq, origin, frame } => {
                let Some(hub) = self.document(&document).filter(|h| h.epoch == epoch) else { return };
                if seq <= hub.seq() {
                    return;
                }
                if seq > hub.seq() + 1 {
                    // The bridge fills gaps before it sends later operations;
                    // should one slip through, the subscribers hear `lagged`
                    // rather than a seq out of order.
                    tracing::warn!(document = %document, seq, have = hub.seq(), "cluster: an operation arrived ahead of a gap");
                    hub.skip_to(seq - 1);
                }
                self.stats().broadcasts.add(1);
                hub.publish_op(seq, origin, Rc::new(OutFrame::finish(Kind::Binary, frame)));
            }
            Event::Gap { document, epoch, to } => {
                if let Some(hub) = self.document(&document).filter(|h| h.epoch == epoch) {
                    hub.skip_to(to);
                }
            }
            Event::Reset { document, epoch } => self.cluster_reset(&document, epoch),
            Event::Presence { document, origin, change } => {
                let Some(hub) = self.document(&document) else { return };
                let frame = match change {
                    Presence::Joined(p) => {
                        if announce_joined(&hub, p) {
                            self.stats().broadcasts.add(1);
                        }
                        return;
                    }
                    Presence::Left(p) => {
                        if !hub.remove_remote(p.connection_id) {
                            return;
                        }
                        encode::user_left(p.connection_id, &p.user_id)
                    }
                    Presence::Cursor(frame) => Rc::new(OutFrame::new(Kind::Binary, &frame)),
                };
                self.stats().broadcasts.add(1);
                hub.publish_presence(origin, frame);
            }
            Event::Members { document, members } => {
                if let Some(hub) = self.document(&document) {
                    self.reconcile_members(&hub, members);
                }
            }
            Event::Joined { document, participant, reply, result } => {
                self.cluster_joined(&document, participant, reply, result)
            }
            Event::Snapshot { document, epoch, seq, state } => {
                let Some(hub) = self.document(&document).filter(|h| h.epoch == epoch) else { return };
                if hub.newer_snapshot(seq) {
                    if let Ok(state) = RawValue::from_string(state.into()) {
                        hub.store_snapshot(seq, state);
                    }
                }
            }
            Event::Appended { session, client_op_id, result } => {
                let Some(session) = self.session(session) else { return };
                let reply = match result {
                    Ok(seq) => {
                        self.stats().operations.add(1);
                        encode::ack(seq, client_op_id.as_deref())
                    }
                    Err(r) => {
                        self.stats().store_refusals.add(1);
                        encode::op_error(ErrorCode::Unavailable, &refusal_text(&r), client_op_id.as_deref())
                    }
                };
                session.send_text(self, reply);
            }
            Event::SnapshotStored { session, seq, result } => {
                let Some(session) = self.session(session) else { return };
                let reply = match result {
                    Ok(()) => encode::ack(seq, None),
                    Err(Refusal::Ahead { .. }) => {
                        encode::error(ErrorCode::BadSnapshot, "snapshot seq is ahead of the document")
                    }
                    Err(r) => {
                        self.stats().store_refusals.add(1);
                        encode::error(ErrorCode::Unavailable, &refusal_text(&r))
                    }
                };
                session.send_text(self, reply);
            }
        }
    }

    /// Announces the difference between the remote participants a hub knows
    /// and those Redis lists.
    fn reconcile_members(&self, hub: &DocumentHub, members: Vec<Participant>) {
        let listed: HashSet<u64> = members.iter().map(|p| p.connection_id).collect();
        for p in hub.remote_participants() {
            if !listed.contains(&p.connection_id) && hub.remove_remote(p.connection_id) {
                hub.publish_presence(p.connection_id, encode::user_left(p.connection_id, &p.user_id));
            }
        }
        for p in members {
            announce_joined(hub, p);
        }
    }

    /// Redis listed a joining session (or could not): the join finishes with
    /// every member Redis knows, so the session's `joined_document` names
    /// everyone whose join was answered before its own, on any node.
    fn cluster_joined(
        &self,
        document: &str,
        participant: Participant,
        reply: JoinReply,
        result: Result<Vec<Participant>, String>,
    ) {
        let session = self.session(reply.session).filter(|s| s.is_open() && s.sub.borrow().is_none());
        let hub = self.document(document);
        let (Some(session), Some(hub)) = (session, hub) else {
            // Gone meanwhile: unlist it again.
            if result.is_ok() {
                if let Some(cluster) = &self.cluster {
                    let connection_id = participant.connection_id;
                    cluster.send(Request::Leave { document: document.into(), connection_id });
                }
            }
            if let Some(s) = self.session(reply.session) {
                s.join_done();
            }
            return;
        };
        match result {
            Ok(members) => {
                // Only additions: one that joined after Redis listed these may
                // be known already (its notification came first).
                for p in members {
                    announce_joined(&hub, p);
                }
                super::handlers::joined(self, &session, &hub, participant, reply.since, reply.epoch.as_deref());
            }
            Err(e) => {
                let message = format!("the cluster could not list the session: {e}");
                session.send_text(self, encode::error(ErrorCode::Unavailable, &message));
            }
        }
        session.join_done();
    }

    /// A document the bridge loaded from Redis: its hub, then everyone who
    /// waited to join it.
    fn cluster_loaded(&self, document: &str, result: Result<crate::cluster::Loaded, String>) {
        let waiters = self.loading.borrow_mut().remove(document).unwrap_or_default();
        match result {
            Ok(l) => {
                let snapshot = l.snapshot.and_then(|(seq, state)| {
                    RawValue::from_string(state.into()).ok().map(|state| Snapshot { seq, state })
                });
                let ops = l.ops.into_iter().map(|f| Rc::new(OutFrame::finish(Kind::Binary, f))).collect();
                let restored = Restored { epoch: l.epoch, seq: l.seq, ops, snapshot };
                let hub = DocumentHub::restore(document, self.capacity(), restored);
                for p in l.members {
                    hub.add_remote(p);
                }
                let hub = self.loaded(document, Rc::new(hub));
                for w in waiters {
                    if super::handlers::finish_join(self, &w.session, hub.clone(), w.since, w.epoch.as_deref()) {
                        w.session.join_done();
                    }
                }
            }
            Err(e) => {
                tracing::error!(document, core = self.index, error = %e, "cluster: could not load a document from Redis");
                for w in waiters {
                    let message = format!("the document could not be loaded from Redis: {e}");
                    w.session.send_text(self, encode::error(ErrorCode::Unavailable, &message));
                    w.session.join_done();
                }
            }
        }
    }

    /// Redis lost the document and it started again with `epoch`: a new hub
    /// at seq 0; its joined sessions move to it, are told `EPOCH_CHANGED`,
    /// and are listed in Redis again. The new history's operations follow.
    fn cluster_reset(&self, document: &str, epoch: Epoch) {
        let Some(old) = self.document(document) else { return };
        if old.epoch == epoch {
            return;
        }
        let restored = Restored { epoch, seq: 0, ops: Vec::new(), snapshot: None };
        let hub = Rc::new(DocumentHub::restore(document, self.capacity(), restored));
        self.replace_document(document, hub.clone());
        let participants = old.local_participants();
        for session in self.all_sessions() {
            let moved = session.sub.borrow().as_ref().is_some_and(|s| Rc::ptr_eq(&s.hub, &old));
            if !moved {
                continue;
            }
            let Some(p) = participants.iter().find(|p| p.connection_id == session.info.id).cloned() else { continue };
            old.unsubscribe(p.connection_id);
            hub.subscribe(p.clone(), session.writer_waker.clone());
            *session.sub.borrow_mut() = Some(Subscription::new(hub.clone()));
            session.send_text(self, encode::epoch_changed(&hub.epoch_text));
            if let Some(cluster) = &self.cluster {
                cluster.send(Request::Join { document: document.into(), participant: p, announce: true, reply: None });
            }
        }
    }
}

/// A session of another node joined: listed among the hub's remote
/// participants and announced with `user_joined`, unless it was known
/// (false).
fn announce_joined(hub: &DocumentHub, p: Participant) -> bool {
    let (id, frame) = (p.connection_id, encode::user_joined(&p));
    let added = hub.add_remote(p);
    if added {
        hub.publish_presence(id, frame);
    }
    added
}

fn refusal_text(r: &Refusal) -> String {
    match r {
        Refusal::Unavailable(why) => format!("the cluster could not sequence it: {why}"),
        Refusal::Epoch(_) => "the document's history started again (a new epoch); not applied".into(),
        Refusal::Ahead { seq } => format!("seq {seq} is ahead of the document"),
    }
}
