//! `colony-averaging`: DHT matchmaking and butterfly all-reduce.
//!
//! This crate is being built under the averaging issue; it exports nothing yet.
