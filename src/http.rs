//! HTTP/1.1 request heads (httparse), routing, and every non-WebSocket answer
//! the relay gives: the 101 upgrade, 4xx and 503 errors, `/healthz` (`docs/protocol.md`,
//! "Endpoints"). Each [`HttpError`] maps to exactly one status line in
//! [`HttpError::response`]. The `/metrics` body is the registry's.

/// Header slots tried first; a head with more is parsed again with
/// [`header_slots_for`] slots, so only the byte limit bounds a head.
pub const MAX_HEADERS: usize = 64;

/// Enough header slots for any head of at most `max_head` bytes (a header
/// line takes at least 4 bytes: `a:\r\n`).
pub fn header_slots_for(max_head: usize) -> usize {
    max_head / 4 + 1
}

/// The route of the documents endpoint.
pub const DOCUMENTS_PREFIX: &str = "/ws/documents/";

/// The route of Yjs rooms (the y-websocket protocol, `docs/yjs.md`).
pub const YJS_PREFIX: &str = "/yjs/";

/// A file served over plain HTTP when `[http] demo` is on (its bytes and
/// headers are in `assets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    /// `/docrelay.js`: the JavaScript client.
    Client = 0,
    /// `/demo`: the demo board.
    Demo = 1,
}

impl Asset {
    /// The asset served at `path`, if any (paths compare exactly).
    pub fn at(path: &str) -> Option<Asset> {
        match path {
            "/docrelay.js" => Some(Asset::Client),
            "/demo" => Some(Asset::Demo),
            _ => None,
        }
    }
}

/// A request head that cannot be served; each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("400 bad request: {0}")]
    BadRequest(&'static str),
    #[error("404 not found")]
    NotFound,
    /// With the methods the path allows, for the `Allow` header.
    #[error("405 method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("426 upgrade required: {0}")]
    UpgradeRequired(&'static str),
    #[error("431 request header fields too large")]
    HeadTooLarge,
    /// More headers than the slots given to the parser: parse again with
    /// [`header_slots_for`] slots (answered 431 if it ever reaches a client).
    #[error("431 too many header fields")]
    TooManyHeaders,
    /// The relay cannot take the connection now (no file descriptor or
    /// registry slot to spare); answered with `Retry-After: 1`.
    #[error("503 service unavailable: {0}")]
    Unavailable(&'static str),
}

impl HttpError {
    /// The full response for this error; the connection is closed after it.
    pub fn response(&self) -> Vec<u8> {
        match self {
            HttpError::BadRequest(why) => response("400 Bad Request", "", why),
            HttpError::NotFound => response("404 Not Found", "", "not found"),
            HttpError::MethodNotAllowed { allow } => {
                response("405 Method Not Allowed", &format!("Allow: {allow}\r\n"), "method not allowed")
            }
            HttpError::UpgradeRequired(why) => {
                response("426 Upgrade Required", "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n", why)
            }
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => {
                response("431 Request Header Fields Too Large", "", "request head too large")
            }
            HttpError::Unavailable(why) => response("503 Service Unavailable", "Retry-After: 1\r\n", why),
        }
    }
}

/// A response with a plain-text body and `Connection: close`.
pub fn response(status: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    response_typed(status, "text/plain; charset=utf-8", extra_headers, body)
}

/// A response with a body of the given type and `Connection: close`.
pub fn response_typed(status: &str, content_type: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The 101 answer to a valid upgrade.
pub fn switching_protocols(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A parsed request head, borrowing the bytes it was read into.
#[derive(Debug)]
pub struct Head<'b, 'h> {
    pub method: &'b str,
    /// The request target's path, before any `?`.
    pub path: &'b str,
    pub query: Option<&'b str>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: &'h [httparse::Header<'b>],
    /// Length of the head in bytes; what follows it in the buffer was
    /// pipelined behind the request (e.g. the first WebSocket frame).
    pub len: usize,
}

impl<'b> Head<'b, '_> {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }

    /// Every header with this name (case-insensitive), in order.
    pub fn headers_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b [u8]> + 's {
        self.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }

    /// How many headers have this name.
    pub fn count(&self, name: &str) -> usize {
        self.headers_named(name).count()
    }
}

/// Parses a request head. `Ok(None)`: incomplete, read more.
pub fn parse_head<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
    max_head: usize,
) -> Result<Option<Head<'b, 'h>>, HttpError> {
    let mut req = httparse::Request::new(headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            if len > max_head {
                return Err(HttpError::HeadTooLarge);
            }
            let target = req.path.unwrap_or("");
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (target, None),
            };
            Ok(Some(Head {
                method: req.method.unwrap_or(""),
                path,
                query,
                version: req.version.unwrap_or(0),
                headers: req.headers,
                len,
            }))
        }
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_head {
                Err(HttpError::HeadTooLarge)
            } else {
                Ok(None)
            }
        }
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::TooManyHeaders),
        Err(_) => Err(HttpError::BadRequest("malformed request head")),
    }
}

/// [`parse_head`] with `small` slots first and, for a head with more headers,
/// again with `big` grown to [`header_slots_for`]`(max_head)` slots.
pub fn parse_head_any<'b, 'h>(
    buf: &'b [u8],
    small: &'h mut [httparse::Header<'b>],
    big: &'h mut Vec<httparse::Header<'b>>,
    max_head: usize,
) -> Result<Option<Head<'b, 'h>>, HttpError> {
    match parse_head(buf, small, max_head) {
        Err(HttpError::TooManyHeaders) => {
            big.resize(header_slots_for(max_head), httparse::EMPTY_HEADER);
            parse_head(buf, big, max_head)
        }
        other => other,
    }
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'b> {
    /// A valid WebSocket upgrade to a document; `accept` is the
    /// `Sec-WebSocket-Accept` value to answer with.
    Document { id: &'b str, accept: String },
    /// A valid WebSocket upgrade to the echo route (`[testing] echo_path`).
    Echo { accept: String },
    /// A valid WebSocket upgrade to a Yjs room (`/yjs/{document}`).
    Yjs { id: &'b str, accept: String },
    /// `/healthz`; `head`: answer without the body (HEAD).
    Health { head: bool },
    /// `/metrics`; `head`: answer without the body (HEAD).
    Metrics { head: bool },
    /// `/docrelay.js` or `/demo`; `head`: answer without the body (HEAD).
    Asset { asset: Asset, head: bool },
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints<'a> {
    /// The WebSocket routes: `/ws/documents/…`, and `echo_path` when not empty.
    pub websocket: bool,
    /// `/metrics` (`/healthz` is served on every listener).
    pub metrics: bool,
    /// The echo route of `[testing] echo_path`; empty: none.
    pub echo_path: &'a str,
    /// `/docrelay.js` and `/demo` (`[http] demo`).
    pub demo: bool,
}

impl Endpoints<'_> {
    /// The separate metrics listener (`metrics.listen`): `/healthz` and `/metrics`.
    pub const METRICS_ONLY: Endpoints<'static> =
        Endpoints { websocket: false, metrics: true, echo_path: "", demo: false };
}

/// Decides what to answer, in the order `docs/protocol.md`, "Endpoints", gives:
/// Host headers 400, a request body 400, unknown path 404, wrong method 405,
/// bad document id 400, then the upgrade checks of [`check_upgrade`].
pub fn route<'b>(head: &Head<'b, '_>, endpoints: &Endpoints<'_>) -> Result<Route<'b>, HttpError> {
    // RFC 9112 section 3.2: an HTTP/1.1 request has exactly one Host; none
    // has two (a proxy and the relay could each take another one).
    let hosts = head.count("host");
    if head.version == 1 && hosts != 1 {
        return Err(HttpError::BadRequest("HTTP/1.1 needs exactly one Host header"));
    }
    if hosts > 1 {
        return Err(HttpError::BadRequest("more than one Host header"));
    }
    check_no_body(head)?;
    enum Target<'b> {
        Document(&'b str),
        Yjs(&'b str),
        Echo,
        Health,
        Metrics,
        Asset(Asset),
    }
    let target = if let Some(id) = head.path.strip_prefix(DOCUMENTS_PREFIX).filter(|_| endpoints.websocket) {
        Target::Document(id)
    } else if let Some(id) = head.path.strip_prefix(YJS_PREFIX).filter(|_| endpoints.websocket) {
        Target::Yjs(id)
    } else if head.path == "/healthz" {
        Target::Health
    } else if head.path == "/metrics" && endpoints.metrics {
        Target::Metrics
    } else if let Some(asset) = Asset::at(head.path).filter(|_| endpoints.demo) {
        Target::Asset(asset)
    } else if endpoints.websocket && !endpoints.echo_path.is_empty() && head.path == endpoints.echo_path {
        Target::Echo
    } else {
        return Err(HttpError::NotFound);
    };
    let plain = matches!(target, Target::Health | Target::Metrics | Target::Asset(_));
    let head_only = plain && head.method == "HEAD";
    if head.method != "GET" && !head_only {
        return Err(HttpError::MethodNotAllowed { allow: if plain { "GET, HEAD" } else { "GET" } });
    }
    match target {
        Target::Health => Ok(Route::Health { head: head_only }),
        Target::Metrics => Ok(Route::Metrics { head: head_only }),
        Target::Asset(asset) => Ok(Route::Asset { asset, head: head_only }),
        Target::Echo => Ok(Route::Echo { accept: check_upgrade(head)? }),
        Target::Document(id) => {
            if !valid_document_id(id) {
                return Err(HttpError::BadRequest("document id must be 1 to 128 of [A-Za-z0-9._~:-]"));
            }
            Ok(Route::Document { id, accept: check_upgrade(head)? })
        }
        Target::Yjs(id) => {
            if !valid_document_id(id) {
                return Err(HttpError::BadRequest("document id must be 1 to 128 of [A-Za-z0-9._~:-]"));
            }
            Ok(Route::Yjs { id, accept: check_upgrade(head)? })
        }
    }
}

/// The relay reads no request body, on any route: a body left unread would
/// be taken for the next bytes of the connection (WebSocket frames after a
/// 101), and a proxy in front could frame it otherwise (request smuggling).
/// So `Transfer-Encoding` of any kind, a malformed or non-zero
/// `Content-Length`, and `Content-Length`s that disagree are refused.
fn check_no_body(head: &Head<'_, '_>) -> Result<(), HttpError> {
    if head.count("transfer-encoding") > 0 {
        return Err(HttpError::BadRequest("Transfer-Encoding is not accepted: requests to the relay have no body"));
    }
    let mut first: Option<&[u8]> = None;
    let mut zero = true;
    for value in head.headers_named("content-length").flat_map(|v| v.split(|b| *b == b',')) {
        let value = value.trim_ascii();
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return Err(HttpError::BadRequest("malformed Content-Length"));
        }
        // Compared as numbers: leading zeros do not count.
        let digits = &value[value.iter().position(|b| *b != b'0').unwrap_or(value.len())..];
        match first {
            Some(f) if f != digits => return Err(HttpError::BadRequest("conflicting Content-Length headers")),
            _ => first = Some(digits),
        }
        zero &= digits.is_empty();
    }
    if !zero {
        return Err(HttpError::BadRequest("a request body is not accepted (Content-Length must be 0)"));
    }
    Ok(())
}

/// `document_id`: 1 to 128 bytes of `[A-Za-z0-9._~:-]`, taken as is.
pub fn valid_document_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-'))
}

/// Whether any header `name` lists `token` (comma-separated, case-insensitive).
fn has_token(head: &Head<'_, '_>, name: &str, token: &str) -> bool {
    head.headers_named(name).any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(token)))
}

/// The non-empty tokens of a comma-separated header value (not UTF-8: none).
fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value).unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// Checks an upgrade request (RFC 6455 section 4.2.1) and returns the accept key.
fn check_upgrade(head: &Head<'_, '_>) -> Result<String, HttpError> {
    // One of each: two keys or versions (or a second Upgrade) could be read
    // one way by a proxy and another way here.
    if head.count("upgrade") > 1 {
        return Err(HttpError::BadRequest("more than one Upgrade header"));
    }
    if head.count("sec-websocket-key") > 1 {
        return Err(HttpError::BadRequest("more than one Sec-WebSocket-Key header"));
    }
    if head.count("sec-websocket-version") > 1 {
        return Err(HttpError::BadRequest("more than one Sec-WebSocket-Version header"));
    }
    if !has_token(head, "upgrade", "websocket") || !has_token(head, "connection", "upgrade") {
        return Err(HttpError::UpgradeRequired("this endpoint speaks WebSocket only"));
    }
    if head.header("upgrade").is_some_and(|v| tokens(v).any(|t| !t.eq_ignore_ascii_case("websocket"))) {
        return Err(HttpError::BadRequest("Upgrade must name websocket alone"));
    }
    if head.header("sec-websocket-version").map(|v| v.trim_ascii()) != Some(b"13".as_slice()) {
        return Err(HttpError::UpgradeRequired("unsupported WebSocket version (13 only)"));
    }
    if head.version != 1 {
        return Err(HttpError::BadRequest("WebSocket needs HTTP/1.1"));
    }
    if head.header("host").is_none() {
        return Err(HttpError::BadRequest("missing Host header"));
    }
    let key = head.header("sec-websocket-key").map(|k| k.trim_ascii()).unwrap_or_default();
    // The key is 16 random bytes in base64: 24 characters ending in "==".
    let base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    if key.len() != 24 || !key[..22].iter().all(base64) || &key[22..] != b"==" {
        return Err(HttpError::BadRequest("missing or malformed Sec-WebSocket-Key"));
    }
    Ok(tungstenite::handshake::derive_accept_key(key))
}

/// A query parameter's raw value (not percent-decoded).
pub fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if kv == name => Some(""),
        _ => None,
    })
}

/// `color` = `#RRGGBB` (the `#` as `%23`) or `RRGGBB`; normalised to `#rrggbb`.
pub fn parse_color(raw: &str) -> Option<String> {
    let hex = raw.strip_prefix("%23").or_else(|| raw.strip_prefix('#')).unwrap_or(raw);
    (hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("#{}", hex.to_ascii_lowercase()))
}

/// A query parameter's value with its `%XX` escapes and `+` decoded (for a
/// token: a JWT has none, but a URL builder may escape any character).
/// Invalid escapes are kept as written.
pub fn percent_decode(raw: &str) -> String {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/healthz`.
pub fn health() -> Vec<u8> {
    response("200 OK", "", "ok")
}

/// The answer to a client that arrives while the relay has no file
/// descriptor to spare: it is accepted only to be told this, then closed.
pub fn fd_limit() -> Vec<u8> {
    HttpError::Unavailable("the relay is at its open-file limit; try again later").response()
}

/// A response cut after its head: the answer to HEAD, whose headers
/// (`Content-Length` included) are those GET would get.
pub fn head_only(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_of(raw: &str) -> Result<Route<'_>, HttpError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = parse_head(raw.as_bytes(), &mut headers, 8192)?.expect("complete");
        route(&head, &Endpoints { websocket: true, metrics: true, echo_path: "/echo", demo: true })
    }

    const UPGRADE: &str = "Host: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn routes() {
        let raw = format!("GET /ws/documents/a.b~c:d-e_f HTTP/1.1\r\n{UPGRADE}");
        let ok = route_of(&raw).unwrap();
        // RFC 6455's own example key and answer.
        assert_eq!(ok, Route::Document { id: "a.b~c:d-e_f", accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into() });
        assert_eq!(route_of("GET /healthz HTTP/1.0\r\n\r\n").unwrap(), Route::Health { head: false });
        assert_eq!(route_of("HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(), Route::Metrics { head: true });
        assert_eq!(
            route_of(&format!("HEAD /ws/documents/d HTTP/1.1\r\n{UPGRADE}")).unwrap_err(),
            HttpError::MethodNotAllowed { allow: "GET" }
        );
        assert_eq!(route_of("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err(), HttpError::NotFound);
        assert_eq!(
            route_of("GET /demo?doc=x HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
            Route::Asset { asset: Asset::Demo, head: false }
        );
        assert_eq!(
            route_of("HEAD /docrelay.js HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
            Route::Asset { asset: Asset::Client, head: true }
        );
        assert_eq!(route_of("GET /demo/ HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err(), HttpError::NotFound);
        let raw = format!("GET /yjs/room-1?token=t HTTP/1.1\r\n{UPGRADE}");
        assert_eq!(route_of(&raw).unwrap(), Route::Yjs { id: "room-1", accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into() });
        assert!(matches!(route_of(&format!("GET /yjs/a%20b HTTP/1.1\r\n{UPGRADE}")), Err(HttpError::BadRequest(_))));
        assert!(matches!(route_of("GET /yjs/room HTTP/1.1\r\nHost: x\r\n\r\n"), Err(HttpError::UpgradeRequired(_))));
        assert_eq!(
            route_of("POST /demo HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err(),
            HttpError::MethodNotAllowed { allow: "GET, HEAD" }
        );
        assert_eq!(
            route_of("POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err(),
            HttpError::MethodNotAllowed { allow: "GET, HEAD" }
        );
        assert!(matches!(route_of("GET /healthz HTTP/1.1\r\n\r\n"), Err(HttpError::BadRequest(_))));
        let two_hosts = "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
        assert!(matches!(route_of(two_hosts), Err(HttpError::BadRequest(_))));
        assert!(matches!(
            route_of("GET /ws/documents/d1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Err(HttpError::UpgradeRequired(_))
        ));
        let v12 = format!("GET /ws/documents/d HTTP/1.1\r\n{}", UPGRADE.replace("Version: 13", "Version: 12"));
        assert!(matches!(route_of(&v12), Err(HttpError::UpgradeRequired(_))));
        let badkey = format!("GET /ws/documents/d HTTP/1.1\r\n{}", UPGRADE.replace("dGhl", "d#hl"));
        assert!(matches!(route_of(&badkey), Err(HttpError::BadRequest(_))));
        assert!(matches!(
            route_of(&format!("GET /ws/documents/a%20b HTTP/1.1\r\n{UPGRADE}")),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(
            route_of(&format!("GET /ws/documents/ HTTP/1.1\r\n{UPGRADE}")),
            Err(HttpError::BadRequest(_))
        ));
        let long = "a".repeat(129);
        assert!(matches!(
            route_of(&format!("GET /ws/documents/{long} HTTP/1.1\r\n{UPGRADE}")),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(route_of(&format!("GET /echo HTTP/1.1\r\n{UPGRADE}")), Ok(Route::Echo { .. })));
    }

    /// Requests a proxy and the relay could frame differently are 400, on
    /// every route; good requests are unchanged.
    #[test]
    fn ambiguous_framing_is_refused() {
        let doc = |extra: &str| format!("GET /ws/documents/d HTTP/1.1\r\n{extra}{UPGRADE}");
        let bad = [
            doc("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
            doc("Sec-WebSocket-Version: 8\r\n"),
            doc("Sec-WebSocket-Version: 13\r\n"),
            doc("Upgrade: h2c\r\n"),
            doc("Content-Length: 5\r\n"),
            doc("Content-Length: 0\r\nContent-Length: 7\r\n"),
            doc("Content-Length: 0, 7\r\n"),
            doc("Content-Length: -1\r\n"),
            doc("Content-Length: \r\n"),
            doc("Transfer-Encoding: chunked\r\n"),
            doc("Transfer-Encoding: identity\r\n"),
            doc("Host: y\r\n"),
            format!("GET /ws/documents/d HTTP/1.1\r\n{}", UPGRADE.replace("websocket", "websocket, h2c")),
            "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n".into(),
            "GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            "GET /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n".into(),
            "GET /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n".into(),
        ];
        for raw in &bad {
            assert!(matches!(route_of(raw), Err(HttpError::BadRequest(_))), "{raw:?}: {:?}", route_of(raw));
        }
        // A body of length 0, said once or several times alike, is no body.
        for extra in
            ["Content-Length: 0\r\n", "Content-Length: 0\r\nContent-Length: 00\r\n", "Content-Length: 0, 0\r\n"]
        {
            assert!(matches!(route_of(&doc(extra)), Ok(Route::Document { .. })), "{extra:?}");
        }
        // Connection is a list that may be split over several lines.
        let split =
            UPGRADE.replace("Connection: keep-alive, Upgrade\r\n", "Connection: keep-alive\r\nConnection: Upgrade\r\n");
        assert!(matches!(route_of(&format!("GET /ws/documents/d HTTP/1.1\r\n{split}")), Ok(Route::Document { .. })));
        // Upgrade naming only another protocol is still "no upgrade" (426).
        let h2c = format!("GET /ws/documents/d HTTP/1.1\r\n{}", UPGRADE.replace("websocket", "h2c"));
        assert!(matches!(route_of(&h2c), Err(HttpError::UpgradeRequired(_))));
        // The 503 says when to come back.
        let unavailable = String::from_utf8(fd_limit()).unwrap();
        assert!(unavailable.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{unavailable}");
        assert!(unavailable.contains("\r\nRetry-After: 1\r\n") && unavailable.contains("\r\nConnection: close\r\n"));
    }

    #[test]
    fn the_metrics_listener_serves_metrics_and_health_only() {
        let on = |raw: &'static str, endpoints: Endpoints<'_>| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let head = parse_head(raw.as_bytes(), &mut headers, 8192).unwrap().unwrap();
            route(&head, &endpoints).map(|r| format!("{r:?}")).map_err(|e| e.to_string())
        };
        let main = Endpoints { websocket: true, metrics: false, echo_path: "/echo", demo: false };
        assert_eq!(on("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", main), Err("404 not found".into()));
        assert!(on("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", main).is_ok());
        let m = Endpoints::METRICS_ONLY;
        assert!(on("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", m).is_ok());
        assert!(on("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", m).is_ok());
        let upgrade = "GET /ws/documents/d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(on(upgrade, m), Err("404 not found".into()));
        assert_eq!(on("GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", m), Err("404 not found".into()));
        // Without `[http] demo`, and on the metrics listener, the client and
        // the demo are not there.
        for endpoints in [main, m] {
            assert_eq!(on("GET /demo HTTP/1.1\r\nHost: x\r\n\r\n", endpoints), Err("404 not found".into()));
            assert_eq!(on("GET /docrelay.js HTTP/1.1\r\nHost: x\r\n\r\n", endpoints), Err("404 not found".into()));
        }
    }

    #[test]
    fn head_limits() {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: a", &mut headers, 8192).unwrap().is_none());
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        assert_eq!(
            parse_head(b"GET /\x01 HTTP/1.1\r\n\r\n", &mut headers, 256).unwrap_err(),
            HttpError::BadRequest("malformed request head")
        );
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(300));
        assert_eq!(parse_head(big.as_bytes(), &mut headers, 256).unwrap_err(), HttpError::HeadTooLarge);
        // 100 headers in 1 KiB: under the byte limit, so served.
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a:b\r\n".repeat(100));
        let (mut small, mut big) = ([httparse::EMPTY_HEADER; MAX_HEADERS], Vec::new());
        assert_eq!(parse_head_any(many.as_bytes(), &mut small, &mut big, 8192).unwrap().unwrap().headers.len(), 100);
    }

    #[test]
    fn head_answers_keep_the_headers_and_drop_the_body() {
        let full = health();
        let cut = head_only(full.clone());
        assert!(full.starts_with(&cut));
        assert!(cut.ends_with(b"Content-Length: 2\r\nConnection: close\r\n\r\n"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb+c%zz%4"), "a.b c%zz%4");
        assert_eq!(percent_decode("eyJ.x_y-z"), "eyJ.x_y-z");
    }

    #[test]
    fn query_and_color() {
        let q = Some("token=abc&color=%23FF00aa&flag");
        assert_eq!(query_param(q, "token"), Some("abc"));
        assert_eq!(query_param(q, "flag"), Some(""));
        assert_eq!(query_param(q, "nope"), None);
        assert_eq!(parse_color("%23FF00aa").as_deref(), Some("#ff00aa"));
        assert_eq!(parse_color("123abc").as_deref(), Some("#123abc"));
        assert_eq!(parse_color("#12345").as_deref(), None);
        assert_eq!(parse_color("zzzzzz"), None);
    }
}
