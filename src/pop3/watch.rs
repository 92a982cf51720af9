//! The relay's view of a relayed POP3 session (placeholder: follows
//! nothing, so Postern never writes into the stream).

use crate::relay::{Farewell, Follow};

#[derive(Default)]
pub struct Watch;

impl Watch {
    pub fn new() -> Self {
        Watch
    }
}

impl Follow for Watch {
    fn client_sent(&mut self, _: &[u8]) {}
    fn backend_sent(&mut self, _: &[u8], _: bool) -> Option<usize> {
        None
    }
    fn bye_seen(&self) -> bool {
        false
    }
    fn following(&self) -> bool {
        false
    }
    fn at_boundary(&self) -> bool {
        false
    }
    fn farewell(&mut self) -> Farewell {
        Farewell::Silent
    }
}
