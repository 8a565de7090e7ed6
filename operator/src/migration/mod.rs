//! The Migration controller: the phase machine ([`phase`]) decides, the reconciler carries
//! decisions out.

pub mod phase;

#[cfg(test)]
mod phase_tests;
