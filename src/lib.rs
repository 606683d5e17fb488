//! tollgate: an OpenAI-compatible cost-tracking reverse proxy.
//!
//! The data path, top to bottom: `server` (router) -> `proxy` (team, body,
//! upstream, forward, tee) -> `usage` (tokens) -> `pricing` (nano-USD) ->
//! `proxy::settle` (metrics + usage row) -> `store` (batched writer).

pub mod app;
pub mod auth;
pub mod budget;
pub mod config;
pub mod error;
pub mod format;
pub mod glob;
pub mod manage;
pub mod metrics;
pub mod numbers;
pub mod period;
pub mod pricing;
pub mod provider;
pub mod proxy;
pub mod server;
pub mod store;
pub mod upstream;
pub mod usage;
pub mod words;
