//! Layer export benchmark: tar + compress + hash a directory the way the
//! exporter does, and report throughput (see bench/export.sh).
//!
//! `export_bench DIR tar OUT` writes the plain layer tar (the reference
//! input for `zstd -T0` / `pigz`); `export_bench DIR gzip|zstd LEVEL STORE`
//! writes the compressed blob into the content store under STORE through
//! the store's hashing writer (the path a real export takes) and prints:
//! `<kind> level=<n> in=<bytes> out=<bytes> secs=<s> MB/s=<uncompressed MB/s> blob=<path>`.

use std::fs::File;
use std::io::BufWriter;
use std::time::Instant;

use kiln_exporter::compression::{Compression, CompressionKind, LayerStream};
use kiln_exporter::layer::write_layer_tar;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 4, "usage: export_bench DIR tar OUT | export_bench DIR gzip|zstd LEVEL OUT");
    let dir = std::path::Path::new(&args[1]);
    if args[2] == "tar" {
        let out = BufWriter::new(File::create(&args[3])?);
        write_layer_tar(dir, out, None)?;
        return Ok(());
    }
    let kind = CompressionKind::parse(&args[2]).ok_or_else(|| anyhow::anyhow!("unknown compression {}", args[2]))?;
    let level: i32 = args[3].parse()?;
    anyhow::ensure!(args.len() == 5, "usage: export_bench DIR gzip|zstd LEVEL STORE");
    let content = kiln_cache::content::ContentStore::open(std::path::Path::new(&args[4]))?;
    let start = Instant::now();
    let stream = LayerStream::new(content.writer()?, Compression { kind, level: Some(level) })?;
    let (stream, _) = write_layer_tar(dir, stream, None)?;
    let (writer, d) = stream.finish()?;
    writer.commit(Some(&d.digest), Some(d.size))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} level={level} in={} out={} secs={secs:.2} MB/s={:.1} blob={}",
        args[2],
        d.uncompressed_size,
        d.size,
        d.uncompressed_size as f64 / 1e6 / secs,
        content.blob_path(&d.digest).display()
    );
    Ok(())
}
