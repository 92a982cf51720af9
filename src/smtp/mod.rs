//! SMTP message submission (RFC 6409): the pre-auth front ([`front`]),
//! the backend login with Postfix's XCLIENT or AUTH ([`backend`]), and
//! what the relay follows after it ([`watch`]).

pub mod backend;
pub mod front;
pub mod watch;
