//! kiln's solver: runs a [`kiln_frontend::Definition`] to a chain of layers.
//!
//! The solver knows ops, inputs and cache keys — not Dockerfiles and not the
//! host. Each op's key is the digest of its definition, its inputs' keys
//! and, for file reads, the content checksum of exactly the files it reads.
//! Independent ops run in parallel; identical ops requested concurrently run
//! once. Host effects go through two small traits in [`worker`] that the
//! engine implements ([`worker::Executor`] runs a process in a container,
//! [`worker::ImageSource`] fetches and unpacks a base image), so the solver
//! can be tested with fakes.
//!
//! Entry point: [`Solver::solve`] with a [`SolveRequest`]; progress comes
//! out as [`Event`]s; a failure is a [`SolveError`] naming the op.
//!
//! Modules: [`solver`] (scheduler, result model, cache records),
//! [`cachekey`] (keys and content checksums), [`fileop`] (COPY/ADD, mkdir,
//! rm, symlink done natively), `exec` (RUN and its mounts), [`tree`]
//! (build contexts and layer chains as file sources), [`pattern`]
//! (`.dockerignore` and glob matching), [`gc`] (usage and pruning of the
//! build cache), [`events`], [`error`].
#![deny(missing_docs)]

pub mod cachekey;
pub mod error;
pub mod events;
mod exec;
pub mod fileop;
pub mod gc;
mod http;
pub mod pattern;
pub mod solver;
pub mod tree;
pub mod worker;

pub use error::SolveError;
pub use events::{Event, EventSink};
pub use solver::{SolveOutput, SolveRequest, SolvedStep, Solver};
pub use worker::{CacheImport, ExecRequest, Executor, HostMount, HostMountSource, ImageSource, LogSink, LogStream, ResolvedImage};
