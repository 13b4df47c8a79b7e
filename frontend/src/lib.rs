//! kiln's Dockerfile frontend: text in, build graph out.
//!
//! Three stages, each with its own types, as BuildKit splits them:
//!
//! 1. [`parser`] turns Dockerfile text into an AST of [`parser::Node`]s, each
//!    with its source [`parser::Span`] (directives, continuations, heredocs,
//!    JSON and shell forms); [`parser::Node::dump`] prints BuildKit's dump.
//!    [`shell`] is BuildKit's shell-word lexer (`$VAR`, `${VAR:-x}`, quotes,
//!    word splitting).
//! 2. [`instructions`] types the AST: one struct per instruction, flags
//!    parsed and validated (`--mount`, `--from`, `--chown`, ...).
//! 3. [`lower()`] turns the stages into a [`graph::Definition`] of ops
//!    (`Source`/`Exec`/`File`/`Merge`) plus the target's image config and
//!    history, asking an [`ImageMetaResolver`] for base images' configs.
//!    [`dockerignore`] matches context paths against `.dockerignore`.
//!
//! Beside the pipeline: [`call`] answers `--call outline|targets|check`
//! without building. Every error is a [`FrontendError`] with its position.
//!
//! The key design choice: expansion happens during lowering, where ARG/ENV
//! scope is known, never during parsing. This crate depends on no other kiln
//! crate and touches no files beyond the Dockerfile and its ignore file.
#![deny(missing_docs)]

pub mod call;
pub mod dockerignore;
pub mod error;
pub mod goquote;
pub mod graph;
pub mod image;
pub mod instructions;
pub mod lower;
pub mod parser;
pub mod shell;

pub use error::FrontendError;
pub use graph::{Definition, Op, OpIndex, OpMeta, OpNode, Platform};
pub use image::{History, ImageConfig};
pub use lower::{ImageMetaResolver, LowerOptions, lower};
pub use parser::Span;
