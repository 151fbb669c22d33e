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

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use yrs::sync::awareness::AwarenessUpdateEntry;
use yrs::sync::protocol::MessageReader;
use yrs::sync::{AwarenessUpdate, Message, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

use super::{Session, Shard, Subscription};
use crate::document::{Capacity, DocumentHub};
use crate::protocol::Participant;
use crate::ws::{Kind, OutFrame, SharedFrame};

/// A Yjs room on its owner core.
pub(crate) struct Room {
    doc: Doc,
    pub(crate) hub: Rc<DocumentHub>,
    /// Each Yjs client id's latest awareness state.
    awareness: RefCell<HashMap<u64, AwarenessState>>,
    /// An upper bound of the document's encoded size: its size when last
    /// measured plus every update applied since (merging only shrinks).
    size_bound: std::cell::Cell<usize>,
}

/// A Yjs client id's latest awareness state: its clock, its JSON, and the
/// connection that announced it first (its owner).
type AwarenessState = (u32, Arc<str>, u64);

impl Room {
    fn new(id: &str, cap: Capacity) -> Room {
        Room {
            doc: Doc::new(),
            hub: Rc::new(DocumentHub::new(id, cap)),
            awareness: RefCell::new(HashMap::new()),
            size_bound: std::cell::Cell::new(0),
        }
    }

    /// The whole document as one update frame (sync step 2).
    fn full_state(&self) -> SharedFrame {
        let update = self.doc.transact().encode_state_as_update_v1(&StateVector::default());
        frame(&Message::Sync(SyncMessage::SyncStep2(update)))
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
    /// The Yjs room of a document, created on first use.
    pub(crate) fn room(&self, document: &str) -> Rc<Room> {
        if let Some(r) = self.rooms.borrow().get(document) {
            return r.clone();
        }
        let room = Rc::new(Room::new(document, self.capacity()));
        self.rooms.borrow_mut().insert(document.into(), room.clone());
        room
    }

    /// A Yjs room, if this core has it.
    pub(crate) fn existing_room(&self, document: &str) -> Option<Rc<Room>> {
        self.rooms.borrow().get(document).cloned()
    }
}

/// A Yjs session becomes CONNECTED (authenticated while VALIDATING): it
/// joins its room and gets the relay's sync step 1 (so that it sends what
/// the relay lacks) and the awareness states.
pub(super) fn start(shard: &Shard, session: &Session) {
    let Some(who) = session.info.identity.clone() else { return };
    let room = shard.room(&session.info.document);
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
                // Exactly what the client lacks.
                let diff = room.doc.transact().encode_state_as_update_v1(&sv);
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
                // Encoded once, for every other client of the room.
                let hub = &room.hub;
                shard.stats().operations.add(1);
                shard.stats().broadcasts.add(1);
                hub.publish_op(hub.seq() + 1, session.info.id, frame(&Message::Sync(SyncMessage::Update(update))));
            }
            Message::Awareness(update) => {
                {
                    let mut states = room.awareness.borrow_mut();
                    for (&client, entry) in &update.clients {
                        if &*entry.json == "null" {
                            states.remove(&client);
                        } else {
                            // A client id belongs to the connection that
                            // announced it first: providers pass on the
                            // states they hear of, and those echoes must not
                            // make another connection its owner.
                            let owner = states.get(&client).map_or(session.info.id, |s| s.2);
                            states.insert(client, (entry.clock, entry.json.clone(), owner));
                        }
                    }
                }
                shard.stats().broadcasts.add(1);
                room.hub.publish_presence(session.info.id, frame(&Message::Awareness(update)));
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
        let now = room.doc.transact().encode_state_as_update_v1(&StateVector::default()).len();
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
        room.hub.publish_presence(session.info.id, frame(&Message::Awareness(AwarenessUpdate { clients: gone })));
    }
}

/// What a Yjs client that fell behind the ring gets instead of a gap: the
/// whole document (it merges what it has already).
pub(super) fn resync_frame(shard: &Shard, session: &Session) -> Option<SharedFrame> {
    shard.existing_room(&session.info.document).map(|r| r.full_state())
}
