//! OAuth 2.0 bearer tokens (`AUTHENTICATE XOAUTH2` and `OAUTHBEARER`,
//! RFC 7628): JWT access tokens checked locally against the keys of a JWKS
//! (a file, or the provider's `jwks_uri` fetched at start, every
//! `jwks_refresh`, and on a token with an unknown `kid` at most every 10 s,
//! the last good set kept while fetching fails): the signature with the
//! key named by `kid` (or the only key) and
//! that key's own algorithm, never one the token picks (no `none`, no
//! HMAC), then `iss`, `aud`, `exp` (and `nbf`) with a small leeway, and the
//! claim that names the user. The backend login for a token user is a
//! master-user login: there is no password to pass on.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::time::Instant;

use crate::http_client::Endpoint;
use crate::imap::Secret;
use crate::latch::Latch;

/// Largest JWKS document read.
const MAX_JWKS: usize = 1024 * 1024;
/// Fetches for unknown `kid`s are at least this far apart.
const MIN_REFETCH: Duration = Duration::from_secs(10);

/// Why a token was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// The token is not good: refused.
    Invalid(String),
    /// No key named by its `kid` (a rotation not fetched yet?).
    UnknownKey(String),
    /// No keys at all yet: the provider could not be reached.
    NoKeys,
}

pub struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

struct Fetch {
    endpoint: Endpoint,
    url: String,
    refresh: Duration,
    timeout: Duration,
    last: Mutex<Option<Instant>>,
}

/// An RFC 7662 introspection endpoint and Postern's credentials for it.
pub struct Introspect {
    pub endpoint: Endpoint,
    pub client_id: String,
    pub client_secret: Secret,
    pub timeout: Duration,
}

/// Largest introspection answer read.
const MAX_INTROSPECTION: usize = 64 * 1024;

pub struct OAuth {
    keys: ArcSwap<Vec<Key>>,
    fetch: Option<Fetch>,
    introspect: Option<Introspect>,
    issuer: String,
    audience: String,
    user_claim: String,
    allow_unverified_email: bool,
    leeway: Duration,
}

/// What the token checks are against, besides the keys.
pub struct Claims {
    pub issuer: String,
    pub audience: String,
    pub user_claim: String,
    /// Take an `email` claim without `email_verified: true`.
    pub allow_unverified_email: bool,
    pub leeway: Duration,
}

impl OAuth {
    /// Keys from a JWKS file; every key must be usable.
    pub fn from_file(jwks_file: &Path, claims: Claims) -> Result<OAuth, String> {
        let text = std::fs::read_to_string(jwks_file)
            .map_err(|e| format!("key `auth.oauth.jwks_file`: {}: {e}", jwks_file.display()))?;
        let keys = parse_jwks(&text)
            .map_err(|e| format!("key `auth.oauth.jwks_file`: {}: {e}", jwks_file.display()))?;
        Ok(OAuth::with(keys, None, claims))
    }

    /// Keys fetched from `url`; until the first fetch, the previous
    /// runtime's keys for the same URL, if any.
    pub fn from_url(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        refresh: Duration,
        claims: Claims,
        previous: Option<&OAuth>,
    ) -> Result<OAuth, String> {
        let endpoint = Endpoint::parse(url, "auth.oauth.jwks_url", tls)?;
        let keys = previous
            .filter(|p| p.fetch.as_ref().is_some_and(|f| f.url == url))
            .map(|p| p.keys.load_full())
            .unwrap_or_default();
        let fetch = Fetch {
            endpoint,
            url: url.to_owned(),
            refresh,
            timeout: Duration::from_secs(5),
            last: Mutex::new(None),
        };
        let mut oauth = OAuth::with(Vec::new(), Some(fetch), claims);
        oauth.keys = ArcSwap::new(keys);
        Ok(oauth)
    }

    /// Every token asked about at an introspection endpoint.
    pub fn from_introspection(introspect: Introspect, claims: Claims) -> OAuth {
        let mut oauth = OAuth::with(Vec::new(), None, claims);
        oauth.introspect = Some(introspect);
        oauth
    }

    fn with(keys: Vec<Key>, fetch: Option<Fetch>, claims: Claims) -> OAuth {
        OAuth {
            keys: ArcSwap::from_pointee(keys),
            fetch,
            introspect: None,
            issuer: claims.issuer,
            audience: claims.audience,
            user_claim: claims.user_claim,
            allow_unverified_email: claims.allow_unverified_email,
            leeway: claims.leeway,
        }
    }

    /// Whether the keys come from a URL.
    pub fn fetches(&self) -> bool {
        self.fetch.is_some()
    }

    /// Fetches the JWKS now; on failure the keys held stay.
    pub async fn refresh(&self) -> Result<usize, String> {
        let Some(fetch) = &self.fetch else {
            return Ok(self.keys.load().len());
        };
        *fetch.last.lock().unwrap() = Some(Instant::now());
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: postern/{}\r\n\r\n",
            fetch.endpoint.target,
            fetch.endpoint.authority,
            env!("CARGO_PKG_VERSION")
        );
        let response = tokio::time::timeout(
            fetch.timeout,
            fetch
                .endpoint
                .exchange(&Secret::new(request.into_bytes()), MAX_JWKS),
        )
        .await
        .map_err(|_| format!("no answer from {} within {:?}", fetch.url, fetch.timeout))??;
        if response.code != 200 {
            return Err(format!("{} answered HTTP {}", fetch.url, response.code));
        }
        let text = std::str::from_utf8(response.body.expose())
            .map_err(|_| format!("{}: the JWKS is not UTF-8", fetch.url))?;
        let keys = parse_jwks(text).map_err(|e| format!("{}: {e}", fetch.url))?;
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(n)
    }

    /// Fetches again for a token whose `kid` is unknown, unless the last
    /// fetch was under 10 s ago. Whether a fetch happened and succeeded.
    pub async fn refresh_for_unknown_key(&self) -> bool {
        let Some(fetch) = &self.fetch else {
            return false;
        };
        let recent = fetch
            .last
            .lock()
            .unwrap()
            .is_some_and(|t| t.elapsed() < MIN_REFETCH);
        if recent {
            return false;
        }
        match self.refresh().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "JWKS fetch failed");
                false
            }
        }
    }

    /// Checks `token` by introspection or against the keys (fetching them
    /// again for an unknown `kid`), and returns the user its claim names.
    pub async fn check(&self, token: &str) -> Result<String, TokenError> {
        if let Some(i) = &self.introspect {
            return self.introspect(i, token).await;
        }
        let checked = self.validate(token);
        if matches!(checked, Err(TokenError::UnknownKey(_) | TokenError::NoKeys))
            && self.refresh_for_unknown_key().await
        {
            return self.validate(token);
        }
        checked
    }

    /// RFC 7662: POST the token with HTTP Basic client credentials; the
    /// answer must say `active`, and its `iss`, `aud` and `exp`, where
    /// given, must fit.
    async fn introspect(&self, i: &Introspect, token: &str) -> Result<String, TokenError> {
        use base64::Engine;
        let unavailable = |e: String| {
            tracing::warn!(error = %e, "token introspection failed");
            TokenError::NoKeys
        };
        let body = format!("token={}&token_type_hint=access_token", form_escape(token));
        // RFC 6749 2.3.1: both form-encoded before Basic.
        let secret = std::str::from_utf8(i.client_secret.expose()).unwrap_or_default();
        let mut credentials = form_escape(&i.client_id).into_bytes();
        credentials.push(b':');
        credentials.extend_from_slice(form_escape(secret).as_bytes());
        let basic = Secret::new(credentials);
        let request = format!(
            "POST {} HTTP/1.0\r\nHost: {}\r\nAuthorization: Basic {}\r\nAccept: application/json\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            i.endpoint.target,
            i.endpoint.authority,
            base64::engine::general_purpose::STANDARD.encode(basic.expose()),
            body.len()
        );
        let response = tokio::time::timeout(
            i.timeout,
            i.endpoint
                .exchange(&Secret::new(request.into_bytes()), MAX_INTROSPECTION),
        )
        .await
        .map_err(|_| unavailable(format!("no answer within {:?}", i.timeout)))?
        .map_err(unavailable)?;
        if response.code != 200 {
            return Err(unavailable(format!(
                "introspection answered HTTP {}",
                response.code
            )));
        }
        let answer: serde_json::Value = serde_json::from_slice(response.body.expose())
            .map_err(|e| unavailable(format!("introspection answer is not JSON: {e}")))?;
        self.judge_introspection(&answer)
    }

    fn judge_introspection(&self, answer: &serde_json::Value) -> Result<String, TokenError> {
        let invalid = |why: &str| Err(TokenError::Invalid(why.into()));
        if answer["active"] != serde_json::Value::Bool(true) {
            return invalid("the provider says the token is not active");
        }
        if let Some(iss) = answer.get("iss") {
            if iss.as_str() != Some(self.issuer.as_str()) {
                return invalid("another issuer");
            }
        }
        // Required: without it any active token of the provider, issued to
        // any client, would do.
        let ours = match answer.get("aud") {
            Some(serde_json::Value::String(a)) => *a == self.audience,
            Some(serde_json::Value::Array(all)) => {
                all.iter().any(|a| a.as_str() == Some(&self.audience))
            }
            _ => false,
        };
        if !ours {
            return invalid("not for our audience (aud missing or another)");
        }
        if let Some(exp) = answer.get("exp").and_then(|e| e.as_u64()) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if exp + self.leeway.as_secs() < now {
                return invalid("expired");
            }
        }
        self.user_of(answer)
    }

    /// The user the claims name. An `email` claim needs `email_verified:
    /// true` beside it: some providers let users set any address, and a
    /// token login reaches the backend as the master user, so an
    /// unverified address would be anyone's mailbox. With
    /// `allow_unverified_email` a missing `email_verified` is taken, one
    /// that is not true never.
    fn user_of(&self, claims: &serde_json::Value) -> Result<String, TokenError> {
        if self.user_claim == "email" {
            match claims.get("email_verified") {
                Some(serde_json::Value::Bool(true)) => {}
                None if self.allow_unverified_email => {}
                None => {
                    return Err(TokenError::Invalid(
                        "no email_verified claim (see auth.oauth.allow_unverified_email)".into(),
                    ))
                }
                Some(_) => return Err(TokenError::Invalid("email_verified is not true".into())),
            }
        }
        claims
            .get(&self.user_claim)
            .and_then(|v| v.as_str())
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| TokenError::Invalid(format!("no `{}` claim", self.user_claim)))
    }

    /// Checks `token` against the keys and returns the user its claim names.
    pub fn validate(&self, token: &str) -> Result<String, TokenError> {
        let invalid = TokenError::Invalid;
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("not a JWT: {e}")))?;
        let keys = self.keys.load();
        if keys.is_empty() {
            return Err(TokenError::NoKeys);
        }
        let only = (keys.len() == 1).then(|| &keys[0]);
        let key = match &header.kid {
            Some(kid) => keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .or(only.filter(|k| k.kid.is_none())),
            None => only,
        }
        .ok_or_else(|| TokenError::UnknownKey(format!("no key for kid {:?}", header.kid)))?;
        if header.alg != key.algorithm {
            return Err(invalid(format!(
                "alg {:?} is not the key's {:?}",
                header.alg, key.algorithm
            )));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation)
            .map_err(|e| invalid(format!("token refused: {e}")))?;
        self.user_of(&data.claims)
    }
}

/// `application/x-www-form-urlencoded` escaping of a token.
fn form_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Refetches the JWKS every `jwks_refresh` until `stop` is set.
pub async fn keep_fresh(oauth: Arc<OAuth>, stop: Arc<Latch>) {
    let Some(fetch) = &oauth.fetch else {
        return;
    };
    let every = fetch.refresh;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait() => return,
        }
        match oauth.refresh().await {
            Ok(n) => tracing::debug!(keys = n, "JWKS refreshed"),
            Err(e) => tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys held"),
        }
    }
}

/// The signing keys of a JWKS document that can be used; others
/// (encryption keys, curves or algorithms not supported) are skipped with a
/// log line, so one new kind of key does not stop the rest. At least one
/// key must be usable.
fn parse_jwks(text: &str) -> Result<Vec<Key>, String> {
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let entries = doc["keys"].as_array().ok_or("not a JWKS: no `keys` list")?;
    let mut keys = Vec::new();
    for entry in entries {
        let kid = entry["kid"].as_str().map(str::to_owned);
        if entry.get("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let parsed = serde_json::from_value::<Jwk>(entry.clone())
            .map_err(|e| e.to_string())
            .and_then(|jwk| {
                let algorithm = algorithm_of(&jwk).ok_or("no usable public-key algorithm")?;
                let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
                Ok((algorithm, key))
            });
        match parsed {
            Ok((algorithm, key)) => keys.push(Key {
                kid,
                algorithm,
                key,
            }),
            Err(e) => tracing::info!(kid = ?kid, reason = %e, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        return Err("no usable signing keys".into());
    }
    Ok(keys)
}

/// The key's own algorithm: as stated, else implied by its type.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    // A stated algorithm that is not a signature one (RSA-OAEP…) rules the
    // key out, whatever its type would imply.
    let stated = jwk.common.key_algorithm.map(|a| match a {
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
        (Some(Some(s)), Some(_)) => Some(s),
        (None, i) => i,
        _ => None,
    }
}
