//! `colony-schema`
