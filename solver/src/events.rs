//! Progress events: what the solver reports while it works.
//!
//! Events are keyed by a vertex digest (the op's definition key, stable for
//! one op within and across builds) and carry the op's progress name. The
//! solver never formats text; renderers (in the engine) consume the stream.

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

/// One progress event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The op started computing (after its inputs were ready).
    Started {
        /// Vertex digest.
        vertex: String,
        /// Progress name, e.g. `[build 2/4] RUN make`.
        name: String,
    },
    /// The op's result came from the cache: nothing was executed.
    Cached {
        /// Vertex digest.
        vertex: String,
        /// Progress name.
        name: String,
    },
    /// The op finished.
    Done {
        /// Vertex digest.
        vertex: String,
        /// Progress name.
        name: String,
        /// Seconds spent computing.
        seconds: f64,
    },
    /// The op failed.
    Error {
        /// Vertex digest.
        vertex: String,
        /// Progress name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// One line of the op's output.
    Log {
        /// Vertex digest.
        vertex: String,
        /// `stdout` or `stderr`.
        stream: String,
        /// The line, without its newline.
        line: String,
    },
}

impl Event {
    /// The vertex the event is about.
    pub fn vertex(&self) -> &str {
        match self {
            Event::Started { vertex, .. }
            | Event::Cached { vertex, .. }
            | Event::Done { vertex, .. }
            | Event::Error { vertex, .. }
            | Event::Log { vertex, .. } => vertex,
        }
    }
}

/// Where a solve sends its events; `None` drops them.
#[derive(Debug, Clone, Default)]
pub struct EventSink(pub Option<UnboundedSender<Event>>);

impl EventSink {
    /// Send one event (a closed receiver is not an error).
    pub fn send(&self, event: Event) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(event);
        }
    }
}
