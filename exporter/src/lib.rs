//! kiln's exporter: snapshots + image config → image outputs.
//! (Skeleton: the outputs issue fills this in.)
#![deny(missing_docs)]
