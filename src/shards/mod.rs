//! Elastic shards: managed topics whose hash space is split and merged while producers and
//! consumers keep running.
//!
//! - `map`: the shard map (ranges, partitions, gates) and the pure split/merge operations.
//! - `routing`: which hash a record routes by.
//! - `registry`: the maps this instance routes with, swapped atomically.
//! - `controller`: executes splits and merges (seal protocol) and runs the autoscaler.
//! - `gates`: which records of a gated partition a consumer group may see yet.
//! - `group_state`: Kafka's view of the groups (owners, commits), the gates' authority.
//! - `produce`: produce to managed topics (rerouting, shardgate's idempotent writer lanes).
//! - `placement`, `sampler`: where a split goes and which replicas move; the autoscaler's
//!   measurements.
//! - `moves`: replica moves as the map records them, judged against Kafka's state.
//! - `stored`: a topic's config and map as one store document.

pub mod controller;
pub mod gates;
pub mod group_state;
pub mod map;
pub mod moves;
pub mod placement;
pub mod produce;
pub mod registry;
pub mod routing;
pub mod sampler;
pub mod stored;

pub use crate::config::{AutoscaleConfig, RouteField, TopicConfig};
pub use map::{HASH_END, MapError, Shard, ShardMap, ShardState};
