//! SASL message decoding for the mechanisms Postern accepts from clients:
//! PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login). Decoding only;
//! the exchange of continuations is driven by `session.rs`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::Secret;

/// Longest decoded SASL message accepted (a user name and a password).
pub const MAX_MESSAGE: usize = 4096;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64 in SASL response")]
    Base64,
    #[error("SASL PLAIN message must be authzid NUL authcid NUL password")]
    PlainShape,
    #[error("SASL message too long")]
    TooLong,
}

/// Credentials out of a SASL exchange.
#[derive(Debug)]
pub struct Credentials {
    /// Authorization identity, when the client asked for one.
    pub authzid: Option<Vec<u8>>,
    pub authcid: Vec<u8>,
    pub password: Secret,
}

/// Decodes a client's base64 response line; `=` is the empty response.
pub fn decode_response(line: &[u8]) -> Result<Secret, SaslError> {
    if line == b"=" {
        return Ok(Secret::default());
    }
    if line.len() > MAX_MESSAGE * 4 / 3 + 4 {
        return Err(SaslError::TooLong);
    }
    STANDARD
        .decode(line)
        .map(Secret::new)
        .map_err(|_| SaslError::Base64)
}

/// Splits a PLAIN message `[authzid] NUL authcid NUL passwd`.
pub fn decode_plain(message: &Secret) -> Result<Credentials, SaslError> {
    let bytes = message.expose();
    let mut parts = bytes.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::PlainShape);
    };
    if authcid.is_empty() || password.contains(&0) {
        return Err(SaslError::PlainShape);
    }
    Ok(Credentials {
        authzid: (!authzid.is_empty()).then(|| authzid.to_vec()),
        authcid: authcid.to_vec(),
        password: Secret::new(password.to_vec()),
    })
}

/// Encodes a PLAIN message for a backend (authzid empty or given).
pub fn encode_plain(authzid: &[u8], authcid: &[u8], password: &[u8]) -> Secret {
    let mut message = Vec::with_capacity(authzid.len() + authcid.len() + password.len() + 2);
    message.extend_from_slice(authzid);
    message.push(0);
    message.extend_from_slice(authcid);
    message.push(0);
    message.extend_from_slice(password);
    let encoded = STANDARD.encode(&message);
    zeroize::Zeroize::zeroize(&mut message);
    Secret::new(encoded.into_bytes())
}

/// The LOGIN mechanism's prompts, base64 of `Username:` and `Password:`.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_round_trip() {
        let encoded = encode_plain(b"", b"alice", b"pw");
        let message = decode_response(encoded.expose()).unwrap();
        let c = decode_plain(&message).unwrap();
        assert_eq!(c.authzid, None);
        assert_eq!(c.authcid, b"alice");
        assert_eq!(c.password.expose(), b"pw");
    }

    #[test]
    fn plain_with_authzid() {
        let c = decode_plain(&Secret::new(b"bob\0alice\0pw".to_vec())).unwrap();
        assert_eq!(c.authzid.as_deref(), Some(&b"bob"[..]));
    }

    #[test]
    fn malformed_plain_is_refused() {
        assert_eq!(
            decode_plain(&Secret::new(b"alice\0pw".to_vec())).unwrap_err(),
            SaslError::PlainShape
        );
        assert_eq!(
            decode_plain(&Secret::new(b"\0\0pw".to_vec())).unwrap_err(),
            SaslError::PlainShape
        );
        assert_eq!(
            decode_plain(&Secret::new(b"\0a\0p\0w".to_vec())).unwrap_err(),
            SaslError::PlainShape
        );
        assert_eq!(decode_response(b"!!!").unwrap_err(), SaslError::Base64);
        assert!(decode_response(b"=").unwrap().is_empty());
    }
}
