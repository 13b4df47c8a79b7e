//! Parallel gzip stores blocks that do not compress (deflate stored blocks)
//! instead of spending a full deflate on them, still compresses the rest as
//! before, and stays one valid, deterministic gzip member that gzip, tar and
//! umoci read.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use common::*;
use kiln_cache::Store;
use kiln_exporter::compression::{ParallelGzip, looks_compressible};
use kiln_exporter::{Output, export, read_blob};
use oci_spec::image::ImageManifest;

/// Input per parallel gzip block (compression.rs `GZIP_BLOCK`).
const BLOCK: usize = 256 * 1024;

/// Bytes that do not compress: xorshift64* output.
fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Log-like text that compresses to about a fifth.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = ["error", "warn", "info", "request", "response", "cache", "layer", "build", "timeout", "ok"];
    let r = random(seed, len / 8 + 64);
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0;
    while out.len() < len {
        let (a, b, c) = (r[i % r.len()] as usize, r[(i + 1) % r.len()] as usize, r[(i + 2) % r.len()] as usize);
        out.extend_from_slice(format!("2026-11-24T01:{:02}:{:02} {} {} id={} ms={}\n", a % 60, b % 60, words[a % 10], words[b % 10], a * 256 + b, c).as_bytes());
        i += 3;
    }
    out.truncate(len);
    out
}

fn parallel_gzip(data: &[u8]) -> Vec<u8> {
    let mut g = ParallelGzip::new(Vec::new(), 6);
    // Odd write sizes: blocks must not depend on how the caller writes.
    for chunk in data.chunks(100_003) {
        g.write_all(chunk).unwrap();
    }
    g.finish().unwrap()
}

fn one_stream_gzip(data: &[u8]) -> Vec<u8> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    g.write_all(data).unwrap();
    g.finish().unwrap()
}

fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut d = flate2::read::GzDecoder::new(gz);
    let mut out = Vec::new();
    d.read_to_end(&mut out).unwrap();
    // One member: nothing left after the trailer.
    assert!(d.into_inner().is_empty(), "bytes after the first gzip member");
    out
}

/// `gzip -t` accepts the stream (skipped if there is no gzip).
fn system_gzip_accepts(gz: &[u8]) {
    let Ok(mut child) = Command::new("gzip").arg("-t").stdin(Stdio::piped()).spawn() else {
        println!("skipped: gzip -t check because gzip is not installed");
        return;
    };
    child.stdin.take().unwrap().write_all(gz).unwrap();
    assert!(child.wait().unwrap().success(), "gzip -t rejected the stream");
}

#[test]
fn random_data_is_stored_round_trips_and_grows_only_by_block_headers() {
    let data = random(1, 8 * BLOCK + 12_345);
    let gz = parallel_gzip(&data);
    // gzip header + trailer, and 5 bytes per stored block of <= 64 KiB
    // (a 256 KiB block is five of them): 0.01 %.
    let max = data.len() + 10 + 8 + 5 * 5 * data.len().div_ceil(BLOCK);
    assert!(gz.len() <= max, "{} bytes of random data became {} (max {max})", data.len(), gz.len());
    // The first block after the 10-byte header is a full, non-final stored
    // block: the deflater was not run on it.
    assert_eq!(&gz[10..15], &[0x00, 0xff, 0xff, 0x00, 0x00], "first block is not stored");
    assert_eq!(gunzip(&gz), data);
    system_gzip_accepts(&gz);
}

#[test]
fn compressible_data_compresses_as_well_as_one_stream_gzip() {
    let data = text(2, 6 * BLOCK + 77);
    assert!(looks_compressible(&data[..BLOCK]).unwrap());
    let gz = parallel_gzip(&data);
    let one = one_stream_gzip(&data);
    assert!(gz.len() < data.len() / 3, "text only compressed to {} of {}", gz.len(), data.len());
    assert!(gz.len() as f64 <= one.len() as f64 * 1.02, "parallel {} vs one stream {}", gz.len(), one.len());
    assert_eq!(gunzip(&gz), data);
    system_gzip_accepts(&gz);
}

#[test]
fn mixed_random_and_text_round_trips_and_each_part_is_treated_on_its_own() {
    // Random, text, random and text again, at sizes that do not line up
    // with blocks, plus a block that is half of each and an empty tail.
    let parts: Vec<(bool, Vec<u8>)> = vec![
        (true, random(3, 3 * BLOCK + 1000)),
        (false, text(4, 2 * BLOCK + 5)),
        (true, random(5, BLOCK / 2)),
        (false, text(6, BLOCK / 2)),
        (true, random(7, 4 * BLOCK)),
        (false, text(8, 3 * BLOCK + 999)),
    ];
    let data: Vec<u8> = parts.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let gz = parallel_gzip(&data);
    assert_eq!(gunzip(&gz), data);
    system_gzip_accepts(&gz);
    // The random parts cost about their size, the text parts about what
    // one-stream gzip makes of them (blocks straddling both go either way).
    let random_len: usize = parts.iter().filter(|(r, _)| *r).map(|(_, p)| p.len()).sum();
    let text_gz: usize = parts.iter().filter(|(r, _)| !*r).map(|(_, p)| one_stream_gzip(p).len()).sum();
    let bound = random_len + random_len / 100 + text_gz * 11 / 10 + BLOCK / 2;
    assert!(gz.len() <= bound, "mixed stream {} bytes, expected at most {bound}", gz.len());
}

#[test]
fn output_is_the_same_on_every_run_and_under_concurrency() {
    let mut data = random(9, 3 * BLOCK);
    data.extend(text(10, 3 * BLOCK));
    data.extend(random(11, BLOCK + 3));
    let first = parallel_gzip(&data);
    // Several streams at once share the gzip pool, so blocks finish in a
    // different order and at different times: the bytes must not change.
    let data = std::sync::Arc::new(data);
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let data = data.clone();
            std::thread::spawn(move || parallel_gzip(&data))
        })
        .collect();
    for run in runs {
        assert!(run.join().unwrap() == first, "a concurrent run produced different bytes");
    }
    assert_eq!(gunzip(&first), *data);
}

#[test]
fn sampling_tells_random_from_text_and_always_deflates_short_blocks() {
    assert!(!looks_compressible(&random(12, BLOCK)).unwrap());
    assert!(looks_compressible(&text(13, BLOCK)).unwrap());
    assert!(looks_compressible(&vec![0u8; BLOCK]).unwrap());
    // Too short to sample: deflated (cheap at that size), even if random.
    assert!(looks_compressible(&random(14, 1000)).unwrap());
    let gz = parallel_gzip(&random(15, 1000));
    assert_eq!(gunzip(&gz), random(15, 1000));
    // Empty input is still a valid gzip member.
    assert_eq!(gunzip(&parallel_gzip(&[])), Vec::<u8>::new());
}

#[test]
fn oci_image_with_a_random_layer_unpacks_with_umoci_and_lists_with_tar() {
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: random layer interop because it needs root");
        return;
    }
    if !have("umoci", "random layer interop") || !have("tar", "random layer interop") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let noise = random(16, 5 * BLOCK + 321);
    let words = text(17, 2 * BLOCK);
    let layer = snapshot(&store, "mixed", |fs| {
        std::fs::write(fs.join("noise.bin"), &noise).unwrap();
        std::fs::write(fs.join("words.txt"), &words).unwrap();
        for i in 0..50 {
            std::fs::write(fs.join(format!("small{i}.txt")), format!("file {i}\n")).unwrap();
        }
    });
    let mut spec = spec(vec![layer]);
    spec.history.truncate(1);
    let layout = tmp.path().join("layout");
    let out = Output::parse(&format!("type=oci,dest={},tar=false,name=kiln-test:v1,compression=gzip", layout.display())).unwrap();
    let built = export(&store, &spec, &out, None).unwrap().unwrap();
    let manifest = ImageManifest::from_reader(&read_blob(&store.content, built.manifest.digest().as_ref()).unwrap()[..]).unwrap();
    let blob = read_blob(&store.content, manifest.layers()[0].digest().as_ref()).unwrap();
    assert!(blob.len() < noise.len() + words.len() / 2, "layer blob {} bytes: text part not compressed", blob.len());
    system_gzip_accepts(&blob);
    let blob_path = tmp.path().join("layer.tar.gz");
    std::fs::write(&blob_path, &blob).unwrap();
    let listing = run(Command::new("tar").arg("tzf").arg(&blob_path));
    assert!(listing.lines().any(|l| l.trim_start_matches("./") == "noise.bin"), "{listing}");
    assert_eq!(listing.lines().filter(|l| l.contains("small")).count(), 50);

    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci").arg("unpack").arg("--image").arg(format!("{}:v1", layout.display())).arg(&bundle));
    assert!(std::fs::read(bundle.join("rootfs/noise.bin")).unwrap() == noise, "noise.bin differs after umoci unpack");
    assert!(std::fs::read(bundle.join("rootfs/words.txt")).unwrap() == words, "words.txt differs after umoci unpack");
}

/// A sink that takes `room` bytes, then fails.
struct FullDisk {
    room: usize,
}

impl Write for FullDisk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.room == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full"));
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_sink_fails_the_layer_stream_instead_of_hanging() {
    use kiln_exporter::compression::{Compression, CompressionKind, LayerStream};
    for kind in [CompressionKind::Gzip, CompressionKind::Zstd, CompressionKind::Uncompressed] {
        let mut stream = LayerStream::new(FullDisk { room: 100_000 }, Compression { kind, level: None }).unwrap();
        let data = random(18, 4 * BLOCK);
        // The error shows up on a later write or at the latest on finish.
        let result = stream.write_all(&data).and_then(|()| stream.finish().map(|_| ()));
        let err = result.expect_err("writing 1 MiB into 100 kB of room succeeded");
        assert!(err.to_string().contains("disk full"), "{kind:?}: {err}");
    }
}
