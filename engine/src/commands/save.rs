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
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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
    let mut images = Vec::new();
    for query in &args.images {
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
    match args.format {
        Format::Docker => save_docker(&store, &images, &args.output, mtime)?,
        Format::Oci => {
            let dest = if args.output.extension().is_some_and(|e| e == "tar") || args.output == std::path::Path::new("-") {
                OciDest::Tar(args.output.clone())
            } else {
                OciDest::Dir(args.output.clone())
            };
            save_oci(&store, &images, &dest, mtime)?
        }
    }
    let summary = format!("saved {} image(s) to {}", images.len(), args.output.display());
    // The archive itself may be on stdout: then the summary goes to stderr.
    if args.output == std::path::Path::new("-") {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
    }
    Ok(0)
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
