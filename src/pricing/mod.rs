//! Prices: the catalog, model-id resolution and exact cost in nano-USD.

pub mod catalog;
pub mod gpu;
pub mod litellm;
pub mod money;
pub mod price;

pub use catalog::{Catalog, Resolved, SharedCatalog};
pub use money::{NanoUsd, Rate};
pub use price::{Breakdown, Line, Meter, ModelPrice, Priced};
