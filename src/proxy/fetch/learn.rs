//! What a fetch teaches prefetch: whether its answers came from memory (hits, late, misses),
//! and the consumer profiles (positions, delivered record sets for content sampling).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::assemble;
use super::plan::{Key, Want};
use crate::protocol::RequestFrame;
use crate::proxy::Ctx;
use crate::proxy::connection::ClientConn;

/// Counts the partitions that got records by where they came from, the records delivered
/// (all, and from memory: the coverage of prefetch), and a response with records for which
/// the request sent no upstream poll of its own (`polled`: it did). With prefetch off
/// (`prefetch` false) only the records delivered.
pub(super) fn count(
    wants: &[Want],
    advanced: &assemble::Delivered,
    hits_of: &HashSet<Key>,
    late_of: &HashSet<Key>,
    polled: bool,
    prefetch: bool,
) {
    // Per partition that got records: from memory (hit: a shared pre-read, or this
    // connection's queue as it was when the request came), late (a read-ahead poll under
    // way when the request came, landed after: no poll of its own, but waited for) or
    // read for this request (miss).
    let (mut hits, mut late, mut records, mut all) = (0u64, 0u64, 0u64, 0u64);
    for (k, (next, _)) in advanced {
        let Some(w) = wants.iter().find(|w| &w.key == k) else {
            continue;
        };
        all += (next - w.part.fetch_offset).max(0) as u64;
        if hits_of.contains(k) {
            hits += 1;
        } else if late_of.contains(k) {
            late += 1;
        } else {
            continue;
        }
        records += (next - w.part.fetch_offset).max(0) as u64;
    }
    metrics::counter!("shardgate_fetch_delivered_records_total").increment(all);
    if !prefetch {
        return;
    }
    metrics::counter!("shardgate_prefetch_hits_total").increment(hits);
    metrics::counter!("shardgate_prefetch_late_total").increment(late);
    metrics::counter!("shardgate_prefetch_misses_total")
        .increment(advanced.len() as u64 - hits - late);
    metrics::counter!("shardgate_prefetch_delivered_records_total").increment(records);
    if !advanced.is_empty() && !polled {
        metrics::counter!("shardgate_prefetch_fetches_saved_total").increment(1);
    }
}

/// One line per answered fetch at debug level (`shardgate::proxy::fetch=debug`): where its
/// partitions came from and what the connection's queue holds after it.
pub(super) fn trace(
    fetch: &super::Fetch<'_>,
    asked: usize,
    advanced: &assemble::Delivered,
    started: Instant,
) {
    tracing::debug!(
        conn = fetch.client.id,
        asked,
        delivered = advanced.len(),
        bytes = advanced.values().map(|(_, r)| r.len()).sum::<usize>(),
        hits = fetch.hits.len(),
        late = fetch.late.len(),
        polled = fetch.polled.len(),
        queued = fetch.client.fetch.queued_bytes(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "fetch answered"
    );
}

/// Tells the consumer profiles where this connection fetched and what it got.
pub(super) fn profile(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    wants: &[Want],
    advanced: &assemble::Delivered,
    isolation: i8,
    asked: Instant,
) {
    let client_id = req.header.client_id.as_deref().unwrap_or("");
    let first = ctx.profiles.fetched(
        client.id,
        client.peer.ip(),
        client_id,
        isolation,
        asked,
        // Partitions with a leader only: a name no topic has is not a position to keep.
        wants.iter().filter(|w| w.leader.is_ok()).filter_map(|w| {
            let got = advanced.get(&w.key);
            Some(crate::prefetch::profiles::Fetched {
                topic: w.name.as_ref()?.as_str(),
                partition: w.key.1,
                from: w.part.fetch_offset,
                next: got.map(|g| g.0),
                bytes: got.map_or(0, |g| g.1.len()),
            })
        }),
    );
    // One delivered record set now and then goes to the content sampler (its rate decides).
    if let Some(sampler) = &ctx.sampler
        && !advanced.is_empty()
        && (first || sampler.due())
    {
        // Which of the partitions: any will do, as long as it is not always the same one.
        let pick = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize);
        let pick = (pick ^ client.id as usize) % advanced.len();
        let (key, (_, records)) = advanced.iter().nth(pick).expect("pick < len");
        if let Some(name) = wants
            .iter()
            .find(|w| &w.key == key)
            .and_then(|w| w.name.as_ref())
        {
            let taken = sampler.offer(
                crate::prefetch::content::SampleKey {
                    conn: client.id,
                    topic: name.as_str().into(),
                    partition: key.1,
                },
                records.clone(),
            );
            // A dropped first sample is retried on the connection's next delivery.
            if taken && first {
                ctx.profiles.sampled(client.id);
            }
        }
    }
}

/// When the group member this connection belongs to got a new assignment: the read-ahead of
/// partitions it no longer holds (revoked in a rebalance) is dropped and no longer read.
/// Looked for at most once a second per connection; left alone when none of what the
/// connection fetches is in the assignment (the link to the member is then doubtful: the
/// queue's own expiry, `readahead::UNASKED_TTL`, still applies).
pub(super) fn unassigned(ctx: &Ctx, client: &ClientConn) {
    let now = Instant::now();
    let known = {
        let mut a = client.fetch.assignment.lock().expect("assignment");
        if a.1
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        a.1 = Some(now);
        a.0
    };
    let Some((at, assigned)) = ctx.profiles.assignment_of(client.id, known) else {
        return;
    };
    client.fetch.assignment.lock().expect("assignment").0 = Some(at);
    let topo = ctx.topology().load();
    let holds = |k: &Key| -> Option<bool> {
        let name = if k.0.name.is_empty() {
            topo.topic_name(&k.0.id)?.as_str()
        } else {
            k.0.name.as_str()
        };
        Some(
            assigned
                .binary_search_by(|(t, p)| (t.as_str(), *p).cmp(&(name, k.1)))
                .is_ok(),
        )
    };
    if client
        .fetch
        .asked_keys()
        .iter()
        .any(|k| holds(k) == Some(true))
    {
        // A topic id no longer known is kept: only what is known not to be assigned goes.
        client.fetch.retain_assigned(|k| holds(k) != Some(false));
    }
}
