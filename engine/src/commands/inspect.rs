//! `kiln inspect REF...`: JSON about local images, shaped like
//! `docker image inspect`.

use kiln_cache::Store;
use kiln_cache::images::{ImageRecord, familiar_name};
use serde_json::json;

use crate::config::Global;
use crate::image_source::open_image;

/// `kiln inspect` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images: names, IDs or digests.
    #[arg(required = true)]
    pub references: Vec<String>,
}

/// Print a JSON array with one object per image; exit code 1 if any is missing.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = Store::open(&global.root)?;
    let all = store.images.list()?;
    let mut out = Vec::new();
    let code = super::for_each_local_image(&store, "inspect", &args.references, |_, record| {
        out.push(describe(&store, &all, &record)?);
        Ok(())
    })?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(code)
}

/// The `docker image inspect`-shaped JSON of one image; `all` is the
/// store's image list (for the other names of the same image).
pub fn describe(store: &Store, all: &[ImageRecord], record: &ImageRecord) -> anyhow::Result<serde_json::Value> {
    let image = open_image(store, record)?;
    let names: Vec<&str> = all.iter().filter(|r| r.target == record.target).map(|r| r.name.as_str()).collect();
    let repo_tags: Vec<&str> = names.iter().filter(|n| !n.contains('@')).map(|n| familiar_name(n)).collect();
    let mut repo_digests: Vec<String> = names
        .iter()
        .map(|n| {
            let repo = n.split('@').next().unwrap_or(n);
            let slash = repo.rfind('/').map(|i| i + 1).unwrap_or(0);
            let repo = match repo[slash..].rfind(':') {
                Some(i) => &repo[..slash + i],
                None => repo,
            };
            format!("{}@{}", familiar_name(repo), record.target.digest)
        })
        .collect();
    repo_digests.sort();
    repo_digests.dedup();
    let c = &image.config_json;
    Ok(json!({
        "Id": record.config_digest,
        "RepoTags": repo_tags,
        "RepoDigests": repo_digests,
        "Created": c.get("created").cloned().unwrap_or(json!("")),
        "Author": c.get("author").cloned().unwrap_or(json!("")),
        "Architecture": c.get("architecture").cloned().unwrap_or(json!("")),
        "Variant": c.get("variant").cloned(),
        "Os": c.get("os").cloned().unwrap_or(json!("")),
        "Size": record.size,
        "Config": c.get("config").cloned().unwrap_or(json!({})),
        "RootFS": { "Type": "layers", "Layers": image.diff_ids },
        "History": c.get("history").cloned().unwrap_or(json!([])),
        "Descriptor": {
            "mediaType": record.target.media_type,
            "digest": record.target.digest,
            "size": record.target.size,
        },
    }))
}
