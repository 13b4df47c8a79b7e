//! `kiln du`: how much the build cache uses, and how many bytes the whole
//! store root takes — the number the disk cap counts, equal to what
//! `du -sb <root>` prints.

use crate::config::Global;

/// `kiln du`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Print build-cache usage, then the root's bytes by top-level directory.
pub fn run(global: &Global, _args: Args) -> anyhow::Result<i32> {
    let store = kiln_cache::Store::open(&global.root)?;
    print(&kiln_solver::gc::usage(&store)?);
    print_root(&kiln_cache::usage::root_usage(store.root())?);
    Ok(0)
}

/// Print the store root's bytes as `kiln du` does: per top-level entry,
/// then the total that the disk cap counts (equal to `du -sb <root>`).
pub fn print_root(root: &kiln_cache::usage::RootUsage) {
    println!();
    println!("{:<28} {:>23}", "STORE ROOT", "BYTES");
    for (name, bytes) in &root.parts {
        println!("{name:<28} {bytes:>23}");
    }
    println!("Root total: {} bytes ({})", root.total, human(root.total));
}

/// Print `u` as `kiln du` does.
pub fn print(u: &kiln_solver::gc::Usage) {
    println!("{:<28} {:>10} {:>12}", "TYPE", "COUNT", "SIZE");
    println!("{:<28} {:>10} {:>12}", "cache records", u.records, "-");
    println!("{:<28} {:>10} {:>12}", "snapshots", u.snapshots, human(u.snapshot_bytes));
    println!("{:<28} {:>10} {:>12}", "  of which unreferenced", u.unreferenced_snapshots, "-");
    println!("{:<28} {:>10} {:>12}", "cache mounts", "-", human(u.cache_mount_bytes));
    println!("Total: {}", human(u.snapshot_bytes + u.cache_mount_bytes));
}

/// Bytes as `12.3MB` (powers of 1024, as docker prints them).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{bytes}B") } else { format!("{v:.1}{}", UNITS[i]) }
}
