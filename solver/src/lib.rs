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
#![deny(missing_docs)]

pub mod worker;

pub use worker::{ExecRequest, Executor, HostMount, HostMountSource, ImageSource, LogSink, ResolvedImage};
