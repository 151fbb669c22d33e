//! Client and relay messages (`docs/protocol.md`, "Client messages", "Relay
//! messages" and "Errors"): pure, no I/O and no session state.
//!
//! A client message is parsed once, with every field kept as raw JSON
//! (`serde_json::value::RawValue`), so that the checks can run in the order the
//! protocol fixes (shape, type, state, fields) and a `payload` can be relayed
//! byte for byte without ever being re-serialised. [`encode`] builds every
//! message the relay sends, straight into frame buffers.

use serde::Deserialize;
use serde_json::value::RawValue;

pub mod encode;

pub use encode::Participant;

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
    EpochChanged,
    Unavailable,
    DocumentFull,
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
            ErrorCode::EpochChanged => "EPOCH_CHANGED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::DocumentFull => "DOCUMENT_FULL",
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
    ListParticipants,
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
            "list_participants" => ClientType::ListParticipants,
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
    #[serde(borrow, default, deserialize_with = "present")]
    pub epoch: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub after: Option<&'a RawValue>,
}

/// A field that is present, `null` included (plain `Option` would read a
/// JSON `null` as absent, but `"payload": null` is a payload like any other).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses a message's shape and type: check 1 (`BAD_MESSAGE`) and check 2
/// (`UNKNOWN_TYPE`) of the check order (`docs/protocol.md`, "Client
/// messages"). For a Binary frame, which must hold UTF-8 JSON.
pub fn parse(data: &[u8]) -> Result<(ClientType, Envelope<'_>), (ErrorCode, &'static str)> {
    match std::str::from_utf8(data) {
        Ok(text) => parse_text(text),
        Err(_) => Err((ErrorCode::BadMessage, "message is not UTF-8")),
    }
}

/// [`parse`] for a Text frame, whose UTF-8 the frame reader already checked.
pub fn parse_text(text: &str) -> Result<(ClientType, Envelope<'_>), (ErrorCode, &'static str)> {
    let bad = |m| Err((ErrorCode::BadMessage, m));
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

/// Check 3 of the check order: whether a message may be sent in the
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

/// A field check (step 4 of the check order): `Err` carries the
/// `BAD_MESSAGE` text.
pub fn field<'a, T: serde::Deserialize<'a>>(
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

/// How deeply arrays and objects nest in a JSON value (0 for a scalar). The
/// text must be valid JSON (a `RawValue` is); brackets inside strings do not
/// count. Stops counting past `max`, so a hostile value costs one pass.
pub fn nesting_depth(json: &str, max: usize) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > deepest {
                    deepest = depth;
                    if deepest > max {
                        return deepest;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A field check for a value relayed or stored as it is (`payload`,
/// `state`): at most `max` levels of arrays and objects.
pub fn check_depth(raw: &RawValue, name: &str, max: usize) -> Result<(), String> {
    if nesting_depth(raw.get(), max) > max {
        return Err(format!("field `{name}` is nested deeper than {max} levels"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_counts_arrays_and_objects_outside_strings() {
        assert_eq!(nesting_depth("1", 64), 0);
        assert_eq!(nesting_depth(r#""[[[""#, 64), 0);
        assert_eq!(nesting_depth(r#"{"a":[1,{"b":[]}],"c":{}}"#, 64), 4);
        assert_eq!(nesting_depth(r#"["\"[", ["\\"], [[]]]"#, 64), 3);
        let deep = format!("{}{}", "[".repeat(500_000), "]".repeat(500_000));
        assert_eq!(nesting_depth(&deep, 64), 65, "stops counting past the limit");
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(check_depth(&RawValue::from_string(ok).unwrap(), "payload", 64).is_ok());
        let over = format!("{}1{}", "{\"a\":".repeat(65), "}".repeat(65));
        let err = check_depth(&RawValue::from_string(over).unwrap(), "state", 64).unwrap_err();
        assert_eq!(err, "field `state` is nested deeper than 64 levels");
    }

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
    fn state_rules() {
        use ClientType::*;
        assert_eq!(check_state(Ping, false, false), None);
        assert_eq!(check_state(Operation, false, false).map(|e| e.0), Some(ErrorCode::AuthRequired));
        assert_eq!(check_state(Authenticate, true, false).map(|e| e.0), Some(ErrorCode::AlreadyAuthenticated));
        assert_eq!(check_state(Operation, true, false).map(|e| e.0), Some(ErrorCode::NotJoined));
        assert_eq!(check_state(JoinDocument, true, true).map(|e| e.0), Some(ErrorCode::AlreadyJoined));
        assert_eq!(check_state(Operation, true, true), None);
    }
}
