//! SASL message decoding for the mechanisms Postern accepts from clients:
//! PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login), and the bearer
//! token mechanisms OAUTHBEARER (RFC 7628) and XOAUTH2. Decoding only; the
//! exchange of continuations is driven by `session.rs`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::Secret;

/// Longest decoded SASL message accepted (a user name and a password).
pub const MAX_MESSAGE: usize = 4096;
/// Longest decoded bearer-token message accepted: tokens of several KiB.
pub const MAX_TOKEN_MESSAGE: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64 in SASL response")]
    Base64,
    #[error("SASL PLAIN message must be authzid NUL authcid NUL password")]
    PlainShape,
    #[error("SASL message too long")]
    TooLong,
    #[error("malformed bearer token message")]
    BearerShape,
}

/// A bearer token out of OAUTHBEARER or XOAUTH2, with the user the client
/// named, if any.
#[derive(Debug)]
pub struct Bearer {
    pub authzid: Option<Vec<u8>>,
    pub token: Secret,
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
    decode_response_up_to(line, MAX_MESSAGE)
}

/// As [`decode_response`], for messages of up to `max` decoded bytes.
pub fn decode_response_up_to(line: &[u8], max: usize) -> Result<Secret, SaslError> {
    if line == b"=" {
        return Ok(Secret::default());
    }
    if line.len() > max * 4 / 3 + 4 {
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

/// The `auth=Bearer <token>` value among `\x01`-separated key=value pairs
/// that end with `\x01\x01`.
fn bearer_in(pairs: &[u8]) -> Result<Secret, SaslError> {
    let body = pairs
        .strip_suffix(b"\x01\x01")
        .ok_or(SaslError::BearerShape)?;
    for pair in body.split(|&b| b == 1) {
        if let Some(value) = pair.strip_prefix(b"auth=") {
            let token = value
                .strip_prefix(b"Bearer ")
                .or_else(|| value.strip_prefix(b"bearer "))
                .ok_or(SaslError::BearerShape)?;
            if token.is_empty() || !token.iter().all(|b| b.is_ascii_graphic()) {
                return Err(SaslError::BearerShape);
            }
            return Ok(Secret::new(token.to_vec()));
        }
    }
    Err(SaslError::BearerShape)
}

/// The error challenge a refused bearer token gets before the final
/// answer (RFC 7628 3.2.3; XOAUTH2's JSON as Google sends it), base64.
pub fn bearer_error_challenge(xoauth2: bool) -> String {
    use base64::Engine as _;
    let error = if xoauth2 {
        r#"{"status":"401","schemes":"bearer"}"#
    } else {
        r#"{"status":"invalid_token"}"#
    };
    base64::engine::general_purpose::STANDARD.encode(error)
}

/// LOGIN's two answers (base64 lines) as credentials.
pub fn decode_login(user: &Secret, password: &Secret) -> Result<Credentials, SaslError> {
    let user = decode_response(user.expose())?;
    let password = decode_response(password.expose())?;
    Ok(Credentials {
        authzid: None,
        authcid: user.expose().to_vec(),
        password,
    })
}

/// A bearer-token mechanism's message (a base64 line of up to
/// [`MAX_TOKEN_MESSAGE`] bytes decoded): XOAUTH2's or OAUTHBEARER's.
pub fn decode_bearer(line: &Secret, xoauth2: bool) -> Result<Bearer, SaslError> {
    let message = decode_response_up_to(line.expose(), MAX_TOKEN_MESSAGE)?;
    if xoauth2 {
        decode_xoauth2(&message)
    } else {
        decode_oauthbearer(&message)
    }
}

/// OAUTHBEARER (RFC 7628): `n,a=<user>,` then `\x01`-separated pairs with
/// `auth=Bearer <token>`. Channel binding (`p=`) is refused; `y` is taken
/// as `n`. `=2C` and `=3D` in the user name are unescaped.
pub fn decode_oauthbearer(message: &Secret) -> Result<Bearer, SaslError> {
    let bytes = message.expose();
    let first = bytes
        .iter()
        .position(|&b| b == 1)
        .ok_or(SaslError::BearerShape)?;
    let gs2 = &bytes[..first];
    let mut fields = gs2.splitn(3, |&b| b == b',');
    let flag = fields.next().ok_or(SaslError::BearerShape)?;
    if flag != b"n" && flag != b"y" {
        return Err(SaslError::BearerShape);
    }
    let authzid = match fields.next() {
        Some(b"") | None => None,
        Some(a) => {
            let user = a.strip_prefix(b"a=").ok_or(SaslError::BearerShape)?;
            let text = std::str::from_utf8(user).map_err(|_| SaslError::BearerShape)?;
            Some(text.replace("=2C", ",").replace("=3D", "=").into_bytes())
        }
    };
    if fields.next() != Some(b"") {
        return Err(SaslError::BearerShape);
    }
    Ok(Bearer {
        authzid,
        token: bearer_in(&bytes[first..])?,
    })
}

/// XOAUTH2: `user=<user>\x01auth=Bearer <token>\x01\x01`.
pub fn decode_xoauth2(message: &Secret) -> Result<Bearer, SaslError> {
    let bytes = message.expose();
    let rest = bytes.strip_prefix(b"user=").ok_or(SaslError::BearerShape)?;
    let end = rest
        .iter()
        .position(|&b| b == 1)
        .ok_or(SaslError::BearerShape)?;
    let user = &rest[..end];
    Ok(Bearer {
        authzid: (!user.is_empty()).then(|| user.to_vec()),
        token: bearer_in(&rest[end..])?,
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
    fn bearer_messages() {
        let b = decode_oauthbearer(&Secret::new(
            b"n,a=user=2Cx@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer abc.def.ghi\x01\x01".to_vec(),
        ))
        .unwrap();
        assert_eq!(b.authzid.as_deref(), Some(&b"user,x@example.com"[..]));
        assert_eq!(b.token.expose(), b"abc.def.ghi");
        let b = decode_oauthbearer(&Secret::new(b"n,,\x01auth=Bearer t\x01\x01".to_vec())).unwrap();
        assert_eq!(b.authzid, None);
        let b = decode_xoauth2(&Secret::new(
            b"user=alice@example.com\x01auth=Bearer tok\x01\x01".to_vec(),
        ))
        .unwrap();
        assert_eq!(b.authzid.as_deref(), Some(&b"alice@example.com"[..]));
        assert_eq!(b.token.expose(), b"tok");
        for bad in [
            &b"p=tls-unique,,\x01auth=Bearer t\x01\x01"[..],
            b"n,,\x01auth=Bearer t\x01",
            b"n,,\x01auth=Basic t\x01\x01",
            b"n,,\x01auth=Bearer \x01\x01",
            b"n,,\x01host=x\x01\x01",
            b"n,,auth=Bearer t",
        ] {
            assert_eq!(
                decode_oauthbearer(&Secret::new(bad.to_vec())).unwrap_err(),
                SaslError::BearerShape,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(decode_xoauth2(&Secret::new(b"auth=Bearer t\x01\x01".to_vec())).is_err());
        assert!(decode_xoauth2(&Secret::new(b"user=a\x01auth=Bearer t\x01".to_vec())).is_err());
    }

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
