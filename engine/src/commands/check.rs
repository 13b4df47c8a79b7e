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
    /// Also re-hash every built snapshot's files against the diff ID its
    /// layer had when exported (the same tar stream the exporter writes);
    /// with `--repair`, a changed snapshot is removed with the cache records
    /// naming it, so the next build computes it again.
    #[arg(long)]
    pub deep: bool,
}

/// The diff ID of a snapshot directory: sha256 of the layer tar the
/// exporter's own writer produces for it.
fn layer_diff_id(dir: &std::path::Path) -> anyhow::Result<String> {
    use sha2::Digest;
    struct Hashing(sha2::Sha256);
    impl std::io::Write for Hashing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (hashing, _) = kiln_exporter::layer::write_layer_tar(dir, Hashing(sha2::Sha256::new()), None)?;
    Ok(format!("sha256:{}", hex::encode(hashing.0.finalize())))
}

/// Check the store; exit 0 when it is consistent, 1 otherwise.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = kiln_cache::Store::open(&global.root)?;
    let options = kiln_cache::check::CheckOptions {
        repair: args.repair,
        diff_id: if args.deep { Some(&layer_diff_id) } else { None },
    };
    let report = kiln_cache::check::check_with(&store, &options)?;
    let c = report.cleaned;
    println!(
        "checked {} blobs, {} images, {} snapshots, {} cache records",
        report.blobs, report.images, report.snapshots, report.records
    );
    if args.deep {
        println!(
            "re-hashed {} snapshots ({} not verifiable: pulled, or never exported)",
            report.snapshots_hashed, report.snapshots_unverifiable
        );
    }
    println!(
        "removed leftovers of unfinished work: {} partial blobs, {} snapshots, {} scratch dirs, {} secret dirs",
        c.ingests, c.snapshots, c.scratch, c.secrets
    );
    for problem in &report.problems {
        let state = if report.repaired.contains(problem) { "repaired" } else { "PROBLEM" };
        println!("{state}: {problem}");
    }
    if report.busy {
        println!("note: a build or prune holds the build lock, or a running build may use them; some cache records and snapshots were not repaired");
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
