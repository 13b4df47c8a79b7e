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
    let registry = Registry::from_global(global)?;
    let pushed = super::pull::runtime()?.block_on(push_local(&registry, &store, &args.reference))?;
    println!("{}", summary(&pushed));
    Ok(0)
}

/// The line `kiln push` prints when done.
pub fn summary(pushed: &crate::registry::PushedImage) -> String {
    format!(
        "{}: digest: {} ({} blob(s) uploaded, {} mounted, {} already there)",
        kiln_cache::images::familiar_name(&pushed.reference),
        pushed.manifest_digest,
        pushed.blobs_uploaded,
        pushed.blobs_mounted,
        pushed.blobs_skipped
    )
}

/// Push the local image `reference` (a name, or an ID/digest, which pushes
/// to the image's stored name).
pub async fn push_local(registry: &Registry, store: &Store, reference: &str) -> anyhow::Result<crate::registry::PushedImage> {
    let record = store.images.resolve(reference)?;
    let target = if kiln_cache::images::normalize_reference(reference)? == record.name {
        reference.to_string()
    } else {
        record.name.clone()
    };
    registry.push(store, &record.target.digest, &target).await
}
