//! kiln's engine: everything that touches the host.
//!
//! - [`config::Global`] — the settings every command shares (store root,
//!   registry mirrors, insecure registries, daemon address).
//! - [`commands`] — one module per `kiln` subcommand; the binary only
//!   parses flags and dispatches here.
//!
//! Further modules (registry client, image store, unpacking, container
//! runtime, daemon) implement the solver's host seams
//! ([`kiln_solver::Executor`], [`kiln_solver::ImageSource`]).
#![deny(missing_docs)]

pub mod build;
pub mod client;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod executor;
pub mod image_source;
pub mod progress;
pub mod registry;
pub mod remote_cache;
pub mod runtime;
pub mod unpack;
pub mod zygote;
