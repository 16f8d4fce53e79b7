//! Ordering gates on the fetch path: what a gate lets a consumer see of a partition's
//! records (applied whenever an answer goes out, from upstream or from memory), and which
//! children of a split a gate holds back but is about to let through (read ahead, so the
//! consumer finds them in memory when it opens).

use std::collections::HashSet;
use std::time::Duration;

use kafka_protocol::messages::fetch_response::PartitionData;

use super::plan::{Key, Want};
use crate::proxy::Ctx;
use crate::shards::gates::{Consumer, records_before};

/// The records of a gated partition that `who` may see (`None`: no gate applies). Several
/// gates may cover one partition (one per split or merge that moved keys onto it): records
/// are held from the first offset a closed gate covers.
pub(super) fn through(
    ctx: &Ctx,
    who: &Consumer,
    conn: u64,
    topic: &str,
    p: &PartitionData,
) -> Option<bytes::Bytes> {
    let m = ctx.shards.get(topic)?;
    let fallback = match m.config.autoscale.gate_fallback_secs {
        0 => None,
        s => Some(Duration::from_secs(s)),
    };
    let from = m
        .map
        .gates
        .iter()
        .filter(|g| g.partition == p.partition_index)
        .filter(|g| !ctx.groups.gate_open(who, conn, topic, g, fallback))
        .map(|g| g.from_offset.unwrap_or(0))
        .min()?;
    let records = p.records.as_ref()?;
    let kept = records_before(records, from);
    if kept.len() < records.len() {
        metrics::counter!("shardgate_gate_held_fetches_total", "topic" => topic.to_string())
            .increment(1);
    }
    Some(kept)
}

/// The partitions of `held` (answers a gate held back from this fetch) whose every gate is
/// about to open: sealed, with the consumer already delivered each parent up to its seal
/// (`GroupTracker::gate_opening`), so only its commit is missing. Those are read ahead
/// beyond the held answer; the others are not (a group far behind a parent could leave
/// what is read ahead of the child to expire unread, again and again).
pub(super) fn opening(
    ctx: &Ctx,
    who: Option<&Consumer>,
    conn: u64,
    held: &HashSet<Key>,
    wants: &[Want],
) -> HashSet<Key> {
    let Some(who) = who.filter(|_| !held.is_empty()) else {
        return HashSet::new();
    };
    wants
        .iter()
        .filter(|w| held.contains(&w.key))
        .filter(|w| {
            let Some(m) = w.name.as_ref().and_then(|n| ctx.shards.get(n)) else {
                return false;
            };
            let topic = w.name.as_deref().unwrap_or_default();
            m.map
                .gates
                .iter()
                .filter(|g| g.partition == w.key.1)
                .all(|g| ctx.groups.gate_opening(who, conn, topic, g))
        })
        .map(|w| w.key.clone())
        .collect()
}
