//! Client and relay messages (PROTOCOL.md sections 4 and 5).
//!
//! A client message is parsed once, with every field kept as raw JSON
//! (`serde_json::value::RawValue`), so that the checks can run in the order the
//! protocol fixes (shape, type, state, fields) and a `payload` can be relayed
//! byte for byte without ever being re-serialised.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::runtime::CoreCtx;
use crate::session::Conn;

/// Error codes of `{"type":"error"}` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadMessage,
    UnknownType,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "BAD_MESSAGE",
            ErrorCode::UnknownType => "UNKNOWN_TYPE",
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
    #[serde(rename = "type", borrow)]
    pub kind: Option<&'a RawValue>,
    #[serde(borrow)]
    pub token: Option<&'a RawValue>,
    #[serde(borrow)]
    pub since: Option<&'a RawValue>,
    #[serde(borrow)]
    pub payload: Option<&'a RawValue>,
    #[serde(borrow)]
    pub client_op_id: Option<&'a RawValue>,
    #[serde(borrow)]
    pub seq: Option<&'a RawValue>,
    #[serde(borrow)]
    pub state: Option<&'a RawValue>,
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
    let mut buf = crate::ws::OutFrame::payload_buffer(64 + message.len());
    let _ = serde_json::to_writer(
        &mut buf,
        &serde_json::json!({"type": "error", "code": code.as_str(), "message": message}),
    );
    buf
}

/// Builds `{"type":"pong"}` as a frame payload.
pub fn pong_reply() -> Vec<u8> {
    let mut buf = crate::ws::OutFrame::payload_buffer(16);
    buf.extend_from_slice(br#"{"type":"pong"}"#);
    buf
}

/// Handles one complete client message on the session's core.
pub(crate) fn handle(ctx: &CoreCtx, conn: &Conn, data: &[u8]) {
    let reply = match parse(data) {
        Err((code, message)) => error_reply(code, message),
        Ok((ClientType::Ping, _)) => pong_reply(),
        // The document protocol (authentication, documents, fan-out) is the
        // next milestone; until then the other types are not served.
        Ok((_, _)) => error_reply(ErrorCode::UnknownType, "message type not supported by this relay yet"),
    };
    conn.send_text(ctx, reply);
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
