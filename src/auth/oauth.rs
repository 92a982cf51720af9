//! OAuth 2.0 bearer tokens (`AUTHENTICATE XOAUTH2` and `OAUTHBEARER`,
//! RFC 7628): JWT access tokens checked locally against the keys of a JWKS
//! file: the signature with the key named by `kid` (or the only key) and
//! that key's own algorithm, never one the token picks (no `none`, no
//! HMAC), then `iss`, `aud`, `exp` (and `nbf`) with a small leeway, and the
//! claim that names the user. The backend login for a token user is a
//! master-user login: there is no password to pass on.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// A checked token's user, or why it is refused (for the log only; the
/// client reads a fixed error).
pub type TokenResult = Result<String, String>;

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

pub struct OAuth {
    keys: Vec<Key>,
    issuer: String,
    audience: String,
    user_claim: String,
    leeway: Duration,
}

impl OAuth {
    /// Loads the JWKS at `jwks_file`; every key must be usable.
    pub fn load(
        jwks_file: &Path,
        issuer: String,
        audience: String,
        user_claim: String,
        leeway: Duration,
    ) -> Result<OAuth, String> {
        let text = std::fs::read_to_string(jwks_file)
            .map_err(|e| format!("key `auth.oauth.jwks_file`: {}: {e}", jwks_file.display()))?;
        let set: JwkSet = serde_json::from_str(&text).map_err(|e| {
            format!(
                "key `auth.oauth.jwks_file`: {} is not a JWKS: {e}",
                jwks_file.display()
            )
        })?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let algorithm = algorithm_of(jwk).ok_or_else(|| {
                format!(
                    "key `auth.oauth.jwks_file`: key {:?} has no usable public-key algorithm",
                    jwk.common.key_id
                )
            })?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                format!(
                    "key `auth.oauth.jwks_file`: key {:?}: {e}",
                    jwk.common.key_id
                )
            })?;
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            });
        }
        if keys.is_empty() {
            return Err(format!(
                "key `auth.oauth.jwks_file`: {} holds no keys",
                jwks_file.display()
            ));
        }
        Ok(OAuth {
            keys,
            issuer,
            audience,
            user_claim,
            leeway,
        })
    }

    /// Checks `token` and returns the user its claim names.
    pub fn validate(&self, token: &str) -> TokenResult {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        let key = match &header.kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or_else(|| format!("no key for kid {:?}", header.kid))?;
        if header.alg != key.algorithm {
            return Err(format!(
                "alg {:?} is not the key's {:?}",
                header.alg, key.algorithm
            ));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation)
            .map_err(|e| format!("token refused: {e}"))?;
        data.claims
            .get(&self.user_claim)
            .and_then(|v| v.as_str())
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("no `{}` claim", self.user_claim))
    }
}

/// The key's own algorithm: as stated, else implied by its type.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    let stated = jwk.common.key_algorithm.and_then(|a| match a {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::RS384 => Some(Algorithm::RS384),
        KeyAlgorithm::RS512 => Some(Algorithm::RS512),
        KeyAlgorithm::PS256 => Some(Algorithm::PS256),
        KeyAlgorithm::PS384 => Some(Algorithm::PS384),
        KeyAlgorithm::PS512 => Some(Algorithm::PS512),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::ES384 => Some(Algorithm::ES384),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    });
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        // A shared secret is no public key.
        AlgorithmParameters::OctetKey(_) => None,
    };
    match (stated, implied) {
        (Some(s), Some(_)) => Some(s),
        (None, i) => i,
        (Some(_), None) => None,
    }
}
