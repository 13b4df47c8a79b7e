//! One module per `kiln` subcommand. Each has an `Args` struct (clap) and a
//! `run(&Global, Args) -> anyhow::Result<i32>` returning the exit code.

pub mod debug;
pub mod run;

use crate::config::Global;

/// All subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Developer tools (e.g. `kiln debug parse`).
    #[command(subcommand)]
    Debug(debug::DebugCommand),
    /// Run a command in a new container.
    Run(run::Args),
}

/// Run one subcommand; returns the process exit code.
pub fn dispatch(global: &Global, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Debug(c) => debug::run(global, c),
        Command::Run(a) => run::run(global, a),
    }
}
