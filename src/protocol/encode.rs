//! Every message the relay sends (`docs/protocol.md`, "Relay messages"),
//! serialised straight into a frame buffer (header room in front, see
//! [`OutFrame::payload_buffer`]) from borrowed fields: no intermediate
//! `serde_json::Value`, whose maps cost dozens of allocations per reply.
//! Payloads clients sent are copied in as the raw bytes they arrived as.

use std::cell::Cell;
use std::io::Write as _;
use std::rc::Rc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::ErrorCode;
use crate::ws::{Kind, OutFrame, SharedFrame};

/// A joined session as `joined_document.participants` and `user_joined` show it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Participant {
    pub connection_id: u64,
    pub user_id: String,
    pub user_name: String,
    pub color: String,
}

fn json_payload(capacity: usize, value: &impl Serialize) -> Vec<u8> {
    let mut buf = OutFrame::payload_buffer(capacity);
    let _ = serde_json::to_writer(&mut buf, value);
    buf
}

/// `{"type":"error","code":...,"message":...}`.
pub fn error(code: ErrorCode, message: &str) -> Vec<u8> {
    error_with(code, message, None, None)
}

/// `error` in reply to an `operation`: it carries the operation's
/// `client_op_id` (raw JSON, as the client sent it), if it had one.
pub fn op_error(code: ErrorCode, message: &str, client_op_id: Option<&str>) -> Vec<u8> {
    error_with(code, message, client_op_id, None)
}

/// `error` `EPOCH_CHANGED`, with the document's current epoch.
pub fn epoch_changed(epoch: &str) -> Vec<u8> {
    error_with(
        ErrorCode::EpochChanged,
        "the document's history has a new epoch: reload it (sync_request since 0)",
        None,
        Some(epoch),
    )
}

fn error_with(code: ErrorCode, message: &str, client_op_id: Option<&str>, epoch: Option<&str>) -> Vec<u8> {
    #[derive(Serialize)]
    struct ErrorReply<'a> {
        r#type: &'static str,
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_op_id: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
    }
    // The id was checked to be a JSON string or number when it was read.
    let client_op_id = client_op_id.and_then(|id| serde_json::from_str::<&RawValue>(id).ok());
    json_payload(64 + message.len(), &ErrorReply { r#type: "error", code: code.as_str(), message, client_op_id, epoch })
}

/// `{"type":"pong"}`.
pub fn pong() -> Vec<u8> {
    let mut buf = OutFrame::payload_buffer(16);
    buf.extend_from_slice(br#"{"type":"pong"}"#);
    buf
}

/// `auth_result` on success.
pub fn auth_ok(user_id: &str, user_name: &str, session_id: &str, connection_id: u64, color: &str) -> Vec<u8> {
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
    json_payload(
        160,
        &AuthOk { r#type: "auth_result", success: true, user_id, user_name, session_id, connection_id, color },
    )
}

/// `auth_result` on failure, with the error's code and message.
pub fn auth_failed(code: &str, message: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct ErrorBody<'a> {
        code: &'a str,
        message: &'a str,
    }
    #[derive(Serialize)]
    struct AuthFailed<'a> {
        r#type: &'static str,
        success: bool,
        error: ErrorBody<'a>,
    }
    json_payload(
        96 + message.len(),
        &AuthFailed { r#type: "auth_result", success: false, error: ErrorBody { code, message } },
    )
}

/// Serialises an iterator as a JSON array once, without collecting it.
struct SeqOnce<I>(Cell<Option<I>>);

impl<'a, I: Iterator<Item = &'a Participant>> Serialize for SeqOnce<I> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.take().into_iter().flatten())
    }
}

/// `joined_document`, with the participants written as they are iterated.
pub fn joined<'a>(
    document_id: &str,
    seq: u64,
    epoch: &str,
    participants: impl Iterator<Item = &'a Participant>,
    participant_count: usize,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct Joined<'d, P: Serialize> {
        r#type: &'static str,
        document_id: &'d str,
        seq: u64,
        epoch: &'d str,
        participants: P,
        participant_count: usize,
    }
    let participants = SeqOnce(Cell::new(Some(participants)));
    json_payload(128, &Joined { r#type: "joined_document", document_id, seq, epoch, participants, participant_count })
}

/// `participants`: one page of a document's participants, and the
/// `connection_id` to ask from for the next (`null` at the end).
pub fn participants<'a>(
    participants: impl Iterator<Item = &'a Participant>,
    participant_count: usize,
    next_after: Option<u64>,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct Page<P: Serialize> {
        r#type: &'static str,
        participants: P,
        participant_count: usize,
        next_after: Option<u64>,
    }
    let participants = SeqOnce(Cell::new(Some(participants)));
    json_payload(128, &Page { r#type: "participants", participants, participant_count, next_after })
}

/// `left_document`.
pub fn left(document_id: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Left<'a> {
        r#type: &'static str,
        document_id: &'a str,
    }
    json_payload(48 + document_id.len(), &Left { r#type: "left_document", document_id })
}

/// The `user_joined` broadcast (presence).
pub fn user_joined(participant: &Participant) -> SharedFrame {
    #[derive(Serialize)]
    struct UserJoined<'a> {
        r#type: &'static str,
        #[serde(flatten)]
        participant: &'a Participant,
    }
    broadcast(json_payload(128, &UserJoined { r#type: "user_joined", participant }))
}

/// The `user_left` broadcast (presence).
pub fn user_left(connection_id: u64, user_id: &str) -> SharedFrame {
    #[derive(Serialize)]
    struct UserLeft<'a> {
        r#type: &'static str,
        connection_id: u64,
        user_id: &'a str,
    }
    broadcast(json_payload(64 + user_id.len(), &UserLeft { r#type: "user_left", connection_id, user_id }))
}

/// A broadcast frame (Binary) from a finished payload buffer.
fn broadcast(payload: Vec<u8>) -> SharedFrame {
    Rc::new(OutFrame::finish(Kind::Binary, payload))
}

/// The `operation` broadcast, encoded once for every subscriber: fixed
/// fields, then the payload as the client sent it. `user_id_json` is the
/// user id already escaped as a JSON string.
pub fn operation(seq: u64, connection_id: u64, user_id_json: &str, payload: &[u8]) -> SharedFrame {
    let mut buf = OutFrame::payload_buffer(96 + user_id_json.len() + payload.len());
    let _ = write!(
        buf,
        r#"{{"type":"operation","seq":{seq},"connection_id":{connection_id},"user_id":{user_id_json},"payload":"#
    );
    buf.extend_from_slice(payload);
    buf.push(b'}');
    broadcast(buf)
}

/// What an [`operation`] frame's JSON starts with, before its seq: in cluster
/// mode Redis puts the seq it gives between this and [`operation_suffix`].
pub const OPERATION_PREFIX: &str = r#"{"type":"operation","seq":"#;

/// What follows the seq in an [`operation`] frame's JSON.
pub fn operation_suffix(connection_id: u64, user_id_json: &str, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(48 + user_id_json.len() + payload.len());
    let _ = write!(buf, r#","connection_id":{connection_id},"user_id":{user_id_json},"payload":"#);
    buf.extend_from_slice(payload);
    buf.push(b'}');
    buf
}

/// The `cursor` broadcast (presence), like [`operation`].
pub fn cursor(connection_id: u64, user_id_json: &str, color: &str, payload: &[u8]) -> SharedFrame {
    let mut buf = OutFrame::payload_buffer(112 + user_id_json.len() + payload.len());
    let _ = write!(
        buf,
        r#"{{"type":"cursor","connection_id":{connection_id},"user_id":{user_id_json},"color":"{color}","payload":"#
    );
    buf.extend_from_slice(payload);
    buf.push(b'}');
    broadcast(buf)
}

/// `ack` of an operation (with its `client_op_id` as raw JSON, if it had
/// one) or of a snapshot.
pub fn ack(seq: u64, client_op_id: Option<&str>) -> Vec<u8> {
    let mut buf = OutFrame::payload_buffer(64 + client_op_id.map_or(0, str::len));
    let _ = write!(buf, r#"{{"type":"ack","seq":{seq}"#);
    if let Some(id) = client_op_id {
        buf.extend_from_slice(br#","client_op_id":"#);
        buf.extend_from_slice(id.as_bytes());
    }
    buf.push(b'}');
    buf
}

/// The `lagged` notice for a subscriber that missed `[from, to]`.
pub fn lagged(from: u64, to: u64) -> SharedFrame {
    let mut buf = OutFrame::payload_buffer(64);
    let _ = write!(buf, r#"{{"type":"lagged","missed_from":{from},"missed_to":{to}}}"#);
    Rc::new(OutFrame::finish(Kind::Text, buf))
}

/// `sync_response`: the document's `seq` and epoch, the snapshot as (seq,
/// raw state) or `null`, and the operation broadcasts' JSON, in seq order.
/// The epoch is 16 hex digits (nothing to escape).
pub fn sync_response<'a>(
    seq: u64,
    epoch: &str,
    snapshot: Option<(u64, &str)>,
    ops: impl Iterator<Item = &'a [u8]>,
    more: bool,
) -> Vec<u8> {
    let mut buf = OutFrame::payload_buffer(256);
    let _ = write!(buf, r#"{{"type":"sync_response","seq":{seq},"epoch":"{epoch}""#);
    match snapshot {
        None => buf.extend_from_slice(br#","snapshot":null"#),
        Some((seq, state)) => {
            let _ = write!(buf, r#","snapshot":{{"seq":{seq},"state":"#);
            buf.extend_from_slice(state.as_bytes());
            buf.push(b'}');
        }
    }
    let _ = write!(buf, r#","more":{more},"ops":["#);
    for (i, op) in ops.enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(op);
    }
    buf.extend_from_slice(b"]}");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parsed(payload: &[u8]) -> Value {
        serde_json::from_slice(&payload[10..]).unwrap()
    }

    #[test]
    fn an_operation_is_its_prefix_seq_and_suffix() {
        let whole = operation(43, 7, "\"ada\"", br#"{"at":3}"#);
        let mut parts = OPERATION_PREFIX.as_bytes().to_vec();
        parts.extend_from_slice(b"43");
        parts.extend_from_slice(&operation_suffix(7, "\"ada\"", br#"{"at":3}"#));
        assert_eq!(whole.payload(), &parts[..]);
    }

    #[test]
    fn replies_are_the_documented_json() {
        assert_eq!(
            parsed(&error(ErrorCode::UnknownType, "x \"y\"")),
            json!({"type":"error","code":"UNKNOWN_TYPE","message":"x \"y\""})
        );
        assert_eq!(parsed(&pong()), json!({"type":"pong"}));
        assert_eq!(parsed(&ack(4, Some("\"c-1\""))), json!({"type":"ack","seq":4,"client_op_id":"c-1"}));
        assert_eq!(parsed(&ack(5, None)), json!({"type":"ack","seq":5}));
        assert_eq!(parsed(&left("d1")), json!({"type":"left_document","document_id":"d1"}));
        let p = Participant { connection_id: 3, user_id: "u".into(), user_name: "U".into(), color: "#000000".into() };
        assert_eq!(
            parsed(&joined("d1", 9, "00000000000000ab", [&p].into_iter(), 7)),
            json!({"type":"joined_document","document_id":"d1","seq":9,"epoch":"00000000000000ab","participants":[{"connection_id":3,"user_id":"u","user_name":"U","color":"#000000"}],"participant_count":7})
        );
        assert_eq!(
            parsed(&participants([&p].into_iter(), 7, Some(3))),
            json!({"type":"participants","participants":[{"connection_id":3,"user_id":"u","user_name":"U","color":"#000000"}],"participant_count":7,"next_after":3})
        );
        assert_eq!(parsed(&participants([].into_iter(), 0, None))["next_after"], Value::Null);
        assert_eq!(
            serde_json::from_slice::<Value>(user_joined(&p).payload()).unwrap(),
            json!({"type":"user_joined","connection_id":3,"user_id":"u","user_name":"U","color":"#000000"})
        );
        let op = operation(7, 3, "\"u\"", br#"{"k": 1}"#);
        assert_eq!(op.payload(), br#"{"type":"operation","seq":7,"connection_id":3,"user_id":"u","payload":{"k": 1}}"#);
        let sync = sync_response(7, "00000000000000ab", Some((5, "{}")), [op.payload()].into_iter(), true);
        assert_eq!(parsed(&sync)["more"], true);
        assert_eq!(parsed(&sync)["snapshot"], json!({"seq":5,"state":{}}));
        assert_eq!(parsed(&sync)["epoch"], "00000000000000ab");
        assert_eq!(
            parsed(&op_error(ErrorCode::Unavailable, "full", Some("\"c-2\""))),
            json!({"type":"error","code":"UNAVAILABLE","message":"full","client_op_id":"c-2"})
        );
        assert_eq!(parsed(&epoch_changed("0a"))["epoch"], "0a");
        assert_eq!(parsed(&sync)["ops"][0]["seq"], 7);
    }
}
