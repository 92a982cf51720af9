//! Borrowed I/O buffers: a small per-thread pool of equal-sized buffers that
//! the relay and the client TLS layer take only while bytes are in flight
//! and give back as soon as they are written or consumed. An idle session
//! therefore holds no buffer at all; a busy thread reuses a handful.
//!
//! Each worker thread runs its own single-threaded runtime, so a
//! thread-local pool needs no lock. Buffers beyond the pool's size, or of
//! another size (grown for an unusually large TLS handshake message), are
//! freed.

use std::cell::RefCell;

/// Bytes the relay reads at once: four full TLS records, so a read from the
/// backend fills whole records on the client side, and a 10 MiB FETCH takes
/// about 160 reads and 160 writes rather than thousands.
pub const READ: usize = 64 * 1024;

/// Size of every pooled buffer: a relay read plus room for the TLS record
/// overhead of encrypting it, so 64 KiB of plaintext becomes four full
/// records in one buffer.
pub const SIZE: usize = READ + 2048;

/// Buffers kept per thread for reuse.
const POOL_PER_THREAD: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of [`SIZE`] initialised bytes, from the pool when it has one.
pub fn take() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; SIZE])
}

/// Returns a buffer to the pool, or frees it.
pub fn give(buf: Vec<u8>) {
    if buf.len() != SIZE || buf.capacity() != SIZE {
        return;
    }
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_odd_sizes_are_not_kept() {
        let a = take();
        assert_eq!(a.len(), SIZE);
        let ptr = a.as_ptr();
        give(a);
        let b = take();
        assert_eq!(b.as_ptr(), ptr, "the pooled buffer comes back");
        let mut grown = b;
        grown.resize(SIZE * 2, 0);
        give(grown);
        assert_eq!(take().len(), SIZE, "a grown buffer is not pooled");
    }
}
