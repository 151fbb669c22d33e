//! JWT and secrets hardening (`docs/protocol.md`, "Authentication"), through the
//! real relay and real clients: `exp`, `nbf` and `iat` with
//! `auth.jwt_leeway_secs`, claims of the wrong type, the algorithm pinned to the
//! configured key, the fixed messages a client is told (the details go to the
//! log, never the token), the secret read from a file or an environment
//! variable, the warning for a short secret, and a session closed with 4001
//! when its token expires.
//!
//! Tokens are made here with the `jsonwebtoken` crate; the RS256/ES256 keys
//! with the `openssl` command. Start-up behaviour (errors, warnings, the log)
//! is tested on the `docrelay` binary.

mod common;
use common::*;

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use docrelay::config::AuthMode;
use docrelay::Config;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

/// The words of the JWT library's own error messages, which a client must
/// never see.
const INTERNALS: [&str; 5] = ["Base64", "variant", "expected", "Json", "JSON"];

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn hs256(claims: &Value) -> String {
    hs(Algorithm::HS256, SECRET.as_bytes(), claims)
}

/// Base64url without padding (RFC 4648, section 5), as JWTs use it.
fn b64url(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A token with `alg: none` and no signature (jsonwebtoken cannot make one).
fn alg_none(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// A `jwt` relay on an ephemeral port with the HS256 [`SECRET`], after `f`
/// adjusted its configuration.
fn jwt_relay_with(f: impl FnOnce(&mut Config)) -> Relay {
    let mut c = config();
    c.limits.close_timeout_ms = 300;
    c.limits.shutdown_grace_ms = 300;
    c.auth.mode = AuthMode::Jwt;
    c.auth.jwt_secret = SECRET.into();
    f(&mut c);
    relay(c)
}

fn jwt_relay() -> Relay {
    jwt_relay_with(|_| {})
}

fn auth_message(token: &str) -> String {
    json!({"type": "authenticate", "token": token}).to_string()
}

/// Authenticates on a new connection to `doc`; asserts success.
fn authed(addr: SocketAddr, doc: &str, token: &str) -> (Client, Value) {
    let mut ws = connect(addr, &format!("/ws/documents/{doc}"));
    let v = request(&mut ws, &auth_message(token));
    assert_eq!((v["type"].as_str(), v["success"].as_bool()), (Some("auth_result"), Some(true)), "{v}");
    (ws, v)
}

/// Authenticates on a new connection and asserts the refusal: an
/// `auth_result` with `AUTH_FAILED` and exactly `message`, then Close 4001.
#[track_caller]
fn assert_refused(addr: SocketAddr, token: &str, message: &str) {
    let mut ws = connect(addr, "/ws/documents/hardening");
    let v = request(&mut ws, &auth_message(token));
    assert_eq!(v["type"], "auth_result", "{v}");
    assert_eq!(v["success"], false, "{v}");
    assert_eq!(v["error"]["code"], "AUTH_FAILED", "{v}");
    assert_eq!(v["error"]["message"], message, "{v}");
    assert!(v.get("user_id").is_none(), "{v}");
    assert_eq!(expect_close(&mut ws), (4001, "authentication failed".to_string()), "after {v}");
}

// ---------------------------------------------------------------------------
// exp, nbf, iat and the leeway
// ---------------------------------------------------------------------------

#[test]
fn nbf_in_the_future_beyond_the_leeway_is_refused_and_within_it_accepted() {
    let relay = jwt_relay();
    let addr = relay.local_addr();
    let now = now_secs();
    let exp = now + 7200;
    // A token valid only in an hour does not authenticate now.
    assert_refused(addr, &hs256(&json!({"sub": "u", "exp": exp, "nbf": now + 3600})), "token not yet valid");
    assert_refused(addr, &hs256(&json!({"sub": "u", "exp": exp, "nbf": now + 120})), "token not yet valid");
    // Within the default 30 s of clock difference, and in the past: accepted.
    let (mut ws, _) = authed(addr, "nbf", &hs256(&json!({"sub": "u", "exp": exp, "nbf": now + 10})));
    assert_pong(&mut ws);
    authed(addr, "nbf", &hs256(&json!({"sub": "u", "exp": exp, "nbf": now - 60})));
}

#[test]
fn iat_in_the_future_beyond_the_leeway_is_refused_and_within_it_accepted() {
    let relay = jwt_relay();
    let addr = relay.local_addr();
    let now = now_secs();
    let exp = now + 7200;
    assert_refused(addr, &hs256(&json!({"sub": "u", "exp": exp, "iat": now + 3600})), "token not yet valid");
    let (mut ws, _) = authed(addr, "iat", &hs256(&json!({"sub": "u", "exp": exp, "iat": now + 10})));
    assert_pong(&mut ws);
    authed(addr, "iat", &hs256(&json!({"sub": "u", "exp": exp, "iat": now - 60})));
}

#[test]
fn exp_past_beyond_the_leeway_is_refused_and_within_it_accepted() {
    let relay = jwt_relay();
    let addr = relay.local_addr();
    let now = now_secs();
    assert_refused(addr, &hs256(&json!({"sub": "u", "exp": now - 3600})), "token expired");
    assert_refused(addr, &hs256(&json!({"sub": "u", "exp": now - 120})), "token expired");
    // Expired 10 s ago, within the 30 s leeway: accepted.
    let (mut ws, _) = authed(addr, "exp", &hs256(&json!({"sub": "u", "exp": now - 10})));
    assert_pong(&mut ws);
    // exp stays required.
    assert_refused(addr, &hs256(&json!({"sub": "u"})), "invalid token");
}

#[test]
fn the_leeway_is_the_configured_one() {
    let relay = jwt_relay_with(|c| c.auth.jwt_leeway_secs = 0);
    let addr = relay.local_addr();
    let now = now_secs();
    // Each of these passes with the default leeway (the tests above); not with 0.
    assert_refused(addr, &hs256(&json!({"sub": "u", "exp": now - 10})), "token expired");
    assert_refused(addr, &hs256(&json!({"sub": "u", "exp": now + 600, "nbf": now + 10})), "token not yet valid");
    assert_refused(addr, &hs256(&json!({"sub": "u", "exp": now + 600, "iat": now + 10})), "token not yet valid");
    let (mut ws, _) = authed(addr, "leeway", &hs256(&json!({"sub": "u", "exp": now + 600, "nbf": now - 1})));
    assert_pong(&mut ws);
}

#[test]
fn time_claims_of_the_wrong_type_are_refused() {
    let relay = jwt_relay();
    let addr = relay.local_addr();
    let exp = now_secs() + 600;
    for claims in [
        json!({"sub": "u", "exp": exp, "nbf": "x"}),
        json!({"sub": "u", "exp": "soon"}),
        json!({"sub": "u", "exp": exp, "iat": true}),
        json!({"sub": "u", "exp": exp, "nbf": {"t": 1}}),
        json!({"sub": "u", "exp": exp, "iat": [1]}),
        json!({"sub": "u", "exp": -1}),
        json!({"sub": "u", "exp": null}),
        json!({"sub": 7, "exp": exp}),
    ] {
        assert_refused(addr, &hs256(&claims), "invalid token");
    }
    eventually("every refusal counted", || metric(addr, "docrelay_auth_failures_total") == 8);
    // The relay still serves a good token.
    let (mut ws, _) = authed(addr, "types", &hs256(&json!({"sub": "u", "exp": exp, "nbf": exp - 900, "iat": 1})));
    assert_pong(&mut ws);
}

// ---------------------------------------------------------------------------
// The algorithm is the configured key's
// ---------------------------------------------------------------------------

#[test]
fn alg_none_and_other_hmac_algorithms_are_refused_with_a_secret() {
    let relay = jwt_relay();
    let addr = relay.local_addr();
    let claims = json!({"sub": "mallory", "exp": now_secs() + 600});
    // The well-known header of an unsigned token.
    assert!(alg_none(&claims).starts_with("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."), "{}", alg_none(&claims));
    assert_refused(addr, &alg_none(&claims), "invalid token");
    // `none` with the signature of a valid HS256 token appended.
    let good = hs256(&claims);
    let signature = good.rsplit('.').next().unwrap();
    assert_refused(addr, &format!("{}{signature}", alg_none(&claims)), "invalid token");
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        assert_refused(addr, &hs(alg, SECRET.as_bytes(), &claims), "invalid token");
    }
    authed(addr, "alg", &good);
}

#[test]
fn rs256_and_es256_tokens_are_refused_when_a_secret_is_configured() {
    let dir = TempDir::new("alg-secret");
    let (rsa, _) = key_pair(dir.path(), "rsa", RSA);
    let (ec, _) = key_pair(dir.path(), "ec", EC_P256);
    let relay = jwt_relay();
    let addr = relay.local_addr();
    let claims = json!({"sub": "u", "exp": now_secs() + 600});
    let rs = encode(&Header::new(Algorithm::RS256), &claims, &EncodingKey::from_rsa_pem(&rsa).unwrap()).unwrap();
    assert_refused(addr, &rs, "invalid token");
    let es = encode(&Header::new(Algorithm::ES256), &claims, &EncodingKey::from_ec_pem(&ec).unwrap()).unwrap();
    assert_refused(addr, &es, "invalid token");
    authed(addr, "alg", &hs256(&claims));
}

/// With a public key file: only its algorithm, and the classic key confusion
/// (an HS256 token whose HMAC key is the public key's PEM) is refused.
fn public_key_pins_its_algorithm(name: &str, genpkey: &[&str], alg: Algorithm, key: fn(&[u8]) -> EncodingKey) {
    let dir = TempDir::new(name);
    let (private, public_file) = key_pair(dir.path(), "relay", genpkey);
    let relay = jwt_relay_with(|c| {
        c.auth.jwt_secret = String::new();
        c.auth.jwt_public_key_file = public_file.clone();
    });
    let addr = relay.local_addr();
    let claims = json!({"sub": "u", "exp": now_secs() + 600});
    let public_pem = std::fs::read(&public_file).unwrap();
    for confused in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        assert_refused(addr, &hs(confused, &public_pem, &claims), "invalid token");
    }
    assert_refused(addr, &alg_none(&claims), "invalid token");
    // The other asymmetric algorithm, signed with a key of its own kind.
    let (other_alg, other_genpkey) =
        if alg == Algorithm::RS256 { (Algorithm::ES256, EC_P256) } else { (Algorithm::RS256, RSA) };
    let (other, _) = key_pair(dir.path(), "other", other_genpkey);
    let other_key = if other_alg == Algorithm::RS256 {
        EncodingKey::from_rsa_pem(&other).unwrap()
    } else {
        EncodingKey::from_ec_pem(&other).unwrap()
    };
    assert_refused(addr, &encode(&Header::new(other_alg), &claims, &other_key).unwrap(), "invalid token");
    // The right algorithm and key work, and time claims are checked here too.
    let (mut ws, _) = authed(addr, name, &encode(&Header::new(alg), &claims, &key(&private)).unwrap());
    assert_pong(&mut ws);
    let early = json!({"sub": "u", "exp": now_secs() + 7200, "nbf": now_secs() + 3600});
    assert_refused(addr, &encode(&Header::new(alg), &early, &key(&private)).unwrap(), "token not yet valid");
}

#[test]
fn rs256_public_key_refuses_hs256_key_confusion_and_other_algorithms() {
    public_key_pins_its_algorithm("rs-pin", RSA, Algorithm::RS256, |pem| EncodingKey::from_rsa_pem(pem).unwrap());
}

#[test]
fn es256_public_key_refuses_hs256_key_confusion_and_other_algorithms() {
    public_key_pins_its_algorithm("es-pin", EC_P256, Algorithm::ES256, |pem| EncodingKey::from_ec_pem(pem).unwrap());
}

// ---------------------------------------------------------------------------
// What the client is told
// ---------------------------------------------------------------------------

#[test]
fn clients_get_fixed_messages_without_library_internals() {
    let relay = jwt_relay();
    let addr = relay.local_addr();
    let exp = now_secs() + 600;
    let claims = json!({"sub": "u", "exp": exp});
    let good = hs256(&claims);
    let tokens = [
        "garbage".to_string(),
        "not a jwt at all".to_string(),
        "a b.c d.e f".to_string(),
        "x.y.z".to_string(),
        alg_none(&claims),
        alg_none(&json!("not an object")),
        format!("{}.e30.", alg_none(&claims).split('.').next().unwrap()),
        hs(Algorithm::HS256, b"another secret", &claims),
        hs256(&json!({"sub": "u", "exp": "soon"})),
        hs256(&json!({"exp": exp})),
        good.replace('.', ".."),
        format!("{good}x"),
    ];
    for token in &tokens {
        let mut ws = connect(addr, "/ws/documents/messages");
        let v = request(&mut ws, &auth_message(token));
        assert_eq!(v["error"]["code"], "AUTH_FAILED", "{token}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{token}: {v}"));
        assert_eq!(message, "invalid token", "{token}");
        let whole = v.to_string();
        for word in INTERNALS {
            assert!(!whole.contains(word), "{token}: the reply shows `{word}`: {whole}");
        }
        assert_eq!(expect_close(&mut ws).0, 4001, "{token}");
    }
}

// ---------------------------------------------------------------------------
// A token that expires during a session
// ---------------------------------------------------------------------------

#[test]
fn a_session_is_closed_with_4001_when_its_token_expires() {
    let relay = jwt_relay_with(|c| c.auth.jwt_leeway_secs = 0);
    let addr = relay.local_addr();
    let now = now_secs();
    // Expires in 2 to 3 s (the token's exp is in whole seconds).
    let exp = now + 3;
    let (mut short, _) = authed(addr, "expiring", &hs256(&json!({"sub": "short", "exp": exp})));
    let (mut long, _) = authed(addr, "expiring", &hs256(&json!({"sub": "long", "exp": now + 600})));
    // The session works until then.
    assert_pong(&mut short);
    let j = request(&mut short, r#"{"type":"join_document"}"#);
    assert_eq!(j["type"], "joined_document", "{j}");

    // Then the relay closes it (whatever it has sent before: pings, user_joined).
    let (code, reason) = expect_close(&mut short);
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(at >= exp as f64 - 0.5, "closed at {at}, before the token's exp {exp}");
    assert_ends_after_close(&mut short);

    // The other session, whose token is still valid, is not affected.
    assert_pong(&mut long);
    let j = request(&mut long, r#"{"type":"join_document"}"#);
    assert_eq!(j["type"], "joined_document", "{j}");
}

#[test]
fn the_leeway_extends_a_session_past_its_tokens_exp() {
    // exp now + 1 with the default 30 s leeway: still open seconds later.
    let relay = jwt_relay();
    let addr = relay.local_addr();
    let (mut ws, _) = authed(addr, "leeway-life", &hs256(&json!({"sub": "u", "exp": now_secs() + 1})));
    std::thread::sleep(Duration::from_millis(2500));
    assert_pong(&mut ws);
}

// ---------------------------------------------------------------------------
// The binary: secrets from a file or the environment, warnings, the log
// ---------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_docrelay");

/// Generous bound for the relay to start or exit: not a speed test.
const PATIENCE: Duration = Duration::from_secs(20);

/// A running `docrelay serve`, killed when dropped; stderr read on a thread.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// `docrelay serve --config FILE` with `envs` added to its environment.
    fn serve(config_file: &str, envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config", config_file]);
        cmd.env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("docrelay starts");
        let (stderr, lines) = collect_stderr(&mut child);
        Proc { child, lines, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the `listening on ADDR` line and returns ADDR.
    fn listening(&self) -> SocketAddr {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        return addr.parse().unwrap_or_else(|_| panic!("no address in {line:?}"));
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no `listening on` line; stderr:\n{}", self.stderr()),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("docrelay ended without a `listening on` line; stderr:\n{}", self.stderr())
                }
            }
        }
    }

    /// Waits (bounded) for the process to exit.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread collect the last lines.
                while self.lines.recv_timeout(Duration::from_secs(5)).is_ok() {}
                return status;
            }
            assert!(Instant::now() < deadline, "docrelay still running; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status must be 0; returns all of stderr.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let status = self.wait();
        let stderr = self.stderr();
        assert_eq!(status.code(), Some(0), "exit status {status}; stderr:\n{stderr}");
        stderr
    }

    /// The process must exit non-zero without panicking; returns stderr.
    fn start_failure(mut self) -> String {
        let status = self.wait();
        let stderr = self.stderr();
        assert!(status.code().is_some_and(|c| c != 0), "expected a failing exit, got {status}; stderr:\n{stderr}");
        assert!(!stderr.contains("panicked"), "docrelay panicked:\n{stderr}");
        stderr
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A configuration file for a one-core `jwt` relay on an ephemeral port, with
/// `auth` lines added under `[auth]`.
fn jwt_config_file(dir: &TempDir, auth: &str) -> String {
    let text = format!("listen = \"127.0.0.1:0\"\ncores = [0]\n[auth]\nmode = \"jwt\"\n{auth}\n");
    dir.file("relay.toml", &text)
}

/// A variable name no other test (or process) uses.
fn env_name(what: &str) -> String {
    format!("DOCRELAY_TEST_{what}_{}", std::process::id())
}

#[test]
fn the_secret_can_come_from_a_file_without_its_trailing_newline() {
    let dir = TempDir::new("secret-file");
    let secret = "file-secret-0123456789-abcdefghijkl";
    let secret_file = dir.file("jwt.secret", &format!("{secret}\n"));
    let proc = Proc::serve(&jwt_config_file(&dir, &format!("jwt_secret_file = {secret_file:?}")), &[]);
    let addr = proc.listening();
    let claims = json!({"sub": "from-file", "exp": now_secs() + 600});
    let (mut ws, a) = authed(addr, "file", &hs(Algorithm::HS256, secret.as_bytes(), &claims));
    assert_eq!(a["user_id"], "from-file");
    assert_pong(&mut ws);
    drop(ws);
    // The newline is not part of the secret.
    let mut ws = connect(addr, "/ws/documents/file");
    let v = request(&mut ws, &auth_message(&hs(Algorithm::HS256, format!("{secret}\n").as_bytes(), &claims)));
    assert_eq!(v["error"]["code"], "AUTH_FAILED", "{v}");
    drop(ws);
    let stderr = proc.stop();
    assert!(!stderr.contains(secret), "the secret is in the log:\n{stderr}");
    assert!(!stderr.contains("shorter than"), "a 35-byte secret is not short:\n{stderr}");
}

#[test]
fn the_secret_can_come_from_an_environment_variable() {
    let dir = TempDir::new("secret-env");
    let name = env_name("SECRET");
    let secret = "env-secret-0123456789-abcdefghijklmn";
    let proc = Proc::serve(&jwt_config_file(&dir, &format!("jwt_secret_env = {name:?}")), &[(&name, secret)]);
    let addr = proc.listening();
    let claims = json!({"sub": "from-env", "exp": now_secs() + 600});
    let (mut ws, a) = authed(addr, "env", &hs(Algorithm::HS256, secret.as_bytes(), &claims));
    assert_eq!(a["user_id"], "from-env");
    assert_pong(&mut ws);
    drop(ws);
    // The variable's name is not the secret.
    let mut ws = connect(addr, "/ws/documents/env");
    let v = request(&mut ws, &auth_message(&hs(Algorithm::HS256, name.as_bytes(), &claims)));
    assert_eq!(v["error"]["code"], "AUTH_FAILED", "{v}");
    drop(ws);
    let stderr = proc.stop();
    assert!(!stderr.contains(secret), "the secret is in the log:\n{stderr}");
}

#[test]
fn a_missing_or_empty_secret_file_is_a_start_up_error_naming_the_key() {
    let dir = TempDir::new("secret-file-missing");
    let missing = dir.path().join("no-such.secret");
    let missing = missing.to_str().unwrap();
    let stderr = Proc::serve(&jwt_config_file(&dir, &format!("jwt_secret_file = {missing:?}")), &[]).start_failure();
    assert!(stderr.contains("auth.jwt_secret_file") && stderr.contains(missing), "{stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");

    let empty = dir.file("empty.secret", "\n");
    let stderr = Proc::serve(&jwt_config_file(&dir, &format!("jwt_secret_file = {empty:?}")), &[]).start_failure();
    assert!(stderr.contains("auth.jwt_secret_file") && stderr.contains("empty"), "{stderr}");
}

#[test]
fn an_unset_or_empty_secret_variable_is_a_start_up_error_naming_the_key() {
    let dir = TempDir::new("secret-env-missing");
    let name = env_name("UNSET");
    let file = jwt_config_file(&dir, &format!("jwt_secret_env = {name:?}"));
    let stderr = Proc::serve(&file, &[]).start_failure();
    assert!(stderr.contains("auth.jwt_secret_env") && stderr.contains(&name), "{stderr}");
    assert!(stderr.contains("not set"), "{stderr}");

    let stderr = Proc::serve(&file, &[(&name, "")]).start_failure();
    assert!(stderr.contains("auth.jwt_secret_env") && stderr.contains("empty"), "{stderr}");
}

#[test]
fn a_short_hs256_secret_is_warned_about_at_start() {
    let dir = TempDir::new("short-secret");
    let proc = Proc::serve(&jwt_config_file(&dir, "jwt_secret = \"s3cret\""), &[]);
    let addr = proc.listening();
    // It still works.
    let (mut ws, _) =
        authed(addr, "short", &hs(Algorithm::HS256, b"s3cret", &json!({"sub": "u", "exp": now_secs() + 60})));
    assert_pong(&mut ws);
    drop(ws);
    let stderr = proc.stop();
    let warning = stderr.lines().find(|l| l.contains("shorter than 32 bytes"));
    let warning = warning.unwrap_or_else(|| panic!("no warning about the short secret:\n{stderr}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(!stderr.contains("s3cret"), "the secret is in the log:\n{stderr}");

    // A secret of 32 bytes gets no such warning.
    let dir = TempDir::new("long-secret");
    let proc = Proc::serve(&jwt_config_file(&dir, &format!("jwt_secret = {:?}", "x".repeat(32))), &[]);
    proc.listening();
    let stderr = proc.stop();
    assert!(!stderr.contains("shorter than"), "{stderr}");
}

#[test]
fn failures_are_logged_with_the_connection_and_the_detail_but_never_the_token() {
    let dir = TempDir::new("auth-log");
    let proc = Proc::serve(&jwt_config_file(&dir, &format!("jwt_secret = {SECRET:?}")), &[]);
    let addr = proc.listening();
    let claims = json!({"sub": "mallory", "exp": now_secs() + 600});
    // A good session first, to learn connection ids.
    let (ws, a) = authed(addr, "log", &hs256(&claims));
    let good_id = a["connection_id"].as_u64().unwrap();
    drop(ws);
    let none = alg_none(&claims);
    let forged = hs(Algorithm::HS256, b"a guessed secret", &claims);
    for token in [&none, &forged] {
        let mut ws = connect(addr, "/ws/documents/log");
        let v = request(&mut ws, &auth_message(token));
        assert_eq!(v["error"]["message"], "invalid token", "{v}");
        assert_eq!(expect_close(&mut ws).0, 4001);
    }
    let stderr = proc.stop();
    let failures: Vec<&str> = stderr.lines().filter(|l| l.contains("authentication failed")).collect();
    assert_eq!(failures.len(), 2, "one log line per failure:\n{stderr}");
    for (line, id) in failures.iter().zip([good_id + 1, good_id + 2]) {
        assert!(line.contains(&format!("id={id}")), "no connection id {id} in {line}");
        assert!(line.contains("INFO") || line.contains("WARN"), "{line}");
    }
    // The library's detail is in the log (here, for `alg: none`)...
    assert!(failures[0].contains("none"), "{}", failures[0]);
    // ... the tokens, their signatures and the secret are not.
    for secret in [none.as_str(), forged.as_str(), forged.rsplit('.').next().unwrap(), SECRET] {
        assert!(!stderr.contains(secret), "`{secret}` is in the log:\n{stderr}");
    }
}
