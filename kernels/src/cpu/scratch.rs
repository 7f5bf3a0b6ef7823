//! Working buffers kept by each thread between calls. A kernel's column
//! matrices are written whole before they are read, so a fresh zeroed
//! allocation for every call would cost a page-clearing pass for nothing.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` values borrowed from this thread's pool; it goes back
/// when dropped. Its contents are whatever the last user left: write
/// before reading.
pub struct Scratch {
    buffer: Vec<f32>,
    len: usize,
}

impl Scratch {
    pub fn take(len: usize) -> Self {
        let mut buffer = FREE.with(|free| free.borrow_mut().pop()).unwrap_or_default();
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
        Scratch { buffer, len }
    }
}

impl Deref for Scratch {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.buffer[..self.len]
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buffer[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.buffer);
        // A thread keeps at most a few: the kernels hold two at a time.
        FREE.with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < 4 {
                free.push(buffer);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Scratch;

    #[test]
    fn a_returned_buffer_is_lent_again_at_the_length_asked() {
        let address = {
            let mut a = Scratch::take(100);
            a.fill(1.0);
            a.as_ptr()
        };
        let b = Scratch::take(10);
        assert_eq!((b.len(), b.as_ptr()), (10, address));
        let c = Scratch::take(50);
        assert_eq!(c.len(), 50);
        assert_ne!(c.as_ptr(), address, "a buffer in use is not lent twice");
    }
}
