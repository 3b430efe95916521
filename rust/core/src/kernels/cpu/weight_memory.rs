//! Memory for repacked weights, in large chunks that Linux may back with 2 MiB pages.
//!
//! A decode step streams every weight once (~100 MB for SmolLM2-135M in Q4_1). In 4 KiB pages
//! that is ~25,000 pages per step, far more than the TLB holds, and under a hypervisor each miss
//! walks two page tables. The matrices themselves are too small for transparent huge pages
//! (most are a few hundred kB), so they are packed one after another into chunks of at least
//! [`CHUNK`] bytes, aligned to 2 MiB and marked `MADV_HUGEPAGE` before they are first written.
//! Elsewhere, or where the kernel refuses the advice, the chunks are ordinary memory.

use std::ops::{Deref, Range};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// The alignment of a chunk: one transparent huge page on x86-64 Linux.
const HUGE_PAGE: usize = 2 << 20;

/// The smallest chunk: a few layers of a small model.
const CHUNK: usize = 16 << 20;

/// Each matrix starts on a cache line.
const ALIGN: usize = 64;

/// One allocation that matrices are repacked into; freed when the last of them is dropped.
struct Chunk {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: a chunk's bytes are written only in `WeightBytes::filled_by`, into a range no other
// `WeightBytes` covers, before the `WeightBytes` for that range exists; after that they are
// only read.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

/// On Linux a chunk is its own mapping, aligned to a huge page and advised to use them: it goes
/// back to the system when its last matrix is dropped, whatever else the heap holds.
#[cfg(target_os = "linux")]
impl Chunk {
    fn new(size: usize) -> Option<Self> {
        let size = size.next_multiple_of(HUGE_PAGE);
        let span = size + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; the slack before the aligned start and
        // after its end is unmapped again, leaving exactly `size` bytes at `start`.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return None;
            }
            let base = base as usize;
            let start = base.next_multiple_of(HUGE_PAGE);
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            let end = base + span;
            if end > start + size {
                libc::munmap((start + size) as *mut libc::c_void, end - start - size);
            }
            // A hint: without transparent huge pages the memory stays in ordinary pages.
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
            Some(Self {
                ptr: NonNull::new(start as *mut u8)?,
                size,
            })
        }
    }
}

#[cfg(target_os = "linux")]
impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: mapped in `Chunk::new` with this size.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
    }
}

#[cfg(not(target_os = "linux"))]
impl Chunk {
    fn layout(size: usize) -> Option<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(size, HUGE_PAGE).ok()
    }

    fn new(size: usize) -> Option<Self> {
        let size = size.next_multiple_of(HUGE_PAGE);
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(Self::layout(size)?) })?;
        Some(Self { ptr, size })
    }
}

#[cfg(not(target_os = "linux"))]
impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.size) {
            // SAFETY: allocated in `Chunk::new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

/// The chunk being filled and how much of it is used.
static OPEN: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

/// Bytes of one repacked matrix, in a shared chunk. Cloning shares them.
#[derive(Clone)]
pub(crate) struct WeightBytes {
    chunk: Option<Arc<Chunk>>,
    range: Range<usize>,
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({} bytes)", self.range.len())
    }
}

impl WeightBytes {
    /// `len` bytes in the open chunk (or a new one), zeroed, then written by `fill`.
    pub fn filled_by(len: usize, fill: impl FnOnce(&mut [u8])) -> Self {
        if len == 0 {
            fill(&mut []);
            return Self {
                chunk: None,
                range: 0..0,
            };
        }
        let (chunk, start) = {
            let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
            let fits =
                |(c, used): &(Arc<Chunk>, usize)| used.next_multiple_of(ALIGN) + len <= c.size;
            if !open.as_ref().is_some_and(fits) {
                let Some(chunk) = Chunk::new(len.max(CHUNK)) else {
                    let wanted = std::alloc::Layout::from_size_align(len, HUGE_PAGE);
                    std::alloc::handle_alloc_error(
                        wanted.unwrap_or(std::alloc::Layout::new::<u8>()),
                    );
                };
                *open = Some((Arc::new(chunk), 0));
            }
            let Some((chunk, used)) = open.as_mut() else {
                unreachable!("a chunk was opened above");
            };
            let start = used.next_multiple_of(ALIGN);
            *used = start + len;
            (chunk.clone(), start)
        };
        // SAFETY: `start..start + len` lies inside the chunk (checked by `fits`), zeroed when it
        // was mapped, and past every range handed out before (the lock orders them): nothing
        // else reads or writes it until `Self` below exists.
        fill(unsafe { std::slice::from_raw_parts_mut(chunk.ptr.as_ptr().add(start), len) });
        Self {
            chunk: Some(chunk),
            range: start..start + len,
        }
    }
}

impl Deref for WeightBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.chunk {
            // SAFETY: the range was written in `filled_by` and is never written again; the chunk
            // lives as long as `self`.
            Some(c) => unsafe {
                std::slice::from_raw_parts(c.ptr.as_ptr().add(self.range.start), self.range.len())
            },
            None => &[],
        }
    }
}

/// Hands memory that loading freed back to the system. The repacked weights no longer reuse the
/// loader's freed buffers (the file's tensors before repacking), which would otherwise stay
/// resident in the heap (~50 MB for SmolLM2-135M in Q4_1).
pub(crate) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: only asks the allocator to release free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_zeroed_filled_aligned_and_independent() {
        let sizes = [1usize, 63, 64, 4096, 3 << 20, 0, 17 << 20, 5];
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (i * 31 + k * 7) as u8).collect())
            .collect();
        let copies: Vec<WeightBytes> = data
            .iter()
            .map(|d| {
                WeightBytes::filled_by(d.len(), |out| {
                    assert!(out.iter().all(|&b| b == 0), "a new range starts zeroed");
                    out.copy_from_slice(d)
                })
            })
            .collect();
        for (d, c) in data.iter().zip(&copies) {
            assert_eq!(&c[..], &d[..]);
            if !d.is_empty() {
                assert_eq!(c.as_ptr() as usize % ALIGN, 0);
            }
        }
        // A clone shares the bytes; dropping the others leaves it intact.
        let kept = copies[4].clone();
        drop(copies);
        assert_eq!(&kept[..], &data[4][..]);
    }
}
