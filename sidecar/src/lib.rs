//! Eden's data plane: a RESP proxy that sits on `localhost` in the application's pod.

pub mod config;
pub mod lease;
