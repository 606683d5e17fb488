//! tollgate: an OpenAI-compatible cost-tracking reverse proxy.
//!
//! The data path, top to bottom: `server` (router) -> `proxy`, whose stages
//! are admit -> route -> reserve -> forward -> settle (`proxy/mod.rs` says
//! what each owns), using `format` (what the client speaks: request facts,
//! usage, errors), `upstream` and `provider` (where it goes: URL,
//! credentials), `usage` (meters), `pricing` (nano-USD) and `budget`;
//! `settle` hands the usage row to `store` (batched writer, one set of
//! queries over SQLite or Postgres).

pub mod alerts;
pub mod app;
pub mod auth;
pub mod budget;
pub mod config;
pub mod error;
pub mod format;
pub mod glob;
pub mod limits;
pub mod manage;
pub mod metrics;
pub mod numbers;
pub mod period;
pub mod pricing;
pub mod provider;
pub mod proxy;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod upstream;
pub mod usage;
pub mod words;
