//! `kiln check [--repair]`: verify the whole store (see
//! `kiln_cache::check::check`) and print what was found.

use crate::config::Global;

/// `kiln check`.
#[derive(Debug, Default, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    let (text, code) = check_store(&store, &args)?;
    print!("{text}");
    Ok(code)
}

/// Check `store` as `args` ask: the report as `kiln check` prints it and
/// the exit code (0 consistent, 1 not). The daemon answers `kiln --host
/// ... check` with the same.
pub fn check_store(store: &kiln_cache::Store, args: &Args) -> anyhow::Result<(String, i32)> {
    use std::fmt::Write;
    let mut out = String::new();
    let options = kiln_cache::check::CheckOptions {
        repair: args.repair,
        diff_id: if args.deep { Some(&layer_diff_id) } else { None },
    };
    let report = kiln_cache::check::check_with(store, &options)?;
    let c = report.cleaned;
    writeln!(
        out,
        "checked {} blobs, {} images, {} snapshots, {} cache records",
        report.blobs, report.images, report.snapshots, report.records
    )?;
    if args.deep {
        writeln!(
            out,
            "re-hashed {} snapshots ({} not verifiable: pulled, or never exported)",
            report.snapshots_hashed, report.snapshots_unverifiable
        )?;
    }
    writeln!(
        out,
        "removed leftovers of unfinished work: {} partial blobs, {} snapshots, {} scratch dirs, {} secret dirs",
        c.ingests, c.snapshots, c.scratch, c.secrets
    )?;
    for problem in &report.problems {
        let state = if report.repaired.contains(problem) { "repaired" } else { "PROBLEM" };
        writeln!(out, "{state}: {problem}")?;
    }
    if report.busy {
        writeln!(out, "note: a build or prune holds the build lock, or a running build may use them; some cache records and snapshots were not repaired")?;
    }
    if report.consistent() {
        writeln!(out, "store is consistent")?;
        Ok((out, 0))
    } else {
        let left = report.problems.len() - report.repaired.len();
        writeln!(out, "store is INCONSISTENT: {left} problem(s){}", if args.repair { "" } else { " (kiln check --repair removes them)" })?;
        Ok((out, 1))
    }
}
