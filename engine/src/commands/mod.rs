//! One module per `kiln` subcommand. Each has an `Args` struct (clap) and a
//! `run(&Global, Args) -> anyhow::Result<i32>` returning the exit code.

pub mod debug;
pub mod du;
pub mod prune;

use crate::config::Global;

/// All subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Developer tools (e.g. `kiln debug parse`).
    #[command(subcommand)]
    Debug(debug::DebugCommand),
    /// Show build-cache disk usage.
    Du(du::Args),
    /// Remove build cache.
    Prune(prune::Args),
}

/// Run one subcommand; returns the process exit code.
pub fn dispatch(global: &Global, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Debug(c) => debug::run(global, c),
        Command::Du(a) => du::run(global, a),
        Command::Prune(a) => prune::run(global, a),
    }
}
