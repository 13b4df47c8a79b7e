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
    // Rust ignores SIGPIPE, so `println!` into a closed pipe (`kiln images |
    // head -1`) panics. A CLI should just stop, as `ls | head` does: restore
    // the default. Not for `serve`: the daemon must outlive clients that hang
    // up, and sees EPIPE as an error on that one connection.
    if !matches!(cli.command, Command::Serve(_)) {
        // SAFETY: setting a signal disposition to SIG_DFL before any threads
        // start; no handler is installed.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let code = match cli.global.resolve().and_then(|g| commands::dispatch(&g, cli.command)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln: {err:#}");
            1
        }
    };
    std::process::exit(code);
}
