//! Authentication (`docs/protocol.md`, "Authentication"): `dev` accepts any non-empty token
//! as the user's id and name; `jwt` verifies a JSON Web Token (HS256 with a
//! shared secret, or RS256/ES256 with a public key file) whose `exp` is
//! required and whose optional `docs` claim limits the documents it opens.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::close;
use crate::config::{AuthMode, Config, ConfigError};
use crate::placement::fnv1a_64;

/// Who a session belongs to after a successful `authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub user_name: String,
}

/// Why `authenticate` failed; each maps to an `auth_result` code and a close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Bad token: `AUTH_FAILED`, then Close 4001.
    #[error("{0}")]
    Failed(String),
    /// Valid token that does not open this document: `FORBIDDEN`, then Close 4003.
    #[error("token does not grant access to document {0}")]
    Forbidden(String),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Failed(_) => "AUTH_FAILED",
            AuthError::Forbidden(_) => "FORBIDDEN",
        }
    }
    pub fn close_code(&self) -> u16 {
        match self {
            AuthError::Failed(_) => close::AUTH_FAILED,
            AuthError::Forbidden(_) => close::FORBIDDEN,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    docs: Option<Vec<String>>,
}

/// Checks tokens; built once at start (keys are loaded and parsed then).
pub enum Authenticator {
    Dev,
    Jwt { key: Box<DecodingKey>, validation: Box<Validation> },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authenticator::Dev => "Authenticator::Dev",
            Authenticator::Jwt { .. } => "Authenticator::Jwt",
        })
    }
}

impl Authenticator {
    /// Builds the authenticator for a configuration; a missing or unreadable
    /// key is a start-up error.
    pub fn from_config(config: &Config) -> Result<Authenticator, ConfigError> {
        let auth = &config.auth;
        match auth.mode {
            AuthMode::Dev => Ok(Authenticator::Dev),
            AuthMode::Jwt => {
                let (key, alg) = if !auth.jwt_public_key_file.is_empty() {
                    let path = &auth.jwt_public_key_file;
                    let pem = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
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
                    (DecodingKey::from_secret(auth.jwt_secret.as_bytes()), Algorithm::HS256)
                };
                let mut validation = Validation::new(alg);
                validation.set_required_spec_claims(&["exp", "sub"]);
                validation.validate_exp = true;
                validation.leeway = 0;
                Ok(Authenticator::Jwt { key: Box::new(key), validation: Box::new(validation) })
            }
        }
    }

    /// Checks `token` for a session on `document`.
    pub fn authenticate(&self, token: &str, document: &str) -> Result<Identity, AuthError> {
        match self {
            Authenticator::Dev => {
                if token.is_empty() {
                    return Err(AuthError::Failed("empty token".into()));
                }
                Ok(Identity { user_id: token.to_string(), user_name: token.to_string() })
            }
            Authenticator::Jwt { key, validation } => {
                let data = decode::<Claims>(token, key, validation)
                    .map_err(|e| AuthError::Failed(format!("invalid token: {e}")))?;
                let claims = data.claims;
                if claims.sub.is_empty() {
                    return Err(AuthError::Failed("invalid token: empty sub".into()));
                }
                if let Some(docs) = &claims.docs {
                    if !docs.iter().any(|pattern| document_matches(pattern, document)) {
                        return Err(AuthError::Forbidden(document.to_string()));
                    }
                }
                let user_name = claims.name.filter(|n| !n.is_empty()).unwrap_or_else(|| claims.sub.clone());
                Ok(Identity { user_id: claims.sub, user_name })
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
    use serde::Serialize;

    #[derive(Serialize)]
    struct Make<'a> {
        sub: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        docs: Option<Vec<&'a str>>,
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn jwt_auth(secret: &str) -> Authenticator {
        let mut c = Config::default();
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt_secret = secret.into();
        Authenticator::from_config(&c).unwrap()
    }

    fn token(secret: &str, claims: &Make<'_>) -> String {
        encode(&Header::default(), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn dev_mode() {
        let a = Authenticator::Dev;
        assert_eq!(a.authenticate("ada", "d").unwrap(), Identity { user_id: "ada".into(), user_name: "ada".into() });
        assert!(matches!(a.authenticate("", "d"), Err(AuthError::Failed(_))));
    }

    #[test]
    fn hs256() {
        let a = jwt_auth("s3cret");
        let exp = Some(now() + 600);
        let ok = token("s3cret", &Make { sub: "u1", name: Some("Ada"), exp, docs: None });
        assert_eq!(a.authenticate(&ok, "d1").unwrap(), Identity { user_id: "u1".into(), user_name: "Ada".into() });
        let no_name = token("s3cret", &Make { sub: "u1", name: None, exp, docs: None });
        assert_eq!(a.authenticate(&no_name, "d1").unwrap().user_name, "u1");
        let wrong = token("other", &Make { sub: "u1", name: None, exp, docs: None });
        assert!(matches!(a.authenticate(&wrong, "d1"), Err(AuthError::Failed(_))));
        let no_exp = token("s3cret", &Make { sub: "u1", name: None, exp: None, docs: None });
        assert!(matches!(a.authenticate(&no_exp, "d1"), Err(AuthError::Failed(_))));
        let expired = token("s3cret", &Make { sub: "u1", name: None, exp: Some(now() - 10), docs: None });
        assert!(matches!(a.authenticate(&expired, "d1"), Err(AuthError::Failed(_))));
        assert!(matches!(a.authenticate("garbage", "d1"), Err(AuthError::Failed(_))));
    }

    #[test]
    fn docs_claim() {
        let a = jwt_auth("k");
        let t = token("k", &Make { sub: "u", name: None, exp: Some(now() + 60), docs: Some(vec!["team-*", "d7"]) });
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
