//! Prices: the catalog, model-id resolution and exact cost in nano-USD.

pub mod catalog;
pub mod litellm;
pub mod money;

pub use catalog::{Catalog, ModelPrice, Resolved, SharedCatalog};
pub use money::{NanoUsd, Rate};
