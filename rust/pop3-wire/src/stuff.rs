//! Dot-stuffing (server side): a stored message into a multi-line response body.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use crate::WireError;

/// Where the normalised octets go: the stuffer writes them, the size counter counts them.
trait Sink {
    /// Input octets passed through unchanged.
    fn span(&mut self, octets: &[u8]);
    /// A line end (always CRLF on the wire).
    fn crlf(&mut self);
    /// A stuffing dot (not part of the message size).
    fn dot(&mut self);
    /// The CRLF that ends a message without a final line end, so that the terminator
    /// starts a line. Sent, but not part of the message size (RFC 1939 §11, Dovecot).
    fn closing_crlf(&mut self) {
        self.crlf();
    }
    /// Writes the stuffed form of LF-only lines from `data[i..]` at once, as far as it
    /// can, and returns where it stopped and whether that is a line start. The default
    /// writes nothing (the line loop does it all).
    #[inline]
    fn lf_lines(&mut self, _data: &[u8], i: usize, at_line_start: bool) -> (usize, bool) {
        (i, at_line_start)
    }
}

/// A sink that writes the octets: a `Vec` (which grows) or an [`Exact`] buffer (which
/// does not); the 32-octet steps write into either.
trait Writes: StepOut {
    fn put(&mut self, octets: &[u8]);
}

impl<W: Writes> Sink for W {
    #[inline]
    fn span(&mut self, octets: &[u8]) {
        self.put(octets);
    }
    #[inline]
    fn crlf(&mut self) {
        self.put(b"\r\n");
    }
    #[inline]
    fn dot(&mut self) {
        self.put(b".");
    }
    #[inline]
    fn lf_lines(&mut self, data: &[u8], i: usize, at_line_start: bool) -> (usize, bool) {
        lf_lines(data, i, at_line_start, self)
    }
}

impl Writes for Vec<u8> {
    #[inline]
    fn put(&mut self, octets: &[u8]) {
        self.extend_from_slice(octets);
    }
}

/// Writes into a buffer of a known length (the stuffed length counted first): octets
/// that would not fit are not written and set `overflow`.
struct Exact<'a> {
    buf: &'a mut [MaybeUninit<u8>],
    len: usize,
    overflow: bool,
}

impl Writes for Exact<'_> {
    #[inline]
    #[allow(unsafe_code)] // one memcpy into room just checked
    fn put(&mut self, octets: &[u8]) {
        let end = self.len + octets.len();
        match self.buf.get_mut(self.len..end) {
            // SAFETY: `room` is `octets.len()` slots, and a `MaybeUninit<u8>` has the
            // layout of a `u8`; a `&mut` cannot overlap the shared input.
            Some(room) => unsafe {
                std::ptr::copy_nonoverlapping(
                    octets.as_ptr(),
                    room.as_mut_ptr().cast::<u8>(),
                    octets.len(),
                );
                self.len = end;
            },
            None => self.overflow = true,
        }
    }
}

/// Counts octets: with `wire`, every octet the stuffer writes (its output's length:
/// dots and the closing CRLF included); without, the message's size (RFC 1939 §11:
/// neither counted).
#[derive(Debug, Clone)]
struct Count {
    octets: u64,
    wire: bool,
}

impl Sink for Count {
    #[inline]
    fn span(&mut self, octets: &[u8]) {
        self.octets += octets.len() as u64;
    }
    #[inline]
    fn crlf(&mut self) {
        self.octets += 2;
    }
    #[inline]
    fn dot(&mut self) {
        self.octets += u64::from(self.wire);
    }
    #[inline]
    fn closing_crlf(&mut self) {
        self.octets += 2 * u64::from(self.wire);
    }
    #[inline]
    fn lf_lines(&mut self, data: &[u8], i: usize, at_line_start: bool) -> (usize, bool) {
        lf_count(data, i, at_line_start, self)
    }
}

/// Octets per block in [`skip_verbatim_blocks`].
const BLOCK: usize = 64;

/// True if no octet of the block `w[1..=BLOCK]` needs rewriting: no bare LF, no bare CR,
/// no `.` after an LF. `w[0]` and `w[BLOCK + 1]` are the octets around the block. Written
/// as branch-free work on three shifted views so that the compiler vectorises it.
#[inline(always)]
fn block_is_verbatim(w: &[u8; BLOCK + 2]) -> bool {
    let prev: &[u8; BLOCK] = w[..BLOCK].try_into().expect("BLOCK octets");
    let cur: &[u8; BLOCK] = w[1..=BLOCK].try_into().expect("BLOCK octets");
    let next: &[u8; BLOCK] = w[2..].try_into().expect("BLOCK octets");
    let mut bad = [0u8; BLOCK];
    for j in 0..BLOCK {
        let bare_lf = (cur[j] == b'\n') & (prev[j] != b'\r');
        let bare_cr = (cur[j] == b'\r') & (next[j] != b'\n');
        let dot_at_line_start = (cur[j] == b'.') & (prev[j] == b'\n');
        bad[j] = u8::from(bare_lf | bare_cr | dot_at_line_start);
    }
    bad.iter().fold(0, |acc, b| acc | b) == 0
}

/// From `i` (at least 1, not inside a CRLF), skips whole blocks that pass through
/// unchanged and returns where the first other block starts. Used only without a TOP cut,
/// where line ends need not be counted.
#[inline]
#[allow(unsafe_code)] // the one call of an AVX2 function, after the CPU check
fn skip_verbatim_blocks(data: &[u8], i: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: this CPU has AVX2 (checked just above, cached by std).
        return unsafe { skip_verbatim_blocks_avx2(data, i) };
    }
    skip_verbatim_blocks_any(data, i)
}

/// [`skip_verbatim_blocks`] compiled for AVX2: the block check vectorises to 32 octets
/// per compare instead of SSE2's 16 (the wheels target baseline x86-64).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
unsafe fn skip_verbatim_blocks_avx2(data: &[u8], i: usize) -> usize {
    skip_verbatim_blocks_any(data, i)
}

#[inline(always)]
fn skip_verbatim_blocks_any(data: &[u8], mut i: usize) -> usize {
    while i + BLOCK < data.len() {
        let w: &[u8; BLOCK + 2] = data[i - 1..i + BLOCK + 1]
            .try_into()
            .expect("a window of BLOCK + 2 octets");
        if !block_is_verbatim(w) {
            break;
        }
        i += BLOCK;
    }
    i
}

/// Input octets [`DotStuffer::lf_stuffed_len`] leaves to the line loop at most: less
/// than a step (32) after the last, or the rest from a step (64 with AVX-512) with a
/// CR in the last 64 octets.
const COUNT_TAIL: usize = 128;

/// Octets per step of [`lf_lines`].
#[cfg(target_arch = "x86_64")]
const LANE: usize = 32;
/// Steps of [`lf_lines`] a growth of its output is sized for (64 KiB of input), when
/// the capacity does not hold one more.
#[cfg(target_arch = "x86_64")]
const RESERVE_STEPS: usize = 2048;
/// Input octets left that [`lf_lines`] leaves to the line loop rather than grow its
/// output for (the end of a message whose stuffed form fits the reserved capacity).
#[cfg(target_arch = "x86_64")]
const TAIL: usize = 4 * LANE;

/// For each set of LFs among 8 octets (bit j: octet j is an LF), the `pshufb` control
/// that spreads the 8 octets over up to 16 with a CR (octet 8 of the source) in front
/// of each LF; 0x80 (a zero) after them. Made at compile time (4 KiB).
#[cfg(target_arch = "x86_64")]
static CR_BEFORE: [[u8; 16]; 256] = spreading_tables(Some(8)).0;

/// For each set of octets to double among 8 (bit j: octet j gets a copy in front of
/// it): the `pshufb` control that spreads the 8 octets over up to 16 that way
/// (`DOUBLE`), and 0xFF where an output octet is such a copy (`COPIES`). Made at compile
/// time (4 KiB each).
#[cfg(target_arch = "x86_64")]
static DOUBLE: [[u8; 16]; 256] = spreading_tables(None).0;
#[cfg(target_arch = "x86_64")]
static COPIES: [[u8; 16]; 256] = spreading_tables(None).1;

/// The `pshufb` controls that put an octet in front of each octet j whose bit is set
/// in the index (source octet `insert`, or octet j itself if None), and where those
/// inserted octets land.
#[cfg(target_arch = "x86_64")]
const fn spreading_tables(insert: Option<u8>) -> ([[u8; 16]; 256], [[u8; 16]; 256]) {
    let mut control = [[0x80u8; 16]; 256];
    let mut inserted = [[0u8; 16]; 256];
    let mut m = 0;
    while m < 256 {
        let mut o = 0;
        let mut j = 0;
        while j < 8 {
            if m & (1 << j) != 0 {
                control[m][o] = match insert {
                    Some(from) => from,
                    None => j as u8,
                };
                inserted[m][o] = 0xff;
                o += 1;
            }
            control[m][o] = j as u8;
            o += 1;
            j += 1;
        }
        m += 1;
    }
    (control, inserted)
}

/// Stores the four spread quarters (`$a`'s lanes, then `$b`'s) one after another from
/// `$dst + $o`, each 16 octets whole; quarter k is 8 octets plus one per bit of `$mk`.
/// A macro, not a function: a `#[target_feature]` function cannot be forced inline.
/// Wrapping additions: `$o` stays below the reserved capacity, and the release build's
/// overflow checks were a sixth of the step's instructions.
#[cfg(target_arch = "x86_64")]
macro_rules! store_quarters {
    ($dst:ident, $o:ident, $a:expr, $b:expr, $m0:expr, $m1:expr, $m2:expr, $m3:expr) => {{
        use std::arch::x86_64::{
            __m128i, _mm256_castsi256_si128, _mm256_extracti128_si256, _mm_storeu_si128,
        };
        let (a, b) = ($a, $b);
        _mm_storeu_si128($dst.add($o).cast::<__m128i>(), _mm256_castsi256_si128(a));
        $o = $o.wrapping_add(8 + $m0.count_ones() as usize);
        _mm_storeu_si128(
            $dst.add($o).cast::<__m128i>(),
            _mm256_extracti128_si256::<1>(a),
        );
        $o = $o.wrapping_add(8 + $m1.count_ones() as usize);
        _mm_storeu_si128($dst.add($o).cast::<__m128i>(), _mm256_castsi256_si128(b));
        $o = $o.wrapping_add(8 + $m2.count_ones() as usize);
        _mm_storeu_si128(
            $dst.add($o).cast::<__m128i>(),
            _mm256_extracti128_si256::<1>(b),
        );
        $o = $o.wrapping_add(8 + $m3.count_ones() as usize);
    }};
}

/// Maildir mail (LF line ends, no CR) without a line loop: from `data[i..]`, each LF
/// written as CRLF and each line that begins with `.` given one more, up to the first
/// 32-octet step that holds a CR or the last 31 octets (left to the line loop, which
/// handles everything; the last 127 too where the output has no room for another step
/// without growing). Returns where it stopped and whether that octet begins a line.
#[inline]
fn lf_lines<O: StepOut>(data: &[u8], i: usize, at_line_start: bool, out: &mut O) -> (usize, bool) {
    #[cfg(target_arch = "x86_64")]
    if i + 2 * LANE <= data.len() {
        if let Some(kernel) = LfKernel::best() {
            return lf_lines_with(kernel, data, i, at_line_start, out);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, out); // the line loop does it all here
    (i, at_line_start)
}

/// Where [`lf_lines`] writes: a `Vec` (which grows) or an [`Exact`] buffer (which
/// does not).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the SIMD steps use it
trait StepOut {
    /// Octets that can be written past the current end.
    fn spare(&self) -> usize;
    /// Makes room for at least `additional` octets past the end; false if it cannot.
    fn grow(&mut self, additional: usize) -> bool;
    /// Where the next octet goes.
    fn end_ptr(&mut self) -> *mut u8;
    /// Takes `n` more octets as written.
    ///
    /// # Safety
    /// The `n` octets from [`StepOut::end_ptr`] must have been written, within
    /// [`StepOut::spare`].
    #[allow(unsafe_code)]
    unsafe fn advance(&mut self, n: usize);
}

impl StepOut for Vec<u8> {
    #[inline]
    fn spare(&self) -> usize {
        self.capacity() - self.len()
    }
    #[inline]
    fn grow(&mut self, additional: usize) -> bool {
        self.reserve(additional);
        true
    }
    #[inline]
    fn end_ptr(&mut self) -> *mut u8 {
        self.spare_capacity_mut().as_mut_ptr().cast()
    }
    #[inline]
    #[allow(unsafe_code)]
    unsafe fn advance(&mut self, n: usize) {
        // SAFETY: the caller wrote these octets, within the capacity.
        unsafe { self.set_len(self.len() + n) };
    }
}

impl StepOut for Exact<'_> {
    #[inline]
    fn spare(&self) -> usize {
        self.buf.len() - self.len
    }
    #[inline]
    fn grow(&mut self, _additional: usize) -> bool {
        false
    }
    #[inline]
    fn end_ptr(&mut self) -> *mut u8 {
        self.buf[self.len..].as_mut_ptr().cast()
    }
    #[inline]
    #[allow(unsafe_code)]
    unsafe fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// The 32-octet step [`lf_lines`] runs, by what the CPU has.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LfKernel {
    Avx2,
    /// AVX-512 with VBMI2's byte expansion (Intel since Ice Lake, AMD since Zen 4).
    Avx512,
}

#[cfg(target_arch = "x86_64")]
impl LfKernel {
    /// The fastest this CPU has (std caches the checks).
    #[inline]
    fn best() -> Option<Self> {
        if Self::Avx512.supported() {
            Some(Self::Avx512)
        } else if Self::Avx2.supported() {
            Some(Self::Avx2)
        } else {
            None
        }
    }

    #[inline]
    fn supported(self) -> bool {
        match self {
            Self::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt")
            }
            Self::Avx512 => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512vbmi2")
                    && std::is_x86_feature_detected!("bmi2")
                    && std::is_x86_feature_detected!("popcnt")
            }
        }
    }
}

/// [`lf_lines`] with `kernel`, which this CPU must support. Works in runs of as many
/// steps as the output's capacity already holds: a step writes at most twice its input
/// and its last store reaches past its output, but mail grows by a CR per line.
/// Reserving the worst case for the whole input at once made `Vec` reallocate (a copy
/// of the whole buffer) on every large message.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // the kernels' calls, and the length they wrote
fn lf_lines_with<O: StepOut>(
    kernel: LfKernel,
    data: &[u8],
    mut i: usize,
    at_line_start: bool,
    out: &mut O,
) -> (usize, bool) {
    debug_assert!(kernel.supported());
    let len = data.len();
    let mut after_lf = at_line_start;
    while i + LANE <= len {
        let mut steps = out.spare().saturating_sub(16) / (2 * LANE);
        if steps == 0 {
            // A short tail, or an output that cannot grow: the line loop writes the
            // rest exactly.
            if len - i < TAIL || !out.grow(((len - i) / LANE).min(RESERVE_STEPS) * 2 * LANE + 16) {
                break;
            }
            steps = (out.spare() - 16) / (2 * LANE);
        }
        let end = i + steps.min((len - i) / LANE) * LANE;
        // SAFETY: the kernel reads `data[i..end]` (whole steps, end <= len) and writes
        // below `steps * 64 + 16` octets from `dst`, within the spare room; the CPU has
        // its features (the caller checked).
        let (next, after, written, stopped) = unsafe {
            let dst = out.end_ptr();
            let src = data.as_ptr();
            match kernel {
                LfKernel::Avx2 => lf_run_avx2(src, i, end, after_lf, dst),
                LfKernel::Avx512 => lf_run_avx512(src, i, end, after_lf, dst),
            }
        };
        // SAFETY: the kernel wrote the `written` octets from the end.
        unsafe { out.advance(written) };
        (i, after_lf) = (next, after);
        if stopped {
            break; // a CR: the line loop takes it from here
        }
    }
    (i, after_lf)
}

/// [`lf_lines`] without writing: adds to `count` the octets it would write (without
/// the dots for a size), and returns where it would stop (the same octets in total,
/// wherever each stops: the line loop counts the rest).
#[inline]
#[allow(unsafe_code)] // the one call of a counting kernel, after the CPU check
fn lf_count(data: &[u8], i: usize, at_line_start: bool, count: &mut Count) -> (usize, bool) {
    #[cfg(target_arch = "x86_64")]
    if i + 2 * LANE <= data.len() {
        let end = i + (data.len() - i) / LANE * LANE;
        // SAFETY: the kernels read `data[i..end]`, whole steps; the CPU has their
        // features (`best` checked).
        let (next, after, octets, dots) = match LfKernel::best() {
            Some(LfKernel::Avx512) => unsafe {
                lf_count_avx512(data.as_ptr(), i, end, at_line_start)
            },
            Some(LfKernel::Avx2) => unsafe { lf_count_avx2(data.as_ptr(), i, end, at_line_start) },
            None => return (i, at_line_start),
        };
        count.octets += octets as u64 + if count.wire { dots as u64 } else { 0 };
        return (next, after);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, count); // the line loop counts it all here
    (i, at_line_start)
}

/// What [`lf_run_avx2`] writes for `data[i..end]`, and where it stops: 32 octets a
/// step and one per LF, and apart, the dots that begin a line.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
#[allow(unsafe_code)]
unsafe fn lf_count_avx2(
    data: *const u8,
    mut i: usize,
    end: usize,
    at_line_start: bool,
) -> (usize, bool, usize, usize) {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8, _mm256_set1_epi8,
    };
    let lf = _mm256_set1_epi8(b'\n' as i8);
    let cr = _mm256_set1_epi8(b'\r' as i8);
    let dot = _mm256_set1_epi8(b'.' as i8);
    let mut after_lf = u32::from(at_line_start);
    let (mut octets, mut dotted) = (0usize, 0usize);
    while i < end {
        // SAFETY: i + 32 <= end.
        let v = unsafe { _mm256_loadu_si256(data.add(i).cast::<__m256i>()) };
        if _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, cr)) != 0 {
            break;
        }
        let lfs = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, lf)) as u32;
        let dots = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, dot)) as u32;
        octets += LANE + lfs.count_ones() as usize;
        dotted += (dots & ((lfs << 1) | after_lf)).count_ones() as usize;
        after_lf = lfs >> 31;
        i += LANE;
    }
    (i, after_lf != 0, octets, dotted)
}

/// [`lf_count_avx2`] with AVX-512 masks, 64 octets a step (and a last 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,bmi2,popcnt")]
#[allow(unsafe_code)]
unsafe fn lf_count_avx512(
    data: *const u8,
    mut i: usize,
    end: usize,
    at_line_start: bool,
) -> (usize, bool, usize, usize) {
    use std::arch::x86_64::{
        __m512i, _mm512_cmpeq_epi8_mask, _mm512_loadu_si512, _mm512_set1_epi8,
    };
    let (lf, cr, dot) = (
        _mm512_set1_epi8(b'\n' as i8),
        _mm512_set1_epi8(b'\r' as i8),
        _mm512_set1_epi8(b'.' as i8),
    );
    let mut after_lf = u64::from(at_line_start);
    let (mut octets, mut dotted) = (0usize, 0usize);
    while i + 2 * LANE <= end {
        // SAFETY: i + 64 <= end.
        let v = unsafe { _mm512_loadu_si512(data.add(i).cast::<__m512i>()) };
        if _mm512_cmpeq_epi8_mask(v, cr) != 0 {
            return (i, after_lf != 0, octets, dotted);
        }
        let lfs = _mm512_cmpeq_epi8_mask(v, lf);
        octets += 2 * LANE + lfs.count_ones() as usize;
        dotted += (_mm512_cmpeq_epi8_mask(v, dot) & ((lfs << 1) | after_lf)).count_ones() as usize;
        after_lf = lfs >> 63;
        i += 2 * LANE;
    }
    // A last 32 octets, if any: the AVX2 step (AVX-512F implies AVX2).
    // SAFETY: `end - i` is 0 or 32.
    let (i, after, more, more_dotted) = unsafe { lf_count_avx2(data, i, end, after_lf != 0) };
    (i, after, octets + more, dotted + more_dotted)
}

/// One run of [`lf_lines_with`] in AVX2, 32 octets a step with no branch on where
/// lines end (line lengths vary at random, and a branch per line end mispredicts about
/// every other step). The step's LFs are a bit mask; each quarter (8 octets) is spread
/// by one `pshufb` with [`CR_BEFORE`]'s control for its 8 bits, from a source that
/// holds the quarter and then CRs, and stored whole (16 octets) where the previous
/// quarter ended, to be overwritten from its real end on. A step in which a line
/// begins with `.` (rare in mail) takes [`DOUBLE`] and [`COPIES`] instead: both its
/// LFs and those dots are doubled, and the copies of LFs then made CRs. On the suite's
/// Maildir mail (random line lengths, every 17th line dotted) about 25% fewer cycles
/// than a loop over each step's LFs, whose trip count the branch predictor cannot
/// learn.
///
/// Reads `data[i..end]` (`end - i` a multiple of 32) and writes from `dst`, at most 64
/// octets a step plus 16; returns where it stopped, whether that octet begins a line,
/// the octets written, and whether a CR stopped it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
#[allow(unsafe_code)]
unsafe fn lf_run_avx2(
    data: *const u8,
    mut i: usize,
    end: usize,
    at_line_start: bool,
    dst: *mut u8,
) -> (usize, bool, usize, bool) {
    use std::arch::x86_64::{
        __m256i, _mm256_and_si256, _mm256_blend_epi32, _mm256_blendv_epi8, _mm256_cmpeq_epi8,
        _mm256_loadu2_m128i, _mm256_loadu_si256, _mm256_movemask_epi8, _mm256_permute4x64_epi64,
        _mm256_set1_epi8, _mm256_shuffle_epi8,
    };
    let lf = _mm256_set1_epi8(b'\n' as i8);
    let cr = _mm256_set1_epi8(b'\r' as i8);
    let dot = _mm256_set1_epi8(b'.' as i8);
    let table = CR_BEFORE.as_ptr();
    let double_t = DOUBLE.as_ptr();
    let copies_t = COPIES.as_ptr();
    let mut after_lf = u32::from(at_line_start);
    let mut o = 0usize;
    // SAFETY (for every access below): loads read `data + i .. data + i + 32` with
    // i + 32 <= end, and 16-octet rows of CR_BEFORE, DOUBLE and COPIES (indexes below
    // 256); each octet of output is written by the store of its quarter (a later store
    // rewrites only octets past it).
    while i < end {
        let v = unsafe { _mm256_loadu_si256(data.add(i).cast::<__m256i>()) };
        let crs = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, cr)) as u32;
        let lfs = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, lf)) as u32;
        let dots = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, dot)) as u32;
        if crs != 0 {
            return (i, after_lf != 0, o, true); // a CR: the line loop takes it from here
        }
        let dotted = dots & ((lfs << 1) | after_lf);
        if dotted != 0 {
            // Also a `.` that begins a line gets a copy in front: each octet to double
            // is copied by DOUBLE's control, and the copies of LFs become CRs.
            let double = lfs | dotted;
            let a = _mm256_permute4x64_epi64::<0x50>(v);
            let b = _mm256_permute4x64_epi64::<0xFA>(v);
            let (m0, m1) = ((double & 0xff) as usize, ((double >> 8) & 0xff) as usize);
            let (m2, m3) = (((double >> 16) & 0xff) as usize, (double >> 24) as usize);
            unsafe {
                let ca = _mm256_loadu2_m128i(double_t.add(m1).cast(), double_t.add(m0).cast());
                let cb = _mm256_loadu2_m128i(double_t.add(m3).cast(), double_t.add(m2).cast());
                let ka = _mm256_loadu2_m128i(copies_t.add(m1).cast(), copies_t.add(m0).cast());
                let kb = _mm256_loadu2_m128i(copies_t.add(m3).cast(), copies_t.add(m2).cast());
                let wa = _mm256_shuffle_epi8(a, ca);
                let wb = _mm256_shuffle_epi8(b, cb);
                let wa =
                    _mm256_blendv_epi8(wa, cr, _mm256_and_si256(ka, _mm256_cmpeq_epi8(wa, lf)));
                let wb =
                    _mm256_blendv_epi8(wb, cr, _mm256_and_si256(kb, _mm256_cmpeq_epi8(wb, lf)));
                store_quarters!(dst, o, wa, wb, m0, m1, m2, m3);
            }
        } else {
            // Quarters 0 and 1 in the lanes of `a`, 2 and 3 in those of `b`, each
            // followed by 8 CRs.
            let a = _mm256_blend_epi32::<0b1100_1100>(_mm256_permute4x64_epi64::<0x50>(v), cr);
            let b = _mm256_blend_epi32::<0b1100_1100>(_mm256_permute4x64_epi64::<0xFA>(v), cr);
            let (m0, m1) = ((lfs & 0xff) as usize, ((lfs >> 8) & 0xff) as usize);
            let (m2, m3) = (((lfs >> 16) & 0xff) as usize, (lfs >> 24) as usize);
            unsafe {
                let ca = _mm256_loadu2_m128i(table.add(m1).cast(), table.add(m0).cast());
                let cb = _mm256_loadu2_m128i(table.add(m3).cast(), table.add(m2).cast());
                let wa = _mm256_shuffle_epi8(a, ca);
                let wb = _mm256_shuffle_epi8(b, cb);
                store_quarters!(dst, o, wa, wb, m0, m1, m2, m3);
            }
        }
        after_lf = lfs >> 31;
        i += LANE;
    }
    (i, after_lf != 0, o, false)
}

/// [`lf_run_avx2`] with AVX-512 (VBMI2), 32 octets a step and no table: the octets
/// that get one in front (LFs, and dots that begin a line) are a bit mask; `pdep` and
/// `pext` turn it into the mask of output slots that receive input octets, and
/// `vpexpandb` spreads the step over them, with a CR in each slot left between (a dot
/// where the octet after it is a dotted line start). One 64-octet store a step (32
/// octets and up to 32 inserted).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,bmi2,popcnt")]
#[allow(unsafe_code)]
unsafe fn lf_run_avx512(
    data: *const u8,
    mut i: usize,
    end: usize,
    at_line_start: bool,
    dst: *mut u8,
) -> (usize, bool, usize, bool) {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8_mask, _mm256_loadu_si256, _mm256_set1_epi8,
        _mm512_mask_expand_epi8, _mm512_mask_mov_epi8, _mm512_set1_epi8, _mm512_storeu_si512,
        _mm512_zextsi256_si512, _pdep_u64, _pext_u64,
    };
    const EVEN: u64 = 0x5555_5555_5555_5555;
    const ODD: u64 = 0xAAAA_AAAA_AAAA_AAAA;
    let lf = _mm256_set1_epi8(b'\n' as i8);
    let cr = _mm256_set1_epi8(b'\r' as i8);
    let dot = _mm256_set1_epi8(b'.' as i8);
    let crs_w = _mm512_set1_epi8(b'\r' as i8);
    let dots_w = _mm512_set1_epi8(b'.' as i8);
    let mut after_lf = u32::from(at_line_start);
    let mut o = 0usize;
    while i < end {
        // SAFETY: i + 32 <= end.
        let v = unsafe { _mm256_loadu_si256(data.add(i).cast::<__m256i>()) };
        if _mm256_cmpeq_epi8_mask(v, cr) != 0 {
            return (i, after_lf != 0, o, true); // a CR: the line loop takes it from here
        }
        let lfs = _mm256_cmpeq_epi8_mask(v, lf);
        let dotted = _mm256_cmpeq_epi8_mask(v, dot) & ((lfs << 1) | after_lf);
        let ins = u64::from(lfs | dotted);
        // Two slots for octet j, bits 2j (the one in front, if any) and 2j + 1; `pext`
        // over the slots in use leaves them in output order, a 1 for each inserted.
        let spread = _pdep_u64(ins, EVEN);
        let used = spread | ODD;
        let data_slots = !_pext_u64(spread, used);
        let fill = if dotted == 0 {
            crs_w
        } else {
            let dot_slots = _pext_u64(_pdep_u64(u64::from(dotted), EVEN), used);
            _mm512_mask_mov_epi8(crs_w, dot_slots, dots_w)
        };
        // Slots from the step's end on get zeros: past its output, which the next
        // step's store overwrites (or the length leaves out).
        let w = _mm512_mask_expand_epi8(fill, data_slots, _mm512_zextsi256_si512(v));
        // SAFETY: o + 64 <= (steps so far + 1) * 64, within what the caller reserved.
        unsafe { _mm512_storeu_si512(dst.add(o).cast(), w) };
        o += 32 + ins.count_ones() as usize;
        after_lf = lfs >> 31;
        i += LANE;
    }
    (i, after_lf != 0, o, false)
}

/// Finds the next CR or LF: `memchr::memchr2` with its searcher made once. `memchr2`
/// makes one (and picks the implementation) on every call, about a quarter of its cost
/// on a line of mail.
struct LineEnds {
    #[cfg(target_arch = "x86_64")]
    avx2: Option<memchr::arch::x86_64::avx2::memchr::Two>,
}

impl LineEnds {
    #[inline]
    fn new() -> Self {
        LineEnds {
            #[cfg(target_arch = "x86_64")]
            avx2: memchr::arch::x86_64::avx2::memchr::Two::new(b'\r', b'\n'),
        }
    }

    /// The offset of the first CR or LF in `haystack`.
    #[inline]
    fn find(&self, haystack: &[u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if let Some(two) = &self.avx2 {
            return two.find(haystack);
        }
        memchr::memchr2(b'\r', b'\n', haystack)
    }
}

/// Where a TOP cut stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    /// No cut: send everything.
    Off,
    /// In the header; after the empty line that ends it, send this many lines.
    Header(u64),
    /// In the body; this many lines (at least one) may still be sent.
    Body(u64),
    /// The cut is complete: ignore further input.
    Done,
}

/// The line-end normalising, dot-stuffing state machine shared by [`DotStuffer`] and
/// [`SizeCounter`].
#[derive(Debug, Clone)]
struct Normaliser {
    /// The next octet begins a line (nothing of the current line has been seen yet).
    at_line_start: bool,
    /// The last octet seen was a CR whose meaning (CRLF or bare CR) awaits the next octet.
    pending_cr: bool,
    top: Top,
    finished: bool,
}

impl Normaliser {
    fn new(top_lines: Option<u64>) -> Self {
        Normaliser {
            at_line_start: true,
            pending_cr: false,
            top: top_lines.map_or(Top::Off, Top::Header),
            finished: false,
        }
    }

    /// A line has ended (its CRLF already written). Returns true if the TOP cut is now
    /// complete and output must stop.
    #[inline]
    fn line_end(&mut self, empty: bool) -> bool {
        self.at_line_start = true;
        match self.top {
            Top::Off | Top::Done => false,
            Top::Header(_) if !empty => false,
            Top::Header(0) | Top::Body(1) => {
                self.top = Top::Done;
                true
            }
            // The empty line that ends the header: n body lines may follow.
            Top::Header(n) => {
                self.top = Top::Body(n);
                false
            }
            Top::Body(n) => {
                self.top = Top::Body(n - 1);
                false
            }
        }
    }

    fn feed<S: Sink>(&mut self, data: &[u8], out: &mut S) -> Result<(), WireError> {
        if self.finished {
            return Err(WireError::Finished);
        }
        if self.top == Top::Done || data.is_empty() {
            return Ok(());
        }
        let len = data.len();
        let mut i = 0;
        if self.pending_cr {
            // The held CR ends a line whatever follows; an LF after it belongs to it.
            self.pending_cr = false;
            out.crlf();
            if data[0] == b'\n' {
                i = 1;
            }
            let empty = self.at_line_start;
            if self.line_end(empty) {
                return Ok(());
            }
        }
        if self.top == Top::Off {
            self.feed_untopped(data, i, out);
            return Ok(());
        }
        // With a TOP cut: every line end is counted. `data[run..i]` is input not yet
        // written that passes through unchanged.
        let mut run = i;
        let line_ends = LineEnds::new();
        while i < len {
            if self.at_line_start && data[i] == b'.' {
                out.span(&data[run..i]);
                out.dot();
                run = i;
            }
            let Some(k) = line_ends.find(&data[i..]) else {
                self.at_line_start = false;
                break;
            };
            let j = i + k;
            let empty = self.at_line_start && k == 0;
            if data[j] == b'\n' {
                // A bare LF (a CRLF is consumed at its CR).
                out.span(&data[run..j]);
                out.crlf();
                i = j + 1;
                run = i;
            } else if j + 1 == len {
                // A CR at the end of the chunk: the next octet decides.
                out.span(&data[run..j]);
                self.at_line_start = empty;
                self.pending_cr = true;
                return Ok(());
            } else if data[j + 1] == b'\n' {
                i = j + 2;
            } else {
                // A bare CR ends a line too.
                out.span(&data[run..j]);
                out.crlf();
                i = j + 1;
                run = i;
            }
            if self.line_end(empty) {
                out.span(&data[run..i]);
                return Ok(());
            }
        }
        out.span(&data[run..]);
        Ok(())
    }

    /// [`Normaliser::feed`] without a TOP cut, from `data[i..]` with no CR held back:
    /// line ends need not be counted, so this loop only finds them. A line that ends in
    /// a bare LF or CR (Maildir) costs one CR/LF search and two appends. Block skipping
    /// is tried only after a CRLF (CRLF mail goes by whole blocks): on LF mail a 64-octet
    /// block often fits inside a line, and trying after every line end cost more than
    /// all the rest.
    #[inline]
    fn feed_untopped<S: Sink>(&mut self, data: &[u8], i: usize, out: &mut S) {
        debug_assert!(self.top == Top::Off && !self.pending_cr);
        let len = data.len();
        // LF-only mail (Maildir's) goes by 32-octet steps as far as it can.
        let (mut i, mut at_line_start) = out.lf_lines(data, i, self.at_line_start);
        // `data[run..i]` is input not yet written that passes through unchanged.
        let mut run = i;
        // Block skipping is tried after a CRLF, from `retry_at` on; after a try that skips
        // nothing the distance doubles (up to 4 KiB), so that input whose CRLFs are each
        // followed by a line to rewrite does not pay for a failed block check each time.
        let mut retry_at = 0;
        let mut backoff = BLOCK;
        let line_ends = LineEnds::new();
        while i < len {
            if at_line_start && data[i] == b'.' {
                out.span(&data[run..i]);
                out.dot();
                run = i;
            }
            let Some(k) = line_ends.find(&data[i..]) else {
                at_line_start = false;
                break;
            };
            let j = i + k;
            if data[j] == b'\n' {
                // A bare LF (a CRLF is consumed at its CR).
                out.span(&data[run..j]);
                out.crlf();
                i = j + 1;
                run = i;
            } else if j + 1 == len {
                // A CR at the end of the chunk: the next octet decides. As in `feed`,
                // `at_line_start` now says whether the line it ends is empty.
                out.span(&data[run..j]);
                self.at_line_start = at_line_start && k == 0;
                self.pending_cr = true;
                return;
            } else if data[j + 1] == b'\n' {
                i = j + 2;
                // A CRLF: mail stored in the wire form may follow.
                if i >= retry_at && i < len && data[i] != b'.' {
                    let skipped = skip_verbatim_blocks(data, i);
                    if skipped == i {
                        retry_at = i + backoff;
                        backoff = (backoff * 2).min(4096);
                    } else {
                        backoff = BLOCK;
                        i = skipped;
                        if data[i - 1] == b'\r' {
                            // The block check saw that this CR's LF follows: keep them
                            // together.
                            i += 1;
                        }
                        at_line_start = data[i - 1] == b'\n';
                        continue;
                    }
                }
            } else {
                // A bare CR ends a line too.
                out.span(&data[run..j]);
                out.crlf();
                i = j + 1;
                run = i;
            }
            at_line_start = true;
        }
        out.span(&data[run..]);
        self.at_line_start = at_line_start;
    }

    fn finish<S: Sink>(&mut self, out: &mut S) -> Result<(), WireError> {
        if self.finished {
            return Err(WireError::Finished);
        }
        self.finished = true;
        if self.pending_cr {
            self.pending_cr = false;
            out.crlf();
            let empty = self.at_line_start;
            self.line_end(empty);
        }
        if !self.at_line_start {
            out.closing_crlf();
            self.at_line_start = true;
        }
        Ok(())
    }
}

/// Streams a stored message as a multi-line response body (RFC 1939 §3).
///
/// * Every line end on the wire is CRLF: CRLF stays, a bare LF becomes CRLF, and so does
///   a bare CR (so `CR CR LF` is two line ends). A CR at the end of a chunk is held back
///   until the next octet (or [`DotStuffer::finish`]) decides.
/// * Every line that begins with `.` gets one more `.` in front, including the first
///   line and a line that begins at a chunk boundary.
/// * [`DotStuffer::finish`] adds a CRLF if the output does not end at a line start, then
///   the `.\r\n` terminator.
/// * TOP cut (`top_lines = Some(n)`, RFC 1939 §7): the header through its empty line is
///   sent, then at most `n` more lines; then [`DotStuffer::done`] becomes true and later
///   input is ignored.
///
/// ```
/// let mut s = pop3_wire::DotStuffer::new(None);
/// let mut out = s.feed(b"Subject: x\n\n.hidden\r").unwrap();
/// out.extend(s.feed(b"\n.").unwrap());
/// out.extend(s.finish().unwrap());
/// assert_eq!(out, b"Subject: x\r\n\r\n..hidden\r\n..\r\n.\r\n");
/// ```
#[derive(Debug, Clone)]
pub struct DotStuffer {
    state: Normaliser,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer::new(None)
    }
}

impl DotStuffer {
    /// A stuffer for the whole message (`None`) or for a TOP of `n` body lines.
    pub fn new(top_lines: Option<u64>) -> Self {
        DotStuffer {
            state: Normaliser::new(top_lines),
        }
    }

    /// True once a TOP cut is complete; further input is ignored.
    pub fn done(&self) -> bool {
        self.state.top == Top::Done
    }

    /// True once [`DotStuffer::finish`] has been called.
    pub fn is_finished(&self) -> bool {
        self.state.finished
    }

    /// Appends the stuffed form of `data` to `out`.
    /// Fails with [`WireError::Finished`] after [`DotStuffer::finish`].
    pub fn feed_into(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        // Mail is mostly CRLF text: reserve a little more than the input; `Vec` grows
        // for the rest.
        out.reserve(data.len() + data.len() / 16 + 8);
        self.state.feed(data, out)
    }

    /// If the stuffed form of `data` is `data` itself (CRLF line ends only, no line
    /// that begins with `.`, no CR held back on either side, no TOP cut), advances the
    /// state exactly as [`DotStuffer::feed`] would and returns true; otherwise changes
    /// nothing and returns false. Lets a caller send mail stored in the wire form
    /// without copying it. A read-only scan that stops at the first octet to rewrite.
    pub fn feed_verbatim(&mut self, data: &[u8]) -> bool {
        let s = &mut self.state;
        let len = data.len();
        if s.finished
            || s.top != Top::Off
            || s.pending_cr
            || len == 0
            || data[len - 1] == b'\r'
            || data[0] == b'\n'
            || (s.at_line_start && data[0] == b'.')
            || (data[0] == b'\r' && data[1] != b'\n')
        {
            return false;
        }
        // Octets 1.. in whole blocks, then the tail one by one (same three rules).
        let mut i = skip_verbatim_blocks(data, 1);
        if i + BLOCK < len {
            return false;
        }
        while i < len {
            let (prev, cur) = (data[i - 1], data[i]);
            let bad = match cur {
                b'\n' => prev != b'\r',
                b'\r' => i + 1 == len || data[i + 1] != b'\n',
                b'.' => prev == b'\n',
                _ => false,
            };
            if bad {
                return false;
            }
            i += 1;
        }
        s.at_line_start = data[len - 1] == b'\n';
        true
    }

    /// How many octets [`DotStuffer::feed_into`] would write for `data` now, without
    /// writing them or changing the state (a read-only pass: about a fifth of the
    /// stuffing's time on LF mail). Fails with [`WireError::Finished`] after
    /// [`DotStuffer::finish`].
    pub fn stuffed_len(&self, data: &[u8]) -> Result<u64, WireError> {
        let mut count = Count {
            octets: 0,
            wire: true,
        };
        self.state.clone().feed(data, &mut count)?;
        Ok(count.octets)
    }

    /// [`DotStuffer::stuffed_len`] where one pass of SIMD steps counts nearly all of
    /// it: no TOP cut, no CR held back, and no CR in `data` but near its end (LF mail,
    /// such as Maildir's). None otherwise, and on CPUs without AVX2: counting mail with
    /// CRLF line ends costs about as much as stuffing it.
    pub fn lf_stuffed_len(&self, data: &[u8]) -> Option<u64> {
        let s = &self.state;
        if s.finished || s.top != Top::Off || s.pending_cr {
            return None;
        }
        let mut count = Count {
            octets: 0,
            wire: true,
        };
        let (i, at_line_start) = lf_count(data, 0, s.at_line_start, &mut count);
        if data.len() - i > COUNT_TAIL {
            return None; // a CR early on, or no SIMD count on this CPU
        }
        let mut rest = s.clone();
        rest.at_line_start = at_line_start;
        rest.feed(&data[i..], &mut count).ok()?;
        Some(count.octets)
    }

    /// Writes the stuffed form of `data` at the start of `out` and returns its length:
    /// for a buffer made [`DotStuffer::stuffed_len`] long (a Python `bytes`, filled
    /// without a copy). Fails with [`WireError::OutputTooSmall`], the buffer's content
    /// and the stuffer's state then undefined, if it does not fit; with
    /// [`WireError::Finished`] after [`DotStuffer::finish`].
    pub fn feed_exact(
        &mut self,
        data: &[u8],
        out: &mut [MaybeUninit<u8>],
    ) -> Result<usize, WireError> {
        let mut exact = Exact {
            buf: out,
            len: 0,
            overflow: false,
        };
        self.state.feed(data, &mut exact)?;
        if exact.overflow {
            return Err(WireError::OutputTooSmall);
        }
        Ok(exact.len)
    }

    /// The stuffed form of `data`. Fails with [`WireError::Finished`] after
    /// [`DotStuffer::finish`].
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.feed_into(data, &mut out)?;
        Ok(out)
    }

    /// Appends the held-back octets, a CRLF if the output does not end a line, then
    /// `.\r\n`. Fails with [`WireError::Finished`] if called twice.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.state.finish(out)?;
        out.extend_from_slice(b".\r\n");
        Ok(())
    }

    /// The held-back octets, a CRLF if the output does not end a line, then `.\r\n`.
    /// Fails with [`WireError::Finished`] if called twice.
    pub fn finish(&mut self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(7);
        self.finish_into(&mut out)?;
        Ok(out)
    }
}

/// Counts a message's POP3 size (RFC 1939 §11) without producing output: the message
/// as stored with every line end made CRLF (a bare CR counts as a line end, as the
/// stuffer sends it). Not counted: stuffing dots, the terminator, and the CRLF that
/// [`DotStuffer::finish`] adds to a message without a final line end (Dovecot's and
/// IMAP's RFC822.SIZE rule). So a client that unstuffs a RETR gets the size, plus 2
/// when the message had no final line end.
#[derive(Debug, Clone)]
pub struct SizeCounter {
    state: Normaliser,
    count: Count,
}

impl Default for SizeCounter {
    fn default() -> Self {
        SizeCounter::new()
    }
}

impl SizeCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        SizeCounter {
            state: Normaliser::new(None),
            count: Count {
                octets: 0,
                wire: false,
            },
        }
    }

    /// Counts `data`. Fails with [`WireError::Finished`] after [`SizeCounter::finish`].
    pub fn feed(&mut self, data: &[u8]) -> Result<(), WireError> {
        self.state.feed(data, &mut self.count)
    }

    /// The size of everything fed. Fails with [`WireError::Finished`] if called twice.
    pub fn finish(&mut self) -> Result<u64, WireError> {
        self.state.finish(&mut self.count)?;
        Ok(self.count.octets)
    }
}

/// The whole-message [`DotStuffer`]: `feed(message)` then `finish()`.
pub fn stuff(message: &[u8], top_lines: Option<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    stuff_into(message, top_lines, &mut out);
    out
}

/// [`stuff`], appending to `out` (a buffer the caller may reuse).
pub fn stuff_into(message: &[u8], top_lines: Option<u64>, out: &mut Vec<u8>) {
    let mut s = DotStuffer::new(top_lines);
    s.feed_into(message, out)
        .and_then(|()| s.finish_into(out))
        .expect("a new DotStuffer is not finished");
}

/// The whole-message [`SizeCounter`].
pub fn wire_size(message: &[u8]) -> u64 {
    let mut c = SizeCounter::new();
    c.feed(message)
        .and_then(|()| c.finish())
        .expect("a new SizeCounter is not finished")
}

/// How much of a header without an empty line [`wire_header_is_ascii`] judges, in the
/// server: 256 KiB (MTAs cut headers far shorter: Postfix at 100 KiB).
pub const HEADER_SCAN_LIMIT: usize = 256 * 1024;

/// RFC 6856: whether the header of a message in wire form (CRLF line ends, stuffed) is
/// US-ASCII. The header is what comes before the first empty line (`\r\n\r\n`), or the
/// first `limit` octets when no empty line ends within them; a wire form that starts
/// with `\r\n` has an empty header. Only the header is read: the body of a large
/// message costs nothing.
pub fn wire_header_is_ascii(wire: &[u8], limit: usize) -> bool {
    if wire.starts_with(b"\r\n") {
        return true;
    }
    // One searcher for every call: building it costs more than searching a header.
    static EMPTY_LINE: OnceLock<memchr::memmem::Finder<'static>> = OnceLock::new();
    let finder = EMPTY_LINE.get_or_init(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    let window = &wire[..wire.len().min(limit)];
    let end = finder.find(window).unwrap_or(window.len());
    window[..end].is_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check_reads_the_header_only() {
        assert!(wire_header_is_ascii(
            b"A: b\r\n\r\n\xff\r\n.\r\n",
            HEADER_SCAN_LIMIT
        ));
        assert!(!wire_header_is_ascii(
            b"A: \xff\r\n\r\nb\r\n.\r\n",
            HEADER_SCAN_LIMIT
        ));
        assert!(wire_header_is_ascii(b"\r\n\xff", 0)); // an empty header
        assert!(!wire_header_is_ascii(b"A: b\r\nB: \xff", 100)); // all header
        assert!(wire_header_is_ascii(b"A: b\r\nB: \xff", 9)); // its first 9 octets
        assert!(wire_header_is_ascii(b"A: b\r\n\r\n\xff", 7)); // empty line past the limit
        assert!(wire_header_is_ascii(b"", 10));
    }

    /// The stuffer's rules, one line at a time: the whole response body (terminator
    /// included), whether a TOP cut completed, and the RFC 1939 size.
    fn reference(m: &[u8], top: Option<u64>) -> (Vec<u8>, bool, u64) {
        // (content, has a line end): CRLF, LF and a bare CR each end a line.
        let mut lines = Vec::new();
        let mut cur = Vec::new();
        let mut i = 0;
        while i < m.len() {
            match m[i] {
                b'\r' if m.get(i + 1) == Some(&b'\n') => {
                    lines.push((std::mem::take(&mut cur), true));
                    i += 1;
                }
                b'\r' | b'\n' => lines.push((std::mem::take(&mut cur), true)),
                b => cur.push(b),
            }
            i += 1;
        }
        if !cur.is_empty() {
            lines.push((cur, false));
        }
        let size = lines
            .iter()
            .map(|(l, end)| l.len() as u64 + if *end { 2 } else { 0 })
            .sum();
        let mut cut = false;
        if let Some(n) = top {
            // The header through its empty line, then n lines.
            if let Some(h) = lines.iter().position(|(l, end)| l.is_empty() && *end) {
                let keep = h + 1 + n as usize;
                cut = lines.len() > keep || (lines.len() == keep && lines[keep - 1].1);
                lines.truncate(keep);
            }
        }
        let mut out = Vec::new();
        for (l, _) in &lines {
            if l.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(l);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        (out, cut, size)
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn one_in(&mut self, n: usize) -> bool {
            self.below(n) == 0
        }
    }

    /// Mail-like text: lines of 0 to ~200 octets (often ~76, often empty), some
    /// starting with dots, ending in LF, CRLF or bare CR (one kind for the whole message,
    /// or mixed), maybe no final line end; sometimes a stray CR or LF inside a line.
    fn message(rng: &mut Rng, lines: usize) -> Vec<u8> {
        let ends: &[&[u8]] = match rng.below(5) {
            0 => &[b"\n"],
            1 => &[b"\r\n"],
            2 => &[b"\r"],
            3 => &[b"\n", b"\r\n"],
            _ => &[b"\n", b"\r\n", b"\r", b"\r\r\n", b"\n\r"],
        };
        let mut m = Vec::new();
        for _ in 0..rng.below(lines + 1) {
            let len = match rng.below(4) {
                0 => 0,
                1 => rng.below(8),
                2 => 70 + rng.below(13),
                _ => rng.below(200),
            };
            let dots = if rng.one_in(4) { 1 + rng.below(3) } else { 0 };
            m.extend(std::iter::repeat_n(b'.', dots.min(len)));
            for _ in dots.min(len)..len {
                m.push(match rng.below(200) {
                    0 => b'\r',
                    1 => b'\n',
                    2..=5 => b'.',
                    6..=30 => b' ',
                    _ => b'a' + rng.below(26) as u8,
                });
            }
            m.extend_from_slice(ends[rng.below(ends.len())]);
        }
        if rng.one_in(3) {
            // No final line end, or a lone CR / LF / dot at the very end.
            let tail: &[&[u8]] = &[b"", b"x", b".", b"\r", b"\n", b"..", b"\r\r"];
            let cut = m.len().saturating_sub(rng.below(3));
            m.truncate(cut);
            m.extend_from_slice(tail[rng.below(tail.len())]);
        }
        m
    }

    /// Random chunks of `m`; often cut right after a CR (a CR ending a chunk, a CRLF
    /// split between chunks); empty chunks too.
    fn chunks<'a>(rng: &mut Rng, m: &'a [u8]) -> Vec<&'a [u8]> {
        let max = [1, 3, 16, 100, 1000, 1 << 20][rng.below(6)];
        let after_cr = rng.one_in(2);
        let mut out = Vec::new();
        let mut rest = m;
        while !rest.is_empty() {
            let mut n = rng.below(max.min(rest.len()) + 1);
            if after_cr && n > 0 {
                if let Some(p) = memchr::memchr(b'\r', &rest[..n]) {
                    n = p + 1;
                }
            }
            out.push(&rest[..n]);
            rest = &rest[n..];
        }
        out
    }

    /// The dispatched block skipping (AVX2 where the CPU has it) agrees with the
    /// portable build at every start on random mail, CRLF mail and its wire form.
    #[test]
    fn block_skipping_builds_agree() {
        let mut rng = Rng(0xB10C_5C1F);
        for round in 0..3000 {
            let mut m = message(&mut rng, 40);
            if round % 3 == 0 {
                // Mostly CRLF, where long skips happen.
                m = m
                    .split(|&b| b == b'\n')
                    .flat_map(|l| l.iter().copied().chain(*b"\r\n"))
                    .collect();
            }
            for _ in 0..8 {
                if m.len() < 2 {
                    break;
                }
                let i = 1 + rng.below(m.len() - 1);
                assert_eq!(
                    skip_verbatim_blocks(&m, i),
                    skip_verbatim_blocks_any(&m, i),
                    "round {round}, start {i}"
                );
            }
        }
    }

    #[test]
    fn random_mail_matches_reference_in_any_chunking() {
        let mut rng = Rng(0x005E_ED0F_D075);
        for round in 0..6_000 {
            let lines = if round % 100 == 0 { 600 } else { 40 };
            let m = message(&mut rng, lines);
            let top = match rng.below(3) {
                0 => Some(rng.below(12) as u64),
                _ => None,
            };
            let (want, cut, size) = reference(&m, top);
            for _ in 0..4 {
                let chunks = chunks(&mut rng, &m);
                // Sometimes as the Python binding does: the verbatim scan first.
                let verbatim_first = rng.one_in(2);
                let mut s = DotStuffer::new(top);
                let mut c = SizeCounter::new();
                let mut out = Vec::new();
                for chunk in &chunks {
                    if verbatim_first && s.feed_verbatim(chunk) {
                        out.extend_from_slice(chunk);
                    } else {
                        s.feed_into(chunk, &mut out).unwrap();
                    }
                    c.feed(chunk).unwrap();
                    assert!(want.starts_with(&out), "{chunks:?} {top:?}");
                }
                s.finish_into(&mut out).unwrap();
                assert_eq!(
                    out.escape_ascii().to_string(),
                    want.escape_ascii().to_string(),
                    "{chunks:?} {top:?}"
                );
                assert_eq!(s.done(), cut, "{chunks:?} {top:?}");
                assert_eq!(c.finish().unwrap(), size, "{chunks:?}");
            }
            assert_eq!(stuff(&m, top), want);
            assert_eq!(wire_size(&m), size);
        }
    }

    /// The 32-octet LF path with an LF, a dotted line start and an empty line at every
    /// place of two steps (quarter and step edges, a dot carried over from the step
    /// before, a message that begins with a dot), against the reference.
    #[test]
    fn lf_steps_at_every_place() {
        let base: Vec<u8> = (0..160).map(|k| b'a' + (k % 26) as u8).collect();
        for p in 0..96 {
            for shape in [&b"\n"[..], b"\n.", b"\n\n", b"\n..", b"\n.\n.", b"\n\n."] {
                let mut m = base.clone();
                m[p..p + shape.len()].copy_from_slice(shape);
                m.push(b'\n');
                for lead in [&b""[..], b".", b"\n."] {
                    let msg = [lead, &m[..]].concat();
                    let (want, _, size) = reference(&msg, None);
                    assert_eq!(
                        stuff(&msg, None).escape_ascii().to_string(),
                        want.escape_ascii().to_string(),
                        "place {p}, shape {shape:?}, lead {lead:?}"
                    );
                    assert_eq!(wire_size(&msg), size);
                }
            }
        }
    }

    /// LF mail for the 32-octet steps: at least `target` octets of lines of up to
    /// `longest` letters, empty lines, dotted line starts and `..` runs (`dense`: also
    /// `\n\n.\n`), and in one message out of `cr_one_in` a CR at a random place.
    fn lf_mail(
        rng: &mut Rng,
        target: usize,
        longest: usize,
        dense: bool,
        cr_one_in: usize,
    ) -> Vec<u8> {
        let mut m = Vec::new();
        while m.len() < target {
            match rng.below(if dense { 7 } else { 6 }) {
                0 => m.push(b'\n'),
                1 => m.extend_from_slice(b"\n."),
                2 => m.extend_from_slice(b".."),
                3 if dense => m.extend_from_slice(b"\n\n.\n"),
                _ => {
                    for _ in 0..rng.below(longest) {
                        m.push(b'a' + rng.below(26) as u8);
                    }
                    m.push(b'\n');
                }
            }
        }
        if rng.one_in(cr_one_in) {
            let at = rng.below(m.len());
            m.insert(at, b'\r');
        }
        m
    }

    /// LF mail of at least `target` octets: lines of `shortest` to `shortest + spread
    /// - 1` letters, one in `dot_one_in` of them starting with a dot.
    fn letter_lines(
        rng: &mut Rng,
        target: usize,
        dot_one_in: usize,
        shortest: usize,
        spread: usize,
    ) -> Vec<u8> {
        let mut m = Vec::new();
        while m.len() < target {
            if rng.one_in(dot_one_in) {
                m.push(b'.');
            }
            for _ in 0..shortest + rng.below(spread) {
                m.push(b'a' + rng.below(26) as u8);
            }
            m.push(b'\n');
        }
        m
    }

    /// The 32-octet LF path on what it is for and at its edges: LF mail with dots and
    /// empty lines, LFs and dots at every place of a step (31/32 included), a CR late
    /// in the message (it stops there), written into a buffer that already holds some
    /// output, in any chunking.
    #[test]
    fn lf_steps_match_reference() {
        let mut rng = Rng(0x000F_A575_7E95);
        for round in 0..4_000 {
            let target = 64 + rng.below(if round % 10 == 0 { 5_000 } else { 400 });
            let mut m = lf_mail(&mut rng, target, 70, false, 4);
            if rng.one_in(3) {
                m.pop(); // maybe no final line end
            }
            let (want, _, size) = reference(&m, None);
            assert_eq!(stuff(&m, None), want, "{}", m.escape_ascii());
            assert_eq!(wire_size(&m), size);
            let mut out = b"+OK earlier output\r\n".to_vec();
            let mut s = DotStuffer::new(None);
            for chunk in chunks(&mut rng, &m) {
                s.feed_into(chunk, &mut out).unwrap();
            }
            s.finish_into(&mut out).unwrap();
            assert_eq!(&out[..20], b"+OK earlier output\r\n");
            assert_eq!(
                out[20..].escape_ascii().to_string(),
                want.escape_ascii().to_string()
            );
        }
    }

    /// The LF path writes in runs that fit the output's capacity: whatever the capacity
    /// it starts with, the octets are the same; and mail whose stuffed form fits what
    /// `feed_into` reserves (lines of 16 octets or more) is stuffed without growing the
    /// buffer, which would copy all of it.
    #[test]
    fn lf_steps_fit_the_capacity() {
        let mut rng = Rng(0x0C0F_FEE5_CA9A);
        for round in 0..600 {
            let short = round % 2 == 0; // lines of 0-3 octets: nearly twice the input
            let target = 64 + rng.below(if round % 10 == 0 { 200_000 } else { 3_000 });
            let (shortest, spread) = if short { (0, 4) } else { (16, 70) };
            let m = letter_lines(&mut rng, target, 9, shortest, spread);
            let (want, _, _) = reference(&m, None);
            let mut s = DotStuffer::new(None);
            let mut out = Vec::new();
            s.feed_into(&m, &mut out).unwrap();
            let reserved = m.len() + m.len() / 16 + 8;
            if !short {
                assert_eq!(out.capacity(), reserved, "grew on {} octets", m.len());
            }
            s.finish_into(&mut out).unwrap();
            assert_eq!(out, want);
            #[cfg(target_arch = "x86_64")]
            for cap in [0, 1, 79, 80, 81, 144, 145, 1_000, m.len()] {
                let mut out = Vec::with_capacity(cap);
                let (i, at_line_start) = lf_lines(&m, 0, true, &mut out);
                let mut prefix = Vec::new();
                DotStuffer::new(None)
                    .feed_into(&m[..i], &mut prefix)
                    .unwrap();
                assert_eq!(out, prefix, "capacity {cap}");
                assert_eq!(at_line_start, i == 0 || m[i - 1] == b'\n');
                assert!(i + TAIL > m.len(), "stopped at {i} of {}", m.len());
            }
        }
    }

    /// Each 32-octet kernel this CPU has (AVX2, and AVX-512 where present: the other
    /// tests run only the one `lf_lines` picks) gives the same octets, stop and line
    /// state, a prefix of the reference, on LF mail with dots, empty lines and a CR.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lf_kernels_agree() {
        let kernels: Vec<LfKernel> = [LfKernel::Avx2, LfKernel::Avx512]
            .into_iter()
            .filter(|k| k.supported())
            .collect();
        eprintln!("LF kernels on this CPU: {kernels:?}");
        let mut rng = Rng(0x00AB_CDEF_0123);
        for round in 0..6_000 {
            let target = 64 + rng.below(if round % 20 == 0 { 20_000 } else { 600 });
            let m = lf_mail(&mut rng, target, 40, true, 5);
            let start = rng.below(40);
            let at_line_start = start == 0 || rng.one_in(2);
            let (want, _, _) = reference(&m[start..], None);
            let mut first: Option<(usize, bool, Vec<u8>)> = None;
            for &kernel in &kernels {
                let mut out = Vec::new();
                let (i, after) = lf_lines_with(kernel, &m, start, at_line_start, &mut out);
                if at_line_start {
                    assert!(want.starts_with(&out), "{kernel:?}: {}", m.escape_ascii());
                }
                assert!(i >= start && (i - start).is_multiple_of(LANE));
                let got = (i, after, out);
                match &first {
                    None => first = Some(got),
                    Some(f) => assert_eq!(f, &got, "{kernel:?} on {}", m.escape_ascii()),
                }
                // The counting kernel: the octets of the stuffed form up to where it
                // stops (at a step with a CR, or the input's last whole step).
                let end = start + (m.len() - start) / LANE * LANE;
                #[allow(unsafe_code)]
                // SAFETY: the kernel reads m[start..end]; the CPU has its features.
                let (stop, after, octets, dots) = unsafe {
                    match kernel {
                        LfKernel::Avx2 => lf_count_avx2(m.as_ptr(), start, end, at_line_start),
                        LfKernel::Avx512 => lf_count_avx512(m.as_ptr(), start, end, at_line_start),
                    }
                };
                let step = if kernel == LfKernel::Avx2 {
                    LANE
                } else {
                    2 * LANE
                };
                let stop_step = &m[stop..(stop + step).min(end)];
                assert!(stop == end || memchr::memchr(b'\r', stop_step).is_some());
                assert!(memchr::memchr(b'\r', &m[start..stop]).is_none());
                assert_eq!(
                    after,
                    if stop == start {
                        at_line_start
                    } else {
                        m[stop - 1] == b'\n'
                    }
                );
                if at_line_start {
                    let mut prefix = Vec::new();
                    DotStuffer::new(None)
                        .feed_into(&m[start..stop], &mut prefix)
                        .unwrap();
                    assert_eq!(
                        octets + dots,
                        prefix.len(),
                        "{kernel:?} on {}",
                        m.escape_ascii()
                    );
                    assert_eq!(octets as u64, wire_size(&m[start..stop]), "{kernel:?}");
                }
            }
        }
    }

    /// `stuffed_len` then `feed_exact` give what `feed_into` gives, chunk by chunk, on
    /// random mail (every kind of line end, TOP cuts, any chunking), and
    /// `stuffed_len` changes nothing; a buffer one octet short is refused.
    #[test]
    fn exact_feed_matches_feed_into() {
        let mut rng = Rng(0x00E8_AC7F_EED5);
        for round in 0..3_000 {
            let lines = if round % 50 == 0 { 3_000 } else { 60 };
            let m = message(&mut rng, lines);
            let top = match rng.below(4) {
                0 => Some(rng.below(12) as u64),
                _ => None,
            };
            let mut a = DotStuffer::new(top);
            let mut b = DotStuffer::new(top);
            for chunk in chunks(&mut rng, &m) {
                let mut want = Vec::new();
                a.feed_into(chunk, &mut want).unwrap();
                let n = b.stuffed_len(chunk).unwrap();
                assert_eq!(n, b.stuffed_len(chunk).unwrap());
                if let Some(quick) = b.lf_stuffed_len(chunk) {
                    assert_eq!(quick, n, "{top:?} {}", chunk.escape_ascii());
                }
                assert_eq!(n, want.len() as u64, "{top:?} {}", chunk.escape_ascii());
                let mut buf = vec![MaybeUninit::<u8>::uninit(); want.len()];
                assert_eq!(b.feed_exact(chunk, &mut buf).unwrap(), want.len());
                // SAFETY: feed_exact wrote all of them.
                #[allow(unsafe_code)]
                let got: Vec<u8> = buf.iter().map(|o| unsafe { o.assume_init() }).collect();
                assert_eq!(got, want);
            }
            assert_eq!(a.finish().unwrap(), b.finish().unwrap());
            assert_eq!(a.done(), b.done());
            let (want, _, _) = reference(&m, top);
            let mut s = DotStuffer::new(top);
            let n = s.stuffed_len(&m).unwrap() as usize;
            if n > 0 {
                let mut short = vec![MaybeUninit::<u8>::uninit(); n - 1];
                assert_eq!(s.feed_exact(&m, &mut short), Err(WireError::OutputTooSmall));
            }
            assert!(want.len() >= n);
        }
        let mut s = DotStuffer::new(None);
        s.finish().unwrap();
        assert_eq!(s.stuffed_len(b"x"), Err(WireError::Finished));
    }

    /// `lf_stuffed_len` counts LF mail (a CR only near the end allowed), and leaves
    /// anything else to `stuffed_len`: a CR early, a TOP cut, a CR held back.
    #[test]
    fn lf_stuffed_len_takes_lf_mail() {
        #[cfg(target_arch = "x86_64")]
        let simd = LfKernel::best().is_some();
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        let mut rng = Rng(0x001F_57AF_F00D);
        for round in 0..2_000 {
            let target = 1 + rng.below(if round % 10 == 0 { 100_000 } else { 3_000 });
            let mut m = letter_lines(&mut rng, target, 8, 0, 80);
            let cr_at = match rng.below(3) {
                0 => None,
                1 => Some(m.len() - 1 - rng.below(m.len().min(64))), // near the end
                _ => Some(rng.below(m.len())),
            };
            if let Some(at) = cr_at {
                m.insert(at, b'\r');
            }
            let s = DotStuffer::new(None);
            let want = s.stuffed_len(&m).unwrap();
            // A count stops at the step (up to 64 octets) that holds the CR.
            let early = cr_at.is_some_and(|at| at + COUNT_TAIL < m.len());
            let late = cr_at.is_none_or(|at| at + 65 >= m.len());
            match s.lf_stuffed_len(&m) {
                Some(n) => {
                    assert_eq!(n, want, "{}", m.escape_ascii());
                    assert!(!early, "counted past an early CR");
                }
                None => assert!(!simd || !late, "refused LF mail of {} octets", m.len()),
            }
            assert_eq!(DotStuffer::new(Some(3)).lf_stuffed_len(&m), None);
        }
        let mut held = DotStuffer::new(None);
        held.feed(b"a\r").unwrap();
        assert_eq!(held.lf_stuffed_len(&[b'a'; 500]), None);
    }
}
