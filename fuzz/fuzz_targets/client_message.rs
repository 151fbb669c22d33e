//! The client-message parser (`docrelay::protocol::parse`, which the session
//! calls for a Binary message, and `parse_text`, for a Text one), then the
//! field checks and the replies and broadcasts built from the raw fields, as
//! `session::handlers` does for each message type.
//!
//! Checks, beyond "never panics":
//! - `parse` and `parse_text` agree on UTF-8 input;
//! - an accepted message is a JSON object whose `type` is the string named;
//! - an accepted unsigned integer (`since`, `seq`) is written exactly as that
//!   number (no sign, fraction, exponent or leading zero);
//! - every broadcast, `ack` and `error` built from the client's raw fields is
//!   valid JSON, and the raw values in it are the client's bytes, unchanged.
#![no_main]

use std::collections::BTreeMap;

use docrelay::protocol::{self, encode, field, ClientType, Envelope, ErrorCode};
use docrelay::ws::{Kind, OutFrame};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::value::RawValue;

fn name(t: ClientType) -> &'static str {
    match t {
        ClientType::Authenticate => "authenticate",
        ClientType::JoinDocument => "join_document",
        ClientType::LeaveDocument => "leave_document",
        ClientType::Operation => "operation",
        ClientType::Cursor => "cursor",
        ClientType::SyncRequest => "sync_request",
        ClientType::Snapshot => "snapshot",
        ClientType::Ping => "ping",
    }
}

/// The raw fields of a message the relay built, to compare with the client's
/// (`null` included: a present field, as `protocol::Envelope` reads it).
#[derive(Deserialize)]
struct Built<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    client_op_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    snapshot: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// An object with its members as raw JSON: unlike `serde_json::Value`, no
/// nesting limit, so a deeply nested payload the relay accepts is checked too.
type Object = BTreeMap<String, Box<RawValue>>;

/// Parses a message the relay built; it must be one JSON object.
fn built(bytes: &[u8]) -> Built<'_> {
    let text = std::str::from_utf8(bytes).expect("the relay's messages are UTF-8");
    if let Err(e) = serde_json::from_str::<Object>(text) {
        panic!("not a JSON object ({e}): {text}");
    }
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The JSON of a reply buffer (from `OutFrame::payload_buffer`).
fn reply(buf: Vec<u8>) -> Vec<u8> {
    OutFrame::finish(Kind::Text, buf).payload().to_vec()
}

fn unsigned(raw: Option<&RawValue>, name: &str, required: bool) -> Result<Option<u64>, String> {
    let n = field::<u64>(raw, name, required)?;
    if let (Some(n), Some(raw)) = (n, raw) {
        assert_eq!(raw.get(), n.to_string(), "`{name}` accepted as {n}");
    }
    Ok(n)
}

fn fields(kind: ClientType, env: &Envelope<'_>) -> Result<(), String> {
    match kind {
        ClientType::Ping | ClientType::LeaveDocument => {}
        ClientType::Authenticate => {
            let _: Option<String> = field(env.token, "token", true)?;
        }
        ClientType::JoinDocument => {
            unsigned(env.since, "since", false)?;
            let _: Option<String> = field(env.epoch, "epoch", false)?;
        }
        ClientType::SyncRequest => {
            unsigned(env.since, "since", true)?;
            let _: Option<String> = field(env.epoch, "epoch", false)?;
        }
        ClientType::Operation => {
            let Some(payload) = env.payload else { return Err("missing field `payload`".into()) };
            let client_op_id = env.client_op_id.map(RawValue::get);
            if let Some(id) = client_op_id {
                // The handler's own check, then what it promises.
                if !matches!(id.as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9')) {
                    return Err("field `client_op_id` must be a string or a number".into());
                }
                let v: serde_json::Value = serde_json::from_str(id).unwrap();
                assert!(v.is_string() || v.is_number(), "client_op_id {id}");
            }
            let frame = encode::operation(7, 3, r#""user""#, payload.get().as_bytes());
            assert_eq!(built(frame.payload()).payload.map(RawValue::get), Some(payload.get()));
            let ack = reply(encode::ack(7, client_op_id));
            assert_eq!(built(&ack).client_op_id.map(RawValue::get), client_op_id);
            let refused = reply(encode::op_error(ErrorCode::Unavailable, "disk full", client_op_id));
            assert_eq!(built(&refused).client_op_id.map(RawValue::get), client_op_id);
        }
        ClientType::Cursor => {
            let Some(payload) = env.payload else { return Err("missing field `payload`".into()) };
            let frame = encode::cursor(3, r#""user""#, "#1f77b4", payload.get().as_bytes());
            assert_eq!(built(frame.payload()).payload.map(RawValue::get), Some(payload.get()));
        }
        ClientType::Snapshot => {
            let seq = unsigned(env.seq, "seq", true)?.unwrap_or(0);
            let Some(state) = env.state else { return Err("missing field `state`".into()) };
            let sync =
                reply(encode::sync_response(seq, "0000000000000001", Some((seq, state.get())), std::iter::empty()));
            let snapshot = built(&sync).snapshot.expect("a snapshot");
            #[derive(Deserialize)]
            struct Snap<'a> {
                #[serde(borrow)]
                state: &'a RawValue,
            }
            let snap: Snap<'_> = serde_json::from_str(snapshot.get()).unwrap();
            assert_eq!(snap.state.get(), state.get());
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let parsed = protocol::parse(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let t = protocol::parse_text(text);
        assert_eq!(t.as_ref().map(|(k, _)| *k).map_err(|e| *e), parsed.as_ref().map(|(k, _)| *k).map_err(|e| *e));
    }
    let (kind, env) = match parsed {
        Ok(m) => m,
        Err((code, message)) => {
            assert!(matches!(code, ErrorCode::BadMessage | ErrorCode::UnknownType));
            built(&reply(encode::error(code, message)));
            return;
        }
    };
    let object: Object = serde_json::from_slice(data).expect("an accepted message is a JSON object");
    let kind_name = object.get("type").and_then(|t| serde_json::from_str::<String>(t.get()).ok());
    assert_eq!(kind_name.as_deref(), Some(name(kind)));
    // Every state gate answers, and the field checks run as the handlers do.
    for (authenticated, joined) in [(false, false), (true, false), (true, true)] {
        let _ = protocol::check_state(kind, authenticated, joined);
    }
    if let Err(message) = fields(kind, &env) {
        built(&reply(encode::error(ErrorCode::BadMessage, &message)));
    }
});
