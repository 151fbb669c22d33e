//! Every WebSocket close code the relay sends, in one place
//! (`docs/protocol.md`, "Close codes").

/// Normal close.
pub const NORMAL: u16 = 1000;
/// The relay is shutting down, or the client was silent beyond
/// `limits.idle_timeout_ms`.
pub const GOING_AWAY: u16 = 1001;
/// The peer broke RFC 6455 (unmasked frame, bad opcode, reserved bits, ...).
pub const PROTOCOL: u16 = 1002;
/// Invalid UTF-8 in a Text message or a Close reason.
pub const INVALID_DATA: u16 = 1007;
/// A message of a type the endpoint does not take (a Text frame on a Yjs
/// room, whose protocol is binary).
pub const UNSUPPORTED: u16 = 1003;
/// Policy: a rate limit exceeded beyond its grace, or a send queue overflow.
pub const POLICY: u16 = 1008;
/// A message larger than `limits.max_message_bytes`.
pub const TOO_BIG: u16 = 1009;
/// Internal error, or a connection validator that did not answer in time.
pub const INTERNAL: u16 = 1011;
/// `authenticate` failed (`AUTH_FAILED`).
pub const AUTH_FAILED: u16 = 4001;
/// The token does not open this document (`FORBIDDEN`).
pub const FORBIDDEN: u16 = 4003;
/// No successful `authenticate` within `limits.auth_timeout_ms`.
pub const AUTH_TIMEOUT: u16 = 4008;
/// A browser origin not in `validation.allowed_origins`.
pub const ORIGIN_NOT_ALLOWED: u16 = 4010;
/// Too many connections: from one IP, or on the whole relay.
pub const TOO_MANY_CONNECTIONS: u16 = 4029;
/// A connection validator failed without a code of its own (or with one
/// outside 4000..=4999).
pub const VALIDATION_FAILED: u16 = 4000;

/// Whether `code` is one a connection validator may close with.
pub fn is_validator_code(code: u16) -> bool {
    (4000..=4999).contains(&code)
}
