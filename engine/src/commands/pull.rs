//! `kiln pull REF [--platform os/arch[/variant]]`: fetch an image from a
//! registry into the local store.

use std::sync::Arc;

use kiln_cache::Store;

use crate::config::Global;
use crate::registry::Registry;
use crate::registry::manifest::parse_platform;

/// `kiln pull` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Platform to pick from a multi-platform image.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Image reference, e.g. `busybox`, `127.0.0.1:5000/app:v1`, `repo@sha256:...`.
    pub reference: String,
}

/// Pull the image; prints its digest.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let platform = parse_platform(&args.platform)?;
    let store = Arc::new(Store::open(&global.root)?);
    let registry = Registry::from_global(global)?;
    let pulled = runtime()?.block_on(registry.pull(&store, &args.reference, &platform))?;
    println!("{}", summary(&pulled.name, &pulled.manifest_digest, pulled.layers.len(), pulled.blobs_fetched));
    Ok(0)
}

/// The line `kiln pull` prints when done.
pub fn summary(name: &str, manifest_digest: &str, layers: usize, fetched: usize) -> String {
    format!(
        "{}: pulled {} ({} layer(s), {} downloaded)",
        kiln_cache::images::familiar_name(name),
        manifest_digest,
        layers,
        fetched
    )
}

/// A multi-threaded tokio runtime for commands that talk to registries.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
