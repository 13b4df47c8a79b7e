//! `kiln rmi REF...`: remove image names. Blobs and snapshots stay until
//! garbage collection.

use kiln_cache::Store;
use kiln_cache::images::familiar_name;

use crate::config::Global;

/// `kiln rmi` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images: names, IDs or digests. An ID removes every name of that image.
    #[arg(required = true)]
    pub references: Vec<String>,
}

/// Remove the names; exit code 1 if any was not found.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = Store::open(&global.root)?;
    super::for_each_local_image(&store, "rmi", &args.references, |reference, record| {
        for name in untag(&store, reference, &record)? {
            println!("Untagged: {}", familiar_name(&name));
        }
        Ok(())
    })
}

/// Remove the names `reference` (resolved to `record`) stands for: a name
/// removes that name, an ID or digest every name of the image. Returns the
/// removed names.
pub fn untag(store: &Store, reference: &str, record: &kiln_cache::images::ImageRecord) -> anyhow::Result<Vec<String>> {
    let by_name = kiln_cache::images::normalize_reference(reference).ok() == Some(record.name.clone());
    let doomed: Vec<String> = if by_name {
        vec![record.name.clone()]
    } else {
        store.images.list()?.into_iter().filter(|r| r.target == record.target).map(|r| r.name).collect()
    };
    for name in &doomed {
        store.images.remove(name)?;
    }
    Ok(doomed)
}
