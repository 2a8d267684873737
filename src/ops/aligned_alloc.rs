//! The process's global allocator: the system allocator, with every block of 4 KiB or more
//! aligned to a 64-byte cache line.
//!
//! Why: glibc returns 16-byte-aligned blocks, so a 16-float (64-byte) vector load or store
//! into an activation buffer straddles two cache lines three times out of four. The kernels
//! move whole 16-image lanes (`(C, H, W, B)` layout) and the Winograd transforms write one
//! such lane per position: on misaligned buffers every one of those accesses touches two
//! lines. Small blocks keep the system's alignment (no padding cost for the many small
//! allocations of the rest of the program).

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks at least this large are cache-line aligned.
const ALIGNED_FROM: usize = 4096;
const LINE: usize = 64;

pub struct CacheAligned;

fn widen(layout: Layout) -> Layout {
    if layout.size() >= ALIGNED_FROM && layout.align() < LINE {
        // Only fails when the size rounded up to a line overflows; then keep the original.
        Layout::from_size_align(layout.size(), LINE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every call forwards to `System` with a layout of the same size and an alignment
// that only depends on the size, so a block is always freed with the layout it was made with.
unsafe impl GlobalAlloc for CacheAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(widen(layout))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(widen(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, widen(layout))
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = widen(layout);
        let new = widen(Layout::from_size_align_unchecked(new_size, layout.align()));
        if old.align() == new.align() {
            return System.realloc(ptr, old, new_size);
        }
        // The alignment class changes: move the block by hand.
        let out = System.alloc(new);
        if !out.is_null() {
            std::ptr::copy_nonoverlapping(ptr, out, layout.size().min(new_size));
            System.dealloc(ptr, old);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn large_blocks_are_cache_line_aligned_and_small_ones_work() {
        for n in [1usize, 3, 1000, 1024, 1025, 4096, 100_000] {
            let v = vec![1f32; n];
            if n * 4 >= super::ALIGNED_FROM {
                assert_eq!(v.as_ptr() as usize % super::LINE, 0, "{n} floats");
            }
            assert_eq!(v.iter().sum::<f32>(), n as f32);
        }
        // Growing across the threshold keeps the contents.
        let mut v: Vec<u8> = (0..100u8).collect();
        v.extend(std::iter::repeat_n(7u8, 10_000));
        assert_eq!(v.as_ptr() as usize % super::LINE, 0);
        assert_eq!(&v[..3], &[0, 1, 2]);
        v.truncate(10);
        v.shrink_to_fit();
        assert_eq!(v, (0..10u8).collect::<Vec<_>>());
    }
}
