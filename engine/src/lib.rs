//! kiln's engine: everything that touches the host.
//! (Skeleton: the engine issue fills this in.)
#![deny(missing_docs)]
