//! shardgate: a Kafka wire-protocol proxy.
//!
//! - `protocol`: framing, headers, the supported-version table.
//! - `proxy`: the client side (connections and one module per request path).
//! - `upstream`: connections to the real cluster and its topology.
//! - `admin`, `telemetry`: HTTP endpoints and metrics.

pub mod admin;
pub mod alloc;
pub mod app;
pub mod config;
pub mod protocol;
pub mod proxy;
pub mod shards;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;

#[cfg(test)]
mod layering;
