//! What comes back: the filter's own replies (`reply`), an answer's token usage (`usage`), the
//! response cache (`cache`) and which target owns a Responses API id (`affinity`).

pub mod affinity;
pub mod cache;
pub mod reply;
pub mod usage;
