//! Parses a framed pre-auth command into a [`PreauthCommand`].
//!
//! Only the grammar a client may use before login is understood (RFC 9051
//! §6.1–6.2, RFC 2971 ID, RFC 4959 SASL-IR): a tag, a command name and
//! astrings (atom, quoted string with `\"`/`\\` escapes, or literal). Every
//! other command is recognised by name only, to answer it with a clear `BAD`.
//! This module returns values; it never writes to the client.

use super::framing::{literal_marker, Piece, RawCommand};
use super::Secret;

/// Most field/value pairs kept from a client's ID (RFC 2971 §3.3 allows 30).
const MAX_ID_FIELDS: usize = 30;
const MAX_ID_FIELD: usize = 30;
const MAX_ID_VALUE: usize = 1024;

#[derive(Debug)]
pub struct Command {
    pub tag: String,
    pub body: PreauthCommand,
}

/// The fields of a client's `ID`: names and optional values, in order.
pub type IdFields = Vec<(String, Option<String>)>;

#[derive(Debug)]
pub enum PreauthCommand {
    Capability,
    Noop,
    Logout,
    StartTls,
    /// The client's ID fields (name, value); `None` for `ID NIL`.
    Id(Option<IdFields>),
    Login {
        user: Vec<u8>,
        password: Secret,
    },
    Authenticate {
        mechanism: String,
        /// SASL-IR: the base64 initial response; `Some(empty)` for `=`.
        initial_response: Option<Secret>,
    },
    /// A command that exists in IMAP but not before login.
    NotPermitted(String),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The first word is not a tag; answered with an untagged `* BAD`.
    #[error("missing or invalid tag")]
    NoTag,
    /// Answered with `<tag> BAD <reason>`.
    #[error("{reason}")]
    Bad { tag: String, reason: &'static str },
}

/// IMAP commands a client may send after login; named in the `BAD` reply.
const AUTHENTICATED_COMMANDS: &[&str] = &[
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST",
    "LSUB",
    "NAMESPACE",
    "STATUS",
    "APPEND",
    "IDLE",
    "CHECK",
    "CLOSE",
    "UNSELECT",
    "EXPUNGE",
    "SEARCH",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
    "UID",
    "ENABLE",
    "GETQUOTA",
    "GETQUOTAROOT",
    "SETQUOTA",
    "GETACL",
    "SETACL",
    "MYRIGHTS",
    "LISTRIGHTS",
    "GETMETADATA",
    "SETMETADATA",
    "COMPRESS",
    "NOTIFY",
    "ESEARCH",
    "SORT",
    "THREAD",
];

pub fn parse(raw: &RawCommand) -> Result<Command, ParseError> {
    let tag = raw.tag().ok_or(ParseError::NoTag)?;
    let tag = String::from_utf8_lossy(tag).into_owned();
    let bad = |reason| ParseError::Bad {
        tag: tag.clone(),
        reason,
    };
    let mut p = Cursor::new(&raw.pieces);
    p.skip(tag.len());
    p.sp().map_err(|_| bad("Missing command"))?;
    let name = p
        .atom()
        .map_err(|_| bad("Missing command"))?
        .to_ascii_uppercase();
    let name = String::from_utf8_lossy(&name).into_owned();
    let body = match name.as_str() {
        "CAPABILITY" => PreauthCommand::Capability,
        "NOOP" => PreauthCommand::Noop,
        "LOGOUT" => PreauthCommand::Logout,
        "STARTTLS" => PreauthCommand::StartTls,
        "ID" => {
            p.sp()
                .map_err(|_| bad("ID needs a parameter list or NIL"))?;
            PreauthCommand::Id(p.id_params().map_err(bad)?)
        }
        "LOGIN" => {
            p.sp()
                .map_err(|_| bad("LOGIN needs a user name and a password"))?;
            let user = p.astring().map_err(|_| bad("Invalid user name"))?;
            p.sp()
                .map_err(|_| bad("LOGIN needs a user name and a password"))?;
            let password = Secret::new(p.astring().map_err(|_| bad("Invalid password"))?);
            PreauthCommand::Login { user, password }
        }
        "AUTHENTICATE" => {
            p.sp().map_err(|_| bad("AUTHENTICATE needs a mechanism"))?;
            let mechanism = p.atom().map_err(|_| bad("Invalid mechanism name"))?;
            let mechanism = String::from_utf8_lossy(&mechanism).to_ascii_uppercase();
            let initial_response = if p.at_end() {
                None
            } else {
                p.sp().map_err(|_| bad("Invalid initial response"))?;
                let ir = p
                    .rest_of_text()
                    .map_err(|_| bad("Invalid initial response"))?;
                if ir.is_empty() {
                    return Err(bad("Invalid initial response"));
                }
                Some(Secret::new(ir))
            };
            PreauthCommand::Authenticate {
                mechanism,
                initial_response,
            }
        }
        // Arguments of commands that need a login are not parsed: the answer
        // is the same whatever they are.
        n if AUTHENTICATED_COMMANDS.contains(&n) => {
            return Ok(Command {
                tag,
                body: PreauthCommand::NotPermitted(name),
            })
        }
        _ => return Err(bad("Unknown command")),
    };
    if !p.at_end() {
        return Err(bad("Unexpected arguments"));
    }
    Ok(Command { tag, body })
}

/// Walks the pieces of a command: within text pieces byte by byte, and from
/// a text piece ending in a literal marker into the literal that follows.
struct Cursor<'a> {
    pieces: &'a [Piece],
    index: usize,
    pos: usize,
}

type Step<T> = Result<T, ()>;

impl<'a> Cursor<'a> {
    fn new(pieces: &'a [Piece]) -> Self {
        Cursor {
            pieces,
            index: 0,
            pos: 0,
        }
    }

    fn text(&self) -> &'a [u8] {
        match self.pieces.get(self.index) {
            Some(Piece::Text(t)) => &t[self.pos.min(t.len())..],
            _ => &[],
        }
    }

    fn skip(&mut self, n: usize) {
        self.pos += n;
    }

    fn peek(&self) -> Option<u8> {
        self.text().first().copied()
    }

    fn at_end(&self) -> bool {
        self.text().is_empty() && self.index + 1 >= self.pieces.len()
    }

    fn sp(&mut self) -> Step<()> {
        if self.peek() == Some(b' ') {
            self.pos += 1;
            Ok(())
        } else {
            Err(())
        }
    }

    fn atom(&mut self) -> Step<Vec<u8>> {
        let t = self.text();
        let n = t.iter().take_while(|&&b| super::is_atom_char(b)).count();
        if n == 0 {
            return Err(());
        }
        self.pos += n;
        Ok(t[..n].to_vec())
    }

    /// Everything up to the end of the current text piece (a SASL-IR).
    fn rest_of_text(&mut self) -> Step<Vec<u8>> {
        let t = self.text();
        if literal_marker(t).is_some() || t.contains(&b' ') {
            return Err(());
        }
        self.pos += t.len();
        Ok(t.to_vec())
    }

    fn astring(&mut self) -> Step<Vec<u8>> {
        match self.peek() {
            Some(b'"') => self.quoted(),
            Some(b'{') => self.literal(),
            _ => {
                let t = self.text();
                let n = t
                    .iter()
                    .take_while(|&&b| super::is_atom_char(b) || b == b']')
                    .count();
                if n == 0 {
                    return Err(());
                }
                self.pos += n;
                Ok(t[..n].to_vec())
            }
        }
    }

    fn string(&mut self) -> Step<Vec<u8>> {
        match self.peek() {
            Some(b'"') => self.quoted(),
            Some(b'{') => self.literal(),
            _ => Err(()),
        }
    }

    fn quoted(&mut self) -> Step<Vec<u8>> {
        let t = self.text();
        let mut out = Vec::new();
        let mut i = 1;
        while i < t.len() {
            match t[i] {
                b'"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                b'\\' => match t.get(i + 1) {
                    Some(&c @ (b'"' | b'\\')) => {
                        out.push(c);
                        i += 2;
                    }
                    _ => return Err(()),
                },
                0 | b'\r' | b'\n' => return Err(()),
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        Err(())
    }

    /// A literal is the marker at the end of this text piece; its bytes are
    /// the next piece, and parsing continues in the piece after that.
    fn literal(&mut self) -> Step<Vec<u8>> {
        literal_marker(self.text()).ok_or(())?;
        // The marker must be all that is left of this piece.
        let t = self.text();
        if t.first() != Some(&b'{') || t.iter().filter(|&&b| b == b'{').count() != 1 {
            return Err(());
        }
        let Some(Piece::Literal(bytes)) = self.pieces.get(self.index + 1) else {
            return Err(());
        };
        self.index += 2;
        self.pos = 0;
        Ok(bytes.clone())
    }

    fn nstring(&mut self) -> Step<Option<Vec<u8>>> {
        if self.nstring_nil() {
            return Ok(None);
        }
        self.string().map(Some)
    }

    fn id_params(&mut self) -> Result<Option<IdFields>, &'static str> {
        const WRONG: &str = "ID takes a parenthesised list of string pairs, or NIL";
        if self.nstring_nil() {
            return Ok(None);
        }
        if self.peek() != Some(b'(') {
            return Err(WRONG);
        }
        self.pos += 1;
        let mut fields = Vec::new();
        if self.peek() == Some(b')') {
            self.pos += 1;
            return Ok(Some(fields));
        }
        loop {
            let name = self.string().map_err(|_| WRONG)?;
            self.sp().map_err(|_| WRONG)?;
            let value = self.nstring().map_err(|_| WRONG)?;
            if name.len() > MAX_ID_FIELD || value.as_ref().is_some_and(|v| v.len() > MAX_ID_VALUE) {
                return Err("ID field or value too long (RFC 2971: 30 and 1024 bytes)");
            }
            if fields.len() == MAX_ID_FIELDS {
                return Err("ID has more than 30 fields");
            }
            fields.push((
                String::from_utf8_lossy(&name).into_owned(),
                value.map(|v| String::from_utf8_lossy(&v).into_owned()),
            ));
            match self.peek() {
                Some(b')') => {
                    self.pos += 1;
                    return Ok(Some(fields));
                }
                Some(b' ') => self.pos += 1,
                _ => return Err(WRONG),
            }
        }
    }

    fn nstring_nil(&mut self) -> bool {
        let t = self.text();
        if t.len() >= 3
            && t[..3].eq_ignore_ascii_case(b"NIL")
            && t.get(3).is_none_or(|&b| b == b' ' || b == b')')
        {
            self.pos += 3;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(line: &str) -> RawCommand {
        RawCommand {
            pieces: vec![Piece::Text(line.as_bytes().to_vec())],
        }
    }

    #[test]
    fn login_with_atoms_and_quoted_escapes() {
        let cmd = parse(&text(r#"a1 login alice "p\"w\\d""#)).unwrap();
        assert_eq!(cmd.tag, "a1");
        match cmd.body {
            PreauthCommand::Login { user, password } => {
                assert_eq!(user, b"alice");
                assert_eq!(password.expose(), br#"p"w\d"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn login_with_literals() {
        let raw = RawCommand {
            pieces: vec![
                Piece::Text(b"a LOGIN {5}".to_vec()),
                Piece::Literal(b"al ce".to_vec()),
                Piece::Text(b" {4+}".to_vec()),
                Piece::Literal(b"p\"w\0".to_vec()),
                Piece::Text(Vec::new()),
            ],
        };
        match parse(&raw).unwrap().body {
            PreauthCommand::Login { user, password } => {
                assert_eq!(user, b"al ce");
                assert_eq!(password.expose(), b"p\"w\0");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_after_literal_is_bad() {
        let raw = RawCommand {
            pieces: vec![
                Piece::Text(b"a LOGIN {5}".to_vec()),
                Piece::Literal(b"alice".to_vec()),
                Piece::Text(b"xyz pw".to_vec()),
            ],
        };
        assert!(matches!(parse(&raw), Err(ParseError::Bad { .. })));
    }

    #[test]
    fn authenticate_with_and_without_initial_response() {
        match parse(&text("x AUTHENTICATE plain AGFsaWNlAHB3"))
            .unwrap()
            .body
        {
            PreauthCommand::Authenticate {
                mechanism,
                initial_response,
            } => {
                assert_eq!(mechanism, "PLAIN");
                assert_eq!(initial_response.unwrap().expose(), b"AGFsaWNlAHB3");
            }
            other => panic!("{other:?}"),
        }
        match parse(&text("x AUTHENTICATE LOGIN")).unwrap().body {
            PreauthCommand::Authenticate {
                initial_response, ..
            } => assert!(initial_response.is_none()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn id_fields_are_kept() {
        match parse(&text(r#"i ID ("name" "Thunderbird" "version" NIL)"#))
            .unwrap()
            .body
        {
            PreauthCommand::Id(Some(fields)) => {
                assert_eq!(fields[0], ("name".into(), Some("Thunderbird".into())));
                assert_eq!(fields[1], ("version".into(), None));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&text("i ID NIL")).unwrap().body,
            PreauthCommand::Id(None)
        ));
        assert!(parse(&text("i ID (\"a\")")).is_err());
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(parse(&text("(( NOOP")).unwrap_err(), ParseError::NoTag);
        assert!(matches!(
            parse(&text("a FROB")),
            Err(ParseError::Bad {
                reason: "Unknown command",
                ..
            })
        ));
        assert!(matches!(
            parse(&text("a NOOP extra")),
            Err(ParseError::Bad {
                reason: "Unexpected arguments",
                ..
            })
        ));
        assert!(matches!(
            parse(&text("a LOGIN alice")),
            Err(ParseError::Bad { .. })
        ));
        assert!(matches!(
            parse(&text("a LOGIN \"unterminated pw")),
            Err(ParseError::Bad { .. })
        ));
        assert!(
            matches!(parse(&text("a SELECT INBOX")).unwrap().body, PreauthCommand::NotPermitted(n) if n == "SELECT")
        );
    }
}
