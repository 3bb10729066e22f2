//! kiln: a build master in the Buildbot tradition, configured by Rhai
//! scripts. See ARCHITECTURE.md for the map of modules and data flow.

pub mod cli;
pub mod config;
pub mod diagnostics;
pub mod memory;
pub mod script;

#[global_allocator]
static ALLOCATOR: memory::Meter = memory::Meter;
