//! `colony-benches`: criterion benches and multi-process harnesses shared helpers.
