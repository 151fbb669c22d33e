//! WebSocket framing (RFC 6455) on top of tungstenite's frame header codec.
//!
//! Reading is incremental and copy-free in the common case: bytes arrive in a
//! per-core scratch buffer, whole frames are unmasked in place and handed to the
//! session as borrowed slices, and only the tail of a frame that is not complete
//! yet is copied into the connection's own buffer. Message size is enforced from
//! the frame header, before any payload is buffered.
//!
//! Writing: a frame is encoded once into an [`OutFrame`] (header and payload in
//! one allocation) and shared by `Rc`, so one broadcast is one allocation no
//! matter how many sessions write it.

use std::io::Cursor;
use std::rc::Rc;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::close;

/// A protocol violation by the peer: the connection is failed with this close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct WsError {
    pub code: u16,
    pub reason: &'static str,
}

impl WsError {
    const fn new(code: u16, reason: &'static str) -> WsError {
        WsError { code, reason }
    }
}

/// Something complete that arrived from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole Text message, checked to be UTF-8 (once, here).
    Text(&'a str),
    /// A whole Binary message.
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The peer's Close, already validated: code (if any) and UTF-8 reason.
    Close(Option<(u16, &'a str)>),
}

/// What the session wants after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop parsing; the rest of the input is discarded (after Close).
    Stop,
}

/// The largest buffer of a completed split frame reused for the next one.
const SPARE_BYTES: usize = 64 * 1024;

/// Incremental reader for the frames of one connection.
#[derive(Debug)]
pub struct FrameReader {
    max_message: usize,
    /// Bytes of a frame that was not complete when the last read ended.
    partial: Vec<u8>,
    /// The whole length of that frame, once its header is in `partial`
    /// (0: not known yet), so the header is parsed once per split.
    partial_total: usize,
    /// Unmasked payload of a fragmented message so far.
    message: Vec<u8>,
    /// Kind of the fragmented message in progress, if any.
    in_message: Option<Data>,
    /// How much of `message` is known to be valid UTF-8 (Text only).
    utf8_valid: usize,
}

impl FrameReader {
    pub fn new(max_message: usize) -> FrameReader {
        FrameReader {
            max_message,
            partial: Vec::new(),
            partial_total: 0,
            message: Vec::new(),
            in_message: None,
            utf8_valid: 0,
        }
    }

    /// Feeds bytes just read from the socket. `input` may be modified (frames
    /// are unmasked in place). Calls `on_event` for each complete event.
    pub fn feed(&mut self, input: &mut [u8], mut on_event: impl FnMut(Event<'_>) -> Flow) -> Result<Flow, WsError> {
        let mut input = input;
        let mut spare = Vec::new();
        if !self.partial.is_empty() {
            // A frame was split across reads: complete it in our own buffer
            // with only the bytes it lacks, then parse the rest in place.
            loop {
                let missing = self.missing()?;
                if missing == 0 {
                    break;
                }
                let n = missing.min(input.len());
                let (head, rest) = std::mem::take(&mut input).split_at_mut(n);
                self.partial.extend_from_slice(head);
                input = rest;
                if input.is_empty() && self.missing()? > 0 {
                    return Ok(Flow::Continue);
                }
            }
            let mut frame = std::mem::take(&mut self.partial);
            // `frame` holds exactly one frame, so parsing consumes all of it.
            if self.parse(&mut frame, &mut on_event)?.is_none() {
                return Ok(Flow::Stop);
            }
            frame.clear();
            spare = frame;
        }
        match self.parse(input, &mut on_event)? {
            Some(used) => {
                if used < input.len() {
                    // A frame begun at the end of this read: keep its bytes,
                    // in the buffer of the last split frame when there was
                    // one (a steady stream of split frames allocates
                    // nothing), with room for the whole frame.
                    if spare.capacity() <= SPARE_BYTES {
                        self.partial = spare;
                    }
                    self.partial.extend_from_slice(&input[used..]);
                    // `parse` noted the frame's length (0 when its header
                    // is cut too): room for all of it.
                    self.partial.reserve_exact(self.partial_total.saturating_sub(self.partial.len()));
                }
                // Otherwise the buffer is dropped: an idle connection holds
                // none, and a big frame does not pin its memory.
                Ok(Flow::Continue)
            }
            None => Ok(Flow::Stop),
        }
    }

    /// How many more bytes the frame begun in `partial` needs to be whole
    /// (its header first, then its payload). Never more than that frame, so
    /// bytes of the next one are never copied.
    fn missing(&mut self) -> Result<usize, WsError> {
        let have = self.partial.len();
        if self.partial_total > 0 {
            return Ok(self.partial_total - have);
        }
        if have < 2 {
            return Ok(2 - have);
        }
        let length_bytes = match self.partial[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask_bytes = if self.partial[1] & 0x80 != 0 { 4 } else { 0 };
        let header_len = 2 + length_bytes + mask_bytes;
        if have < header_len {
            return Ok(header_len - have);
        }
        let mut cursor = Cursor::new(&self.partial[..]);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(1), // cannot happen with the whole header present
            Err(_) => return Err(WsError::new(close::PROTOCOL, "reserved opcode")),
        };
        self.check_header(&header, len)?;
        // `len` is bounded by max_message in check_header.
        self.partial_total = header_len + len as usize;
        Ok(self.partial_total.saturating_sub(have))
    }

    /// Parses whole frames from `buf`. Returns how many bytes were consumed
    /// (the rest is an incomplete frame), or None when the session said Stop.
    fn parse(
        &mut self,
        buf: &mut [u8],
        on_event: &mut impl FnMut(Event<'_>) -> Flow,
    ) -> Result<Option<usize>, WsError> {
        let mut pos = 0;
        loop {
            if pos == buf.len() {
                // Everything consumed: no frame begun.
                self.partial_total = 0;
                return Ok(Some(pos));
            }
            let mut cursor = Cursor::new(&buf[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    // Not even the header is complete: its length is not known.
                    self.partial_total = 0;
                    return Ok(Some(pos));
                }
                Err(_) => return Err(WsError::new(close::PROTOCOL, "reserved opcode")),
            };
            let header_len = cursor.position() as usize;
            self.check_header(&header, len)?;
            let len = len as usize; // bounded by max_message in check_header
            if buf.len() - pos - header_len < len {
                // Incomplete; the size was already checked, so buffering is
                // bounded. Its length is kept for the reads that complete it.
                self.partial_total = header_len + len;
                return Ok(Some(pos));
            }
            let start = pos + header_len;
            let payload = &mut buf[start..start + len];
            if let Some(mask) = header.mask {
                apply_mask(payload, mask);
            }
            pos = start + len;
            if self.frame(&header, payload, on_event)? == Flow::Stop {
                return Ok(None);
            }
        }
    }

    fn check_header(&self, h: &FrameHeader, len: u64) -> Result<(), WsError> {
        // RFC 6455 section 5.2: "the most significant bit MUST be 0" in a
        // 64-bit length. Such a length is malformed, not merely too big.
        if len >> 63 != 0 {
            return Err(WsError::new(close::PROTOCOL, "frame length with the most significant bit set"));
        }
        if h.rsv1 || h.rsv2 || h.rsv3 {
            return Err(WsError::new(close::PROTOCOL, "reserved bits set"));
        }
        if h.mask.is_none() {
            return Err(WsError::new(close::PROTOCOL, "client frame not masked"));
        }
        match h.opcode {
            OpCode::Control(_) => {
                if !h.is_final {
                    return Err(WsError::new(close::PROTOCOL, "fragmented control frame"));
                }
                if len > 125 {
                    return Err(WsError::new(close::PROTOCOL, "control frame too long"));
                }
            }
            OpCode::Data(d) => {
                match (d, self.in_message) {
                    (Data::Continue, None) => {
                        return Err(WsError::new(close::PROTOCOL, "continuation without a message"))
                    }
                    (Data::Text | Data::Binary, Some(_)) => {
                        return Err(WsError::new(close::PROTOCOL, "new message inside a fragmented one"))
                    }
                    _ => {}
                }
                let so_far = if d == Data::Continue { self.message.len() as u64 } else { 0 };
                if so_far.saturating_add(len) > self.max_message as u64 {
                    return Err(WsError::new(close::TOO_BIG, "message too big"));
                }
            }
        }
        Ok(())
    }

    fn frame(
        &mut self,
        h: &FrameHeader,
        payload: &[u8],
        on_event: &mut impl FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, WsError> {
        match h.opcode {
            OpCode::Control(Control::Ping) => Ok(on_event(Event::Ping(payload))),
            OpCode::Control(Control::Pong) => Ok(on_event(Event::Pong(payload))),
            OpCode::Control(Control::Close) => {
                let close = parse_close(payload)?;
                on_event(Event::Close(close));
                Ok(Flow::Stop)
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(WsError::new(close::PROTOCOL, "reserved opcode"))
            }
            OpCode::Data(Data::Text | Data::Binary) if h.is_final => {
                if h.opcode == OpCode::Data(Data::Binary) {
                    return Ok(on_event(Event::Binary(payload)));
                }
                match std::str::from_utf8(payload) {
                    Ok(text) => Ok(on_event(Event::Text(text))),
                    Err(_) => Err(WsError::new(close::INVALID_DATA, "invalid UTF-8 in text message")),
                }
            }
            OpCode::Data(d) => {
                if let Data::Text | Data::Binary = d {
                    self.in_message = Some(d);
                    self.utf8_valid = 0;
                    self.message.clear();
                }
                self.message.extend_from_slice(payload);
                let text = self.in_message == Some(Data::Text);
                if text && !h.is_final {
                    // Fail fast: check what arrived so far, allowing a code point
                    // cut at the end of a fragment. The last fragment is left to
                    // the whole-message check below, which yields the `&str`.
                    match std::str::from_utf8(&self.message[self.utf8_valid..]) {
                        Ok(_) => self.utf8_valid = self.message.len(),
                        Err(e) => {
                            let cut_at_end = e.error_len().is_none();
                            if !cut_at_end {
                                return Err(WsError::new(close::INVALID_DATA, "invalid UTF-8 in text message"));
                            }
                            self.utf8_valid += e.valid_up_to();
                        }
                    }
                }
                if !h.is_final {
                    return Ok(Flow::Continue);
                }
                self.in_message = None;
                let message = std::mem::take(&mut self.message);
                let flow = if text {
                    match std::str::from_utf8(&message) {
                        Ok(t) => on_event(Event::Text(t)),
                        Err(_) => return Err(WsError::new(close::INVALID_DATA, "invalid UTF-8 in text message")),
                    }
                } else {
                    on_event(Event::Binary(&message))
                };
                // Keep a modest buffer for the next fragmented message; free big ones.
                if message.capacity() <= 4096 {
                    self.message = message;
                    self.message.clear();
                }
                Ok(flow)
            }
        }
    }
}

/// Whether `chunk`, read as frames from its first byte, holds a Close frame.
/// Used after the relay has failed a connection: the frame stream is no longer
/// trusted, but the peer's Close reply, read after ours, starts a fresh read.
pub fn starts_frames_with_close(chunk: &[u8]) -> bool {
    let mut pos = 0;
    while pos < chunk.len() {
        let mut cursor = Cursor::new(&chunk[pos..]);
        match FrameHeader::parse(&mut cursor) {
            Ok(Some((h, len))) => {
                if h.opcode == OpCode::Control(Control::Close) {
                    return true;
                }
                pos = pos.saturating_add(cursor.position() as usize).saturating_add(len as usize);
            }
            _ => return false,
        }
    }
    false
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::new(close::PROTOCOL, "close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            // RFC 6455 7.4: the defined codes a peer may send, and the
            // registered (3000-3999) and private (4000-4999) ranges.
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed {
                return Err(WsError::new(close::PROTOCOL, "invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..])
                .map_err(|_| WsError::new(close::INVALID_DATA, "invalid UTF-8 in close reason"))?;
            Ok(Some((code, reason)))
        }
    }
}

/// XORs `buf` with the 4-byte client mask (RFC 6455 section 5.3), eight bytes
/// at a time. tungstenite's own `apply_mask` is private.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the mask phase is 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends one client-to-server frame (masked, as RFC 6455 requires of
/// clients) to `out`. The relay never sends these; the load generator and
/// the tests do, so the encoding lives here beside the decoder.
pub fn encode_client_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, mask: [u8; 4], payload: &[u8]) {
    out.push(opcode | if fin { 0x80 } else { 0 });
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if mask != [0; 4] {
        apply_mask(&mut out[start..], mask);
    }
}

/// Room reserved in front of a payload for the longest server frame header.
const HEADROOM: usize = 10;

/// One encoded server frame (header and payload in one buffer), immutable
/// once built, shared by every session that writes it.
#[derive(Debug)]
pub struct OutFrame {
    buf: Vec<u8>,
    start: usize,
}

/// A frame shared between the sessions of one core.
pub type SharedFrame = Rc<OutFrame>;

/// Server frame kinds the relay sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
    Ping,
    Pong,
    Close,
}

impl Kind {
    fn opcode(self) -> OpCode {
        match self {
            Kind::Text => OpCode::Data(Data::Text),
            Kind::Binary => OpCode::Data(Data::Binary),
            Kind::Ping => OpCode::Control(Control::Ping),
            Kind::Pong => OpCode::Control(Control::Pong),
            Kind::Close => OpCode::Control(Control::Close),
        }
    }
}

impl OutFrame {
    /// A payload buffer with room for the header in front: write the payload
    /// after the returned vector's current end, then call [`OutFrame::finish`].
    pub fn payload_buffer(capacity: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADROOM + capacity);
        v.resize(HEADROOM, 0);
        v
    }

    /// Turns a buffer from [`OutFrame::payload_buffer`] into a frame without
    /// copying the payload: the header is written into the headroom.
    pub fn finish(kind: Kind, mut buf: Vec<u8>) -> OutFrame {
        debug_assert!(buf.len() >= HEADROOM);
        let len = (buf.len() - HEADROOM) as u64;
        let header = FrameHeader { opcode: kind.opcode(), ..FrameHeader::default() };
        let mut head = [0u8; HEADROOM];
        let mut w = Cursor::new(&mut head[..]);
        header.format(len, &mut w).expect("a server frame header fits in 10 bytes");
        let hlen = w.position() as usize;
        let start = HEADROOM - hlen;
        buf[start..HEADROOM].copy_from_slice(&head[..hlen]);
        OutFrame { buf, start }
    }

    /// A frame holding a copy of `payload`.
    pub fn new(kind: Kind, payload: &[u8]) -> OutFrame {
        let mut buf = OutFrame::payload_buffer(payload.len());
        buf.extend_from_slice(payload);
        OutFrame::finish(kind, buf)
    }

    /// A Close frame with a code and a reason (cut to fit 125 bytes on a
    /// character boundary).
    pub fn close(code: u16, reason: &str) -> OutFrame {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut buf = OutFrame::payload_buffer(2 + end);
        buf.extend_from_slice(&code.to_be_bytes());
        buf.extend_from_slice(&reason.as_bytes()[..end]);
        OutFrame::finish(Kind::Close, buf)
    }

    /// The bytes to put on the wire.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The payload alone (for a broadcast: its JSON, reused by `sync_response`).
    pub fn payload(&self) -> &[u8] {
        &self.buf[HEADROOM..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_client_frame(&mut out, fin, opcode, [0x11, 0x22, 0x33, 0x44], payload);
        out
    }

    fn collect(r: &mut FrameReader, chunks: &[&[u8]]) -> Result<Vec<String>, WsError> {
        let mut seen = Vec::new();
        for c in chunks {
            let mut c = c.to_vec();
            r.feed(&mut c, |e| {
                seen.push(match e {
                    Event::Text(t) => format!("text:{t}"),
                    Event::Binary(b) => format!("bin:{}", String::from_utf8_lossy(b)),
                    Event::Ping(p) => format!("ping:{}", String::from_utf8_lossy(p)),
                    Event::Pong(p) => format!("pong:{}", String::from_utf8_lossy(p)),
                    Event::Close(c) => format!("close:{c:?}"),
                });
                Flow::Continue
            })?;
        }
        Ok(seen)
    }

    #[test]
    fn byte_by_byte_with_interleaved_ping() {
        let mut wire = masked(0x1, false, b"hel");
        wire.extend(masked(0x9, true, b"p"));
        wire.extend(masked(0x0, true, "lo \u{e9}".as_bytes()));
        let chunks: Vec<&[u8]> = wire.chunks(1).collect();
        let mut r = FrameReader::new(1024);
        assert_eq!(collect(&mut r, &chunks).unwrap(), vec!["ping:p", "text:hello \u{e9}"]);
        assert_eq!(r.partial.capacity(), 0);
    }

    #[test]
    fn a_split_frame_copies_only_its_own_bytes() {
        // Frame A split across two reads; the second read also holds B whole
        // and the start of C. Only A's missing bytes and C's start are copied.
        let a = masked(0x1, true, &[b'a'; 300]);
        let b = masked(0x1, true, &[b'b'; 3000]);
        let c = masked(0x1, true, &[b'c'; 50]);
        let mut second = a[100..].to_vec();
        second.extend_from_slice(&b);
        second.extend_from_slice(&c[..10]);
        let mut r = FrameReader::new(1 << 20);
        let seen = collect(&mut r, &[&a[..100], &second]).unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen[0] == format!("text:{}", "a".repeat(300)) && seen[1] == format!("text:{}", "b".repeat(3000)));
        assert_eq!(r.partial, &c[..10]);
        assert!(r.partial.capacity() < 1000, "the read was copied whole: {}", r.partial.capacity());
        let seen = collect(&mut r, &[&c[10..]]).unwrap();
        assert_eq!(seen, vec![format!("text:{}", "c".repeat(50))]);
        assert_eq!(r.partial.capacity(), 0);
    }

    #[test]
    fn size_is_checked_from_the_header() {
        let mut r = FrameReader::new(10);
        // Only the header of an 11-byte frame: rejected before any payload arrives.
        let wire = masked(0x2, true, &[0; 11]);
        assert_eq!(collect(&mut r, &[&wire[..6]]).unwrap_err().code, close::TOO_BIG);
        let mut r = FrameReader::new(10);
        let mut wire = masked(0x2, false, &[0; 6]);
        wire.extend(masked(0x0, true, &[0; 5]));
        assert_eq!(collect(&mut r, &[&wire]).unwrap_err().code, close::TOO_BIG);
    }

    #[test]
    fn a_64_bit_length_with_its_top_bit_set_is_a_protocol_error() {
        // FIN + Binary, masked, 127: the 8-byte length follows.
        let header = |len: u64| {
            let mut w = vec![0x82, 0x80 | 127];
            w.extend_from_slice(&len.to_be_bytes());
            w.extend_from_slice(&[1, 2, 3, 4]);
            w
        };
        for len in [1u64 << 63, u64::MAX, (1 << 63) | 5] {
            let err = collect(&mut FrameReader::new(1 << 20), &[&header(len)]).unwrap_err();
            assert_eq!(
                err,
                WsError::new(close::PROTOCOL, "frame length with the most significant bit set"),
                "{len:#x}"
            );
            // The same when the header arrives in pieces (the split-frame path).
            let wire = header(len);
            let chunks: Vec<&[u8]> = wire.chunks(3).collect();
            assert_eq!(collect(&mut FrameReader::new(1 << 20), &chunks).unwrap_err().code, close::PROTOCOL);
        }
        // Below the top bit, a length over the limit is still "too big".
        let err = collect(&mut FrameReader::new(1 << 20), &[&header((1 << 63) - 1)]).unwrap_err();
        assert_eq!(err.code, close::TOO_BIG);
    }

    #[test]
    fn utf8_fails_fast_but_allows_split_code_points() {
        let e = "\u{e9}".as_bytes();
        let mut wire = masked(0x1, false, &e[..1]);
        wire.extend(masked(0x0, true, &e[1..]));
        assert_eq!(collect(&mut FrameReader::new(100), &[&wire]).unwrap(), vec!["text:\u{e9}"]);
        let wire = masked(0x1, false, &[b'a', 0xff]);
        assert_eq!(collect(&mut FrameReader::new(100), &[&wire]).unwrap_err().code, close::INVALID_DATA);
        let wire = masked(0x1, true, &[0xc3]);
        assert_eq!(collect(&mut FrameReader::new(100), &[&wire]).unwrap_err().code, close::INVALID_DATA);
    }

    #[test]
    fn protocol_errors() {
        let unmasked = [0x81u8, 0x01, b'a'];
        assert_eq!(collect(&mut FrameReader::new(100), &[&unmasked]).unwrap_err().code, close::PROTOCOL);
        let cont = masked(0x0, true, b"x");
        assert_eq!(collect(&mut FrameReader::new(100), &[&cont]).unwrap_err().code, close::PROTOCOL);
        let rsv = {
            let mut w = masked(0x1, true, b"x");
            w[0] |= 0x40;
            w
        };
        assert_eq!(collect(&mut FrameReader::new(100), &[&rsv]).unwrap_err().code, close::PROTOCOL);
        let big_ping = masked(0x9, true, &[0; 126]);
        assert_eq!(collect(&mut FrameReader::new(1000), &[&big_ping]).unwrap_err().code, close::PROTOCOL);
        let op = masked(0x3, true, b"");
        assert_eq!(collect(&mut FrameReader::new(100), &[&op]).unwrap_err().code, close::PROTOCOL);
        let bad_close = masked(0x8, true, &999u16.to_be_bytes());
        assert_eq!(collect(&mut FrameReader::new(100), &[&bad_close]).unwrap_err().code, close::PROTOCOL);
    }

    #[test]
    fn close_is_parsed() {
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        let wire = masked(0x8, true, &p);
        assert_eq!(collect(&mut FrameReader::new(100), &[&wire]).unwrap(), vec!["close:Some((1000, \"bye\"))"]);
    }

    #[test]
    fn mask_matches_bytewise() {
        let mask = [1, 2, 3, 4];
        for n in 0..40 {
            let mut a: Vec<u8> = (0..n as u8).collect();
            let b: Vec<u8> = a.iter().enumerate().map(|(i, x)| x ^ mask[i % 4]).collect();
            apply_mask(&mut a, mask);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn encoded_frames() {
        assert_eq!(OutFrame::new(Kind::Text, b"hi").bytes(), &[0x81, 2, b'h', b'i']);
        let big = OutFrame::new(Kind::Binary, &[7; 300]);
        assert_eq!(&big.bytes()[..4], &[0x82, 126, 1, 44]);
        assert_eq!(big.bytes().len(), 304);
        let c = OutFrame::close(1001, "bye");
        assert_eq!(c.bytes(), &[0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']);
        let long = "\u{e9}".repeat(100);
        assert!(OutFrame::close(1000, &long).bytes().len() <= 127);
    }
}
