//! The fetch path: plan → sources → post-process → assemble.
//!
//! - plan (`plan.rs`): the partitions the request covers (from the request or its KIP-227
//!   session, `session.rs`), their names and upstream leaders.
//! - sources: the connection's read-ahead (`readahead.rs`: answers that came in after their
//!   request was answered, the part of an answer beyond max_bytes) and upstream
//!   long-polls (`upstream.rs`: the client's max_wait and min_bytes sent on, one poll per
//!   broker at a time on a socket of the connection's own). Waiting is the broker's: an idle
//!   consumer costs one upstream fetch per broker per wait. The predictive prefetch queue will
//!   be one more source here.
//! - post-process: ordering gates of managed topics, pool-growth nudges, no real broker
//!   named in hints.
//! - assemble (`assemble.rs`): max_bytes over the whole response (the first batch may
//!   exceed it, as Kafka does), only what changed for incremental sessions, and the encoding
//!   with record bytes passed on as slices of the upstream frames (vectored write, no copy).
//!
//! The request answers as soon as min_bytes arrived from any brokers, an error arrived, or
//! the wait ran out; a poll still running then serves the connection's next fetch.

mod assemble;
mod gated;
mod learn;
mod pace;
mod plan;
mod queued;
mod rank;
pub mod readahead;
mod refill;
pub mod session;
pub mod shared;
mod upstream;
mod upstream_sessions;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::FutureExt;
use kafka_protocol::messages::fetch_response::PartitionData;
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse};

use super::connection::ClientConn;
use super::{Ctx, HandlerError, Reply};
use crate::protocol::{RequestFrame, codes, encode_response};
use crate::shards::gates::Consumer;
use plan::{Key, Want};

pub async fn handle(
    ctx: &std::sync::Arc<Ctx>,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let mut body: FetchRequest = req.decode_body()?;
    // Every sub-fetch copies this body: forced once here, it holds for all of them.
    let forced = super::client_fields::fetch_as_consumer(&mut body);
    super::client_fields::report(
        client,
        ApiKey::Fetch,
        req.header.client_id.as_deref(),
        &forced,
    );
    let version = req.api_version;
    let by_id = version >= 13;
    let started = Instant::now();
    // The client's max wait, capped: a fetch asking to wait for days is answered (empty) at the
    // cap, and the client fetches again.
    let max_wait = (body.max_wait_ms.max(0) as u64).min(ctx.settings.raw.limits.max_fetch_wait_ms);
    let deadline = started + Duration::from_millis(max_wait);
    // Until the stored maps are loaded a managed topic looks like a plain one: its gates would
    // not apply. Wait (within the client's max wait); still unloaded, answer retriable errors.
    if !ctx.shards.loaded() {
        ctx.shards.wait_loaded(deadline - started).await;
    }
    let opened = match ctx.fetch_sessions.open(&body, by_id) {
        Ok(o) => o,
        Err(code) => {
            let resp = FetchResponse::default().with_error_code(code);
            return Ok(Reply::Frame(encode_response(
                ApiKey::Fetch,
                version,
                req.correlation_id(),
                &resp,
            )?));
        }
    };
    let kind = opened.kind;
    let (min_bytes, max_bytes) = (body.min_bytes.max(1) as usize, body.max_bytes);
    let loaded = ctx.shards.loaded();
    let mut wants = plan::resolve(&ctx.topology().load(), opened.parts, by_id, loaded);
    if loaded && plan::any_unknown(&wants) {
        let topo = ctx.topology().load();
        ctx.topology()
            .refresh_after(topo.version, Duration::from_millis(500))
            .await;
        let parts = wants.into_iter().map(|w| (w.key, w.part)).collect();
        wants = plan::resolve(&ctx.topology().load(), parts, by_id, loaded);
    }
    if let Some(access) = crate::proxy::authorize::Access::of(ctx, client, ApiKey::Fetch) {
        plan::refuse_unreadable(&access, &mut wants);
    }
    let who = observe_positions(ctx, client, req, &wants);

    let mut fetch = Fetch {
        ctx,
        client,
        who: who.as_ref(),
        template: upstream::Template::new(body, version, req.header.client_id.clone()),
        got: HashMap::new(),
        bytes: 0,
        errors: false,
        throttle_ms: 0,
        held: HashSet::new(),
        polled: HashSet::new(),
        mine: HashMap::new(),
        covered: HashMap::new(),
        hits: HashSet::new(),
        late: HashSet::new(),
        first_take: true,
        ever_covered: HashSet::new(),
    };
    for w in &wants {
        if let Err(code) = w.leader {
            fetch.errors = true;
            fetch
                .got
                .insert(w.key.clone(), plan::error_answer(w.key.1, code));
        }
    }
    fetch.run(&wants, deadline, min_bytes).await;
    if kind.full() {
        // A full response lists every partition: wait for polls of partitions upstream
        // never reported on yet (each bounded by its own timeout).
        fetch.settle(&wants).await;
    }
    // Throttle times of polls folded since the last answer (this request's own or the
    // connection's read-ahead): the client backs off as it would with Kafka.
    let throttle = client.fetch.take_throttle();
    fetch.throttle_ms = fetch.throttle_ms.max(throttle);
    client.note_throttle(throttle);
    let (reply, advanced) = assemble::answer(
        &mut fetch,
        &wants,
        kind,
        max_bytes,
        version,
        req.correlation_id(),
    )?;
    client.fetch.note_delivered(
        advanced.values().map(|(_, r)| r.len()).sum(),
        wants
            .iter()
            .map(|w| w.part.partition_max_bytes.max(0) as usize)
            .sum(),
    );
    learn::trace(&fetch, wants.len(), &advanced, started);
    fetch.read_ahead(&wants, &advanced, Duration::from_millis(max_wait));
    learn::count(
        &wants,
        &advanced,
        &fetch.hits,
        &fetch.late,
        !fetch.polled.is_empty(),
        ctx.settings.raw.prefetch.mode() != crate::config::PrefetchMode::Off,
    );
    let isolation = fetch.template.body.isolation_level;
    learn::profile(ctx, client, req, &wants, &advanced, isolation, started);
    learn::unassigned(ctx, client);
    Ok(reply)
}

/// One fetch request at work.
struct Fetch<'a> {
    ctx: &'a std::sync::Arc<Ctx>,
    client: &'a ClientConn,
    who: Option<&'a Consumer>,
    template: upstream::Template,
    /// Partitions with an answer to deliver (records, an error, a divergence).
    got: HashMap<Key, PartitionData>,
    bytes: usize,
    errors: bool,
    throttle_ms: i32,
    /// Partitions whose records an ordering gate holds back (kept in the read-ahead, checked
    /// again instead of fetched again).
    held: HashSet<Key>,
    /// Brokers this request sent a poll to.
    polled: HashSet<i32>,
    /// The polls this request sent (sent with at most what was left of its wait).
    mine: HashMap<i32, upstream::SubFuture>,
    /// Partitions a shared pre-read in flight covers (not polled; its read is waited for).
    covered: HashMap<Key, upstream::SubFuture>,
    /// Partitions answered from memory: a shared pre-read, or the connection's read-ahead
    /// when it was there before this request polled anything.
    hits: HashSet<Key>,
    /// Partitions answered by a read-ahead poll that was under way when this request came.
    late: HashSet<Key>,
    /// Whether `take_ready` has not run yet (what it finds then was read ahead).
    first_take: bool,
    /// Partitions a pre-read covered at some point: when it lands empty, their broker may
    /// be polled once more in this request (it was skipped for them).
    ever_covered: HashSet<Key>,
}

impl Fetch<'_> {
    async fn run(&mut self, wants: &[Want], deadline: Instant, min_bytes: usize) {
        let poll_max = Duration::from_millis(self.ctx.settings.raw.limits.fetch_poll_max_ms);
        let mut poll = Duration::from_millis(5).min(poll_max);
        let mut polled = false;
        // Read-ahead polls that landed before this request came are in memory: filed first,
        // so what they hold counts as such.
        let landed: Vec<_> = self
            .polled_brokers(wants)
            .into_iter()
            .filter_map(|b| self.client.fetch.pending(b))
            .filter_map(|f| f.now_or_never())
            .collect();
        for r in &landed {
            self.fold(r);
        }
        loop {
            self.take_ready(wants);
            self.first_take = false;
            if self.bytes >= min_bytes || self.errors {
                return;
            }
            let now = Instant::now();
            if polled && now >= deadline {
                break;
            }
            // Upstream is asked at least once, also with max_wait 0 ("what is there now").
            let remaining = deadline.saturating_duration_since(now);
            let waits = self.poll_upstream(wants, remaining);
            polled = true;
            if remaining.is_zero() {
                break;
            }
            let tick = if self.held.is_empty() {
                remaining
            } else {
                poll.min(remaining)
            };
            self.wait(waits, tick).await;
            poll = (poll * 2).min(poll_max);
        }
        // The wait is over. The polls this request sent end about now (none was sent with a
        // longer wait than what was left): what they bring goes into this answer. A
        // read-ahead poll still out may wait longer; it serves the next fetch.
        let mine: Vec<_> = self.mine.drain().map(|(_, f)| f).collect();
        if !mine.is_empty() {
            for result in futures::future::join_all(mine).await {
                self.fold(&result);
            }
            self.take_ready(wants);
        }
    }

    /// The brokers leading `wants` (once each).
    fn polled_brokers(&self, wants: &[Want]) -> Vec<i32> {
        let mut brokers: Vec<i32> = wants.iter().filter_map(|w| w.leader.ok()).collect();
        brokers.sort_unstable();
        brokers.dedup();
        brokers
    }

    /// Takes what the read-ahead holds at the offsets asked for, through the gates.
    fn take_ready(&mut self, wants: &[Want]) {
        let state = &self.client.fetch;
        self.held.clear();
        self.covered.clear();
        let isolation = self.template.body.isolation_level;
        let topo = self.ctx.topology().load();
        let prefetch = self.ctx.settings.raw.prefetch.predictive();
        for w in wants {
            if self.got.contains_key(&w.key) {
                continue;
            }
            let took = state.take(&w.key, plan::Asked::of(&w.part), isolation);
            if let (readahead::Took::Dropped, Ok(b)) = (&took, w.leader) {
                // The client sought elsewhere: the chain reading there stops for its poll.
                state.yield_broker(b);
            }
            let p = match took {
                readahead::Took::Entry(t) => {
                    if t.data.records.as_ref().is_some_and(|r| !r.is_empty()) {
                        if self.first_take {
                            self.hits.insert(w.key.clone());
                        } else if t.ahead {
                            self.late.insert(w.key.clone());
                        }
                    }
                    let mut p = self.within_partition_max(w, t.data);
                    raise_marks(state, &w.key, &mut p);
                    p
                }
                _ if !prefetch => continue,
                _ => match self.ctx.shared_reads.find(
                    self.client.id,
                    w,
                    isolation,
                    topic_id(&topo, w),
                    leader_epoch(&topo, w),
                ) {
                    shared::Found::Ready(p) => {
                        self.hits.insert(w.key.clone());
                        let mut p = *p;
                        raise_marks(state, &w.key, &mut p);
                        p
                    }
                    shared::Found::InFlight(f) => {
                        self.covered.insert(w.key.clone(), f);
                        self.ever_covered.insert(w.key.clone());
                        continue;
                    }
                    shared::Found::Nothing => continue,
                },
            };
            let mut p = p;
            plan::scrub(&mut p);
            if p.error_code != codes::NONE {
                self.errors = true;
                self.got.insert(w.key.clone(), p);
                continue;
            }
            if let (Some(who), Some(name)) = (self.who, &w.name) {
                let before = p.records.as_ref().map_or(0, |r| r.len());
                let kept = gated::through(self.ctx, who, self.client.id, name, &p);
                if before > 0 && kept.as_ref().is_some_and(|k| k.is_empty()) {
                    // Everything held: keep it (charged again) for the next check rather
                    // than fetch again.
                    let charge = self.ctx.budget.charge(before);
                    state.hold(
                        w.key.clone(),
                        w.part.fetch_offset,
                        plan::Asked::of(&w.part),
                        isolation,
                        p,
                        charge,
                    );
                    self.held.insert(w.key.clone());
                    continue;
                }
                if let Some(k) = kept {
                    p.records = Some(k);
                }
                if self.ctx.shards.nudge(name, self.client.id) {
                    // The pool grew: a retriable error makes the client refresh metadata and
                    // see the new partitions (it fetches this offset again, nothing skipped).
                    p.error_code = codes::NOT_LEADER_OR_FOLLOWER;
                    p.records = Some(Default::default());
                    self.errors = true;
                    metrics::counter!("shardgate_pool_nudges_total", "topic" => name.to_string())
                        .increment(1);
                }
            }
            self.bytes += p.records.as_ref().map_or(0, |r| r.len());
            self.got.insert(w.key.clone(), p);
        }
    }

    /// A queued answer cut at whole batches to the partition max bytes the client asks with
    /// now (it may have been read for a larger one); the rest stays first in the queue. A
    /// first batch above it goes whole, as Kafka sends it.
    fn within_partition_max(&self, w: &Want, mut p: PartitionData) -> PartitionData {
        let limit = w.part.partition_max_bytes.max(0) as usize;
        let Some(records) = p.records.clone().filter(|r| r.len() > limit) else {
            return p;
        };
        let (fit, next) = plan::batches_within(&records, limit);
        if let (true, Some(next)) = (fit > 0, next) {
            let mut rest = p.clone();
            rest.records = Some(records.slice(fit..));
            p.records = Some(records.slice(..fit));
            let charge = self.ctx.budget.charge(records.len() - fit);
            self.client.fetch.put(
                w.key.clone(),
                next,
                None,
                self.template.body.isolation_level,
                rest,
                Some(charge),
            );
        }
        p
    }

    /// Makes sure every partition still waiting is being read: one poll per broker at a time
    /// (a poll already running for a broker is waited for; once it lands, the next round
    /// starts a fresh one if its partitions still have nothing). Returns the polls to wait on.
    fn poll_upstream(&mut self, wants: &[Want], remaining: Duration) -> Vec<upstream::SubFuture> {
        let state = &self.client.fetch;
        let mut by_broker: BTreeMap<i32, Vec<&Want>> = BTreeMap::new();
        for w in wants {
            if self.got.contains_key(&w.key)
                || self.held.contains(&w.key)
                || self.covered.contains_key(&w.key)
            {
                continue;
            }
            if let Ok(b) = w.leader {
                by_broker.entry(b).or_default().push(w);
            }
        }
        // A shared pre-read under way answers its partitions (or, empty, lets them be polled).
        let mut waits: Vec<upstream::SubFuture> = self.covered.values().cloned().collect();
        for (broker, ws) in by_broker {
            let asked: Vec<(&Key, plan::Asked)> = ws
                .iter()
                .map(|w| (&w.key, plan::Asked::of(&w.part)))
                .collect();
            if let Some(f) = state.pending_for(broker, &asked) {
                waits.push(f);
                continue;
            }
            // A partition left to a pre-read that then came back empty: poll for it now.
            let uncovered = ws.iter().any(|w| self.ever_covered.remove(&w.key));
            if self.polled.contains(&broker) && !uncovered {
                // This request's poll of it came back with nothing: the broker waited what
                // was left of the wait then (give or take its timer), no second poll.
                continue;
            }
            match self.start_poll(broker, &ws, remaining, readahead::PollKind::Own) {
                Some(f) => {
                    self.polled.insert(broker);
                    self.mine.insert(broker, f.clone());
                    waits.push(f);
                }
                // A read-ahead went out meanwhile: waited for as any poll in flight.
                None => waits.extend(state.pending(broker)),
            }
        }
        waits
    }

    /// Continuation read-ahead: after a response with records, the client's next fetch is
    /// sent now to every broker without a poll in flight (the partitions that got records
    /// from their next offset, or from the end of what the connection's queue holds of them;
    /// the others where they were), so upstream reads the next answer while this one is
    /// written to the client instead of after, and partitions of other brokers are read
    /// while a queue answers from memory; `refill.rs` keeps going while the queue has room.
    /// The next fetch of the connection picks the polls up. Consumers that got nothing cause
    /// no read-ahead (an idle consumer costs no extra polls), except of children of a split
    /// whose gate is about to open (`gated::opening`); children a gate holds further off are
    /// not read beyond the answer it holds.
    fn read_ahead(&self, wants: &[Want], advanced: &assemble::Delivered, max_wait: Duration) {
        let mode = self.ctx.settings.raw.prefetch.mode();
        if mode == crate::config::PrefetchMode::Off {
            return;
        }
        let opening = gated::opening(self.ctx, self.who, self.client.id, &self.held, wants);
        if advanced.is_empty() && opening.is_empty() {
            return;
        }
        let state = &self.client.fetch;
        let shared = &self.ctx.shared_reads;
        let prefetch = mode == crate::config::PrefetchMode::Predictive;
        let isolation = self.template.body.isolation_level;
        let topo = self.ctx.topology().load();
        let Some(room) = refill::room(self.ctx, state) else {
            return; // the queue is full: the client takes from it first
        };
        let mut by_broker: BTreeMap<i32, Vec<Want>> = BTreeMap::new();
        for w in wants {
            let Ok(b) = w.leader else { continue };
            let held = self.held.contains(&w.key);
            if (held || advanced.is_empty()) && !opening.contains(&w.key) {
                continue;
            }
            let mut next = w.clone();
            let got = advanced.get(&w.key);
            match state.tail(&w.key) {
                readahead::Tail::Stuck => continue,
                readahead::Tail::At(o, epoch) => {
                    next.part.fetch_offset = o;
                    if next.part.last_fetched_epoch >= 0
                        && let Some(e) = epoch
                    {
                        next.part.last_fetched_epoch = e;
                    }
                }
                readahead::Tail::Empty => {
                    if let Some((o, records)) = got {
                        next.part.fetch_offset = *o;
                        // What the client's next fetch will say (KIP-320): the epoch of the
                        // last batch it got. A stale one could earn an answer the broker would
                        // not give the client (a diverging epoch after a leader change inside
                        // what was delivered).
                        if next.part.last_fetched_epoch >= 0
                            && let Some(epoch) = plan::last_batch_epoch(records)
                        {
                            next.part.last_fetched_epoch = epoch;
                        }
                    }
                }
            }
            // Another consumer's read of the same partition is out or kept: taken from
            // there, not read again.
            if prefetch
                && shared.covers(
                    &next,
                    isolation,
                    topic_id(&topo, &next),
                    leader_epoch(&topo, &next),
                )
            {
                continue;
            }
            by_broker.entry(b).or_default().push(next);
        }
        for (broker, mut ws) in by_broker {
            state.emptiest_first(&mut ws);
            let refs: Vec<&Want> = ws.iter().collect();
            // At most the room left (Kafka still sends one whole batch).
            let mut template = self.template.clone();
            template.body.max_bytes =
                (room.min(i32::MAX as usize) as i32).clamp(1, template.body.max_bytes.max(1));
            let Some(poll) = refill::start_poll(
                self.ctx,
                self.client.id,
                state,
                &template,
                broker,
                &refs,
                max_wait,
                readahead::PollKind::ReadAhead,
            ) else {
                // One is in flight: if it does not ask what the client will, the chain
                // behind it stops after it.
                let asked: Vec<(&Key, plan::Asked)> = ws
                    .iter()
                    .map(|w| (&w.key, plan::Asked::of(&w.part)))
                    .collect();
                let _ = state.pending_for(broker, &asked);
                continue;
            };
            metrics::counter!("shardgate_fetch_readahead_polls_total").increment(1);
            let children = ws.iter().filter(|w| opening.contains(&w.key)).count();
            metrics::counter!("shardgate_prefetch_opening_reads_total").increment(children as u64);
            let chain = refill::Refill {
                ctx: self.ctx.clone(),
                conn: self.client.id,
                state: std::sync::Arc::downgrade(state),
                template: self.template.clone(),
                max_wait,
                broker,
            };
            state.drive(chain.run(ws, poll));
        }
    }

    /// Starts a poll of `wants` on `broker` (the broker may hold it up to `max_wait`) and
    /// files it as the connection's poll in flight there (None: one is already).
    fn start_poll(
        &self,
        broker: i32,
        wants: &[&Want],
        max_wait: Duration,
        kind: readahead::PollKind,
    ) -> Option<upstream::SubFuture> {
        refill::start_poll(
            self.ctx,
            self.client.id,
            &self.client.fetch,
            &self.template,
            broker,
            wants,
            max_wait,
            kind,
        )
    }

    /// Waits for the first poll to land (and files it), or `tick`.
    async fn wait(&mut self, waits: Vec<upstream::SubFuture>, tick: Duration) {
        if waits.is_empty() {
            tokio::time::sleep(tick).await;
            return;
        }
        let first = futures::future::select_all(waits);
        if let Ok((result, _, _)) = tokio::time::timeout(tick, first).await {
            self.fold(&result);
        }
    }

    fn fold(&mut self, result: &upstream::SubResult) {
        let budget = self.ctx.budget.clone();
        // Its throttle time is kept in the connection's state (a read-ahead task may fold
        // it first), and taken before the answer goes out.
        let folded = self
            .client
            .fetch
            .fold(result, |n| (n > 0).then(|| budget.charge(n)));
        if folded.stale {
            self.ctx.topology().request_refresh();
        }
    }

    /// Waits for the polls running for the brokers of partitions still without an answer
    /// (those `which` selects), files what they bring and takes it.
    async fn join_polls(&mut self, wants: &[Want], which: impl Fn(&Want) -> bool) {
        let state = &self.client.fetch;
        let mut waits = Vec::new();
        let mut brokers = HashSet::new();
        for w in wants {
            if self.got.contains_key(&w.key) || !which(w) {
                continue;
            }
            if let Ok(b) = w.leader
                && brokers.insert(b)
                && let Some(f) = state.pending(b)
            {
                waits.push(f);
            }
        }
        if waits.is_empty() {
            return;
        }
        for result in futures::future::join_all(waits).await {
            self.fold(&result);
        }
        self.take_ready(wants);
    }

    /// Waits until every partition of a full response has something to report: an answer,
    /// or the offsets upstream last gave for it (each poll bounded by its own timeout).
    async fn settle(&mut self, wants: &[Want]) {
        let state = self.client.fetch.clone();
        self.join_polls(wants, |w| state.seen(&w.key).is_none())
            .await;
    }
}

/// The topic id a want's partition has: the request's own (Fetch v13+), else the one the
/// topology knows for the name.
pub(super) fn topic_id(topo: &crate::upstream::topology::Topology, w: &Want) -> uuid::Uuid {
    if w.key.0.id.is_nil() {
        w.name
            .as_ref()
            .and_then(|n| topo.topics.get(n))
            .map_or(w.key.0.id, |t| t.id)
    } else {
        w.key.0.id
    }
}

/// The partition's leader epoch in the topology (-1: unknown).
pub(super) fn leader_epoch(topo: &crate::upstream::topology::Topology, w: &Want) -> i32 {
    w.name
        .as_ref()
        .and_then(|n| topo.topics.get(n))
        .and_then(|t| t.partitions.get(w.key.1 as usize))
        .map_or(-1, |p| p.leader_epoch)
}

/// For fetches touching managed topics: who is fetching, and the positions the fetch reveals
/// (fetching from offset o means everything before o was delivered).
fn observe_positions(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    wants: &[Want],
) -> Option<Consumer> {
    let mut who = None;
    for w in wants {
        let Some(name) = &w.name else { continue };
        if !ctx.shards.is_managed(name) {
            continue;
        }
        let c = who.get_or_insert_with(|| {
            let client_id = req.header.client_id.as_deref().unwrap_or("");
            ctx.groups.consumer(client.peer.ip(), client_id, client.id)
        });
        ctx.groups
            .fetched(c, client.id, name, w.part.partition, w.part.fetch_offset);
    }
    who
}

/// Offsets this connection was told since an answer was read (for another consumer, or
/// before a gate let it through) are still true and never go back: never ahead of upstream.
fn raise_marks(state: &readahead::ConnFetch, key: &Key, p: &mut PartitionData) {
    if p.error_code != codes::NONE {
        return;
    }
    if let Some(seen) = state.seen(key) {
        p.high_watermark = p.high_watermark.max(seen.high_watermark);
        p.last_stable_offset = p.last_stable_offset.max(seen.last_stable_offset);
        p.log_start_offset = p.log_start_offset.max(seen.log_start_offset);
    }
}
