//! ManageSieve (RFC 5804): the pre-auth front ([`front`]), the backend
//! login ([`backend`]) and what the relay follows after it ([`watch`]).
//! This module holds the protocol's words: atoms, quoted strings and
//! literals.

pub mod backend;
pub mod front;
pub mod watch;

use crate::imap::framing::{Piece, RawCommand};

/// One word of a command or response line.
#[derive(Debug, PartialEq, Eq)]
pub enum Token {
    /// A bare word (`AUTHENTICATE`, `OK`), upper-cased.
    Atom(String),
    /// A quoted string, unescaped, or a literal's bytes.
    Str(Vec<u8>),
}

impl Token {
    pub fn as_str(&self) -> Option<&[u8]> {
        match self {
            Token::Str(s) => Some(s),
            Token::Atom(_) => None,
        }
    }
}

/// Why a line could not be read as tokens.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// Splits a command (its text pieces and literals) into tokens. A text
/// piece that ends in a literal marker (`{n}` or `{n+}`) is followed by
/// that literal, which becomes one string.
pub fn tokens(command: &RawCommand) -> Result<Vec<Token>, Malformed> {
    let mut out = Vec::new();
    for piece in &command.pieces {
        match piece {
            Piece::Literal(bytes) => out.push(Token::Str(bytes.clone())),
            Piece::Text(text) => {
                let text = match crate::imap::framing::literal_marker(text) {
                    Some(_) => &text[..text.iter().rposition(|&b| b == b'{').unwrap_or(0)],
                    None => &text[..],
                };
                line_tokens(text, &mut out)?;
            }
        }
    }
    Ok(out)
}

/// Tokens of one line's text (without literals).
pub fn line_tokens(mut text: &[u8], out: &mut Vec<Token>) -> Result<(), Malformed> {
    loop {
        while let [b' ', rest @ ..] = text {
            text = rest;
        }
        match text {
            [] => return Ok(()),
            [b'"', rest @ ..] => {
                let mut s = Vec::new();
                let mut i = 0;
                loop {
                    match rest.get(i) {
                        None => return Err(Malformed("unterminated quoted string")),
                        Some(b'"') => break,
                        Some(b'\\') => match rest.get(i + 1) {
                            Some(&c @ (b'"' | b'\\')) => {
                                s.push(c);
                                i += 2;
                            }
                            _ => return Err(Malformed("bad escape in a quoted string")),
                        },
                        Some(&c) => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                out.push(Token::Str(s));
                text = &rest[i + 1..];
                if !matches!(text.first(), None | Some(b' ')) {
                    return Err(Malformed("text after a quoted string"));
                }
            }
            _ => {
                let end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
                let word = &text[..end];
                if !word
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_(/)".contains(b))
                {
                    return Err(Malformed("not a word"));
                }
                out.push(Token::Atom(
                    String::from_utf8_lossy(word).to_ascii_uppercase(),
                ));
                text = &text[end..];
            }
        }
    }
}

/// A quoted string for a response, escaped; control characters dropped.
pub fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &[u8]) -> Result<Vec<Token>, Malformed> {
        let mut out = Vec::new();
        line_tokens(text, &mut out).map(|_| out)
    }

    #[test]
    fn words_strings_and_escapes() {
        assert_eq!(
            line(br#"authenticate "PLAIN" "AGEAYg==""#).unwrap(),
            [
                Token::Atom("AUTHENTICATE".into()),
                Token::Str(b"PLAIN".to_vec()),
                Token::Str(b"AGEAYg==".to_vec())
            ]
        );
        assert_eq!(
            line(br#""a\"b\\c""#).unwrap(),
            [Token::Str(br#"a"b\c"#.to_vec())]
        );
        assert_eq!(line(b"").unwrap(), []);
        assert!(line(br#""open"#).is_err());
        assert!(line(br#""a"b"#).is_err());
        assert!(line(br#""\n""#).is_err());
    }

    #[test]
    fn literals_become_strings() {
        let command = RawCommand {
            pieces: vec![
                Piece::Text(br#"AUTHENTICATE "PLAIN" {8+}"#.to_vec()),
                Piece::Literal(b"AGEAYg==".to_vec()),
                Piece::Text(Vec::new()),
            ],
        };
        assert_eq!(
            tokens(&command).unwrap(),
            [
                Token::Atom("AUTHENTICATE".into()),
                Token::Str(b"PLAIN".to_vec()),
                Token::Str(b"AGEAYg==".to_vec())
            ]
        );
    }

    #[test]
    fn quoting_escapes() {
        assert_eq!(quoted(r#"say "hi"\"#), r#""say \"hi\"\\""#);
        assert_eq!(quoted("a\r\nb"), r#""ab""#);
    }
}
