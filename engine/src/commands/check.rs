//! `kiln check [--repair]`: verify the whole store (see
//! `kiln_cache::check::check`) and print what was found.

use crate::config::Global;

/// `kiln check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Remove broken image names, cache records, snapshots and corrupt
    /// blobs (records and snapshots only while no build or prune runs).
    #[arg(long)]
    pub repair: bool,
}

/// Check the store; exit 0 when it is consistent, 1 otherwise.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = kiln_cache::Store::open(&global.root)?;
    let report = kiln_cache::check::check(&store, args.repair)?;
    let c = report.cleaned;
    println!(
        "checked {} blobs, {} images, {} snapshots, {} cache records",
        report.blobs, report.images, report.snapshots, report.records
    );
    println!(
        "removed leftovers of unfinished work: {} partial blobs, {} snapshots, {} scratch dirs",
        c.ingests, c.snapshots, c.scratch
    );
    for problem in &report.problems {
        let state = if report.repaired.contains(problem) { "repaired" } else { "PROBLEM" };
        println!("{state}: {problem}");
    }
    if report.busy {
        println!("note: a build or prune holds the build lock; cache records and snapshots were not repaired");
    }
    if report.consistent() {
        println!("store is consistent");
        Ok(0)
    } else {
        let left = report.problems.len() - report.repaired.len();
        println!("store is INCONSISTENT: {left} problem(s){}", if args.repair { "" } else { " (kiln check --repair removes them)" });
        Ok(1)
    }
}
