//! Predictive prefetch: what each consumer reads (profiles), and reading ahead for it.
//!
//! - `profiles`: consumer identity (group + member from the group protocol, linked to fetch
//!   connections) and what each consumes: assignment, positions, rate, commits.

pub mod profiles;

pub use profiles::Profiles;
