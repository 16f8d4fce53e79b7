//! A writer lane: one task per upstream partition keeping up to `DEPTH` batches in flight,
//! coalescing queued jobs, settling the window and retrying in order after a failure.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::*;

pub(super) struct LaneState {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) pin: u64,
    pub(super) producer: Option<(i64, i16)>,
    /// The producer id this lane gave up on (so it is not handed back).
    pub(super) dropped: Option<(i64, i16)>,
    pub(super) next_seq: i32,
    /// Client streams with a batch this lane gave up on: (stream → its base sequence).
    /// (stream → base sequence of its failed batch, since when); forgotten after GAP_TTL.
    pub(super) gaps: HashMap<ClientStream, (i32, Instant)>,
    /// Shared with `ShardWriter::acked_end`.
    pub(super) acked: Arc<std::sync::atomic::AtomicI64>,
}

impl LaneState {
    /// Records that the broker acknowledged `count` records from `base_offset` on.
    fn acknowledged(&self, base_offset: i64, count: i64) {
        if base_offset >= 0 {
            self.acked
                .fetch_max(base_offset + count, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

pub(super) async fn run_lane(
    w: Arc<ShardWriter>,
    topic: String,
    partition: i32,
    pin: u64,
    fresh_producer: bool,
    mut rx: mpsc::Receiver<Job>,
) {
    let shared = *w.producer.lock().expect("writer producer");
    let acked = w.acked_slot(&topic, partition);
    let mut st = LaneState {
        acked,
        topic,
        partition,
        pin,
        producer: None,
        dropped: if fresh_producer { shared } else { None },
        next_seq: 0,
        gaps: HashMap::new(),
    };
    let mut carry: Option<Job> = None;
    let mut inflight: VecDeque<Sent> = VecDeque::new();
    let mut closed = false;
    loop {
        if closed && carry.is_none() {
            recover(&w, &mut st, None, &mut inflight).await;
            return;
        }
        let can_send = inflight.len() < DEPTH;
        tokio::select! {
            biased;
            answer = async { (&mut inflight.front_mut().expect("a batch in flight").answer).await },
                if !inflight.is_empty() =>
            {
                let sent = inflight.pop_front().expect("a batch in flight");
                match answer {
                    Ok(Ok(written)) => reply_written(&mut st, sent.jobs, written),
                    _ => recover(&w, &mut st, Some(sent), &mut inflight).await,
                }
            }
            first = next_job(&mut carry, &mut rx), if can_send => {
                let Some(first) = first else {
                    closed = true;
                    continue;
                };
                let jobs = take_batch(&mut st, first, &mut rx, &mut carry);
                let (jobs, stale): (Vec<Job>, Vec<Job>) =
                    jobs.into_iter().partition(|j| w.registry.may_write(&j._routed));
                for job in stale {
                    // Routed before this instance's store session may have lapsed (e.g. it was
                    // frozen): the map may be stale. Not written; the client retries, and its
                    // later batches wait for that retry (a gap), so they stay behind it.
                    metrics::counter!("shardgate_fenced_batches_total").increment(1);
                    let e = fenced_error();
                    fail(&mut st, job, &Failure::Skipped(e.clone()), e);
                }
                if !jobs.is_empty() {
                    send(&w, &mut st, jobs, &mut inflight).await;
                }
            }
        }
    }
}

pub(super) async fn next_job(carry: &mut Option<Job>, rx: &mut mpsc::Receiver<Job>) -> Option<Job> {
    match carry.take() {
        Some(j) => Some(j),
        None => rx.recv().await,
    }
}

/// `first` and whatever is queued behind it, up to the byte budget, that can share a batch.
pub(super) fn take_batch(
    st: &mut LaneState,
    first: Job,
    rx: &mut mpsc::Receiver<Job>,
    carry: &mut Option<Job>,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(job) = next.take() {
        if let Some(refusal) = gap_refusal(st, &job) {
            let _ = job.reply.send(Err(refusal));
        } else if Instant::now() >= job.deadline {
            // Queued past its deadline (the lane was recovering): not written, and later
            // batches of its client stream must wait for the retry.
            let e = WriteError {
                code: codes::REQUEST_TIMED_OUT,
                message: Some("not written: queued past the request timeout".into()),
            };
            fail(st, job, &Failure::Skipped(e.clone()), e);
        } else if jobs.first().is_some_and(|f: &Job| !coalescable(f, &job)) {
            *carry = Some(job);
            break;
        } else {
            bytes += job_bytes(&job);
            jobs.push(job);
        }
        if bytes < COALESCE_BYTES {
            next = rx.try_recv().ok();
        }
    }
    jobs
}

/// Settles the window after a failure (or before a slow-path write): waits for every batch
/// still in flight, then retries the failed ones in sequence order with their own sequences
/// (`write`). A batch answered after an earlier one failed was written, so the earlier one
/// was too and its retry is answered as a duplicate. Once a retry gives up, the failed
/// batches after it are not written either (that would put them before it): they fail, and
/// their client streams get a gap.
pub(super) async fn recover(
    w: &Arc<ShardWriter>,
    st: &mut LaneState,
    failed_first: Option<Sent>,
    inflight: &mut VecDeque<Sent>,
) {
    let mut failed: Vec<Sent> = failed_first.into_iter().collect();
    while let Some(mut s) = inflight.pop_front() {
        match (&mut s.answer).await {
            Ok(Ok(written)) => {
                // The broker took this sequence, so it had every earlier one of the same
                // producer id: the failed batches before it were written (answer lost).
                let (before, rest): (Vec<Sent>, Vec<Sent>) =
                    failed.into_iter().partition(|f| f.producer == s.producer);
                failed = rest;
                // Acknowledged before their jobs are answered (which may release the epoch).
                let count: i64 = s.jobs.iter().map(|j| j.records.len() as i64).sum();
                st.acknowledged(written.base_offset, count);
                for f in before {
                    reply_written(
                        st,
                        f.jobs,
                        Written {
                            base_offset: -1,
                            log_append_time_ms: -1,
                            log_start_offset: -1,
                        },
                    );
                }
                reply_written(st, s.jobs, written)
            }
            _ => failed.push(s),
        }
    }
    if failed.is_empty() {
        return;
    }
    metrics::counter!("shardgate_writer_recoveries_total").increment(1);
    let window_end = st.next_seq;
    let window_producer = st.producer;
    let mut gave_up: Option<WriteError> = None;
    for f in failed {
        if let Some(e) = &gave_up {
            for job in f.jobs {
                fail(st, job, &Failure::GaveUp(e.clone()), e.clone());
            }
            continue;
        }
        if st.producer == Some(f.producer) {
            st.next_seq = f.seq;
        }
        if let Some(e) = write_now(w, st, f.jobs).await {
            gave_up = Some(e);
        }
    }
    match gave_up {
        // The first attempt of a batch given up here went out in the window, where its
        // outcome may be unknown (a lost answer): reusing its sequences for other records
        // could be answered as a duplicate of it. A fresh producer id rules that out.
        Some(_) if st.producer.is_some() => {
            st.dropped = st.producer.take();
            metrics::counter!("shardgate_writer_producer_resets_total").increment(1);
        }
        Some(_) => {}
        None if st.producer == window_producer => st.next_seq = window_end,
        None => {}
    }
}

/// Writes `jobs` as one batch with retries (`write`) and answers them; returns the error if
/// the lane gave up on them.
pub(super) async fn write_now(
    w: &Arc<ShardWriter>,
    st: &mut LaneState,
    jobs: Vec<Job>,
) -> Option<WriteError> {
    match write(w, st, &jobs).await {
        Ok(written) => {
            reply_written(st, jobs, written);
            None
        }
        Err(Failure::Refused(_)) if jobs.len() > 1 => {
            // One job may be what the broker refuses (too large, invalid): write each
            // alone so the others still get through.
            let mut gave_up: Option<WriteError> = None;
            for job in jobs {
                if let Some(e) = &gave_up {
                    // Writing later jobs now would put them before the one given up.
                    fail(st, job, &Failure::Skipped(e.clone()), e.clone());
                    continue;
                }
                let single = [job];
                let result = write(w, st, &single).await;
                let [job] = single;
                if let Err(Failure::GaveUp(e)) = &result {
                    gave_up = Some(e.clone());
                }
                finish_single(st, job, result);
            }
            gave_up
        }
        Err(f) => {
            let e = f.error();
            for job in jobs {
                fail(st, job, &f, e.clone());
            }
            matches!(f, Failure::GaveUp(_)).then_some(e)
        }
    }
}

/// Answers the jobs of a written batch, each with the offset of its first record.
pub(super) fn reply_written(st: &mut LaneState, jobs: Vec<Job>, written: Written) {
    let count: i64 = jobs.iter().map(|j| j.records.len() as i64).sum();
    st.acknowledged(written.base_offset, count);
    let mut offset = 0i64;
    for job in jobs {
        if let Some((stream, seq)) = &job.client
            && st.gaps.get(stream).is_some_and(|g| g.0 == *seq)
        {
            st.gaps.remove(stream);
        }
        let n = job.records.len() as i64;
        let _ = job.reply.send(Ok(Written {
            base_offset: if written.base_offset >= 0 {
                written.base_offset + offset
            } else {
                -1
            },
            ..written
        }));
        offset += n;
    }
}

pub(super) fn finish_single(st: &mut LaneState, job: Job, result: Result<Written, Failure>) {
    match result {
        Ok(written) => {
            st.acknowledged(written.base_offset, job.records.len() as i64);
            if let Some((stream, seq)) = &job.client
                && st.gaps.get(stream).is_some_and(|g| g.0 == *seq)
            {
                st.gaps.remove(stream);
            }
            let _ = job.reply.send(Ok(written));
        }
        Err(f) => {
            let e = f.error();
            fail(st, job, &f, e)
        }
    }
}

pub(super) fn fail(st: &mut LaneState, job: Job, f: &Failure, e: WriteError) {
    if matches!(f, Failure::GaveUp(_) | Failure::Skipped(_))
        && let Some((stream, seq)) = &job.client
    {
        st.gaps.retain(|_, (_, since)| since.elapsed() < GAP_TTL);
        st.gaps
            .entry(stream.clone())
            .or_insert((*seq, Instant::now()));
    }
    if matches!(f, Failure::GaveUp(_)) {
        // The batch may still be appended (a request the broker has read but not answered):
        // keep its epoch in flight a while longer, so a seal is not read before it lands.
        let routed = job._routed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(UNKNOWN_OUTCOME_HOLD).await;
            drop(routed);
        });
    }
    let _ = job.reply.send(Err(e));
}

/// A later batch of a client stream with an unresolved failed batch in this lane.
pub(super) fn gap_refusal(st: &LaneState, job: &Job) -> Option<WriteError> {
    let (stream, seq) = job.client.as_ref()?;
    let (gap, since) = st.gaps.get(stream)?;
    if since.elapsed() >= GAP_TTL {
        return None;
    }
    // Sequences wrap at i32::MAX; "later" is within half the space ahead.
    let ahead = (*seq as i64 - *gap as i64).rem_euclid(i32::MAX as i64 + 1);
    (ahead > 0 && ahead < (1 << 30)).then(|| {
        metrics::counter!("shardgate_writer_sequence_gaps_total").increment(1);
        WriteError {
            code: OUT_OF_ORDER_SEQUENCE,
            message: Some(format!(
                "an earlier batch (sequence {gap}) of this producer was not written; retry it first"
            )),
        }
    })
}

pub(super) fn coalescable(a: &Job, b: &Job) -> bool {
    a.info.attributes == b.info.attributes
}

pub(super) fn job_bytes(j: &Job) -> usize {
    j.records
        .iter()
        .map(|r| {
            r.key.as_ref().map_or(0, |k| k.len())
                + r.value.as_ref().map_or(0, |v| v.len())
                + r.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()))
                    .sum::<usize>()
                + 16
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::records::BatchInfo;

    #[test]
    fn later_batches_of_a_failed_stream_are_refused() {
        let stream = ClientStream {
            producer_id: 7,
            producer_epoch: 0,
            topic: "t".into(),
            partition: 0,
        };
        let mut st = LaneState {
            topic: "t".into(),
            partition: 0,
            pin: 0,
            producer: None,
            dropped: None,
            next_seq: 0,
            gaps: HashMap::new(),
            acked: Default::default(),
        };
        st.gaps.insert(stream.clone(), (10, Instant::now()));
        let job = |seq: i32, s: &ClientStream| {
            let (tx, _rx) = oneshot::channel();
            Job {
                info: BatchInfo {
                    attributes: 0,
                    producer_id: 7,
                    producer_epoch: 0,
                    base_sequence: seq,
                    partition_leader_epoch: -1,
                    records: 1,
                },
                records: vec![],
                acks: -1,
                deadline: Instant::now(),
                client: Some((s.clone(), seq)),
                reply: tx,
                _routed: crate::shards::registry::InflightGuard::untracked(),
            }
        };
        // The failed batch itself and earlier ones pass; later ones wait for it.
        assert!(gap_refusal(&st, &job(10, &stream)).is_none());
        assert!(gap_refusal(&st, &job(9, &stream)).is_none());
        assert_eq!(gap_refusal(&st, &job(15, &stream)).unwrap().code, 45);
        let other = ClientStream {
            producer_id: 8,
            ..stream.clone()
        };
        assert!(gap_refusal(&st, &job(15, &other)).is_none());
        st.gaps
            .insert(stream.clone(), (i32::MAX - 1, Instant::now()));
        assert_eq!(gap_refusal(&st, &job(3, &stream)).unwrap().code, 45);
    }
}
