//! The files the relay serves over plain HTTP, embedded in the binary when it
//! is built: the JavaScript client at `GET /docrelay.js` (the very file
//! `clients/js/docrelay.js`) and the demo board at `GET /demo`
//! (`clients/js/demo/index.html`), both when `[http] demo` is on
//! (`docs/protocol.md`, "Endpoints"). [`http::route`] finds them.
//!
//! Both carry an `ETag` (a hash of the file) and `Cache-Control: no-cache`: a
//! browser keeps its copy but asks each time, and the relay answers
//! `304 Not Modified` to an `If-None-Match` that names it, so a relay that was
//! upgraded never leaves a page with a stale client.

use std::sync::OnceLock;

use crate::http::{self, Asset};
use crate::placement::fnv1a_64;

/// `clients/js/docrelay.js`, served at `/docrelay.js`.
pub const CLIENT_JS: &str = include_str!("../clients/js/docrelay.js");
/// `clients/js/demo/index.html`, served at `/demo`.
pub const DEMO_HTML: &str = include_str!("../clients/js/demo/index.html");

fn body(asset: Asset) -> &'static str {
    match asset {
        Asset::Client => CLIENT_JS,
        Asset::Demo => DEMO_HTML,
    }
}

/// The entity tag of an asset: a quoted hash and length of the file, the
/// same on every start of one build.
pub fn etag(asset: Asset) -> &'static str {
    static TAGS: OnceLock<[String; 2]> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        [Asset::Client, Asset::Demo].map(|a| format!("\"{:016x}-{:x}\"", fnv1a_64(body(a).as_bytes()), body(a).len()))
    });
    &tags[asset as usize]
}

/// The content type, and the headers beside the caching ones.
fn headers(asset: Asset) -> (&'static str, &'static str) {
    match asset {
        // Any origin may import the client as a module script, which needs
        // CORS; the file is public.
        Asset::Client => {
            ("text/javascript; charset=utf-8", "Access-Control-Allow-Origin: *\r\nX-Content-Type-Options: nosniff\r\n")
        }
        // The page runs its own inline module and the client from this
        // relay, talks only to this relay, and may not be framed.
        Asset::Demo => (
            "text/html; charset=utf-8",
            "Content-Security-Policy: default-src 'none'; script-src 'self' 'unsafe-inline'; \
             style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'\r\n\
             X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n",
        ),
    }
}

/// The answer to `GET` (the caller cuts it to its head for `HEAD`):
/// `304 Not Modified` when one of `if_none_match` (the request's
/// `If-None-Match` values) names the current file, else `200 OK` with it.
pub fn response<'v>(asset: Asset, if_none_match: impl IntoIterator<Item = &'v [u8]>) -> Vec<u8> {
    let tag = etag(asset);
    let (content_type, extra) = headers(asset);
    if if_none_match.into_iter().any(|v| names_etag(v, tag)) {
        return format!(
            "HTTP/1.1 304 Not Modified\r\nETag: {tag}\r\nCache-Control: no-cache\r\n{extra}Connection: close\r\n\r\n"
        )
        .into_bytes();
    }
    http::response_typed(
        "200 OK",
        content_type,
        &format!("ETag: {tag}\r\nCache-Control: no-cache\r\n{extra}"),
        body(asset),
    )
}

/// Whether an `If-None-Match` value (`*`, or a comma-separated list of
/// entity tags, weak or strong: RFC 9110 section 13.1.2, weak comparison)
/// names `tag`.
fn names_etag(value: &[u8], tag: &str) -> bool {
    let Ok(value) = std::str::from_utf8(value) else { return false };
    value.split(',').map(str::trim).any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: Vec<u8>) -> String {
        String::from_utf8(r).unwrap()
    }

    #[test]
    fn the_client_is_served_whole_with_its_tag() {
        let r = text(response(Asset::Client, []));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/javascript; charset=utf-8\r\n"), "{r}");
        assert!(r.contains(&format!("ETag: {}\r\n", etag(Asset::Client))));
        assert!(r.contains("Cache-Control: no-cache\r\n"));
        assert!(r.contains("Access-Control-Allow-Origin: *\r\n"));
        assert!(r.contains(&format!("Content-Length: {}\r\n", CLIENT_JS.len())));
        assert!(r.ends_with(&format!("\r\n\r\n{CLIENT_JS}")));
        assert!(CLIENT_JS.contains("export class DocRelayClient"));
    }

    #[test]
    fn a_matching_if_none_match_gets_304_without_a_body() {
        let tag = etag(Asset::Demo);
        for v in [tag.to_string(), format!("W/{tag}"), "*".into(), format!("\"x\", {tag}")] {
            let r = text(response(Asset::Demo, [v.as_bytes()]));
            assert!(r.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{v}: {r}");
            assert!(r.ends_with("\r\n\r\n") && !r.contains("Content-Length"), "{r}");
        }
        for v in ["\"other\"", "", "W/\"\""] {
            assert!(text(response(Asset::Demo, [v.as_bytes()])).starts_with("HTTP/1.1 200 OK"), "{v}");
        }
        assert_ne!(etag(Asset::Demo), etag(Asset::Client));
    }
}
