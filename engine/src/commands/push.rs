//! `kiln push REF`: upload a local image to its registry.

use kiln_cache::Store;

use crate::config::Global;
use crate::registry::Registry;

/// `kiln push` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Local image name, e.g. `127.0.0.1:5000/app:v1` (tag it first with `kiln tag`).
    pub reference: String,
}

/// Push the image; prints the pushed digest.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = Store::open(&global.root)?;
    let record = store.images.resolve(&args.reference)?;
    let registry = Registry::from_global(global)?;
    // Pushing by ID pushes to the image's stored name.
    let target = if kiln_cache::images::normalize_reference(&args.reference)? == record.name {
        args.reference.clone()
    } else {
        record.name.clone()
    };
    let pushed = super::pull::runtime()?.block_on(registry.push(&store, &record.target.digest, &target))?;
    println!(
        "{}: digest: {} ({} blob(s) uploaded, {} already there)",
        kiln_cache::images::familiar_name(&pushed.reference),
        pushed.manifest_digest,
        pushed.blobs_uploaded,
        pushed.blobs_skipped
    );
    Ok(0)
}
