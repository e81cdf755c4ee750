//! Per-thread recycling of the graph engine's pass buffers.
//!
//! A pass of the graph engine allocates a buffer for every value, cotangent and saved
//! intermediate; the next batch allocates the same sizes again. Freshly allocated memory has to
//! be zero-filled (`vec![0; n]`) or faulted in page by page, which measured 8–17% of a
//! transformer pass. Instead, a finished pass hands its buffers to the pool of the thread that
//! ran it ([`recycle`]), and operators that overwrite every element of their output take one
//! back ([`buffer`]) by length. A thread's pool holds one finished pass's buffers at most:
//! when the next pass hands over its own, whatever it did not take is freed first ([`turn`]),
//! and never more than [`MAX_BYTES`]. Only threads that enabled it keep buffers
//! ([`enable_on_this_thread`]: the workers of the engines' own thread pools, which end with
//! each call, so nothing is held after a call returns); elsewhere [`recycle`] frees. The
//! contents of a recycled buffer are whatever its last user left (always initialized values):
//! [`buffer`]'s callers write every element before reading any.

use std::cell::{Cell, RefCell};

/// The most bytes one thread keeps in its pool.
pub const MAX_BYTES: usize = 256 << 20;
/// Buffers smaller than this many bytes are not kept (the allocator serves them well).
pub const MIN_BYTES: usize = 16 << 10;

/// One thread's free buffers of one element type, by length: the buffers of the last finished
/// pass. A pass takes buffers of the lengths it asks for; what it did not take is freed when it
/// hands over its own ([`turn`]), so a pool never holds more than one pass's buffers.
#[derive(Debug, Default)]
pub struct BufPool<T> {
    free: std::collections::HashMap<usize, Vec<Vec<T>>>,
    bytes: usize,
}

impl<T: Copy + Default> BufPool<T> {
    fn take(&mut self, n: usize) -> Vec<T> {
        if let Some(v) = self.free.get_mut(&n).and_then(|l| l.pop()) {
            self.bytes -= v.capacity() * std::mem::size_of::<T>();
            return v;
        }
        vec![T::default(); n]
    }

    fn give(&mut self, v: Vec<T>) {
        let b = v.capacity() * std::mem::size_of::<T>();
        if b < MIN_BYTES || self.bytes + b > MAX_BYTES {
            return;
        }
        self.bytes += b;
        self.free.entry(v.len()).or_default().push(v);
    }

    /// Frees what the last pass left untaken.
    fn turn(&mut self) {
        self.free.clear();
        self.bytes = 0;
    }
}

/// Element types with a per-thread pool.
pub trait Pooled: Copy + Default + 'static {
    /// Runs `f` on this thread's pool for the type.
    fn with_pool<R>(f: impl FnOnce(&mut BufPool<Self>) -> R) -> R;
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static POOL_F32: RefCell<BufPool<f32>> = RefCell::new(BufPool::default());
    static POOL_F64: RefCell<BufPool<f64>> = RefCell::new(BufPool::default());
}

impl Pooled for f32 {
    fn with_pool<R>(f: impl FnOnce(&mut BufPool<Self>) -> R) -> R {
        POOL_F32.with(|p| f(&mut p.borrow_mut()))
    }
}

impl Pooled for f64 {
    fn with_pool<R>(f: impl FnOnce(&mut BufPool<Self>) -> R) -> R {
        POOL_F64.with(|p| f(&mut p.borrow_mut()))
    }
}

/// A buffer of `n` elements with unspecified contents (zeros when newly allocated, a
/// recycled buffer's old values otherwise): the caller writes every element.
pub fn buffer<T: Pooled>(n: usize) -> Vec<T> {
    T::with_pool(|p| p.take(n))
}

/// An empty vector with room for `n` elements: a recycled buffer of that length, cleared, or a
/// new allocation (not zero-filled) — for outputs built by pushing.
pub fn with_capacity<T: Pooled>(n: usize) -> Vec<T> {
    let v = T::with_pool(|p| {
        p.free
            .get_mut(&n)
            .and_then(|l| l.pop())
            .inspect(|v| p.bytes -= v.capacity() * std::mem::size_of::<T>())
    });
    match v {
        Some(mut v) => {
            v.clear();
            v
        }
        None => Vec::with_capacity(n),
    }
}

/// Frees this thread's untaken buffers: call before handing over a finished pass's buffers.
pub fn turn<T: Pooled>() {
    T::with_pool(|p| p.turn())
}

/// Hands `v` to this thread's pool (or frees it: past the pool's limits, or on a thread
/// without a pool).
pub fn recycle<T: Pooled>(v: Vec<T>) {
    if ENABLED.with(|e| e.get()) {
        T::with_pool(|p| p.give(v))
    }
}

/// Lets this thread keep recycled buffers until it ends (or [`clear`]).
pub fn enable_on_this_thread() {
    ENABLED.with(|e| e.set(true));
}

/// Frees this thread's pools.
pub fn clear() {
    f32::with_pool(|p| *p = BufPool::default());
    f64::with_pool(|p| *p = BufPool::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_buffer_comes_back_for_the_same_length_until_the_next_turn() {
        // a thread that did not enable the pool keeps nothing
        std::thread::spawn(|| {
            recycle(vec![1.0f32; 10_000]);
            assert!(f32::with_pool(|p| p.free.is_empty()));
        })
        .join()
        .unwrap();
        enable_on_this_thread();
        clear();
        let v = vec![1.0f32; 10_000];
        let p = v.as_ptr();
        recycle(v);
        let w: Vec<f32> = buffer(10_000);
        assert_eq!((w.len(), w.as_ptr()), (10_000, p));
        // another length, or a buffer too small to keep: a fresh zeroed one
        recycle(w);
        let z: Vec<f32> = buffer(9_999);
        assert!(z.iter().all(|x| *x == 0.0));
        recycle(vec![2.0f32; 10]);
        let z: Vec<f32> = buffer(10);
        assert!(z.iter().all(|x| *x == 0.0));
        // what was not taken is freed at the next turn
        turn::<f32>();
        let z: Vec<f32> = buffer(10_000);
        assert!(z.iter().all(|x| *x == 0.0));
        clear();
    }
}
