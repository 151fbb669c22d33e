//! Yjs rooms (`docs/yjs.md`): the y-websocket protocol on `/yjs/{document}`,
//! so that any `y-websocket` `WebsocketProvider` works unchanged.
//!
//! Each room lives on its document's owner core: a `yrs` document holding
//! the merged state, and a hub whose rings carry the fan-out. An update is
//! decoded and applied (a malformed one is refused and goes nowhere), then
//! encoded once into a frame that every other client of the room gets; a
//! client that falls behind the ring gets the whole state again instead of
//! a gap. Awareness (cursors, names) goes on the presence ring; the relay
//! keeps each client id's latest state, hands them to a client that joins,
//! and publishes their removal when the connection that announced them ends.
//!
//! With `storage.dir` a room's history is kept in the core's log under its
//! own key ([`yjs_key`]): every update as a record, passed on once stored
//! (as an operation is), and every `documents.yjs_compact_after` updates the
//! room's whole state as one merged update (a snapshot), after which the
//! updates before it are dead and their space is reclaimed. A room is
//! loaded from its merged state and the updates after it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use yrs::sync::awareness::AwarenessUpdateEntry;
use yrs::sync::protocol::MessageReader;
use yrs::sync::{AwarenessUpdate, Message, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

use super::shard::Committed;
use super::{Session, Shard, Subscription};
use crate::cluster::{Loaded, Request};
use crate::document::{Capacity, DocumentHub, Restored};
use crate::protocol::Participant;
use crate::store::index::yjs_key;
use crate::store::record::Kind as RecordKind;
use crate::store::{Epoch, StoreError};
use crate::ws::{Kind, OutFrame, SharedFrame};

/// A Yjs room on its owner core.
pub(crate) struct Room {
    /// Its key in the store.
    key: Box<str>,
    doc: Doc,
    pub(crate) hub: Rc<DocumentHub>,
    /// Each Yjs client id's latest awareness state.
    awareness: RefCell<HashMap<u64, AwarenessState>>,
    /// An upper bound of the document's encoded size: its size when last
    /// measured plus every update applied since (merging only shrinks).
    size_bound: Cell<usize>,
    /// Updates stored since the last merged state, and their bytes.
    unmerged: Cell<(u64, usize)>,
    /// Bytes of the last merged state stored.
    merged_bytes: Cell<usize>,
    /// The ticket of the last merged state appended.
    merged_ticket: Cell<u64>,
    /// The store refused an update or a merged state: the whole state is to
    /// be stored (retried by the ticker until the store takes it).
    dirty: Cell<bool>,
    /// Cluster mode: the session whose update Redis refused last (it hears
    /// of a refusal of the state sent again).
    last_refused: Cell<u64>,
}

/// A Yjs client id's latest awareness state: its clock, its JSON, and the
/// connection that announced it first (its owner).
type AwarenessState = (u32, Arc<str>, u64);

impl Room {
    /// A room resuming `doc` at `seq` of `epoch` (a new room: an empty
    /// document, seq 0 of a new epoch).
    fn new(id: &str, cap: Capacity, doc: Doc, epoch: Epoch, seq: u64) -> Room {
        // Rooms keep no operation history: a client is resynced from the
        // document itself.
        let cap = Capacity { history: 0, ..cap };
        let size = doc.transact().encode_state_as_update_v1(&StateVector::default()).len();
        Room {
            key: yjs_key(id).into(),
            doc,
            hub: Rc::new(DocumentHub::restore(id, cap, Restored { epoch, seq, ops: Vec::new(), snapshot: None })),
            awareness: RefCell::new(HashMap::new()),
            size_bound: Cell::new(size),
            unmerged: Cell::new((0, 0)),
            merged_bytes: Cell::new(size),
            merged_ticket: Cell::new(0),
            dirty: Cell::new(false),
            last_refused: Cell::new(0),
        }
    }

    /// Appends the room's whole state as one merged update (a snapshot at
    /// the last seq assigned, which it covers): the updates up to it are
    /// dead from then on. A refusal leaves the room dirty, to try again.
    fn merge(&self, shard: &Shard) {
        let state = self.state();
        match shard.store.append(&self.key, self.hub.epoch, RecordKind::Snapshot, self.hub.assigned(), &state) {
            Ok(ticket) => {
                self.hub.last_ticket.set(ticket);
                self.merged_ticket.set(ticket);
                self.unmerged.set((0, 0));
                self.merged_bytes.set(state.len());
                self.size_bound.set(state.len());
                self.dirty.set(false);
                tracing::debug!(room = %self.hub.id, seq = self.hub.assigned(), bytes = state.len(), "yjs: room state merged");
            }
            Err(e) => {
                self.dirty.set(true);
                tracing::debug!(room = %self.hub.id, error = %e, "yjs: merging the room's state was refused; retried later");
            }
        }
    }

    /// After an update is appended: merges the room's state once enough has
    /// piled up since the last merge (`documents.yjs_compact_after` updates,
    /// or more bytes than the merged state and at least 1 MiB).
    fn note_appended(&self, shard: &Shard, bytes: usize) {
        if shard.log.is_none() {
            return;
        }
        let (n, b) = self.unmerged.get();
        self.unmerged.set((n + 1, b + bytes));
        let after = shard.config.documents.yjs_compact_after.max(1);
        if n + 1 >= after || b + bytes > self.merged_bytes.get().max(1 << 20) {
            self.merge(shard);
        }
    }

    /// The whole document as one update (a diff against nothing).
    fn state(&self) -> Vec<u8> {
        self.doc.transact().encode_state_as_update_v1(&StateVector::default())
    }

    /// Keeps the awareness states of `update`; a client id belongs to the
    /// connection that announced it first (`announcer`): providers pass on
    /// the states they hear of, and those echoes must not make another
    /// connection its owner.
    fn note_awareness(&self, update: &AwarenessUpdate, announcer: u64) {
        let mut states = self.awareness.borrow_mut();
        for (&client, entry) in &update.clients {
            if &*entry.json == "null" {
                states.remove(&client);
            } else {
                let owner = states.get(&client).map_or(announcer, |s| s.2);
                states.insert(client, (entry.clock, entry.json.clone(), owner));
            }
        }
    }

    /// Passes an awareness message of connection `from` on to this room's
    /// clients, and in cluster mode to the other relays.
    fn publish_awareness(&self, shard: &Shard, from: u64, f: SharedFrame) {
        if let Some(cluster) = &shard.cluster {
            let document = self.key.clone();
            cluster.send(Request::Cursor { document, connection_id: from, frame: f.payload().into() });
        }
        self.hub.publish_presence(from, f);
    }

    /// Cluster mode: sends the room's whole state to its history in Redis
    /// of `epoch` as one update (an update that changes nothing a relay
    /// has); `session` hears of a refusal.
    fn append_state(&self, shard: &Shard, epoch: Epoch, session: u64) {
        let Some(cluster) = &shard.cluster else { return };
        cluster.send(Request::Append {
            document: self.key.clone(),
            epoch,
            origin: 0,
            suffix: Message::Sync(SyncMessage::Update(self.state())).encode_v1().into(),
            core: shard.index,
            session,
            client_op_id: None,
        });
    }

    /// Every awareness state held, as one message (None: there are none).
    fn awareness_states(&self) -> Option<SharedFrame> {
        let states = self.awareness.borrow();
        if states.is_empty() {
            return None;
        }
        let clients = states
            .iter()
            .map(|(&id, (clock, json, _))| (id, AwarenessUpdateEntry { clock: *clock, json: json.clone() }))
            .collect();
        Some(frame(&Message::Awareness(AwarenessUpdate { clients })))
    }
}

fn frame(message: &Message) -> SharedFrame {
    Rc::new(OutFrame::new(Kind::Binary, &message.encode_v1()))
}

impl Shard {
    fn add_room(&self, id: &str, room: Room) -> Rc<Room> {
        let room = Rc::new(room);
        self.rooms.borrow_mut().insert(id.into(), room.clone());
        self.wake_ticker();
        room
    }

    /// A Yjs room, if this core has it.
    pub(crate) fn existing_room(&self, document: &str) -> Option<Rc<Room>> {
        self.rooms.borrow().get(document).cloned()
    }
}

/// A Yjs session becomes CONNECTED (authenticated while VALIDATING): it
/// enters its room, once the room is loaded.
pub(super) fn start(shard: &Shard, session: &Rc<Session>) {
    let id = &session.info.document;
    if let Some(room) = shard.existing_room(id) {
        return enter(shard, session, &room);
    }
    let key = yjs_key(id);
    if shard.cluster.is_none() && shard.store.head(&key).is_none() {
        let room = shard.add_room(id, Room::new(id, shard.capacity(), Doc::new(), Epoch::random(), 0));
        return enter(shard, session, &room);
    }
    // Its history is in the store: what the client sends meanwhile is held.
    session.join_pending();
    let first = {
        let mut loading = shard.rooms_loading.borrow_mut();
        let waiters = loading.entry(id.clone()).or_default();
        waiters.push(session.clone());
        waiters.len() == 1
    };
    if !first {
        return;
    }
    match &shard.cluster {
        // Answered by the bridge's `Loaded` (`cluster_loaded`).
        Some(cluster) => cluster.send(Request::Load { document: key.into(), core: shard.index }),
        None => {
            let shard = shard.rc();
            shard.spawn_tracked(load(shard.clone(), id.clone()));
        }
    }
}

/// Loads a room from the store, then lets in everyone who waited.
async fn load(shard: Rc<Shard>, id: Box<str>) {
    let result = read_room(&shard, &id).await;
    let waiters = shard.rooms_loading.borrow_mut().remove(&id).unwrap_or_default();
    match result {
        Ok(room) => {
            let room = shard.add_room(&id, room);
            for session in waiters {
                enter(&shard, &session, &room);
                session.join_done();
            }
        }
        Err(e) => {
            tracing::error!(room = %id, core = shard.index, error = %e, "yjs: could not load a room's history");
            for session in waiters {
                session.begin_close(&shard, crate::close::INTERNAL, "the room's history could not be loaded");
                session.join_done();
            }
        }
    }
}

/// A room as stored: its latest merged state, then every update after it.
/// An update that does not decode or apply (damage) is skipped, said so.
async fn read_room(shard: &Shard, id: &str) -> Result<Room, StoreError> {
    let key = yjs_key(id);
    let Some(head) = shard.store.head(&key) else {
        return Ok(Room::new(id, shard.capacity(), Doc::new(), Epoch::random(), 0));
    };
    let doc = Doc::new();
    let mut skipped = 0;
    let mut apply_stored = |bytes: &[u8]| {
        if !apply_state(&doc, bytes) {
            skipped += 1;
        }
    };
    let merged = shard.store.latest_snapshot(&key).await?;
    let from = merged.as_ref().map_or(1, |m| m.seq + 1);
    if let Some(m) = &merged {
        apply_stored(&m.state);
    }
    if head.oldest > from {
        tracing::warn!(room = id, from, oldest = head.oldest, "yjs: updates of the room were lost to damage");
    }
    let updates = shard.store.read_range(&key, from, head.seq).await?;
    let mut bytes = 0;
    for u in &updates {
        bytes += u.len();
        apply_stored(u);
    }
    if skipped > 0 {
        tracing::warn!(room = id, skipped, "yjs: stored updates of the room that do not apply were skipped");
    }
    let room = Room::new(id, shard.capacity(), doc, head.epoch, head.seq);
    room.merged_bytes.set(merged.map_or(0, |m| m.state.len()));
    room.unmerged.set((updates.len() as u64, bytes));
    tracing::debug!(room = id, seq = head.seq, updates = updates.len(), "yjs: room loaded");
    Ok(room)
}

/// The session joins its loaded room and gets the relay's sync step 1 (so
/// that it sends what the relay lacks) and the awareness states.
fn enter(shard: &Shard, session: &Session, room: &Rc<Room>) {
    if !session.is_open() {
        return;
    }
    let Some(who) = session.info.identity.clone() else { return };
    let color = session.info.color.clone().unwrap_or_else(|| crate::auth::palette_color(&who.user_id).to_string());
    let participant =
        Participant { connection_id: session.info.id, user_id: who.user_id, user_name: who.user_name, color };
    *session.sub.borrow_mut() = Some(Subscription::new(room.hub.clone()));
    room.hub.subscribe(participant, session.writer_waker.clone());
    let sv = room.doc.transact().state_vector();
    session.send(shard, frame(&Message::Sync(SyncMessage::SyncStep1(sv))));
    if let Some(states) = room.awareness_states() {
        session.send(shard, states);
    }
}

/// One binary message of a Yjs client: one or more y-protocol messages.
pub(super) fn handle(shard: &Shard, session: &Session, data: &[u8]) {
    let Some(room) = session.sub.borrow().as_ref().and_then(|_| shard.existing_room(&session.info.document)) else {
        return;
    };
    let mut decoder = DecoderV1::from(data);
    for message in MessageReader::new(&mut decoder) {
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                refuse(shard, session, &format!("malformed message: {e}"));
                return;
            }
        };
        match message {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                // Exactly what the client lacks; then it has all the room has.
                let txn = room.doc.transact();
                let diff = txn.encode_state_as_update_v1(&sv);
                let mut known = txn.state_vector();
                known.merge(sv);
                drop(txn);
                session.yjs_known.borrow_mut().get_or_insert_with(StateVector::default).merge(known);
                session.send(shard, frame(&Message::Sync(SyncMessage::SyncStep2(diff))));
            }
            Message::Sync(SyncMessage::SyncStep2(update) | SyncMessage::Update(update)) => {
                if session.info.identity.as_ref().is_some_and(|who| who.read_only) {
                    // A read-only grant receives but does not change the
                    // document (as y-sweet does): a change is dropped, and
                    // said why; an empty answer to our step 1 is fine.
                    if !Update::decode_v1(&update).is_ok_and(|u| u.is_empty()) {
                        refuse(shard, session, "read-only: this token may not change the document");
                    }
                    continue;
                }
                match apply(&room, &update, shard.config.documents.max_room_bytes) {
                    Err(why) => {
                        refuse(shard, session, &why);
                        return;
                    }
                    // Nothing new (a client's answer to our step 1 when it
                    // has nothing we lack): nothing to pass on.
                    Ok(false) => continue,
                    Ok(true) => {}
                }
                store_and_pass_on(shard, session, &room, update);
            }
            Message::Awareness(update) => {
                room.note_awareness(&update, session.info.id);
                shard.stats().broadcasts.add(1);
                room.publish_awareness(shard, session.info.id, frame(&Message::Awareness(update)));
            }
            Message::AwarenessQuery => {
                if let Some(states) = room.awareness_states() {
                    session.send(shard, states);
                }
            }
            Message::Auth(_) | Message::Custom(..) => {}
        }
    }
}

/// An applied update: stored, then passed on to every other client of the
/// room, encoded once. If the store refuses it, it is passed on all the
/// same (the room has it, and a client that joins would get it), the sender
/// is told, and the room's whole state is stored once the store takes
/// records again.
fn store_and_pass_on(shard: &Shard, session: &Session, room: &Rc<Room>, update: Vec<u8>) {
    let hub = &room.hub;
    if let Some(cluster) = &shard.cluster {
        // Redis gives it a seq, and every node (this one too) passes it on
        // in seq order (`cluster_update`).
        cluster.send(Request::Append {
            document: room.key.clone(),
            epoch: hub.epoch,
            origin: session.info.id,
            suffix: Message::Sync(SyncMessage::Update(update)).encode_v1().into(),
            core: shard.index,
            session: session.info.id,
            client_op_id: None,
        });
        return;
    }
    let seq = hub.assign_seq();
    let ticket = match shard.store.append(&room.key, hub.epoch, RecordKind::Op, seq, &update) {
        Ok(ticket) => {
            hub.last_ticket.set(ticket);
            room.note_appended(shard, update.len());
            ticket
        }
        Err(e) => {
            not_stored(shard, session, room, &e.to_string());
            0 // published in its turn, behind what waits to be stored
        }
    };
    let what = Committed::Update { room: room.clone(), seq, frame: frame(&Message::Sync(SyncMessage::Update(update))) };
    super::handlers::commit_or_defer(shard, session, hub.clone(), ticket, what);
}

/// An update the store refused or failed to write: the room stores its
/// whole state later, and the sender hears why.
pub(super) fn not_stored(shard: &Shard, session: &Session, room: &Room, why: &str) {
    shard.stats().store_refusals.add(1);
    room.dirty.set(true);
    refuse(shard, session, &format!("{why}: the update was applied and passed on, and is stored with the room later"));
}

/// Decodes and applies an update; false: it holds nothing (no change to
/// pass on); an error names why it was refused. An update that would make
/// the document larger than `max_bytes` is refused before it is applied.
fn apply(room: &Room, update: &[u8], max_bytes: usize) -> Result<bool, String> {
    let decoded = Update::decode_v1(update).map_err(|e| format!("malformed update: {e}"))?;
    if decoded.is_empty() {
        return Ok(false);
    }
    if room.size_bound.get() + update.len() > max_bytes {
        // The bound may overstate: measure the document as it is.
        let now = room.state().len();
        room.size_bound.set(now);
        if now + update.len() > max_bytes {
            return Err(format!(
                "the document is too large: {now} bytes, and this update of {} would pass documents.max_room_bytes ({max_bytes})",
                update.len()
            ));
        }
    }
    room.doc.transact_mut().apply_update(decoded).map_err(|e| format!("update refused: {e}"))?;
    room.size_bound.set(room.size_bound.get() + update.len());
    Ok(true)
}

/// Tells the client why its message was dropped (the y-protocols auth
/// message, "permission denied", which providers report and survive).
fn refuse(shard: &Shard, session: &Session, why: &str) {
    tracing::debug!(id = session.info.id, why, "yjs: message refused");
    session.send(shard, frame(&Message::Auth(Some(why.to_string()))));
}

/// A Yjs session ends: the awareness states it announced are removed, for
/// everyone, so its cursors disappear.
pub(super) fn leave(shard: &Shard, session: &Session) {
    let Some(sub) = session.sub.borrow_mut().take() else { return };
    sub.hub.unsubscribe(session.info.id);
    let Some(room) = shard.existing_room(&session.info.document) else { return };
    let gone: HashMap<u64, AwarenessUpdateEntry> = {
        let mut states = room.awareness.borrow_mut();
        let mine: Vec<u64> = states.iter().filter(|(_, s)| s.2 == session.info.id).map(|(&id, _)| id).collect();
        mine.into_iter()
            .filter_map(|id| {
                states
                    .remove(&id)
                    .map(|(clock, _, _)| (id, AwarenessUpdateEntry { clock: clock + 1, json: "null".into() }))
            })
            .collect()
    };
    tracing::debug!(id = session.info.id, awareness_removed = gone.len(), "yjs: left the room");
    if !gone.is_empty() {
        room.publish_awareness(shard, session.info.id, frame(&Message::Awareness(AwarenessUpdate { clients: gone })));
    }
}

/// The ticker's round over the rooms: stores the state of a room that needs
/// it (storage refused something, or an idle room has unmerged updates,
/// so that it loads from one record), and frees a room without clients for
/// `after` once everything of it is written.
pub(super) fn tick(shard: &Shard, now: std::time::Instant, after: std::time::Duration) {
    if let Some(cluster) = &shard.cluster {
        let rooms: Vec<Rc<Room>> = shard.rooms.borrow().values().cloned().collect();
        for room in rooms {
            if room.dirty.get() {
                resend_state(shard, &room);
            }
            let idle = room.hub.subscriber_count() == 0 && room.hub.empty_since.get().is_some_and(|t| now - t >= after);
            if idle && !room.dirty.get() {
                shard.rooms.borrow_mut().remove(&*room.hub.id);
                cluster.send(Request::Unfollow { document: room.key.clone() });
            }
        }
        return;
    }
    if shard.log.is_none() {
        // In memory only: nothing to store, and the room's state dies with it.
        shard.rooms.borrow_mut().retain(|_, room| {
            room.hub.subscriber_count() > 0 || room.hub.empty_since.get().is_none_or(|t| now - t < after)
        });
        return;
    }
    let rooms: Vec<Rc<Room>> = shard.rooms.borrow().values().cloned().collect();
    for room in rooms {
        let idle = room.hub.subscriber_count() == 0 && room.hub.empty_since.get().is_some_and(|t| now - t >= after);
        let t = room.merged_ticket.get();
        let merge_lost = t > shard.store.stored() && t <= shard.store.failed();
        if room.dirty.get() || merge_lost || idle && room.unmerged.get().0 > 0 {
            room.merge(shard);
        }
        let settled = !room.dirty.get() && !room.hub.storing() && room.hub.last_ticket.get() <= shard.store.written();
        if idle && settled && room.unmerged.get().0 == 0 {
            shard.rooms.borrow_mut().remove(&*room.hub.id);
            tracing::debug!(room = %room.hub.id, "yjs: idle room freed");
        }
    }
}

/// What a Yjs client that fell behind the ring gets instead of a gap: a
/// diff of the room against what the client is known to have (what it said
/// in its sync step 1 and the answer it got, or what it was sent at its
/// last resync), which
/// covers everything it missed; the whole document when nothing is known.
pub(super) fn resync_frame(shard: &Shard, session: &Session) -> Option<SharedFrame> {
    let room = shard.existing_room(&session.info.document)?;
    let mut known = session.yjs_known.borrow_mut();
    let txn = room.doc.transact();
    let diff = txn.encode_state_as_update_v1(known.as_ref().unwrap_or(&StateVector::default()));
    *known = Some(txn.state_vector());
    Some(frame(&Message::Sync(SyncMessage::SyncStep2(diff))))
}

// ---------------------------------------------------------------------------
// Cluster mode (`docs/yjs.md`, "Cluster mode"): a room's updates go through
// Redis as a document's operations do, under the room's key; every node
// applies them in seq order and passes them on. Every
// `documents.yjs_compact_after`-th update's node stores the room's merged
// state (base64, as a snapshot); a node loads a room from it and the
// updates after it.

/// Applies the updates in one y-protocol message (sync step 2 or update);
/// false if it held something that does not decode or apply.
fn apply_message(doc: &Doc, message: &[u8]) -> bool {
    let mut decoder = DecoderV1::from(message);
    let mut ok = true;
    for m in MessageReader::new(&mut decoder) {
        match m {
            Ok(Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u))) => {
                ok &= apply_state(doc, &u);
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    ok
}

/// Decodes and applies one Yjs update (a merged state too); false if it
/// does not decode or apply.
fn apply_state(doc: &Doc, state: &[u8]) -> bool {
    Update::decode_v1(state).is_ok_and(|u| doc.transact_mut().apply_update(u).is_ok())
}

/// Applies `change` to the room's document, and passes on to its clients
/// here whatever it brought that they may lack (on the presence ring: it
/// has no seq of its own).
fn merge_in(room: &Room, change: impl FnOnce(&Doc)) {
    let before = room.doc.transact().state_vector();
    change(&room.doc);
    let diff = room.doc.transact().encode_state_as_update_v1(&before);
    if !Update::decode_v1(&diff).is_ok_and(|u| u.is_empty()) {
        room.hub.publish_presence(0, frame(&Message::Sync(SyncMessage::Update(diff))));
    }
}

fn base64_state(room: &Room) -> Box<str> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(room.state()).into()
}

fn unbase64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// The room as Redis holds it (`Request::Load`): a new room, or, for a
/// room reloaded after a gap, what it lacked merged in.
pub(super) fn cluster_loaded(shard: &Shard, id: &str, result: Result<Loaded, String>) {
    let waiters = shard.rooms_loading.borrow_mut().remove(id).unwrap_or_default();
    let l = match result {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(room = id, core = shard.index, error = %e, "yjs: could not load a room from Redis");
            for session in waiters {
                session.begin_close(shard, crate::close::INTERNAL, "the room could not be loaded from Redis");
                session.join_done();
            }
            return;
        }
    };
    let doc = Doc::new();
    let mut skipped = 0;
    let merged_seq = match &l.snapshot {
        Some((seq, state)) => {
            if !unbase64(state).is_some_and(|s| apply_state(&doc, &s)) {
                skipped += 1;
            }
            *seq
        }
        None => 0,
    };
    let first = l.seq + 1 - l.ops.len() as u64;
    if first > merged_seq + 1 {
        tracing::warn!(room = id, from = merged_seq + 1, first, "yjs: updates of the room were gone from Redis");
    }
    for f in l.ops {
        if !apply_message(&doc, OutFrame::finish(Kind::Binary, f).payload()) {
            skipped += 1;
        }
    }
    if skipped > 0 {
        tracing::warn!(room = id, skipped, "yjs: updates of the room in Redis that do not apply were skipped");
    }
    // A reload that finds another epoch: the room's history in Redis started
    // again; the room here hands its state over to it first, as on a reset
    // (but the new room is followed).
    hand_over(shard, id, l.epoch);
    let room = match shard.existing_room(id).filter(|r| r.hub.epoch == l.epoch) {
        Some(room) => {
            let state = doc.transact().encode_state_as_update_v1(&StateVector::default());
            merge_in(&room, |d| {
                apply_state(d, &state);
            });
            room.hub.skip_to(l.seq);
            room
        }
        None => shard.add_room(id, Room::new(id, shard.capacity(), doc, l.epoch, l.seq)),
    };
    tracing::debug!(room = id, seq = l.seq, "yjs: room loaded from Redis");
    for session in waiters {
        enter(shard, &session, &room);
        session.join_done();
    }
}

/// The next update of a room, from Redis (this node's own too): applied
/// (a no-op for the node that sent it) and passed on.
pub(super) fn cluster_update(shard: &Shard, id: &str, epoch: Epoch, seq: u64, origin: u64, frame: Vec<u8>) {
    let Some(room) = shard.existing_room(id).filter(|r| r.hub.epoch == epoch) else { return };
    let hub = &room.hub;
    if seq <= hub.seq() {
        return;
    }
    if seq > hub.seq() + 1 {
        hub.skip_to(seq - 1);
    }
    let frame = Rc::new(OutFrame::finish(Kind::Binary, frame));
    if !apply_message(&room.doc, frame.payload()) {
        tracing::warn!(room = id, seq, "yjs: an update from Redis does not apply; passed on as it is");
    }
    shard.stats().operations.add(1);
    shard.stats().broadcasts.add(1);
    hub.publish_op(seq, origin, frame);
    // The node of the session that sent every n-th update stores the
    // merged state: it has applied every update up to it.
    let n = shard.config.documents.yjs_compact_after.max(1);
    if seq.is_multiple_of(n) && shard.session(origin).is_some() {
        if let Some(cluster) = &shard.cluster {
            let state = base64_state(&room);
            let (document, core) = (room.key.clone(), shard.index);
            cluster.send(Request::Snapshot { document, epoch, seq, state, core, session: origin });
        }
    }
}

/// Updates up to `to` were gone from Redis's stream before this node got
/// them: the room goes on after them, and loads again to get them (merged
/// into the state it stores).
pub(super) fn cluster_gap(shard: &Shard, id: &str, epoch: Epoch, to: u64) {
    let Some(room) = shard.existing_room(id).filter(|r| r.hub.epoch == epoch) else { return };
    room.hub.skip_to(to);
    if let Some(cluster) = &shard.cluster {
        cluster.send(Request::Load { document: room.key.clone(), core: shard.index });
    }
}

/// Redis lost the room and it started again (a new epoch): this node hands
/// its whole state to the new history, as one update, and its clients are
/// closed (1001) so that they reconnect and sync both ways again.
pub(super) fn cluster_reset(shard: &Shard, id: &str, epoch: Epoch) {
    if let (Some(cluster), Some(room)) = (&shard.cluster, hand_over(shard, id, epoch)) {
        cluster.send(Request::Unfollow { document: room.key.clone() });
    }
}

/// A room of another epoch than `epoch` hands its state to that history
/// and is gone (its clients closed with 1001); returns it.
fn hand_over(shard: &Shard, id: &str, epoch: Epoch) -> Option<Rc<Room>> {
    let room = shard.existing_room(id).filter(|r| r.hub.epoch != epoch && shard.cluster.is_some())?;
    room.append_state(shard, epoch, 0);
    shard.rooms.borrow_mut().remove(id);
    tracing::warn!(room = id, %epoch, "yjs: the room's history in Redis started again; its clients reconnect");
    for session in shard.all_sessions() {
        let here = session.sub.borrow().as_ref().is_some_and(|s| Rc::ptr_eq(&s.hub, &room.hub));
        if here {
            session.begin_close(shard, crate::close::GOING_AWAY, "the room's history started again; reconnect");
        }
    }
    Some(room)
}

/// Awareness from a session of another node: kept (that session is the
/// owner of the client ids it announced) and passed on.
pub(super) fn cluster_awareness(shard: &Shard, id: &str, origin: u64, message: &[u8]) {
    let Some(room) = shard.existing_room(id) else { return };
    let mut decoder = DecoderV1::from(message);
    let Some(Ok(Message::Awareness(update))) = MessageReader::new(&mut decoder).next() else { return };
    room.note_awareness(&update, origin);
    shard.stats().broadcasts.add(1);
    room.hub.publish_presence(origin, Rc::new(OutFrame::new(Kind::Binary, message)));
}

/// A merged state some node stored: what it holds that this node lacks
/// (an update Redis refused) is merged in and passed on.
pub(super) fn cluster_merged_state(shard: &Shard, id: &str, epoch: Epoch, state: &str) {
    let Some(room) = shard.existing_room(id).filter(|r| r.hub.epoch == epoch) else { return };
    let Some(state) = unbase64(state) else { return };
    merge_in(&room, |d| {
        apply_state(d, &state);
    });
}

/// Redis did not take a session's update (or the merged state it was to
/// store): the sender hears why, and the room sends its whole state again
/// (an update that changes nothing it had) until Redis takes it.
pub(super) fn cluster_refused(shard: &Shard, session: &Session, why: &str) {
    shard.stats().store_refusals.add(1);
    if let Some(room) = shard.existing_room(&session.info.document) {
        room.dirty.set(true);
        room.last_refused.set(session.info.id);
    }
    refuse(shard, session, &format!("{why}: the update is sent again with the room's state"));
}

/// Sends the room's whole state as one update, after a refusal.
fn resend_state(shard: &Shard, room: &Room) {
    room.dirty.set(false);
    room.append_state(shard, room.hub.epoch, room.last_refused.get());
}
