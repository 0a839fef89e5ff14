//! Shared pieces of the fuzz targets: an allocator that enforces the
//! allocation caps, a reader that splits fuzz input into fields, and the
//! seed corpus each target writes when asked.
//!
//! # Allocation caps
//!
//! Every target links [`CappedAlloc`]: one allocation larger than
//! [`MAX_ALLOCATION`], or more than [`MAX_LIVE`] bytes live at once, aborts
//! the process, which libFuzzer reports as a crash and saves the input. A
//! decoder that allocates a length read from its input before checking it
//! therefore fails here even when the allocation would be lazily mapped and
//! never show in the RSS (`-rss_limit_mb` is the backstop for slow growth;
//! without a sanitizer libFuzzer's own `-malloc_limit_mb` is not enforced).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    io::Write,
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
};

pub mod seeds;

/// Largest single allocation a target may make: the largest cap a decoder
/// states (1 MiB control messages, state headers and chunks) with room for
/// a vector's doubling.
pub const MAX_ALLOCATION: usize = 8 << 20;
/// Most bytes live at once (the runtime and buffers of one input).
pub const MAX_LIVE: usize = 256 << 20;

/// The system allocator with [`MAX_ALLOCATION`] and [`MAX_LIVE`] enforced.
pub struct CappedAlloc;

#[global_allocator]
static ALLOCATOR: CappedAlloc = CappedAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);

fn over_cap(size: usize) -> ! {
    // No formatting: this must not allocate.
    let _ = std::io::stderr().write_all(b"colony-fuzz: allocation over the cap (see fuzz/src/lib.rs)\n");
    let _ = size;
    std::process::abort()
}

fn reserve(size: usize) {
    if size > MAX_ALLOCATION {
        over_cap(size);
    }
    if LIVE.fetch_add(size, Ordering::Relaxed) + size > MAX_LIVE {
        over_cap(size);
    }
}

// SAFETY: every method forwards to `System` with the caller's layout and
// pointer unchanged; the counting around it touches no allocation.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        reserve(layout.size());
        // SAFETY: forwarded as received (GlobalAlloc contract).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        reserve(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        reserve(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Splits fuzz input into fields; reads past the end give zeros / empty.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        match self.rest.split_first() {
            Some((b, rest)) => {
                self.rest = rest;
                *b
            }
            None => 0,
        }
    }

    /// The next two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` next bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        head
    }

    /// A field prefixed by its length byte.
    pub fn field(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8());
        self.bytes(n)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
}

/// The f64 bits of a float, so that round trips compare NaN by identity.
pub fn bits(x: f64) -> u64 {
    x.to_bits()
}

/// When `COLONY_FUZZ_WRITE_SEEDS` names a directory, writes `seeds` there
/// (one file per seed) and exits: `scripts/fuzz.sh --seeds` regenerates the
/// committed corpus this way, with the encoders of the crates themselves.
pub fn write_seeds_if_asked(seeds: impl FnOnce() -> Vec<(&'static str, Vec<u8>)>) {
    let Some(dir) = std::env::var_os("COLONY_FUZZ_WRITE_SEEDS") else {
        return;
    };
    let dir = Path::new(&dir);
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        let seeds = seeds();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        Ok(seeds.len())
    });
    match written {
        Ok(n) => {
            eprintln!("wrote {n} seeds to {}", dir.display());
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("cannot write seeds to {}: {e}", dir.display());
            std::process::exit(2)
        }
    }
}
