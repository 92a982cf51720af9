//! The pre-auth IMAP protocol: the front that answers a client before
//! login ([`front`]), framing with limits ([`framing`]), command parsing
//! ([`command`]), SASL decoding ([`sasl`], POP3's AUTH uses it too) and the
//! bits of response syntax shared by the client and backend sides
//! (quoting, capabilities).
//!
//! Why our own parser rather than imap-codec: before login Postern
//! understands seven commands, and what matters is where bytes may be
//! buffered and when a `+` continuation may be sent (never for a literal over
//! the cap; never for bytes pipelined after STARTTLS). Those decisions live in
//! the framing layer, which imap-codec leaves to its caller, and the grammar
//! left after framing (tag, atom, astring, ID's string pairs, a base64 SASL-IR)
//! is a few hundred lines that read without a second crate's type model.
//! After login nothing is parsed: [`watch`] only follows where responses
//! end and whether COMPRESS is on, so the relay knows when it may speak.

pub mod command;
pub mod framing;
pub mod front;
pub mod sasl;
pub mod watch;

use std::fmt;
use zeroize::Zeroize;

/// Bytes that must never be logged: a password, a SASL response.
/// Wiped from memory when dropped.
#[derive(Clone, Default)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Equal bytes, compared in constant time.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == other.0.len() && bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for Secret {}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// ATOM-CHAR of RFC 9051: any CHAR except atom-specials.
pub fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// A tag is 1*<any ASTRING-CHAR except "+">.
pub fn is_tag_char(b: u8) -> bool {
    (is_atom_char(b) || b == b']') && b != b'+'
}

/// Appends `bytes` as an IMAP string: a quoted string when it can be one,
/// else a literal (`{n+}` and the bytes when the peer has LITERAL+ or
/// LITERAL-, else `{n}`). Returns true when it wrote only a synchronizing
/// literal's marker: the caller sends that, waits for `+`, then the bytes.
pub fn push_string(out: &mut Vec<u8>, bytes: &[u8], non_sync_literals: bool) -> bool {
    let quotable = bytes.len() < 1024
        && bytes
            .iter()
            .all(|&b| b != 0 && b != b'\r' && b != b'\n' && b < 0x80);
    if quotable {
        out.push(b'"');
        for &b in bytes {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
        false
    } else {
        let marker = if non_sync_literals {
            format!("{{{}+}}\r\n", bytes.len())
        } else {
            format!("{{{}}}\r\n", bytes.len())
        };
        out.extend_from_slice(marker.as_bytes());
        if non_sync_literals {
            out.extend_from_slice(bytes);
        }
        !non_sync_literals
    }
}

/// A capability list as parsed from a `[CAPABILITY …]` code or a
/// `* CAPABILITY` line, kept in the backend's order and spelling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities(pub Vec<String>);

impl Capabilities {
    pub fn parse(text: &str) -> Self {
        Capabilities(text.split_ascii_whitespace().map(str::to_owned).collect())
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|c| c.eq_ignore_ascii_case(name))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

/// Text safe to put in a response line: printable ASCII, at most `max` bytes.
pub fn printable(text: &str, max: usize) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_or_sent_as_literals() {
        let mut out = Vec::new();
        assert!(!push_string(&mut out, br#"a"b\c"#, false));
        assert_eq!(out, br#""a\"b\\c""#);
        out.clear();
        assert!(push_string(&mut out, "pässword".as_bytes(), false));
        assert_eq!(out, b"{9}\r\n");
        out.clear();
        assert!(!push_string(&mut out, b"a\r\nb", true));
        assert_eq!(out, b"{4+}\r\na\r\nb");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new(b"hunter2".to_vec());
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn capabilities_compare_without_case() {
        let caps = Capabilities::parse("IMAP4rev1 SASL-IR AUTH=PLAIN  LITERAL+");
        assert!(caps.has("sasl-ir"));
        assert!(caps.has("AUTH=PLAIN"));
        assert!(!caps.has("STARTTLS"));
        assert_eq!(caps.to_string(), "IMAP4rev1 SASL-IR AUTH=PLAIN LITERAL+");
    }
}
