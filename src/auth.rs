//! Authentication (`docs/protocol.md`, "Authentication"): `dev` accepts any non-empty token
//! as the user's id and name; `jwt` verifies a JSON Web Token (HS256 with a
//! shared secret, or RS256/ES256 with a public key file) whose `exp` is
//! required, whose `nbf` and `iat` must not lie in the future (all three with
//! `auth.jwt_leeway_secs` of clock difference), and whose optional `docs`
//! claim limits the documents it opens.
//!
//! A client is only ever told one of the short fixed messages of
//! [`Failure`]; what exactly was wrong (the JWT library's error) is
//! [`AuthError::detail`], for the relay's log. Neither ever holds the token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer};
use tracing::warn;

use crate::close;
use crate::config::{AuthMode, Config, ConfigError};
use crate::placement::fnv1a_64;

/// The shortest HS256 secret the relay accepts without a warning at start.
pub const MIN_SECRET_BYTES: usize = 32;

/// Who a session belongs to after a successful `authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub user_name: String,
    /// When the session's authentication ends: the token's `exp` plus the
    /// leeway. `None`: never (`dev` mode, or an `exp` too far to represent).
    pub expires_at: Option<SystemTime>,
    /// A read-only grant (a JWT with `"mode": "read"`): the session may
    /// receive but not change the document (Yjs rooms, `docs/yjs.md`).
    pub read_only: bool,
}

/// Why a token was refused, as the client is told (`auth_result.error.message`):
/// a small fixed set, so that no library internals reach the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `dev` mode: the token is empty.
    EmptyToken,
    /// Malformed, badly signed, another algorithm, a missing or mistyped claim.
    Invalid,
    /// `exp` passed more than the leeway ago.
    Expired,
    /// `nbf` or `iat` more than the leeway in the future.
    NotYetValid,
}

impl Failure {
    /// The message the client gets.
    pub fn message(self) -> &'static str {
        match self {
            Failure::EmptyToken => "empty token",
            Failure::Invalid => "invalid token",
            Failure::Expired => "token expired",
            Failure::NotYetValid => "token not yet valid",
        }
    }
}

/// Why `authenticate` failed; each maps to an `auth_result` code and a close code.
/// `Display` is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Bad token: `AUTH_FAILED`, then Close 4001. `detail` is for the log only.
    #[error("{}", failure.message())]
    Failed { failure: Failure, detail: String },
    /// Valid token that does not open this document: `FORBIDDEN`, then Close 4003.
    #[error("token does not grant access to document {0}")]
    Forbidden(String),
}

impl AuthError {
    fn failed(failure: Failure, detail: impl Into<String>) -> AuthError {
        AuthError::Failed { failure, detail: detail.into() }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Failed { .. } => "AUTH_FAILED",
            AuthError::Forbidden(_) => "FORBIDDEN",
        }
    }

    pub fn close_code(&self) -> u16 {
        match self {
            AuthError::Failed { .. } => close::AUTH_FAILED,
            AuthError::Forbidden(_) => close::FORBIDDEN,
        }
    }

    /// What exactly was wrong, for the relay's log (never sent to the
    /// client, never the token itself).
    pub fn detail(&self) -> String {
        match self {
            AuthError::Failed { detail, .. } => detail.clone(),
            AuthError::Forbidden(document) => format!("the token's docs claim does not open document {document}"),
        }
    }
}

/// A JWT NumericDate (RFC 7519, section 2): seconds since the epoch, a
/// non-negative integer or a finite non-negative number (rounded, as the JWT
/// library does). Anything else (a string, a boolean, a negative number)
/// fails the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NumericDate(u64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NumericDate, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = NumericDate;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a NumericDate (non-negative seconds since the epoch)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NumericDate, E> {
                Ok(NumericDate(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<NumericDate, E> {
                u64::try_from(v).map(NumericDate).map_err(|_| E::custom("a negative NumericDate"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<NumericDate, E> {
                if v.is_finite() && v >= 0.0 && v < u64::MAX as f64 {
                    Ok(NumericDate(v.round() as u64))
                } else {
                    Err(E::custom("a NumericDate out of range"))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    docs: Option<Vec<String>>,
    /// `"read"`: a read-only grant.
    #[serde(default)]
    mode: Option<String>,
    exp: NumericDate,
    #[serde(default)]
    nbf: Option<NumericDate>,
    #[serde(default)]
    iat: Option<NumericDate>,
}

/// Checks tokens; built once at start (keys are loaded and parsed then).
pub enum Authenticator {
    Dev,
    Jwt { key: Box<DecodingKey>, validation: Box<Validation>, leeway: u64 },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authenticator::Dev => "Authenticator::Dev",
            Authenticator::Jwt { .. } => "Authenticator::Jwt",
        })
    }
}

/// The HS256 secret from whichever of `auth.jwt_secret`, `auth.jwt_secret_file`
/// and `auth.jwt_secret_env` is set (`Config::validate` allows at most one).
/// Errors name the key, the file or the variable, never the secret.
fn load_secret(auth: &crate::config::Auth) -> Result<Vec<u8>, ConfigError> {
    let invalid = |m: String| Err(ConfigError::Invalid(m));
    let secret = if !auth.jwt_secret_file.is_empty() {
        let path = &auth.jwt_secret_file;
        let mut bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => return invalid(format!("auth.jwt_secret_file {path}: cannot read it: {e}")),
        };
        // One trailing line ending (`echo secret > file`) is not part of it.
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return invalid(format!("auth.jwt_secret_file {path}: the file is empty"));
        }
        bytes
    } else if !auth.jwt_secret_env.is_empty() {
        use std::os::unix::ffi::OsStringExt;
        let name = &auth.jwt_secret_env;
        let Some(value) = std::env::var_os(name) else {
            return invalid(format!("auth.jwt_secret_env: the environment variable {name} is not set"));
        };
        if value.is_empty() {
            return invalid(format!("auth.jwt_secret_env: the environment variable {name} is empty"));
        }
        value.into_vec()
    } else {
        if auth.jwt_secret.is_empty() {
            return invalid("auth.jwt_secret is empty".into());
        }
        auth.jwt_secret.as_bytes().to_vec()
    };
    Ok(secret)
}

/// Seconds since the epoch, now.
fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Authenticator {
    /// Builds the authenticator for a configuration; a missing, unreadable
    /// or empty key or secret is a start-up error. An HS256 secret shorter
    /// than [`MIN_SECRET_BYTES`] is logged as a warning.
    pub fn from_config(config: &Config) -> Result<Authenticator, ConfigError> {
        let auth = &config.auth;
        match auth.mode {
            AuthMode::Dev => Ok(Authenticator::Dev),
            AuthMode::Jwt => {
                let (key, alg) = if !auth.jwt_public_key_file.is_empty() {
                    let path = &auth.jwt_public_key_file;
                    let pem = std::fs::read(path).map_err(|e| {
                        ConfigError::Invalid(format!("auth.jwt_public_key_file {path}: cannot read it: {e}"))
                    })?;
                    if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                        (k, Algorithm::RS256)
                    } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                        (k, Algorithm::ES256)
                    } else {
                        return Err(ConfigError::Invalid(format!(
                            "auth.jwt_public_key_file {path}: not an RSA or EC public key in PEM format"
                        )));
                    }
                } else {
                    let secret = load_secret(auth)?;
                    if secret.len() < MIN_SECRET_BYTES {
                        warn!(
                            bytes = secret.len(),
                            "the HS256 secret is shorter than {MIN_SECRET_BYTES} bytes and can be guessed; \
                             use at least {MIN_SECRET_BYTES} random bytes"
                        );
                    }
                    (DecodingKey::from_secret(&secret), Algorithm::HS256)
                };
                // Exactly one algorithm: the one of the configured key. A token
                // with any other `alg` (`none`, HS256 against a public key,
                // RS256 against a secret) is refused before its signature.
                let mut validation = Validation::new(alg);
                validation.set_required_spec_claims(&["exp", "sub"]);
                validation.validate_exp = true;
                validation.validate_nbf = true;
                validation.leeway = auth.jwt_leeway_secs;
                Ok(Authenticator::Jwt {
                    key: Box::new(key),
                    validation: Box::new(validation),
                    leeway: auth.jwt_leeway_secs,
                })
            }
        }
    }

    /// Checks `token` for a session on `document`.
    pub fn authenticate(&self, token: &str, document: &str) -> Result<Identity, AuthError> {
        match self {
            Authenticator::Dev => {
                if token.is_empty() {
                    return Err(AuthError::failed(Failure::EmptyToken, "empty token"));
                }
                Ok(Identity {
                    user_id: token.to_string(),
                    user_name: token.to_string(),
                    expires_at: None,
                    read_only: false,
                })
            }
            Authenticator::Jwt { key, validation, leeway } => {
                let data = decode::<Claims>(token, key, validation).map_err(|e| {
                    let failure = match e.kind() {
                        ErrorKind::ExpiredSignature => Failure::Expired,
                        ErrorKind::ImmatureSignature => Failure::NotYetValid,
                        _ => Failure::Invalid,
                    };
                    AuthError::failed(failure, e.to_string())
                })?;
                let claims = data.claims;
                // The library checked `exp` and `nbf`; checked again here, with
                // `iat`, so that the rules hold whatever its defaults.
                let now = now_secs();
                if claims.exp.0.saturating_add(*leeway) < now {
                    return Err(AuthError::failed(Failure::Expired, "exp is in the past"));
                }
                if claims.nbf.is_some_and(|nbf| nbf.0 > now.saturating_add(*leeway)) {
                    return Err(AuthError::failed(Failure::NotYetValid, "nbf is in the future"));
                }
                if claims.iat.is_some_and(|iat| iat.0 > now.saturating_add(*leeway)) {
                    return Err(AuthError::failed(Failure::NotYetValid, "iat is in the future"));
                }
                if claims.sub.is_empty() {
                    return Err(AuthError::failed(Failure::Invalid, "empty sub"));
                }
                if let Some(docs) = &claims.docs {
                    if !docs.iter().any(|pattern| document_matches(pattern, document)) {
                        return Err(AuthError::Forbidden(document.to_string()));
                    }
                }
                let expires_at = UNIX_EPOCH.checked_add(Duration::from_secs(claims.exp.0.saturating_add(*leeway)));
                let user_name = claims.name.filter(|n| !n.is_empty()).unwrap_or_else(|| claims.sub.clone());
                let read_only = claims.mode.as_deref() == Some("read");
                Ok(Identity { user_id: claims.sub, user_name, expires_at, read_only })
            }
        }
    }
}

/// A `docs` claim entry: an exact document id, or a prefix followed by `*`.
pub fn document_matches(pattern: &str, document: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => document.starts_with(prefix),
        None => pattern == document,
    }
}

/// The palette colours are picked from when a client gives none.
pub const PALETTE: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// A stable colour for a user id.
pub fn palette_color(user_id: &str) -> &'static str {
    PALETTE[(fnv1a_64(user_id.as_bytes()) % PALETTE.len() as u64) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::{json, Value};

    fn now() -> u64 {
        now_secs()
    }

    fn jwt_auth(secret: &str) -> Authenticator {
        let mut c = Config::default();
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt_secret = secret.into();
        Authenticator::from_config(&c).unwrap()
    }

    fn token(secret: &str, claims: &Value) -> String {
        encode(&Header::default(), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn failure(r: Result<Identity, AuthError>) -> Failure {
        match r {
            Err(AuthError::Failed { failure, .. }) => failure,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn dev_mode() {
        let a = Authenticator::Dev;
        assert_eq!(
            a.authenticate("ada", "d").unwrap(),
            Identity { user_id: "ada".into(), user_name: "ada".into(), expires_at: None, read_only: false }
        );
        assert_eq!(failure(a.authenticate("", "d")), Failure::EmptyToken);
    }

    #[test]
    fn hs256() {
        let a = jwt_auth("s3cret");
        let exp = now() + 600;
        let ok = token("s3cret", &json!({"sub": "u1", "name": "Ada", "exp": exp}));
        let id = a.authenticate(&ok, "d1").unwrap();
        assert_eq!((id.user_id.as_str(), id.user_name.as_str()), ("u1", "Ada"));
        assert_eq!(id.expires_at, Some(UNIX_EPOCH + Duration::from_secs(exp + 30)), "exp plus the default leeway");
        let no_name = token("s3cret", &json!({"sub": "u1", "exp": exp}));
        assert_eq!(a.authenticate(&no_name, "d1").unwrap().user_name, "u1");
        let wrong = token("other", &json!({"sub": "u1", "exp": exp}));
        assert_eq!(failure(a.authenticate(&wrong, "d1")), Failure::Invalid);
        let no_exp = token("s3cret", &json!({"sub": "u1"}));
        assert_eq!(failure(a.authenticate(&no_exp, "d1")), Failure::Invalid);
        let expired = token("s3cret", &json!({"sub": "u1", "exp": now() - 100}));
        assert_eq!(failure(a.authenticate(&expired, "d1")), Failure::Expired);
        assert_eq!(failure(a.authenticate("garbage", "d1")), Failure::Invalid);
    }

    #[test]
    fn time_claims_with_leeway() {
        let a = jwt_auth("s3cret");
        let now = now();
        let t = |claims: Value| token("s3cret", &claims);
        // Within the 30 s leeway: accepted.
        for ok in [
            json!({"sub": "u", "exp": now - 20}),
            json!({"sub": "u", "exp": now + 60, "nbf": now + 20}),
            json!({"sub": "u", "exp": now + 60, "iat": now + 20}),
            json!({"sub": "u", "exp": (now + 60) as f64 + 0.25, "nbf": now - 5, "iat": now - 5}),
        ] {
            assert!(a.authenticate(&t(ok.clone()), "d").is_ok(), "{ok}");
        }
        assert_eq!(failure(a.authenticate(&t(json!({"sub": "u", "exp": now - 100})), "d")), Failure::Expired);
        let nbf = t(json!({"sub": "u", "exp": now + 7200, "nbf": now + 3600}));
        assert_eq!(failure(a.authenticate(&nbf, "d")), Failure::NotYetValid);
        let iat = t(json!({"sub": "u", "exp": now + 7200, "iat": now + 3600}));
        assert_eq!(failure(a.authenticate(&iat, "d")), Failure::NotYetValid);
        for bad in [
            json!({"sub": "u", "exp": "soon"}),
            json!({"sub": "u", "exp": now + 60, "nbf": "x"}),
            json!({"sub": "u", "exp": now + 60, "iat": true}),
            json!({"sub": "u", "exp": -1}),
            json!({"sub": "u", "exp": null}),
        ] {
            assert_eq!(failure(a.authenticate(&t(bad.clone()), "d")), Failure::Invalid, "{bad}");
        }
        // An exp beyond what a SystemTime holds: accepted, never expires.
        let far = t(json!({"sub": "u", "exp": u64::MAX}));
        assert!(a.authenticate(&far, "d").is_ok());
    }

    #[test]
    fn client_messages_are_fixed_and_details_stay_in_the_log() {
        let a = jwt_auth("s3cret");
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
        for bad in ["not a jwt", "a.b.c", none] {
            let e = a.authenticate(bad, "d").unwrap_err();
            assert_eq!(e.to_string(), "invalid token");
            assert!(!e.detail().is_empty());
            assert!(!e.detail().contains(bad), "the detail never holds the token: {}", e.detail());
        }
    }

    #[test]
    fn secret_sources() {
        let dir = std::env::temp_dir().join(format!("docrelay-auth-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let mut auth = Config::default().auth;
        auth.jwt_secret_file = file.to_str().unwrap().into();
        assert_eq!(load_secret(&auth).unwrap(), b"from-a-file");
        std::fs::write(&file, "crlf\r\n\n").unwrap();
        assert_eq!(load_secret(&auth).unwrap(), b"crlf\r\n", "one line ending only");
        std::fs::write(&file, "\n").unwrap();
        let err = load_secret(&auth).unwrap_err().to_string();
        assert!(err.contains("auth.jwt_secret_file") && err.contains("empty"), "{err}");
        auth.jwt_secret_file = dir.join("missing").to_str().unwrap().into();
        let err = load_secret(&auth).unwrap_err().to_string();
        assert!(err.contains("auth.jwt_secret_file") && err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();

        let mut auth = Config::default().auth;
        auth.jwt_secret_env = "DOCRELAY_UNIT_TEST_SURELY_UNSET_VARIABLE".into();
        let err = load_secret(&auth).unwrap_err().to_string();
        assert!(
            err.contains("auth.jwt_secret_env") && err.contains("DOCRELAY_UNIT_TEST_SURELY_UNSET_VARIABLE"),
            "{err}"
        );
    }

    #[test]
    fn debug_of_a_config_does_not_show_the_secret() {
        let mut c = Config::default();
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt_secret = "hunter2-very-secret-value".into();
        for text in [format!("{c:?}"), format!("{c:#?}"), format!("{:?}", c.auth)] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("jwt_secret"), "the field is still listed: {text}");
        }
        let a = Authenticator::from_config(&c).unwrap();
        assert!(!format!("{a:?}").contains("hunter2"));
    }

    #[test]
    fn docs_claim() {
        let a = jwt_auth("k");
        let t = token("k", &json!({"sub": "u", "exp": now() + 60, "docs": ["team-*", "d7"]}));
        assert!(a.authenticate(&t, "team-42").is_ok());
        assert!(a.authenticate(&t, "d7").is_ok());
        assert_eq!(a.authenticate(&t, "d8").unwrap_err(), AuthError::Forbidden("d8".into()));
        assert!(document_matches("*", "anything"));
        assert!(!document_matches("d7", "d77"));
    }

    #[test]
    fn palette_is_stable() {
        assert_eq!(palette_color("ada"), palette_color("ada"));
        assert!(PALETTE.contains(&palette_color("bob")));
    }
}
