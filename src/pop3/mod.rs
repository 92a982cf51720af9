//! POP3 (RFC 1939): after login, [`watch`] follows where the backend's responses end.

pub mod watch;
