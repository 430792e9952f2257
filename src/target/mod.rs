//! One target's request: how it is addressed and authenticated (`provider`), the body it gets
//! (`rewrite`), which headers go where (`forward`), and the Entra ID tokens an Azure target may
//! need (`token`).

pub mod forward;
pub mod provider;
pub mod rewrite;
pub mod token;
