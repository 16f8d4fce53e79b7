//! shardgate: a Kafka wire-protocol proxy with elastic shards.
//!
//! Layers, lowest first (`layering.rs` checks them; docs/ARCHITECTURE.md has the module map):
//! - `protocol`, `telemetry`, `alloc`, `tls`, `auth`: wire format, metrics, allocation guard,
//!   TLS, client authentication (SASL mechanisms, credentials).
//! - `config`: the validated configuration, managed topics' config included.
//! - `http`: a minimal blocking HTTP(S) client (CLI, admin forwarding, OAuth tokens).
//! - `store`: versioned documents (shard maps), instance registry, leader lock.
//! - `security`: users and ACL rules kept in the store, followed by every instance.
//! - `upstream`: connections to the real cluster and its topology.
//! - `shards`: shard maps, routing, gates, the controller, managed-topic produce.
//! - `prefetch`: consumer profiles, content embedders and their background pool.
//! - `proxy`: the client side (connections and one module per request path).
//! - `admin`: admin HTTP; `app`: the composition root that wires all of it.

pub mod admin;
pub mod alloc;
pub mod app;
pub mod auth;
pub mod config;
pub mod http;
pub mod prefetch;
pub mod protocol;
pub mod proxy;
pub mod security;
pub mod shards;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;

#[cfg(test)]
mod layering;
