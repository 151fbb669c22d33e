//! `GET /docrelay.js` and `GET /demo` (`docs/protocol.md`, "Endpoints";
//! README, "The demo"): the client file byte for byte and the demo page, with
//! their content types and caching headers, when `[http] demo` is on, which
//! by default it is in `dev` mode and is not in `jwt` mode.

mod common;
use common::*;

use docrelay::config::AuthMode;

const CLIENT: &str = include_str!("../clients/js/docrelay.js");
const DEMO: &str = include_str!("../clients/js/demo/index.html");

/// Splits a raw response into its status, its head and its body.
fn split(raw: &str) -> (u16, String, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {raw:?}"));
    let status = head[9..12].parse().unwrap();
    (status, head.to_string(), body.to_string())
}

fn get(addr: std::net::SocketAddr, method: &str, path: &str, extra: &str) -> (u16, String, String) {
    split(&raw_http(addr, format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes()))
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn the_client_and_the_demo_are_served_in_dev_mode() {
    let relay = relay(config());
    let addr = relay.local_addr();

    let (status, head, body) = get(addr, "GET", "/docrelay.js", "");
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, CLIENT, "the served client is clients/js/docrelay.js byte for byte");
    assert_eq!(header(&head, "content-type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(header(&head, "cache-control"), Some("no-cache"));
    assert_eq!(header(&head, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&head, "content-length"), Some(CLIENT.len().to_string().as_str()));
    let etag = header(&head, "etag").expect("an ETag").to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    // Revalidation: the same tag is 304 without a body; another is the file.
    let (status, head, body) = get(addr, "GET", "/docrelay.js", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!((status, body.as_str()), (304, ""), "{head}");
    assert_eq!(header(&head, "etag"), Some(etag.as_str()));
    let (status, _, body) = get(addr, "GET", "/docrelay.js", "If-None-Match: \"stale\"\r\n");
    assert_eq!((status, body.len()), (200, CLIENT.len()));

    // HEAD: the same head, no body.
    let (status, head, body) = get(addr, "HEAD", "/docrelay.js", "");
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(header(&head, "content-length"), Some(CLIENT.len().to_string().as_str()));

    let (status, head, body) = get(addr, "GET", "/demo?doc=board", "");
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, DEMO);
    assert_eq!(header(&head, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(header(&head, "cache-control"), Some("no-cache"));
    let csp = header(&head, "content-security-policy").expect("a CSP");
    assert!(csp.contains("connect-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_ne!(header(&head, "etag"), Some(etag.as_str()));
    assert!(DEMO.contains("/docrelay.js"), "the demo runs the client the relay serves");

    // Only GET and HEAD; the paths are exact.
    let (status, head, _) = get(addr, "POST", "/demo", "Content-Length: 0\r\n");
    assert_eq!(status, 405);
    assert_eq!(header(&head, "allow"), Some("GET, HEAD"));
    assert_eq!(get(addr, "GET", "/demo/", "").0, 404);
    assert_eq!(get(addr, "GET", "/Docrelay.js", "").0, 404);
}

#[test]
fn jwt_mode_serves_them_only_when_the_operator_says_so() {
    let jwt = || {
        let mut c = config();
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt_secret = "a-secret-of-at-least-thirty-two-bytes!!".into();
        c
    };
    let relay_off = relay(jwt());
    for path in ["/demo", "/docrelay.js"] {
        assert_eq!(get(relay_off.local_addr(), "GET", path, "").0, 404, "{path} in jwt mode by default");
    }
    let mut on = jwt();
    on.http.demo = Some(true);
    let relay_on = relay(on);
    assert_eq!(get(relay_on.local_addr(), "GET", "/demo", "").0, 200);
    assert_eq!(get(relay_on.local_addr(), "GET", "/docrelay.js", "").2, CLIENT);

    let mut dev_off = config();
    dev_off.http.demo = Some(false);
    let relay_dev_off = relay(dev_off);
    for path in ["/demo", "/docrelay.js"] {
        assert_eq!(get(relay_dev_off.local_addr(), "GET", path, "").0, 404, "{path} with demo = false");
    }
}

#[test]
fn print_config_names_the_demo_switch() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_docrelay")).arg("print-config").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let section = text.split("[http]").nth(1).expect("an [http] section").split("\n[").next().unwrap();
    assert!(section.contains("# demo = true"), "{section}");
    assert!(section.contains(r#"on when auth.mode = "dev", off in"#) && section.contains(r#""jwt" mode"#), "{section}");
}
