//! Layer compression and the one-pass hashing stream.
//!
//! A layer tar flows through [`LayerStream`]: the uncompressed bytes are
//! hashed (the diff ID), compressed, and the compressed bytes hashed again
//! (the blob digest) and counted on their way to the sink. Nothing is read
//! twice. Gzip is compressed in parallel pigz-style ([`ParallelGzip`]), zstd
//! with libzstd's worker threads; hashing and writing the compressed bytes
//! happens on a thread of its own ([`BackgroundWriter`]), so it overlaps
//! with tarring and hashing the input.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc;

use flate2::{Compress, FlushCompress, Status};
use sha2::{Digest, Sha256};

/// How layer blobs are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompressionKind {
    /// Plain tar.
    Uncompressed,
    /// gzip (the default, as in BuildKit).
    Gzip,
    /// zstd.
    Zstd,
}

/// A compression and its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// The algorithm.
    pub kind: CompressionKind,
    /// Level; `None` is the algorithm's default (gzip
    /// [`DEFAULT_GZIP_LEVEL`], zstd 3).
    pub level: Option<i32>,
}

/// gzip level when none is asked for: 5, the default of containers/image
/// (buildah, podman, skopeo). zlib's own default, 6, took 10-20 % longer
/// on real layers for about 1 % smaller output (bench/EXPORT.md).
pub const DEFAULT_GZIP_LEVEL: i32 = 5;

impl Default for Compression {
    fn default() -> Self {
        Compression { kind: CompressionKind::Gzip, level: None }
    }
}

/// OCI layer media type of a plain tar.
pub const MEDIA_TYPE_OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI layer media type of a gzip tar.
pub const MEDIA_TYPE_OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI layer media type of a zstd tar.
pub const MEDIA_TYPE_OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker layer media type of a plain tar.
pub const MEDIA_TYPE_DOCKER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker layer media type of a gzip tar.
pub const MEDIA_TYPE_DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

impl CompressionKind {
    /// Parse `gzip`, `zstd` or `uncompressed` (buildx spelling).
    pub fn parse(s: &str) -> Option<CompressionKind> {
        match s {
            "gzip" => Some(CompressionKind::Gzip),
            "zstd" => Some(CompressionKind::Zstd),
            "uncompressed" => Some(CompressionKind::Uncompressed),
            _ => None,
        }
    }

    /// Valid levels, inclusive.
    pub fn level_range(self) -> (i32, i32) {
        match self {
            CompressionKind::Uncompressed => (0, 0),
            CompressionKind::Gzip => (0, 9),
            CompressionKind::Zstd => (1, 22),
        }
    }

    /// The OCI layer media type. Snapshot blob records always use this
    /// spelling; manifests map it with [`layer_media_type`].
    pub fn oci_media_type(self) -> &'static str {
        match self {
            CompressionKind::Uncompressed => MEDIA_TYPE_OCI_TAR,
            CompressionKind::Gzip => MEDIA_TYPE_OCI_GZIP,
            CompressionKind::Zstd => MEDIA_TYPE_OCI_ZSTD,
        }
    }

    /// The compression a layer media type (OCI or Docker spelling) names.
    pub fn from_media_type(media_type: &str) -> Option<CompressionKind> {
        match media_type {
            MEDIA_TYPE_OCI_TAR | MEDIA_TYPE_DOCKER_TAR => Some(CompressionKind::Uncompressed),
            MEDIA_TYPE_OCI_GZIP | MEDIA_TYPE_DOCKER_GZIP => Some(CompressionKind::Gzip),
            MEDIA_TYPE_OCI_ZSTD => Some(CompressionKind::Zstd),
            _ => None,
        }
    }
}

/// The media type a layer of `kind` gets in a manifest. Docker has no zstd
/// layer type, so zstd layers keep the OCI type in both (as BuildKit does).
pub fn layer_media_type(kind: CompressionKind, oci: bool) -> &'static str {
    match (kind, oci) {
        (_, true) | (CompressionKind::Zstd, false) => kind.oci_media_type(),
        (CompressionKind::Uncompressed, false) => MEDIA_TYPE_DOCKER_TAR,
        (CompressionKind::Gzip, false) => MEDIA_TYPE_DOCKER_GZIP,
    }
}

/// What a finished [`LayerStream`] measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDigests {
    /// `sha256:` of the uncompressed bytes.
    pub diff_id: String,
    /// `sha256:` of the compressed bytes.
    pub digest: String,
    /// Compressed size.
    pub size: u64,
    /// Uncompressed size.
    pub uncompressed_size: u64,
}

/// `sha256:<hex>` of finished hasher.
pub(crate) fn digest_string(hasher: Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    digest_string(Sha256::new_with_prefix(bytes))
}

/// Hashes and counts what passes through to `inner`.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder<W: Write + Send + 'static> {
    Plain(W),
    Gzip(ParallelGzip<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

/// Uncompressed bytes in; diff ID, blob digest and size out; compressed
/// bytes to the sink. One pass.
pub struct LayerStream<W: Write + Send + 'static> {
    hasher: Sha256,
    count: u64,
    encoder: Encoder<BackgroundWriter<HashingWriter<W>>>,
}

/// Threads to compress with: every core this process may use.
pub fn compression_threads() -> usize {
    // Read once: std reads the cgroup quota files at every call, and every
    // layer stream asks.
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

impl<W: Write + Send + 'static> LayerStream<W> {
    /// Start a stream compressing with `compression` into `sink`.
    pub fn new(sink: W, compression: Compression) -> io::Result<Self> {
        let out = BackgroundWriter::new(HashingWriter { inner: sink, hasher: Sha256::new(), count: 0 });
        let encoder = match compression.kind {
            CompressionKind::Uncompressed => Encoder::Plain(out),
            CompressionKind::Gzip => {
                Encoder::Gzip(ParallelGzip::new(out, compression.level.unwrap_or(DEFAULT_GZIP_LEVEL).clamp(0, 9) as u32))
            }
            CompressionKind::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, compression.level.unwrap_or(3))?;
                // zstd's output is the same for any worker count >= 1 (but
                // differs from 0), so always use workers: reproducible
                // across machines, and large layers use every core.
                enc.multithread(compression_threads() as u32)?;
                Encoder::Zstd(enc)
            }
        };
        Ok(LayerStream { hasher: Sha256::new(), count: 0, encoder })
    }

    /// Flush the compressor and return the sink and what was measured.
    pub fn finish(self) -> io::Result<(W, StreamDigests)> {
        let out = match self.encoder {
            Encoder::Plain(w) => w,
            Encoder::Gzip(g) => g.finish()?,
            Encoder::Zstd(z) => z.finish()?,
        }
        .finish()?;
        let digests = StreamDigests {
            diff_id: digest_string(self.hasher),
            digest: digest_string(out.hasher),
            size: out.count,
            uncompressed_size: self.count,
        };
        Ok((out.inner, digests))
    }
}

impl<W: Write + Send + 'static> Write for LayerStream<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.encoder {
            Encoder::Plain(w) => w.write(buf)?,
            Encoder::Gzip(g) => g.write(buf)?,
            Encoder::Zstd(z) => z.write(buf)?,
        };
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.encoder {
            Encoder::Plain(w) => w.flush(),
            Encoder::Gzip(_) => Ok(()),
            Encoder::Zstd(z) => z.flush(),
        }
    }
}

/// Bytes a [`BackgroundWriter`] collects before handing them over.
const HANDOFF: usize = 256 * 1024;

/// A writer that passes its bytes, in order and in chunks of
/// [`HANDOFF`], to a thread that writes them to `inner`: the sink's work
/// (hashing, the content store's own hashing, the file write) runs beside
/// the caller's instead of after it. Errors of the sink surface on the
/// next write or on [`finish`](Self::finish).
pub struct BackgroundWriter<W: Write + Send + 'static> {
    buf: Vec<u8>,
    tx: Option<mpsc::SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<io::Result<W>>>,
}

impl<W: Write + Send + 'static> BackgroundWriter<W> {
    /// Start the writing thread for `inner`.
    pub fn new(mut inner: W) -> Self {
        // A few chunks in the queue smooth out bursts (a finished gzip block
        // is written at once) without holding much memory.
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
        let thread = std::thread::Builder::new()
            .name("kiln-blob-writer".into())
            .spawn(move || {
                for chunk in rx {
                    inner.write_all(&chunk)?;
                }
                inner.flush()?;
                Ok(inner)
            })
            .expect("spawning the blob writer thread");
        BackgroundWriter { buf: Vec::with_capacity(HANDOFF), tx: Some(tx), thread: Some(thread) }
    }

    /// Hand `chunk` to the thread; if it is gone, its error.
    fn send(&mut self, chunk: Vec<u8>) -> io::Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| io::Error::other("blob writer already failed"))?;
        if tx.send(chunk).is_ok() {
            return Ok(());
        }
        self.tx = None;
        Err(self.join().err().unwrap_or_else(|| io::Error::other("blob writer stopped early")))
    }

    fn join(&mut self) -> io::Result<W> {
        let thread = self.thread.take().ok_or_else(|| io::Error::other("blob writer already joined"))?;
        thread.join().map_err(|_| io::Error::other("blob writer thread panicked"))?
    }

    /// Write what is buffered, wait for the thread and return the sink.
    pub fn finish(mut self) -> io::Result<W> {
        let rest = std::mem::take(&mut self.buf);
        if !rest.is_empty() {
            self.send(rest)?;
        }
        self.tx = None;
        self.join()
    }
}

impl<W: Write + Send + 'static> Write for BackgroundWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() && buf.len() >= HANDOFF {
            // Large writes (whole gzip blocks) go over as they are.
            self.send(buf.to_vec())?;
            return Ok(buf.len());
        }
        let n = buf.len().min(HANDOFF - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        if self.buf.len() == HANDOFF {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(HANDOFF));
            self.send(full)?;
        }
        Ok(n)
    }
    /// Buffered bytes go to the thread; the sink itself is flushed by
    /// [`finish`](Self::finish).
    fn flush(&mut self) -> io::Result<()> {
        let rest = std::mem::take(&mut self.buf);
        if !rest.is_empty() {
            self.send(rest)?;
        }
        Ok(())
    }
}

impl<W: Write + Send + 'static> Drop for BackgroundWriter<W> {
    fn drop(&mut self) {
        // Unfinished (an error elsewhere): stop the thread, drop the sink.
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Input per gzip block. Fixed, so the output does not depend on the
/// number of threads.
const GZIP_BLOCK: usize = 256 * 1024;
/// Each block is primed with this much of the input before it (as pigz),
/// so splitting costs almost no ratio.
const GZIP_DICT: usize = 32 * 1024;

/// A gzip writer that deflates fixed-size blocks on a thread pool, each
/// ending in a sync flush (byte-aligned, non-final), the last one with the
/// final bit; the blocks concatenate into one valid deflate stream (one gzip
/// member). A block that does not compress (see [`looks_compressible`]) is
/// written as deflate stored blocks instead, at memcpy speed. The CRC is
/// computed on the calling thread. Output is deterministic: every decision
/// depends on the data only, never on timing or the thread count.
pub struct ParallelGzip<W: Write> {
    inner: W,
    level: u32,
    block: Vec<u8>,
    /// The last `GZIP_DICT` bytes of input before `block`.
    dict: Vec<u8>,
    crc: flate2::Crc,
    in_flight: VecDeque<mpsc::Receiver<io::Result<Vec<u8>>>>,
    max_in_flight: usize,
    wrote_header: bool,
}

impl<W: Write> ParallelGzip<W> {
    /// Compress into `inner` at `level` (0-9).
    pub fn new(inner: W, level: u32) -> Self {
        ParallelGzip {
            inner,
            level,
            block: Vec::with_capacity(GZIP_BLOCK),
            dict: Vec::new(),
            crc: flate2::Crc::new(),
            in_flight: VecDeque::new(),
            max_in_flight: 2 * compression_threads() + 2,
            wrote_header: false,
        }
    }

    fn header(&mut self) -> io::Result<()> {
        if !self.wrote_header {
            // magic, deflate, no flags, mtime 0, no extra flags, OS unknown:
            // nothing that depends on the host or the time.
            self.inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])?;
            self.wrote_header = true;
        }
        Ok(())
    }

    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        self.header()?;
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(GZIP_BLOCK));
        let dict = std::mem::take(&mut self.dict);
        // The next block's dictionary is the tail of this block (plus the
        // old dictionary if this block is short).
        let mut next_dict = if block.len() >= GZIP_DICT { Vec::new() } else { dict.clone() };
        next_dict.extend_from_slice(&block[block.len().saturating_sub(GZIP_DICT)..]);
        let cut = next_dict.len().saturating_sub(GZIP_DICT);
        self.dict = next_dict.split_off(cut);
        let (tx, rx) = mpsc::sync_channel(1);
        let level = self.level;
        gzip_pool().spawn(move || {
            let _ = tx.send(deflate_block(level, &dict, &block, last));
        });
        self.in_flight.push_back(rx);
        while self.in_flight.len() > if last { 0 } else { self.max_in_flight } {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(rx) = self.in_flight.pop_front() {
            let bytes = rx.recv().map_err(|_| io::Error::other("gzip worker vanished"))??;
            self.inner.write_all(&bytes)?;
        }
        Ok(())
    }

    /// Write the last block and the trailer; return the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.dispatch(true)?;
        let crc = self.crc.sum();
        let len = self.crc.amount();
        self.inner.write_all(&crc.to_le_bytes())?;
        self.inner.write_all(&len.to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(GZIP_BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        if self.block.len() == GZIP_BLOCK {
            self.dispatch(false)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The pool gzip blocks are deflated on. Not rayon's global pool: layers
/// are written in parallel on that one, and a layer waiting for its blocks
/// there could take every thread and wait forever.
fn gzip_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(compression_threads())
            .thread_name(|i| format!("kiln-gzip-{i}"))
            .build()
            .expect("gzip thread pool")
    })
}

/// Raw-deflate one block primed with `dict`; sync-flushed, or finished
/// when `last`. Data that does not compress is stored instead: a random
/// block costs a few small test compressions instead of a full deflate,
/// and never grows by more than the stored-block headers.
fn deflate_block(level: u32, dict: &[u8], data: &[u8], last: bool) -> io::Result<Vec<u8>> {
    if level > 0 && !looks_compressible(data)? {
        return Ok(stored_blocks(data, last));
    }
    let mut c = Compress::new(flate2::Compression::new(level), false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    loop {
        let consumed = c.total_in() as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(4096));
        }
        let status = c.compress_vec(&data[consumed..], &mut out, flush).map_err(io::Error::other)?;
        let done = c.total_in() as usize == data.len();
        match status {
            Status::StreamEnd => break,
            // A sync flush is complete when all input is in and the
            // output buffer was not filled up.
            Status::Ok | Status::BufError if !last && done && out.len() < out.capacity() => break,
            _ => {}
        }
    }
    // The samples can miss: never emit more than storing would.
    if out.len() > stored_len(data.len(), last) {
        return Ok(stored_blocks(data, last));
    }
    Ok(out)
}

/// Bytes of each test compression sample: enough for level 1 to find
/// the repeats of text or code, small enough that sampling costs little.
const SAMPLE_LEN: usize = 2 * 1024;
/// Samples per block, spread evenly from its start to its end (a 256 KiB
/// block is probed every 36 KiB; 1/16 of it is test-compressed).
const SAMPLES: usize = 8;
/// Largest payload of one deflate stored block.
const STORED_MAX: usize = u16::MAX as usize;

/// Whether deflating `data` is worth it: the samples, each deflated alone
/// at the fastest level, shrink by at least 1/32 (3 %). Random, encrypted
/// and already-compressed data does not; text, binaries and tar headers
/// do by far more. Blocks too short to sample are always deflated.
pub fn looks_compressible(data: &[u8]) -> io::Result<bool> {
    if data.len() < SAMPLES * SAMPLE_LEN * 2 {
        return Ok(true);
    }
    let step = (data.len() - SAMPLE_LEN) / (SAMPLES - 1);
    let mut c = Compress::new(flate2::Compression::fast(), false);
    let mut out = Vec::with_capacity(SAMPLE_LEN + SAMPLE_LEN / 8 + 64);
    let (mut sampled, mut compressed) = (0usize, 0usize);
    for i in 0..SAMPLES {
        let sample = &data[i * step..i * step + SAMPLE_LEN];
        c.reset();
        out.clear();
        // The buffer holds any deflate of SAMPLE_LEN bytes (worst case is
        // stored: 5 bytes per 64 KiB), so one call finishes the stream.
        let status = c.compress_vec(sample, &mut out, FlushCompress::Finish).map_err(io::Error::other)?;
        if status != Status::StreamEnd {
            return Ok(true);
        }
        sampled += SAMPLE_LEN;
        compressed += out.len();
    }
    Ok(compressed * 32 < sampled * 31)
}

/// Size of `len` bytes as stored blocks (see [`stored_blocks`]).
fn stored_len(len: usize, last: bool) -> usize {
    let blocks = len.div_ceil(STORED_MAX).max(usize::from(last));
    len + 5 * blocks
}

/// `data` as deflate stored blocks of at most 64 KiB: a byte with the
/// final bit and type 00 (byte-aligned: the block before ended on a byte
/// boundary), LEN and its complement, then the bytes. The last block of
/// the stream gets the final bit (an empty one if there is no data).
fn stored_blocks(data: &[u8], last: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored_len(data.len(), last));
    let mut chunks: Vec<&[u8]> = data.chunks(STORED_MAX).collect();
    if chunks.is_empty() && last {
        chunks.push(&[]);
    }
    let count = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        out.push(u8::from(last && i + 1 == count));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn roundtrip(kind: CompressionKind, data: &[u8]) {
        let mut s = LayerStream::new(Vec::new(), Compression { kind, level: None }).unwrap();
        s.write_all(data).unwrap();
        let (out, d) = s.finish().unwrap();
        assert_eq!(d.diff_id, sha256_digest(data));
        assert_eq!(d.digest, sha256_digest(&out));
        assert_eq!(d.size, out.len() as u64);
        let mut back = Vec::new();
        match kind {
            CompressionKind::Gzip => {
                flate2::read::GzDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
            }
            CompressionKind::Zstd => back = zstd::decode_all(&out[..]).unwrap(),
            CompressionKind::Uncompressed => back = out,
        }
        assert_eq!(back, data);
    }

    fn sample(n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        let mut x: u32 = 1;
        while v.len() < n {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            v.extend_from_slice(format!("line {} value {}\n", v.len() % 977, x >> 20).as_bytes());
        }
        v.truncate(n);
        v
    }

    #[test]
    fn all_kinds_roundtrip_and_hash() {
        for kind in [CompressionKind::Uncompressed, CompressionKind::Gzip, CompressionKind::Zstd] {
            for n in [0, 1, GZIP_BLOCK - 1, GZIP_BLOCK, 3 * GZIP_BLOCK + 17] {
                roundtrip(kind, &sample(n));
            }
        }
    }

    #[test]
    fn parallel_gzip_is_deterministic_and_system_gunzip_accepts_it() {
        let data = sample(5 * GZIP_BLOCK + 3);
        let gz = |d: &[u8]| {
            let mut g = ParallelGzip::new(Vec::new(), 6);
            g.write_all(d).unwrap();
            g.finish().unwrap()
        };
        let a = gz(&data);
        assert_eq!(a, gz(&data));
        // The dictionary keeps the ratio close to one-stream gzip.
        let mut one = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        one.write_all(&data).unwrap();
        let one = one.finish().unwrap();
        assert!(a.len() as f64 <= one.len() as f64 * 1.02, "{} vs {}", a.len(), one.len());
        if let Ok(mut child) = std::process::Command::new("gzip")
            .args(["-t"])
            .stdin(std::process::Stdio::piped())
            .spawn()
        {
            child.stdin.take().unwrap().write_all(&a).unwrap();
            assert!(child.wait().unwrap().success(), "gzip -t rejected our stream");
        }
    }
}
