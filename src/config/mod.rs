//! The master configuration as plain, validated data.

pub mod diff;
mod model;
pub mod print;
pub mod validate;
mod worker;

pub use model::*;
pub use worker::*;
