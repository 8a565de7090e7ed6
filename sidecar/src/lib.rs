//! Eden's data plane: a RESP proxy that sits on `localhost` in the application's pod.
//!
//! A request's path: [`server`] accepts the client, [`session`] reads its bytes and finds
//! request boundaries with [`frame`], classifies each request with [`command`], and forwards
//! whole batches to the [`upstream`]; replies are copied back as bytes. [`admin`] serves health
//! and [`metrics`] on a separate port. The strategy the operator pushes arrives through
//! [`config`], and [`lease`] acknowledges it. [`replicate`] is the replication engine and the
//! verifier; [`cli`] holds the binary's `replicate` and `verify` verbs.
//!
//! Under a strategy, [`plan`] turns each applied generation into upstreams, [`route`] decides
//! per command, [`session::routed`] carries the decisions out with [`reply`] boundaries to keep
//! replies in order, [`mirror`] sends what the other side must also see, and [`hold`] is the
//! cutover pause.

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod command;
pub mod command_info;
pub mod config;
pub mod conversation;
pub mod frame;
pub mod freshness;
pub mod hold;
pub mod human;
pub mod lease;
pub mod metrics;
pub mod mirror;
pub mod plan;
pub mod replicate;
pub mod reply;
pub mod route;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod upstream;
