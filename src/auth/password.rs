//! Password hashes: parsing stored forms once at load, verifying a password
//! against one (CPU-heavy; callers run it on the blocking pool), and making
//! new hashes for `postern hash-password`.
//!
//! Accepted stored forms: PHC argon2 strings (`$argon2id$…`), bcrypt
//! (`$2a$`/`$2b$`/`$2y$`), SHA-crypt (`$5$`, `$6$`), and the same behind
//! Dovecot's scheme prefixes (`{ARGON2ID}`, `{ARGON2I}`, `{BLF-CRYPT}`,
//! `{SHA256-CRYPT}`, `{SHA512-CRYPT}`, `{CRYPT}`), plus `{PLAIN}`/`{CLEAR}`
//! for tests and migrations — so a Dovecot passwd-file works as it is.

use argon2::password_hash::{
    PasswordHash as PhcString, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use subtle::ConstantTimeEq;

use crate::imap::Secret;

#[derive(Clone)]
pub enum PasswordHash {
    Plain(Secret),
    Argon2(String),
    Bcrypt(String),
    ShaCrypt256(String),
    ShaCrypt512(String),
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.scheme())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheme {
    Argon2id,
    Bcrypt,
    Sha512Crypt,
}

impl PasswordHash {
    /// Parses a stored hash; the error says which forms are understood.
    pub fn parse(stored: &str) -> Result<PasswordHash, String> {
        let (prefix, rest) = match stored.strip_prefix('{').and_then(|s| s.split_once('}')) {
            Some((scheme, rest)) => (Some(scheme.to_ascii_uppercase()), rest),
            None => (None, stored),
        };
        let hash = match prefix.as_deref() {
            Some("PLAIN" | "CLEAR" | "CLEARTEXT") => return Ok(PasswordHash::Plain(Secret::new(rest.as_bytes().to_vec()))),
            Some("ARGON2ID" | "ARGON2I" | "BLF-CRYPT" | "SHA256-CRYPT" | "SHA512-CRYPT" | "CRYPT") | None => {
                Self::from_modular_crypt(rest)?
            }
            Some(other) => {
                return Err(format!(
                    "password scheme {{{other}}} is not supported (use ARGON2ID, BLF-CRYPT, SHA512-CRYPT, SHA256-CRYPT or PLAIN)"
                ))
            }
        };
        Ok(hash)
    }

    fn from_modular_crypt(s: &str) -> Result<PasswordHash, String> {
        if s.starts_with("$argon2") {
            PhcString::new(s).map_err(|e| format!("invalid argon2 hash: {e}"))?;
            Ok(PasswordHash::Argon2(s.to_owned()))
        } else if ["$2a$", "$2b$", "$2x$", "$2y$"]
            .iter()
            .any(|p| s.starts_with(p))
        {
            if s.len() != 60 {
                return Err("invalid bcrypt hash: expected 60 characters".into());
            }
            Ok(PasswordHash::Bcrypt(s.to_owned()))
        } else if s.starts_with("$6$") {
            Ok(PasswordHash::ShaCrypt512(s.to_owned()))
        } else if s.starts_with("$5$") {
            Ok(PasswordHash::ShaCrypt256(s.to_owned()))
        } else {
            Err("unrecognised password hash (expected $argon2id$, $2y$, $6$, $5$ or a {SCHEME} prefix)".into())
        }
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            PasswordHash::Plain(_) => "PLAIN",
            PasswordHash::Argon2(_) => "ARGON2",
            PasswordHash::Bcrypt(_) => "BLF-CRYPT",
            PasswordHash::ShaCrypt256(_) => "SHA256-CRYPT",
            PasswordHash::ShaCrypt512(_) => "SHA512-CRYPT",
        }
    }

    /// True when `password` matches. Slow by design; call it off the async
    /// worker threads.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Plain(p) => p.expose().ct_eq(password).into(),
            PasswordHash::Argon2(h) => PhcString::new(h)
                .map(|phc| Argon2::default().verify_password(password, &phc).is_ok())
                .unwrap_or(false),
            PasswordHash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            PasswordHash::ShaCrypt256(h) => std::str::from_utf8(password)
                .map(|p| sha_crypt::sha256_check(p, h).is_ok())
                .unwrap_or(false),
            PasswordHash::ShaCrypt512(h) => std::str::from_utf8(password)
                .map(|p| sha_crypt::sha512_check(p, h).is_ok())
                .unwrap_or(false),
        }
    }
}

/// Password checks allowed to run at once, per core. More wait their turn
/// (within the pre-auth deadline) instead of piling threads and memory onto
/// the blocking pool: an argon2 check can take tens of MiB.
const CHECKS_PER_CORE: usize = 2;

/// Verifies on the blocking pool, at most `CHECKS_PER_CORE` per core at once.
pub async fn verify_off_thread(
    hash: std::sync::Arc<PasswordHash>,
    password: Secret,
) -> Result<bool, String> {
    static CHECKS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let checks = CHECKS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores * CHECKS_PER_CORE)
    });
    // {PLAIN} costs a comparison: not worth a trip to another thread.
    if let PasswordHash::Plain(_) = *hash {
        return Ok(hash.verify(password.expose()));
    }
    let _permit = checks.acquire().await.map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || hash.verify(password.expose()))
        .await
        .map_err(|e| format!("password check failed: {e}"))
}

/// Makes a new hash of `password` in `scheme`, with a random salt.
pub fn hash(password: &[u8], scheme: Scheme) -> Result<String, String> {
    match scheme {
        Scheme::Argon2id => {
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            Argon2::default()
                .hash_password(password, &salt)
                .map(|h| h.to_string())
                .map_err(|e| e.to_string())
        }
        Scheme::Bcrypt => bcrypt::hash(password, bcrypt::DEFAULT_COST).map_err(|e| e.to_string()),
        Scheme::Sha512Crypt => {
            let text = std::str::from_utf8(password)
                .map_err(|_| "SHA512-CRYPT needs a UTF-8 password".to_string())?;
            sha_crypt::sha512_simple(text, &sha_crypt::Sha512Params::default())
                .map_err(|e| format!("{e:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generated_scheme_verifies() {
        for scheme in [Scheme::Argon2id, Scheme::Bcrypt, Scheme::Sha512Crypt] {
            let h = hash(b"correct horse", scheme).unwrap();
            let parsed = PasswordHash::parse(&h).unwrap();
            assert!(parsed.verify(b"correct horse"), "{scheme:?}");
            assert!(!parsed.verify(b"wrong horse"), "{scheme:?}");
        }
    }

    #[test]
    fn dovecot_hashes_verify_as_they_are() {
        // Each made by `doveadm pw -s SCHEME -p secret` (Dovecot 2.3).
        for stored in [
            "{SHA512-CRYPT}$6$dkFJnitTK6y6x7Fv$G6UepOhKAg8bNs0ZCEKGNrX0hHRvPTFe/uOVA9lMpIOVAPoWEHS1kHcuo0W2Zo6RKV/NJAJn.G7bkdTYSvMy7.",
            "{SHA256-CRYPT}$5$6yO3P.WhRn2wFF/1$puUdG/K7SJPqdhbkuhh0ih3Rz/SQLa8.fjepoLQA9//",
            "{BLF-CRYPT}$2y$05$dtf70NvA0eSR0QSN4u5XG.q9WOUyIRRbREI/DvnYa.dkwu3lNZdj2",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$wBBLQTnU0oQbF812Hk1JFg$23mpNuEENHsrmi2fiEV5afgzv+yF40dCcrn400y97pg",
            "{PLAIN}secret",
        ] {
            let h = PasswordHash::parse(stored).unwrap();
            assert!(h.verify(b"secret"), "{stored}");
            assert!(!h.verify(b"Secret"), "{stored}");
        }
    }

    #[test]
    fn unknown_schemes_are_refused_with_a_reason() {
        assert!(PasswordHash::parse("{MD5}abc").unwrap_err().contains("MD5"));
        assert!(PasswordHash::parse("hunter2").is_err());
        assert!(PasswordHash::parse("$2y$short").is_err());
    }

    #[test]
    fn hashes_do_not_print_their_secret() {
        let h = PasswordHash::parse("{PLAIN}hunter2").unwrap();
        assert_eq!(format!("{h:?}"), "PLAIN");
    }
}
