//! `colony-optim`: the collaborative optimizer.
//!
//! This crate is being built under the optimizer issue; it exports nothing yet.
