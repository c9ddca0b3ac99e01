//! `pypop._wire`: a thin pyo3 binding of the pure `pop3-wire` crate.
//!
//! The API is `pypop/_wire.pyi`; the behaviour is docs/wire.md. Every streaming call takes
//! a whole chunk (one FFI call per chunk, never per line or octet). Input may be any
//! bytes-like object (`bytes` is read in place, anything else is copied once through
//! `memoryview(x).tobytes()`, as the pure-Python twin does); output is always `bytes`.
//! Above [`RELEASE_GIL_ABOVE`] octets of input the work runs with the GIL released.

use pop3_wire as wire;
use pyo3::exceptions::{PyException, PyOverflowError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyMemoryView, PySet};
use std::cell::RefCell;
use std::ffi::{CStr, CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

// Python allocates pyo3 objects with 16-octet alignment at most: a codec type that needs
// more (SIMD state inside) would crash at run time, so refuse to build instead.
const _: () = {
    assert!(std::mem::align_of::<wire::LineFramer>() <= 16);
    assert!(std::mem::align_of::<wire::DotStuffer>() <= 16);
    assert!(std::mem::align_of::<wire::SizeCounter>() <= 16);
    assert!(std::mem::align_of::<wire::Unstuffer>() <= 16);
};

/// Inputs larger than this are processed without holding the GIL.
const RELEASE_GIL_ABOVE: usize = 64 * 1024;

/// Output is built in a reused buffer and copied once into the `bytes` result (fresh
/// large buffers cost page faults on every call). Buffers beyond this size are not kept.
const SCRATCH_KEEP: usize = 4 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's empty scratch buffer.
fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    SCRATCH.with(|cell| {
        // Taken out, not borrowed, so that a nested call just gets a fresh buffer.
        let mut buf = cell.take();
        buf.clear();
        let result = f(&mut buf);
        if buf.capacity() <= SCRATCH_KEEP {
            *cell.borrow_mut() = buf;
        }
        result
    })
}

/// Empties a per-object scratch buffer, dropping it if it grew too large.
fn reset(scratch: &mut Vec<u8>) {
    if scratch.capacity() > SCRATCH_KEEP {
        *scratch = Vec::new();
    } else {
        scratch.clear();
    }
}

fn value_error(e: wire::WireError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The argument as `bytes`: itself if it is one, else a copy of its buffer.
fn as_bytes<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.clone());
    }
    Ok(PyMemoryView::from(obj)?
        .call_method0("tobytes")?
        .cast_into::<PyBytes>()?)
}

/// Runs `f` on `data`, without the GIL if `data` is large. `bytes` are immutable, so
/// reading them with the GIL released is sound.
fn run<'a, T, F>(py: Python<'_>, data: &'a [u8], f: F) -> T
where
    F: Send + FnOnce(&'a [u8]) -> T,
    T: Send,
{
    if data.len() > RELEASE_GIL_ABOVE {
        py.detach(|| f(data))
    } else {
        f(data)
    }
}

/// A count argument: a Python int (anything with `__index__`), saturated to `u64::MAX`
/// if huge; negative ones are kept apart so that each caller raises its own `ValueError`.
#[derive(Debug, Clone, Copy)]
enum Count {
    Value(u64),
    Negative,
}

impl<'a, 'py> FromPyObject<'a, 'py> for Count {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match obj.extract::<i64>() {
            Ok(n) => Ok(u64::try_from(n).map_or(Count::Negative, Count::Value)),
            Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => Ok(if obj.lt(0)? {
                Count::Negative
            } else {
                Count::Value(u64::MAX)
            }),
            Err(e) => Err(e),
        }
    }
}

fn top_lines_arg(top_lines: Option<Count>) -> PyResult<Option<u64>> {
    match top_lines {
        None => Ok(None),
        Some(Count::Value(n)) => Ok(Some(n)),
        Some(Count::Negative) => Err(PyValueError::new_err("top_lines must not be negative")),
    }
}

/// Splits a byte stream into command lines (server side, lenient line ends).
#[pyclass(module = "pypop._wire")]
struct LineFramer {
    inner: wire::LineFramer,
}

#[pymethods]
impl LineFramer {
    #[new]
    #[pyo3(signature = (max_line = Count::Value(255)), text_signature = "(max_line=255)")]
    fn new(max_line: Count) -> PyResult<Self> {
        let max_line = match max_line {
            Count::Value(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Count::Negative => 0,
        };
        Ok(LineFramer {
            inner: wire::LineFramer::new(max_line).map_err(value_error)?,
        })
    }

    #[getter]
    fn max_line(&self) -> usize {
        self.inner.max_line()
    }

    /// Octets held for an incomplete line (0 while skipping an overlong one).
    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }

    /// Every line completed by ``data``, without its line end; ``None`` marks an overlong line.
    fn feed<'py>(
        &mut self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let data = as_bytes(data)?;
        let data = data.as_bytes();
        let list = PyList::empty(py);
        if data.len() > RELEASE_GIL_ABOVE {
            let framer = &mut self.inner;
            let lines = py.detach(|| framer.feed(data));
            for line in lines {
                list.append(line.map(|l| PyBytes::new(py, &l)))?;
            }
        } else {
            let mut result = Ok(());
            self.inner.feed_with(data, |line| {
                if result.is_ok() {
                    result = list.append(line.map(|l| PyBytes::new(py, l)));
                }
            });
            result?;
        }
        Ok(list)
    }

    /// Forget buffered input and any overlong-skip state (used at STLS).
    fn clear(&mut self) {
        self.inner.clear();
    }
}

/// Streams a stored message as a multi-line response body (RFC 1939 §3).
#[pyclass(module = "pypop._wire")]
struct DotStuffer {
    inner: wire::DotStuffer,
    scratch: Vec<u8>,
}

#[pymethods]
impl DotStuffer {
    #[new]
    #[pyo3(signature = (top_lines = None))]
    fn new(top_lines: Option<Count>) -> PyResult<Self> {
        let top_lines = top_lines_arg(top_lines)?;
        Ok(DotStuffer {
            inner: wire::DotStuffer::new(top_lines),
            scratch: Vec::new(),
        })
    }

    /// True once a TOP cut is complete; further input is ignored.
    #[getter]
    fn done(&self) -> bool {
        self.inner.done()
    }

    fn feed<'py>(
        &mut self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = as_bytes(data)?;
        let DotStuffer { inner, scratch } = self;
        reset(scratch);
        // One GIL release for all three: mail stored in the wire form goes out as the
        // same object (no copy); LF mail is counted, then stuffed straight into its
        // `bytes` (a scratch buffer would cost a copy of the block); anything else is
        // stuffed into scratch (counting CRLF mail costs as much as stuffing it).
        let plan = run(py, data.as_bytes(), |d| {
            if inner.feed_verbatim(d) {
                return Ok(Plan::Same);
            }
            if d.len() > RELEASE_GIL_ABOVE {
                if let Some(len) = inner.lf_stuffed_len(d) {
                    return Ok(Plan::Exact(len));
                }
            }
            inner.feed_into(d, scratch).map(|()| Plan::Scratch)
        })
        .map_err(value_error)?;
        match plan {
            Plan::Same => Ok(data),
            Plan::Exact(len) => exact_bytes(py, inner, data.as_bytes(), len),
            Plan::Scratch => Ok(PyBytes::new(py, scratch)),
        }
    }

    /// Pending octets, a CRLF if the output does not end a line, then ".\\r\\n".
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.inner.finish().map_err(value_error)?;
        Ok(PyBytes::new(py, &out))
    }
}

/// How [`DotStuffer::feed`] answers a chunk.
enum Plan {
    /// The chunk is its own stuffed form.
    Same,
    /// A `bytes` of this many octets, stuffed into in place.
    Exact(u64),
    /// The stuffed form is in scratch.
    Scratch,
}

/// A new `bytes` of `len` octets (`stuffed_len(data)`) that `inner` stuffs `data` into,
/// in place and with the GIL released.
#[allow(unsafe_code)] // a `bytes` filled after it is made, as CPython's own code does
fn exact_bytes<'py>(
    py: Python<'py>,
    inner: &mut wire::DotStuffer,
    data: &[u8],
    len: u64,
) -> PyResult<Bound<'py, PyBytes>> {
    let n = usize::try_from(len)
        .ok()
        .filter(|&n| isize::try_from(n).is_ok())
        .ok_or_else(|| PyOverflowError::new_err("stuffed form too large"))?;
    // SAFETY: with a NULL source, PyBytes_FromStringAndSize makes a `bytes` of n octets
    // left uninitialised (or fails with an exception set); nothing else can see it
    // before it is returned, so its buffer may be written, without the GIL too.
    let bytes = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), n as isize),
        )?
        .cast_into_unchecked::<PyBytes>()
    };
    // SAFETY: the buffer of a `bytes` of n octets; `MaybeUninit` for the unwritten ones.
    let buf = unsafe {
        std::slice::from_raw_parts_mut(
            pyo3::ffi::PyBytes_AsString(bytes.as_ptr()).cast::<MaybeUninit<u8>>(),
            n,
        )
    };
    let written = py
        .detach(|| inner.feed_exact(data, buf))
        .map_err(value_error)?;
    if written != n {
        // Not reachable while stuffed_len counts what feed_exact writes; never hand
        // out a `bytes` with octets nobody wrote.
        return Err(PyValueError::new_err(
            "stuffed length differs from its count",
        ));
    }
    Ok(bytes)
}

/// Counts a message's POP3 size (RFC 1939 §11) without producing output: the message
/// with every line end made CRLF, not counting the CRLF added before the terminator.
#[pyclass(module = "pypop._wire")]
struct SizeCounter {
    inner: wire::SizeCounter,
}

#[pymethods]
impl SizeCounter {
    #[new]
    fn new() -> Self {
        SizeCounter {
            inner: wire::SizeCounter::new(),
        }
    }

    fn feed(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = as_bytes(data)?;
        let counter = &mut self.inner;
        run(py, data.as_bytes(), |d| counter.feed(d)).map_err(value_error)
    }

    fn finish(&mut self) -> PyResult<u64> {
        self.inner.finish().map_err(value_error)
    }
}

/// Client side: multi-line reply bytes in, message bytes out (strict CRLF).
#[pyclass(module = "pypop._wire")]
struct Unstuffer {
    inner: wire::Unstuffer,
    scratch: Vec<u8>,
}

#[pymethods]
impl Unstuffer {
    #[new]
    fn new() -> Self {
        Unstuffer {
            inner: wire::Unstuffer::new(),
            scratch: Vec::new(),
        }
    }

    #[getter]
    fn done(&self) -> bool {
        self.inner.done()
    }

    /// (message octets, None) until the terminator; then (octets, bytes after it).
    fn feed<'py>(
        &mut self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyBytes>, Option<Bound<'py, PyBytes>>)> {
        let data = as_bytes(data)?;
        let Unstuffer { inner, scratch } = self;
        reset(scratch);
        let rest =
            run(py, data.as_bytes(), |d| inner.feed_into(d, scratch)).map_err(value_error)?;
        Ok((PyBytes::new(py, scratch), rest.map(|r| PyBytes::new(py, r))))
    }
}

/// Whole-message DotStuffer: feed(message) + finish().
#[pyfunction]
#[pyo3(signature = (message, top_lines = None))]
fn stuff<'py>(
    py: Python<'py>,
    message: &Bound<'py, PyAny>,
    top_lines: Option<Count>,
) -> PyResult<Bound<'py, PyBytes>> {
    let top_lines = top_lines_arg(top_lines)?;
    let message = as_bytes(message)?;
    with_scratch(|out| {
        run(py, message.as_bytes(), |m| {
            wire::stuff_into(m, top_lines, out)
        });
        Ok(PyBytes::new(py, out))
    })
}

/// Whole-message SizeCounter.
#[pyfunction]
fn wire_size(py: Python<'_>, message: &Bound<'_, PyAny>) -> PyResult<u64> {
    let message = as_bytes(message)?;
    Ok(run(py, message.as_bytes(), wire::wire_size))
}

/// RFC 6856: is the header of this wire-form message US-ASCII (the first `limit`
/// octets when no empty line ends within them)? The GIL stays held: only the header is
/// read, never more than `limit` octets.
#[pyfunction]
#[pyo3(signature = (wire, limit = wire::HEADER_SCAN_LIMIT))]
fn wire_header_is_ascii(wire: &Bound<'_, PyAny>, limit: usize) -> PyResult<bool> {
    let wire = as_bytes(wire)?;
    Ok(wire::wire_header_is_ascii(wire.as_bytes(), limit))
}

/// Whole-buffer Unstuffer; raises ValueError if the terminator is missing.
#[pyfunction]
fn unstuff<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let data = as_bytes(data)?;
    with_scratch(|out| {
        let rest = run(py, data.as_bytes(), |d| wire::unstuff_into(d, out)).map_err(value_error)?;
        Ok((PyBytes::new(py, out), PyBytes::new(py, rest)))
    })
}

#[pyfunction]
fn constant_time_eq(a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(wire::constant_time_eq(
        as_bytes(a)?.as_bytes(),
        as_bytes(b)?.as_bytes(),
    ))
}

#[pyfunction]
fn apop_digest(timestamp: &Bound<'_, PyAny>, secret: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(wire::apop_digest(
        as_bytes(timestamp)?.as_bytes(),
        as_bytes(secret)?.as_bytes(),
    ))
}

#[pyfunction]
fn apop_verify(
    timestamp: &Bound<'_, PyAny>,
    secret: &Bound<'_, PyAny>,
    digest: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    Ok(wire::apop_verify(
        as_bytes(timestamp)?.as_bytes(),
        as_bytes(secret)?.as_bytes(),
        as_bytes(digest)?.as_bytes(),
    ))
}

#[pyfunction]
fn cram_md5_digest(secret: &Bound<'_, PyAny>, challenge: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(wire::cram_md5_digest(
        as_bytes(secret)?.as_bytes(),
        as_bytes(challenge)?.as_bytes(),
    ))
}

#[pyfunction]
fn cram_md5_verify(
    secret: &Bound<'_, PyAny>,
    challenge: &Bound<'_, PyAny>,
    digest: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    Ok(wire::cram_md5_verify(
        as_bytes(secret)?.as_bytes(),
        as_bytes(challenge)?.as_bytes(),
        as_bytes(digest)?.as_bytes(),
    ))
}

#[pyfunction]
fn cram_md5_context<'py>(
    py: Python<'py>,
    secret: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let context = wire::cram_md5_context(as_bytes(secret)?.as_bytes());
    Ok(PyBytes::new(py, &context))
}

#[pyfunction]
fn cram_md5_verify_context(
    context: &Bound<'_, PyAny>,
    challenge: &Bound<'_, PyAny>,
    digest: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    wire::cram_md5_verify_context(
        as_bytes(context)?.as_bytes(),
        as_bytes(challenge)?.as_bytes(),
        as_bytes(digest)?.as_bytes(),
    )
    .map_err(value_error)
}

#[pyfunction]
fn make_challenge(host: &str) -> PyResult<String> {
    wire::make_challenge(host).map_err(value_error)
}

/// A PROXY header (v1 or v2) at the start of `data`: None while incomplete, else
/// (length, version, local, source, source_port, destination, destination_port, ssl).
#[pyfunction]
#[pyo3(signature = (data, max_len = DEFAULT_PROXY_MAX), text_signature = "(data, max_len=1024)")]
#[allow(clippy::type_complexity)]
fn parse_proxy_header<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    max_len: usize,
) -> PyResult<
    Option<(
        usize,
        u8,
        bool,
        Bound<'py, PyBytes>,
        u16,
        Bound<'py, PyBytes>,
        u16,
        bool,
    )>,
> {
    let data = as_bytes(data)?;
    match wire::parse_proxy_header(data.as_bytes(), max_len) {
        Ok(None) => Ok(None),
        Ok(Some(h)) => Ok(Some((
            h.length,
            h.version,
            h.local,
            PyBytes::new(py, &h.source),
            h.source_port,
            PyBytes::new(py, &h.destination),
            h.destination_port,
            h.ssl,
        ))),
        Err(e) => Err(PyValueError::new_err(e.message())),
    }
}

/// The default bound of a PROXY header (v2 TLVs included).
const DEFAULT_PROXY_MAX: usize = 1024;

/// Whole small regular files, in order, read with the GIL released once for all of them
/// (a backend's read-ahead: one call instead of five system calls, each giving up and
/// taking back the GIL, per file). Stops at the first that cannot be read whole. With
/// `stuffed`, each comes in wire form (`stuff(contents)`), stuffed here without the GIL.
/// With `dir_fds`, each path is a plain name opened in the directory held by the
/// descriptor beside it (never by a path walk: the directory's path may lead elsewhere
/// by now).
#[pyfunction]
#[pyo3(signature = (paths, limit, stuffed = false, dir_fds = None))]
fn read_small_files<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    limit: usize,
    stuffed: bool,
    dir_fds: Option<Vec<libc::c_int>>,
) -> PyResult<Bound<'py, PyList>> {
    if let Some(fds) = &dir_fds {
        check_dir_fds(&paths, fds)?; // before any I/O
    }
    // All of them in one buffer, `ends` apart: no allocation per file in the worker.
    let (all, ends) = py.detach(|| {
        let mut dirs = Dirs::default();
        let mut all = Vec::new();
        let mut raw = Vec::new();
        let mut ends = Vec::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            let into = if stuffed { &mut raw } else { &mut all };
            let file = match &dir_fds {
                Some(fds) => open_at(fds[i], path.as_os_str().as_bytes()),
                None => open_message(&mut dirs, path),
            };
            if !read_small_file(file, limit, into) {
                break;
            }
            if stuffed {
                wire::stuff_into(&raw, None, &mut all);
                raw.clear();
            }
            ends.push(all.len());
        }
        (all, ends)
    });
    let mut start = 0;
    PyList::new(
        py,
        ends.iter().map(|&end| {
            let part = PyBytes::new(py, &all[start..end]);
            start = end;
            part
        }),
    )
}

/// `read_small_files`' arguments with `dir_fds`: one non-negative descriptor per path,
/// and each path a plain name (a `/` would walk from the held directory elsewhere).
fn check_dir_fds(paths: &[PathBuf], fds: &[libc::c_int]) -> PyResult<()> {
    if fds.len() != paths.len() {
        return Err(PyValueError::new_err(
            "dir_fds must hold one descriptor per path",
        ));
    }
    if fds.iter().any(|&fd| fd < 0) {
        return Err(PyValueError::new_err("negative file descriptor"));
    }
    if paths
        .iter()
        .any(|p| p.as_os_str().as_bytes().contains(&b'/'))
    {
        return Err(PyValueError::new_err(
            "with dir_fds, paths must be names without '/'",
        ));
    }
    Ok(())
}

/// A name without `/` (opened relative to a directory descriptor), else ValueError.
fn plain_name(path: &Path) -> PyResult<&[u8]> {
    let name = path.as_os_str().as_bytes();
    if name.contains(&b'/') {
        return Err(PyValueError::new_err(
            "with a dir_fd, the name must have no '/'",
        ));
    }
    Ok(name)
}

/// The whole contents of the regular file at `path` (fewer than `limit` octets) if the
/// kernel can give them without waiting: the path resolved from its caches alone
/// (`openat2` with `RESOLVE_CACHED`) and every octet in the page cache (`preadv2` with
/// `RWF_NOWAIT`). None for anything else (not cached, not a regular file, a symbolic
/// link, too large, shorter than `fstat` said, an error, a kernel without these calls):
/// the caller then reads it in a worker thread, where waiting costs the event loop
/// nothing. Saves a thread hop per large message when it is in memory.
///
/// With `dir_fd`, `path` is a plain name opened in that directory (also kept beneath
/// it: `RESOLVE_BENEATH`), never through the directory's path.
#[pyfunction]
#[pyo3(signature = (path, limit, dir_fd = None))]
fn read_file_now<'py>(
    py: Python<'py>,
    path: PathBuf,
    limit: u64,
    dir_fd: Option<libc::c_int>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let (dirfd, resolve) = match dir_fd {
        Some(fd) if fd < 0 => return Err(PyValueError::new_err("negative file descriptor")),
        Some(fd) => {
            plain_name(&path)?;
            (fd, libc::RESOLVE_CACHED | libc::RESOLVE_BENEATH)
        }
        None => (libc::AT_FDCWD, libc::RESOLVE_CACHED),
    };
    let Some((file, size)) = open_cached(dirfd, &path, resolve, limit) else {
        return Ok(None);
    };
    bytes_read_now(py, file.as_raw_fd(), 0, size)
}

/// `size` octets of the open file `fd` from `offset` if every one is in the page cache
/// (`preadv2` with `RWF_NOWAIT`, the GIL released); None if any is not, the file ends
/// before them, a read fails, or the call is not supported here. The later blocks of a
/// large message streamed on the event loop.
#[pyfunction]
fn read_at_now<'py>(
    py: Python<'py>,
    fd: libc::c_int,
    offset: u64,
    size: u64,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    if fd < 0 {
        return Err(PyValueError::new_err("negative file descriptor"));
    }
    bytes_read_now(py, fd, offset, size)
}

/// A new `bytes` of `size` octets read from `fd` at `offset` by [`read_all_now`], or
/// None (never a `bytes` with octets nobody wrote).
#[allow(unsafe_code)] // a `bytes` filled after it is made, as in exact_bytes
fn bytes_read_now<'py>(
    py: Python<'py>,
    fd: libc::c_int,
    offset: u64,
    size: u64,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let n = isize::try_from(size).map_err(|_| PyOverflowError::new_err("size too large"))?;
    if offset
        .checked_add(size)
        .is_none_or(|end| i64::try_from(end).is_err())
    {
        return Err(PyOverflowError::new_err("offset and size past 2**63 - 1"));
    }
    // SAFETY: with a NULL source, PyBytes_FromStringAndSize makes a `bytes` of n octets
    // left uninitialised (or fails with an exception set); nothing else can see it
    // before it is returned, so its buffer may be written, without the GIL too.
    let bytes = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), n),
        )?
        .cast_into_unchecked::<PyBytes>()
    };
    // SAFETY: the buffer of a `bytes` of n octets, as a raw address (Send) for the call.
    let buf = unsafe { pyo3::ffi::PyBytes_AsString(bytes.as_ptr()) } as usize;
    let whole = py.detach(|| read_all_now(fd, offset, buf as *mut u8, n as usize));
    Ok(whole.then_some(bytes))
}

/// `struct open_how` of openat2(2) (libc's cannot be built outside the crate).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// [`read_file_now`]'s open: the file and its size, or None.
#[allow(unsafe_code)]
fn open_cached(dirfd: libc::c_int, path: &Path, resolve: u64, limit: u64) -> Option<(File, u64)> {
    let name = CString::new(path.as_os_str().as_bytes()).ok()?;
    let how = OpenHow {
        flags: (libc::O_RDONLY
            | libc::O_NOFOLLOW
            | libc::O_NONBLOCK
            | libc::O_NOCTTY
            | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `dirfd` is AT_FDCWD or a descriptor the caller holds, `name` is
    // NUL-terminated and `how` a valid open_how of the size passed, all alive for the
    // call; a non-negative return is a new descriptor of ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let fd = libc::c_int::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: see above.
    let file = unsafe { File::from_raw_fd(fd) };
    let meta = file.metadata().ok()?;
    (meta.file_type().is_file() && meta.len() < limit).then_some((file, meta.len()))
}

/// Reads `size` octets of `fd` from `offset` into `buf` from the page cache alone;
/// false if any is not there, the file is shorter, or a read fails.
#[allow(unsafe_code)]
fn read_all_now(fd: libc::c_int, offset: u64, buf: *mut u8, size: usize) -> bool {
    let mut got = 0;
    while got < size {
        let iov = libc::iovec {
            // SAFETY: `buf` holds `size` writable octets; got < size.
            iov_base: unsafe { buf.add(got) }.cast(),
            iov_len: size - got,
        };
        // SAFETY: one iovec within `buf`'s octets; the kernel writes at most iov_len.
        let n = unsafe {
            libc::preadv2(
                fd,
                &iov,
                1,
                (offset + got as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(0) => return false, // shorter than fstat said
            Ok(n) => got += n,
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
            }
            Err(_) => return false, // EAGAIN: not all in memory; or not supported here
        }
    }
    true
}

/// Whether the files named in `names` (NUL-terminated paths relative to `directory`)
/// still have the size, mtime (ns) and inode in `stats` (three little-endian 64-bit
/// numbers each: size and inode unsigned, mtime signed), by `lstat`: the check a cached
/// listing makes of sizes counted from the content. False at the first difference or
/// failure (the caller scans again, and meets the failure there); the GIL is released
/// for all of them.
#[pyfunction]
fn files_unchanged(
    py: Python<'_>,
    directory: PathBuf,
    names: &Bound<'_, PyBytes>,
    stats: &Bound<'_, PyBytes>,
) -> PyResult<bool> {
    let (names, stats) = (names.as_bytes(), stats.as_bytes());
    if !names.is_empty() && names.last() != Some(&0) {
        return Err(PyValueError::new_err("names must end with a NUL"));
    }
    let count = names.iter().filter(|&&b| b == 0).count();
    if stats.len() != count * 24 {
        return Err(PyValueError::new_err("stats must hold 24 octets per name"));
    }
    if count == 0 {
        return Ok(true);
    }
    Ok(py.detach(|| {
        let Some(dir) = open_dir(&directory) else {
            return false;
        };
        let number = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 octets"));
        names
            .split_inclusive(|&b| b == 0)
            .zip(stats.chunks_exact(24))
            .all(|(name, want)| {
                let Ok(name) = CStr::from_bytes_with_nul(name) else {
                    return false;
                };
                let mut st = MaybeUninit::<libc::stat>::uninit();
                // SAFETY: `name` is NUL-terminated and `st` is writable for a struct stat;
                // both outlive the call, and `dir` is an open descriptor.
                let rc = unsafe {
                    libc::fstatat(
                        dir.as_raw_fd(),
                        name.as_ptr(),
                        st.as_mut_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                if rc != 0 {
                    return false;
                }
                // SAFETY: fstatat returned 0, so it filled `st`.
                let st = unsafe { st.assume_init() };
                let mtime_ns =
                    i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec);
                u64::try_from(st.st_size).ok() == Some(number(&want[..8]))
                    && mtime_ns == i128::from(number(&want[8..16]) as i64)
                    && st.st_ino == number(&want[16..])
            })
    }))
}

/// The directory of the last file opened: the next file in it is opened relative to it,
/// without the kernel walking the whole path again.
#[derive(Default)]
struct Dirs {
    path: Vec<u8>,
    fd: Option<OwnedFd>,
}

impl Dirs {
    /// A descriptor of `path` (O_PATH: enough to open what is in it), kept for the next.
    fn get(&mut self, path: &[u8]) -> Option<BorrowedFd<'_>> {
        if self.fd.is_none() || self.path != path {
            self.fd = None;
            let dir = open_dir(Path::new(OsStr::from_bytes(path)))?;
            self.path.clear();
            self.path.extend_from_slice(path);
            self.fd = Some(dir);
        }
        self.fd.as_ref().map(|fd| fd.as_fd())
    }
}

/// A descriptor of the directory `path` (O_PATH: enough to open or stat what is in it).
fn open_dir(path: &Path) -> Option<OwnedFd> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(path)
        .ok()?;
    Some(dir.into())
}

/// Appends the file's octets to `out` if it is a regular file (never through a symbolic
/// link) of fewer than `limit` octets; false, with `out` as it was, for anything else or
/// a failure. Reads exactly as many octets as fstat reported (one read), asking for one
/// more to see a file that grew.
fn read_small_file(file: Option<File>, limit: usize, out: &mut Vec<u8>) -> bool {
    let Some(file) = file else {
        return false;
    };
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.file_type().is_file() {
        return false;
    }
    let Ok(size) = usize::try_from(meta.len()) else {
        return false;
    };
    if size >= limit {
        return false;
    }
    let start = out.len();
    // Read into uninitialised capacity: zeroing it first (vec![0; n]) cost more
    // instructions than the rest of the call.
    out.reserve(size + 1);
    let fd = file.as_raw_fd();
    while out.len() - start < size {
        let want = size + 1 - (out.len() - start);
        let spare = &mut out.spare_capacity_mut()[..want];
        // SAFETY: `spare` is writable memory of `spare.len()` octets owned by `out`; the
        // kernel writes at most that many, and only the `n` it reports are kept.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
        match usize::try_from(n) {
            Ok(0) => break, // shorter than fstat said: what is there
            // SAFETY: the kernel initialised these `n` octets (n <= spare.len()).
            Ok(n) => unsafe { out.set_len(out.len() + n) },
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
            }
            Err(_) => {
                out.truncate(start);
                return false;
            }
        }
    }
    if out.len() - start > size {
        out.truncate(start);
        return false; // grew since fstat
    }
    true
}

/// Opens a message file for reading: relative to its directory's descriptor when the
/// path ends in a plain name (`dir/name`), else by the whole path.
fn open_message(dirs: &mut Dirs, path: &Path) -> Option<File> {
    let bytes = path.as_os_str().as_bytes();
    match bytes.iter().rposition(|&b| b == b'/') {
        Some(slash) if !matches!(&bytes[slash + 1..], b"" | b"." | b"..") => {
            let dir = if slash == 0 {
                &bytes[..1]
            } else {
                &bytes[..slash]
            };
            open_at(dirs.get(dir)?.as_raw_fd(), &bytes[slash + 1..])
        }
        _ => open_at(libc::AT_FDCWD, bytes),
    }
}

/// Opens `name` relative to `dirfd` for reading. O_NOFOLLOW: never through a symbolic
/// link; O_NONBLOCK: a FIFO opens at once instead of hanging.
#[allow(unsafe_code)]
fn open_at(dirfd: libc::c_int, name: &[u8]) -> Option<File> {
    const FLAGS: libc::c_int =
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    let name = CString::new(name).ok()?;
    // SAFETY: `dirfd` is AT_FDCWD or a descriptor the caller keeps open, and `name` a
    // NUL-terminated string alive for the call; the descriptor returned is ours alone.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), FLAGS) };
    // SAFETY: a non-negative return is a new descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

/// What [`answer_fetches`] hands back: lines answered, RETRs among them, their message
/// octets, octets queued, the set of retrieved indexes, the line it took but could not
/// answer from the source (the engine's Retrieve event), DELEs among the lines
/// answered, and their message octets.
type Fetches<'py> = (
    usize,
    usize,
    u64,
    usize,
    Option<Bound<'py, PySet>>,
    Option<(usize, Option<u64>)>,
    usize,
    u64,
);

static TOP_OK: PyOnceLock<Py<PyBytes>> = PyOnceLock::new();

/// A message's size from the engine's list, or None where it is not an octet count.
fn size_at(sizes: &Bound<'_, PyList>, index: usize) -> PyResult<Option<u64>> {
    Ok(sizes.get_item(index)?.extract::<u64>().ok())
}

/// The engine's TRANSACTION-state quick path (docs/wire.md): answers `lines[at:]` while
/// each is a plain `RETR n` / `TOP n m` of a live message that `source(index, top)` has
/// in wire form, or a plain `DELE n` of a live message, within `budget` lines and
/// `room` octets queued onto `out`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn answer_fetches<'py>(
    py: Python<'py>,
    lines: &Bound<'py, PyList>,
    at: usize,
    budget: usize,
    sizes: &Bound<'py, PyList>,
    deleted: &Bound<'py, PyByteArray>,
    source: &Bound<'py, PyAny>,
    out: &Bound<'py, PyList>,
    room: usize,
    octets_line: bool,
    check_ascii: bool,
    retrieved: Option<Bound<'py, PySet>>,
    dele_ok: &Bound<'py, PyBytes>,
) -> PyResult<Fetches<'py>> {
    use wire::Download;
    let mut retrieved = retrieved;
    let (mut answered, mut retrs, mut octets, mut queued) = (0usize, 0usize, 0u64, 0usize);
    let (mut deletes, mut deleted_octets) = (0usize, 0u64);
    let mut miss = None;
    while answered < budget && queued < room {
        let Ok(item) = lines.get_item(at + answered) else {
            break; // the end of the window
        };
        let Ok(line) = item.cast::<PyBytes>() else {
            break; // None: an overlong line
        };
        let Some(command) = wire::plain_download(line.as_bytes()) else {
            break;
        };
        let (msg, top) = match command {
            Download::Retr(m) => (m, None),
            Download::Top(m, n) => (m, Some(n)),
            Download::Dele(m) => (m, None),
        };
        let index = match usize::try_from(msg) {
            Ok(m) if (1..=sizes.len()).contains(&m) => m - 1,
            _ => break,
        };
        // SAFETY: the octet is copied out at once; no Python code runs meanwhile.
        if unsafe { deleted.as_bytes() }.get(index) != Some(&0) {
            break; // no such message, or "already deleted": the general path's -ERR
        }
        if let Download::Dele(_) = command {
            if dele_ok.as_bytes().is_empty() {
                break; // the engine's reply text cannot be a status line
            }
            let Some(size) = size_at(sizes, index)? else {
                break;
            };
            // SAFETY: no other view of the buffer is alive, and no Python code runs
            // while this one is.
            let marks = unsafe { deleted.as_bytes_mut() };
            marks[index] = 1;
            deletes += 1;
            deleted_octets += size;
            queued += dele_ok.as_bytes().len();
            out.append(dele_ok)?;
            answered += 1;
            continue;
        }
        let size = match top {
            Some(_) => 0,
            None if !octets_line => break, // an operator's wording of "+OK n octets"
            None => match size_at(sizes, index)? {
                Some(size) => size,
                None => break, // not a size: the engine's general path formats it
            },
        };
        // From here on the line is taken: answered, or handed back as the miss.
        let wire = match source.call1((index, top)) {
            Ok(w) => w.cast_into::<PyBytes>().ok(),
            Err(e) if e.is_instance_of::<PyException>(py) => None,
            Err(e) => return Err(e),
        };
        let wire = wire.filter(|w| {
            !check_ascii || wire::wire_header_is_ascii(w.as_bytes(), wire::HEADER_SCAN_LIMIT)
        });
        let Some(wire) = wire else {
            miss = Some((index, top));
            break;
        };
        let header = match top {
            Some(_) => TOP_OK
                .get_or_init(py, || PyBytes::new(py, b"+OK\r\n").unbind())
                .bind(py)
                .clone(),
            None => {
                let mut buf = [0u8; 48];
                let left = {
                    let mut cur = &mut buf[..];
                    write!(cur, "+OK {size} octets\r\n").expect("48 octets hold any u64");
                    cur.len()
                };
                let n = buf.len() - left;
                retrs += 1;
                octets += size;
                let set = match &retrieved {
                    Some(s) => s,
                    None => retrieved.insert(PySet::empty(py)?),
                };
                set.add(index)?;
                PyBytes::new(py, &buf[..n])
            }
        };
        queued += header.as_bytes().len() + wire.as_bytes().len();
        out.append(header)?;
        out.append(wire)?;
        answered += 1;
    }
    Ok((
        answered,
        retrs,
        octets,
        queued,
        retrieved,
        miss,
        deletes,
        deleted_octets,
    ))
}

/// The compiled wire codec (rust/pop3-wire); docs/wire.md is its specification.
#[pymodule]
fn _wire(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_MAX_LINE", wire::DEFAULT_MAX_LINE)?;
    m.add("HEADER_SCAN_LIMIT", wire::HEADER_SCAN_LIMIT)?;
    m.add("IMPLEMENTATION", "rust")?;
    m.add("MAX_TOP_LINES", wire::MAX_TOP_LINES)?;
    m.add_class::<LineFramer>()?;
    m.add_class::<DotStuffer>()?;
    m.add_class::<SizeCounter>()?;
    m.add_class::<Unstuffer>()?;
    m.add_function(wrap_pyfunction!(stuff, m)?)?;
    m.add_function(wrap_pyfunction!(wire_size, m)?)?;
    m.add_function(wrap_pyfunction!(wire_header_is_ascii, m)?)?;
    m.add_function(wrap_pyfunction!(unstuff, m)?)?;
    m.add_function(wrap_pyfunction!(constant_time_eq, m)?)?;
    m.add_function(wrap_pyfunction!(apop_digest, m)?)?;
    m.add_function(wrap_pyfunction!(apop_verify, m)?)?;
    m.add_function(wrap_pyfunction!(cram_md5_digest, m)?)?;
    m.add_function(wrap_pyfunction!(cram_md5_verify, m)?)?;
    m.add_function(wrap_pyfunction!(cram_md5_context, m)?)?;
    m.add_function(wrap_pyfunction!(cram_md5_verify_context, m)?)?;
    m.add_function(wrap_pyfunction!(make_challenge, m)?)?;
    m.add("PROXY_HEADER_MAX", DEFAULT_PROXY_MAX)?;
    m.add_function(wrap_pyfunction!(parse_proxy_header, m)?)?;
    m.add_function(wrap_pyfunction!(read_small_files, m)?)?;
    m.add_function(wrap_pyfunction!(read_file_now, m)?)?;
    m.add_function(wrap_pyfunction!(read_at_now, m)?)?;
    m.add_function(wrap_pyfunction!(files_unchanged, m)?)?;
    m.add_function(wrap_pyfunction!(answer_fetches, m)?)?;
    Ok(())
}
