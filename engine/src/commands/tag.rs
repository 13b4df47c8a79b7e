//! `kiln tag SOURCE TARGET`: give a local image another name.

use kiln_cache::Store;

use crate::config::Global;

/// `kiln tag` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Existing image: name, ID or digest (prefix).
    pub source: String,
    /// New name, e.g. `127.0.0.1:5000/app:v1`.
    pub target: String,
}

/// Add the name.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = Store::open(&global.root)?;
    store.images.tag(&args.source, &args.target)?;
    Ok(0)
}
