//! The master configuration as plain, validated data.

pub mod diff;
mod listen;
mod model;
pub mod print;
mod properties;
pub mod validate;
mod worker;
mod www;

pub use listen::*;
pub use model::*;
pub use properties::*;
pub use worker::*;
pub use www::*;
