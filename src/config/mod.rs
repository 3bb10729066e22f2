//! The master configuration as plain, validated data.

mod model;
pub mod validate;

pub use model::*;
