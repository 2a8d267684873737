//! One module per group of subcommands: each command's arguments (clap) and what it does.
//! `main.rs` only parses and dispatches here.

pub mod data;
pub mod eval;
pub mod inspect;
pub mod pictures;
pub mod run;
pub mod sweep;
