//! Predictive prefetch (docs/ARCHITECTURE.md, "prefetch"): what each consumer will fetch next,
//! read ahead and answered exactly. Built so far:
//!
//! - `profiles`: consumer identity (group + member from the group protocol, linked to fetch
//!   connections) and what each consumes: assignment, positions, rate, commits.
//! - `content`: delivered records sampled at a bounded rate, off the request path, into
//!   profiles' routing-value histograms and (through `embed`) content centroids.
//! - `embed`: the embedders that turn sampled record content into vectors, the bounded
//!   background pool that runs them off the request path, and the running-mean centroids the
//!   predictor compares partitions' content with.
//! - `offsets`: committed offsets read when a classic group's leader sends its assignment,
//!   answering its members' OffsetFetch a round trip sooner (`proxy::rebalance_offsets`).

pub mod content;
pub mod embed;
pub mod offsets;
pub mod profiles;

pub use profiles::Profiles;
