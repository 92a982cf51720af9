//! POP3 (RFC 1939, 2449, 2595, 5034, 3206) through the same pipeline as
//! IMAP: the pre-auth front ([`front`]), the backend login ([`backend`])
//! and the relay's view of a relayed session ([`watch`]).

pub mod backend;
pub mod front;
pub mod watch;
