//! The `kiln` binary: parses flags, resolves the global settings once, and
//! hands off to `kiln_engine::commands`.

use clap::Parser;
use kiln_engine::commands::{self, Command};
use kiln_engine::config::GlobalArgs;

/// kiln builds container images from Dockerfiles, runs and pushes them.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.global.resolve().and_then(|g| commands::dispatch(&g, cli.command)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln: {err:#}");
            1
        }
    };
    std::process::exit(code);
}
