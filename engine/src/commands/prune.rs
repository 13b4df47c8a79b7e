//! `kiln prune [--all] [--keep-storage SIZE]`: collect build-cache garbage.

use crate::config::Global;

/// `kiln prune`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Remove the whole build cache (records, snapshots, cache mounts).
    #[arg(short, long)]
    pub all: bool,
    /// Remove the oldest cache entries until the rest fits, e.g. `10GB`.
    #[arg(long, value_name = "SIZE")]
    pub keep_storage: Option<String>,
}

/// Prune and print what was freed.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let keep_bytes = args.keep_storage.as_deref().map(kiln_solver::gc::parse_size).transpose()?;
    let store = kiln_cache::Store::open(&global.root)?;
    let options = kiln_solver::gc::PruneOptions { all: args.all, keep_bytes };
    print(&kiln_solver::gc::prune(&store, &options)?);
    Ok(0)
}

/// Print `report` as `kiln prune` does.
pub fn print(report: &kiln_solver::gc::PruneReport) {
    println!(
        "Deleted {} cache records and {} snapshots\nTotal reclaimed space: {}",
        report.records,
        report.snapshots,
        super::du::human(report.bytes)
    );
}
