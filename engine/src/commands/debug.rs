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
        DebugCommand::Parse { json, file } => parse(json, &file),
    }
}

/// Parse `file` and print its AST: BuildKit's dump format, or JSON with
/// every node's range. A parse error goes to stderr with exit code 1.
fn parse(json: bool, file: &std::path::Path) -> anyhow::Result<i32> {
    let data = std::fs::read(file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match kiln_frontend::parser::parse(&data) {
        Ok(result) => {
            for w in &result.warnings {
                eprintln!("[WARNING]: {}", w.short);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&result.ast)?);
            } else {
                println!("{}", result.ast.dump());
            }
            Ok(0)
        }
        Err(err) => {
            let err = err.in_file(name).with_source(&String::from_utf8_lossy(&data));
            eprintln!("{err}");
            Ok(1)
        }
    }
}
