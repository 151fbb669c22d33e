//! The HTTP request head parser and the router (`docrelay::http`), on
//! arbitrary bytes, as the accept path calls them: `parse_head_any` on the
//! bytes read so far, then `route` on a complete head.
//!
//! Checks, beyond "never panics":
//! - a complete head is at most `max_head` bytes, lies inside the input and
//!   ends with its blank line; every prefix of it is "incomplete" (the relay
//!   reads a head in pieces and must decide the same at every read);
//! - an incomplete head is shorter than `max_head`;
//! - every route agrees with the head it came from (path, method, version,
//!   the document id's alphabet, the accept key's shape);
//! - every error's response is a complete HTTP/1.1 response with the status
//!   that error names and a `Content-Length` equal to its body.
#![no_main]

use docrelay::http::{self, HttpError, Route};
use libfuzzer_sys::fuzz_target;

/// `limits.max_head_bytes`' default.
const MAX_HEAD: usize = 8192;

fn status_of(e: &HttpError) -> u16 {
    match e {
        HttpError::BadRequest(_) => 400,
        HttpError::NotFound => 404,
        HttpError::MethodNotAllowed { .. } => 405,
        HttpError::UpgradeRequired(_) => 426,
        HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
    }
}

fn check_response(bytes: &[u8], status: u16) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!("not a complete response ({other:?}): {:?}", String::from_utf8_lossy(bytes)),
    };
    assert_eq!(resp.code, Some(status));
    let content_length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).unwrap().parse::<usize>().unwrap());
    assert_eq!(content_length, Some(bytes.len() - len), "Content-Length is not the body's length");
}

/// What [`http::parse_head_any`] decided, without the borrows.
fn outcome(buf: &[u8], max_head: usize) -> Result<Option<usize>, HttpError> {
    let mut small = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
    let mut big = Vec::new();
    http::parse_head_any(buf, &mut small, &mut big, max_head).map(|h| h.map(|h| h.len))
}

fuzz_target!(|data: &[u8]| {
    let mut small = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
    let mut big = Vec::new();
    let head = match http::parse_head_any(data, &mut small, &mut big, MAX_HEAD) {
        Ok(Some(head)) => head,
        Ok(None) => {
            assert!(data.len() < MAX_HEAD, "an incomplete head of {} bytes was not refused", data.len());
            return;
        }
        Err(e) => {
            check_response(&e.response(), status_of(&e));
            return;
        }
    };
    assert!(head.len <= data.len() && head.len <= MAX_HEAD);
    assert!(data[..head.len].ends_with(b"\n"), "a head ends with its blank line");
    assert!(head.version <= 1);
    assert!(!head.path.contains('?'));
    // Read in pieces, the head is incomplete until its last byte arrives.
    let cuts = [head.len - 1, head.len / 2, data.iter().map(|&b| b as usize).sum::<usize>() % head.len];
    for cut in cuts {
        assert_eq!(outcome(&data[..cut], MAX_HEAD), Ok(None), "prefix of {cut} of a {}-byte head", head.len);
    }
    for h in head.headers {
        let _ = head.header(h.name);
    }
    match http::route(&head, "/echo") {
        Ok(Route::Document { id, accept }) => {
            assert!(http::valid_document_id(id));
            assert_eq!(head.path.strip_prefix(http::DOCUMENTS_PREFIX), Some(id));
            assert_eq!((head.method, head.version), ("GET", 1));
            assert_eq!(accept.len(), 28, "a base64 SHA-1");
        }
        Ok(Route::Echo { accept }) => {
            assert_eq!((head.path, head.method, head.version), ("/echo", "GET", 1));
            assert_eq!(accept.len(), 28);
        }
        Ok(Route::Health { head: head_only }) => {
            assert_eq!(head.path, "/healthz");
            assert_eq!(head_only, head.method == "HEAD");
            let full = http::health();
            check_response(&full, 200);
            assert!(full.starts_with(&http::head_only(full.clone())));
        }
        Ok(Route::Metrics { head: head_only }) => {
            assert_eq!(head.path, "/metrics");
            assert_eq!(head_only, head.method == "HEAD");
        }
        Err(e) => check_response(&e.response(), status_of(&e)),
    }
    // The query string's parameters, as the documents route reads them.
    if let Some(color) = http::query_param(head.query, "color").and_then(http::parse_color) {
        assert!(color.len() == 7 && color.starts_with('#'));
        assert!(color[1..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
    let _ = http::query_param(head.query, "token");
});
