//! `kiln save [-o FILE] [--format docker|oci] IMAGE...`: images from the
//! local store as a docker-archive (the default, for `docker load`) or an
//! OCI image layout (a tar if FILE ends in `.tar`, else a directory),
//! written by the same code as `-o type=docker` / `-o type=oci`.

use std::path::PathBuf;

use kiln_cache::Store;
use kiln_cache::images::{familiar_name, normalize_reference};
use kiln_exporter::image::descriptor;
use kiln_exporter::{NamedImage, OciDest, save_docker, save_oci};

use crate::config::Global;

/// Archive formats `kiln save` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// docker-archive (`docker load` / `podman load`).
    Docker,
    /// OCI image layout.
    Oci,
}

/// `kiln save` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write (must not exist; written beside and renamed); `-`,
    /// the default, is standard output as with `docker save`.
    #[arg(short, long, value_name = "FILE", default_value = "-")]
    pub output: PathBuf,
    /// Archive format.
    #[arg(long, value_enum, default_value = "docker")]
    pub format: Format,
    /// Images: names, IDs or digests (prefixes).
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// Save; prints what was written.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = Store::open(&global.root)?;
    let saved = save(&store, &args.images, args.format, &args.output)?;
    // The archive itself may be on stdout: then the summary goes to stderr.
    if to_stdout(&args.output) {
        eprintln!("{}", summary(saved, &args.output));
    } else {
        println!("{}", summary(saved, &args.output));
    }
    Ok(0)
}

/// Whether `-o` means standard output (`-`, the default).
pub fn to_stdout(output: &std::path::Path) -> bool {
    output == std::path::Path::new(kiln_exporter::dest::STDOUT_DEST)
}

/// What `kiln save` prints after writing `count` images to `output`.
pub fn summary(count: usize, output: &std::path::Path) -> String {
    format!("saved {count} image(s) to {}", output.display())
}

/// Whether `kiln save --format format -o output` writes a directory (an
/// OCI layout whose name does not end in `.tar`, and not stdout) rather
/// than a file.
pub fn writes_dir(format: Format, output: &std::path::Path) -> bool {
    format == Format::Oci && !output.extension().is_some_and(|e| e == "tar") && !to_stdout(output)
}

/// Write `queries` (names, IDs or digests) from `store` to `output`;
/// returns how many images were written.
pub fn save(store: &Store, queries: &[String], format: Format, output: &std::path::Path) -> anyhow::Result<usize> {
    let mut images = Vec::new();
    for query in queries {
        let record = store.images.resolve(query)?;
        // Named like `docker save`: by the name asked for; an ID or digest
        // carries no name.
        let by_name = normalize_reference(query).is_ok_and(|n| n == record.name);
        images.push(NamedImage {
            manifest: descriptor(&record.target.media_type, &record.target.digest, record.target.size)?,
            name: by_name.then(|| familiar_name(&record.name).to_string()),
        });
    }
    let mtime = source_date_epoch()?.unwrap_or(0);
    match format {
        Format::Docker => save_docker(store, &images, output, mtime)?,
        Format::Oci => {
            let dest = if writes_dir(format, output) {
                OciDest::Dir(output.to_path_buf())
            } else {
                OciDest::Tar(output.to_path_buf())
            };
            save_oci(store, &images, &dest, mtime)?
        }
    }
    Ok(images.len())
}

/// `SOURCE_DATE_EPOCH` from the environment, if set.
fn source_date_epoch() -> anyhow::Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => {
            Ok(Some(v.parse().map_err(|_| anyhow::anyhow!("SOURCE_DATE_EPOCH={v:?}: expected seconds since 1970"))?))
        }
        _ => Ok(None),
    }
}
