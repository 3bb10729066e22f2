//! The master configuration as plain, validated data.

mod model;
pub mod print;
pub mod validate;

pub use model::*;
