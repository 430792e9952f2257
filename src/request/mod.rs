//! The client's request, as it arrives: what it is (`operation`, or `azure` for apps written for
//! Azure OpenAI), who sent it (`auth`, `intake`) and its body, read once (`body`).

pub mod auth;
pub mod azure;
pub mod body;
pub mod intake;
pub mod operation;
