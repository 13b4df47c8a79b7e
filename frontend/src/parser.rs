//! Dockerfile text → AST with source ranges.

use serde::{Deserialize, Serialize};

/// A range in the Dockerfile: 1-based lines and columns, end inclusive line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// First line (1-based).
    pub start_line: usize,
    /// Column on the first line (1-based).
    pub start_col: usize,
    /// Last line (1-based).
    pub end_line: usize,
    /// Column after the last character on the last line (1-based).
    pub end_col: usize,
}

/// An AST node (to be completed by the parser).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Node {
    /// Where it came from.
    pub span: Span,
}
