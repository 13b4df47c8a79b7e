//! `kiln debug ...`: developer tools.

use crate::config::Global;

/// `kiln debug` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DebugCommand {
    /// Print the parsed AST of a Dockerfile.
    Parse {
        /// Print JSON with source ranges.
        #[arg(long)]
        json: bool,
        /// The Dockerfile.
        file: std::path::PathBuf,
    },
}

/// Run a debug subcommand.
pub fn run(_global: &Global, command: DebugCommand) -> anyhow::Result<i32> {
    match command {
        DebugCommand::Parse { .. } => anyhow::bail!("kiln debug parse: the parser is not wired in yet"),
    }
}
