//! kiln: a build master in the Buildbot tradition, configured by Rhai
//! scripts. See ARCHITECTURE.md for the map of modules and data flow.

pub mod bench;
pub mod builds;
pub mod changes;
pub mod cli;
pub mod client;
pub mod config;
pub mod diagnostics;
pub mod events;
pub mod http;
pub mod master;
pub mod memory;
pub mod net;
pub mod queuedir;
pub mod quickstart;
pub mod repl;
pub mod scaffold;
pub mod schedulers;
pub mod script;
pub mod store;
pub mod suggest;
pub mod sync;
pub mod throttle;
pub mod workers;

#[global_allocator]
static ALLOCATOR: memory::Meter = memory::Meter;
