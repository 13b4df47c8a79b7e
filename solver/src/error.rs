//! The error a failed solve returns: which op failed, where it came from in
//! the Dockerfile, why, and the last lines of its output.

use std::fmt;

/// A failed op. Ops that depended on it fail with the same error, so the
/// solve reports the root cause, not its consequences.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveError {
    /// The op's progress name, e.g. `[build 2/4] RUN make`.
    pub op: String,
    /// Dockerfile line the op came from, when known.
    pub line: Option<usize>,
    /// What went wrong.
    pub message: String,
    /// The last lines the op's process printed (empty for non-exec ops).
    pub log_tail: Vec<String>,
}

impl fmt::Display for SolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op)?;
        if let Some(line) = self.line {
            write!(f, " (Dockerfile line {line})")?;
        }
        write!(f, ": {}", self.message)?;
        if !self.log_tail.is_empty() {
            write!(f, "\n--- last {} lines of output ---", self.log_tail.len())?;
            for l in &self.log_tail {
                write!(f, "\n{l}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for SolveError {}
