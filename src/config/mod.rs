//! The master configuration as plain, validated data.

pub mod diff;
mod listen;
mod model;
pub mod print;
pub mod validate;
mod worker;
mod www;

pub use listen::*;
pub use model::*;
pub use worker::*;
pub use www::*;
