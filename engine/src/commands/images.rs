//! `kiln images`: list local images.

use kiln_cache::Store;
use kiln_cache::images::{ImageRecord, familiar_name};

use crate::config::Global;

/// `kiln images` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only print image IDs.
    #[arg(short, long)]
    pub quiet: bool,
    /// Show full IDs.
    #[arg(long)]
    pub no_trunc: bool,
    /// Print one JSON object per image instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Print the list.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = Store::open(&global.root)?;
    print(&args, &store.images.list()?)?;
    Ok(0)
}

/// Print `images` as `kiln images` does (table, IDs, or JSON lines).
pub fn print(args: &Args, images: &[ImageRecord]) -> anyhow::Result<()> {
    if args.json {
        for r in images {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    let id = |digest: &str| -> String {
        let hex = digest.trim_start_matches("sha256:");
        if args.no_trunc { digest.to_string() } else { hex[..12.min(hex.len())].to_string() }
    };
    if args.quiet {
        let mut seen = std::collections::BTreeSet::new();
        for r in images {
            if seen.insert(r.config_digest.clone()) {
                println!("{}", id(&r.config_digest));
            }
        }
        return Ok(());
    }
    println!("{:<40} {:<16} {:<14} {:<22} {:>10}", "REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE");
    for r in images {
        let short = familiar_name(&r.name);
        let (repo, tag) = match short.split_once('@') {
            Some((repo, _)) => (repo, "<none>"),
            None => {
                let slash = short.rfind('/').map(|i| i + 1).unwrap_or(0);
                match short[slash..].rfind(':') {
                    Some(i) => (&short[..slash + i], &short[slash + i + 1..]),
                    None => (short, "<none>"),
                }
            }
        };
        let created = r.created.as_deref().map(|c| c.get(..19).unwrap_or(c).replace('T', " ")).unwrap_or_default();
        println!("{:<40} {:<16} {:<14} {:<22} {:>10}", repo, tag, id(&r.config_digest), created, human_size(r.size));
    }
    Ok(())
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "kB", "MB", "GB"];
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1000.0 && unit + 1 < UNITS.len() {
        size /= 1000.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes}B") } else { format!("{size:.3}{}", UNITS[unit]).replace(".000", "") }
}
