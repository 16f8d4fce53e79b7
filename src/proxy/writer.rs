//! shardgate's own idempotent producer for managed topics. Records of one client batch can
//! land on several partitions, so the client's producer id and sequences cannot be forwarded;
//! instead every upstream partition of a managed topic has one writer lane that owns a
//! producer id and sequence of its own.
//!
//! A lane keeps up to `DEPTH` batches in flight on one upstream connection, in sequence order;
//! when the window is full, the jobs queued behind it (up to a byte budget) form the next
//! batch, so a hot partition writes bigger batches instead of more of them. When a batch fails
//! (lost answer, leader change), the lane lets the window settle and retries the failed
//! batches in order with their own sequences: the broker answers one it already has as a
//! duplicate instead of writing it twice. Jobs enter a lane synchronously, in the order the
//! client's produce lane routed them, so per-partition order is the order of arrival.
//!
//! Emulating the broker for client producers: when a lane gives up on a batch of an
//! idempotent client (its records may or may not be written), later batches of that client
//! producer for that lane are refused with OUT_OF_ORDER_SEQUENCE until the client retries the
//! failed one, as a broker would do with a sequence gap. Otherwise a retried batch would land
//! behind batches sent after it and break per-key order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::{mpsc, oneshot};

use crate::protocol::records::{BatchInfo, Record, encode_batch};
use crate::protocol::{codes, decode_response, encode_request};
use crate::upstream::UpstreamError;
use crate::upstream::pool::Pool;

/// Produce v9: flexible, topics by name; every Kafka since 2.4 takes it.
const PRODUCE_VERSION: i16 = 9;
const INIT_PRODUCER_ID_VERSION: i16 = 3;
/// A lane stops adding queued jobs to a batch past this many record bytes (well under the
/// broker's default 1 MiB message.max.bytes).
const COALESCE_BYTES: usize = 512 * 1024;
/// Batches a lane keeps in flight (a broker remembers the last five per producer and
/// partition for duplicate detection).
const DEPTH: usize = 4;
/// How long a lane refuses a client stream's later batches after giving up on one of its
/// batches: long enough for the client to retry it, bounded in case the retry goes to another
/// lane (the keys moved in a split) or never comes (the client bumped its epoch).
const GAP_TTL: Duration = Duration::from_secs(60);

const OUT_OF_ORDER_SEQUENCE: i16 = 45;
const DUPLICATE_SEQUENCE: i16 = 46;
const INVALID_PRODUCER_EPOCH: i16 = 47;
const INVALID_PRODUCER_ID_MAPPING: i16 = 49;
const UNKNOWN_PRODUCER_ID: i16 = 59;
const NOT_ENOUGH_REPLICAS: i16 = 19;
const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
const NETWORK_EXCEPTION: i16 = 13;
const KAFKA_STORAGE_ERROR: i16 = 56;
const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;

/// The client producer stream a job belongs to (idempotent clients only).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientStream {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub topic: String,
    pub partition: i32,
}

/// Records of one client partition bound for one upstream partition.
pub struct Job {
    /// Compression and timestamp type of the client's batch.
    pub info: BatchInfo,
    pub records: Vec<Record>,
    pub acks: i16,
    pub deadline: Instant,
    /// Set for idempotent clients: (stream, base sequence of the client's batch).
    pub client: Option<(ClientStream, i32)>,
    pub reply: oneshot::Sender<Result<Written, WriteError>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// Offset of this job's first record.
    pub base_offset: i64,
    pub log_append_time_ms: i64,
    pub log_start_offset: i64,
}

#[derive(Debug, Clone)]
pub struct WriteError {
    pub code: i16,
    pub message: Option<String>,
}

type Lane = mpsc::UnboundedSender<Job>;

pub struct ShardWriter {
    pool: Arc<Pool>,
    lanes: Mutex<HashMap<(String, i32), Lane>>,
    /// Lanes whose task died: their successor must not reuse the shared producer id, whose
    /// sequences on that partition are unknown to it.
    restarted: Mutex<std::collections::HashSet<(String, i32)>>,
    /// The producer id lanes start with; replaced when a lane needs a fresh one.
    producer: Mutex<Option<(i64, i16)>>,
    /// One InitProducerId at a time, so lanes starting together share one id. Held across
    /// the call on purpose: a cold path (start-up and producer resets).
    acquiring: tokio::sync::Mutex<()>,
    pins: AtomicU64,
}

impl ShardWriter {
    pub fn new(pool: Arc<Pool>) -> Arc<Self> {
        Arc::new(Self {
            pool,
            lanes: Mutex::new(HashMap::new()),
            restarted: Mutex::new(Default::default()),
            producer: Mutex::new(None),
            acquiring: tokio::sync::Mutex::new(()),
            pins: AtomicU64::new(1 << 40),
        })
    }

    /// Queues a job on the lane of (topic, partition). Synchronous, so jobs keep the order of
    /// the calls.
    pub fn submit(self: &Arc<Self>, topic: &str, partition: i32, job: Job) {
        let mut lanes = self.lanes.lock().expect("writer lanes");
        let key = (topic.to_string(), partition);
        let tx = lanes.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let pin = self.pins.fetch_add(1, Ordering::Relaxed);
            let fresh = self
                .restarted
                .lock()
                .expect("writer restarted")
                .remove(&key);
            tokio::spawn(run_lane(self.clone(), key.0.clone(), key.1, pin, fresh, rx));
            tx
        });
        if let Err(mpsc::error::SendError(job)) = tx.send(job) {
            // Only if the lane task died (a panic): answer, and start a new lane next time.
            lanes.remove(&key);
            self.restarted
                .lock()
                .expect("writer restarted")
                .insert(key.clone());
            let _ = job.reply.send(Err(WriteError {
                code: codes::NOT_LEADER_OR_FOLLOWER,
                message: Some("writer lane restarted".into()),
            }));
        }
    }

    /// The shared producer id, or a new one if the caller's lane cannot use `not`.
    async fn producer_id(&self, not: Option<(i64, i16)>) -> Result<(i64, i16), WriteError> {
        let _one_at_a_time = self.acquiring.lock().await;
        // Another lane may have fetched one while this one waited.
        if let Some(p) = *self.producer.lock().expect("writer producer")
            && Some(p) != not
        {
            return Ok(p);
        }
        let topo = self.pool.topology.load();
        let broker = topo
            .any_broker(self.pins.fetch_add(1, Ordering::Relaxed))
            .ok_or(WriteError {
                code: codes::LEADER_NOT_AVAILABLE,
                message: Some("no upstream broker known".into()),
            })?;
        let req = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000)
            .with_producer_id((-1).into())
            .with_producer_epoch(-1);
        let resp: InitProducerIdResponse = self
            .pool
            .call(
                broker,
                0,
                ApiKey::InitProducerId,
                INIT_PRODUCER_ID_VERSION,
                None,
                &req,
            )
            .await
            .map_err(upstream_error)?;
        if resp.error_code != codes::NONE {
            return Err(WriteError {
                code: resp.error_code,
                message: Some(format!(
                    "InitProducerId for shardgate's own producer failed with error {}",
                    resp.error_code
                )),
            });
        }
        let p = (resp.producer_id.0, resp.producer_epoch);
        tracing::info!(
            producer_id = p.0,
            epoch = p.1,
            "upstream idempotent producer id"
        );
        metrics::counter!("shardgate_writer_producer_ids_total").increment(1);
        *self.producer.lock().expect("writer producer") = Some(p);
        Ok(p)
    }
}

fn upstream_error(e: UpstreamError) -> WriteError {
    WriteError {
        code: match e {
            UpstreamError::Timeout { .. } => codes::REQUEST_TIMED_OUT,
            _ => NETWORK_EXCEPTION,
        },
        message: Some(e.to_string()),
    }
}

struct LaneState {
    topic: String,
    partition: i32,
    pin: u64,
    producer: Option<(i64, i16)>,
    /// The producer id this lane gave up on (so it is not handed back).
    dropped: Option<(i64, i16)>,
    next_seq: i32,
    /// Client streams with a batch this lane gave up on: (stream → its base sequence).
    /// (stream → base sequence of its failed batch, since when); forgotten after GAP_TTL.
    gaps: HashMap<ClientStream, (i32, Instant)>,
}

async fn run_lane(
    w: Arc<ShardWriter>,
    topic: String,
    partition: i32,
    pin: u64,
    fresh_producer: bool,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    let shared = *w.producer.lock().expect("writer producer");
    let mut st = LaneState {
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
                if !jobs.is_empty() {
                    send(&w, &mut st, jobs, &mut inflight).await;
                }
            }
        }
    }
}

async fn next_job(carry: &mut Option<Job>, rx: &mut mpsc::UnboundedReceiver<Job>) -> Option<Job> {
    match carry.take() {
        Some(j) => Some(j),
        None => rx.recv().await,
    }
}

/// `first` and whatever is queued behind it, up to the byte budget, that can share a batch.
fn take_batch(
    st: &mut LaneState,
    first: Job,
    rx: &mut mpsc::UnboundedReceiver<Job>,
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
            fail(st, job, &Failure::GaveUp(e.clone()), e);
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

/// A batch sent upstream and not answered yet.
struct Sent {
    jobs: Vec<Job>,
    producer: (i64, i16),
    seq: i32,
    answer: tokio::task::JoinHandle<Result<Written, WriteError>>,
}

/// The fast path: encode with the next sequence and queue on the leader's connection without
/// waiting (up to DEPTH batches in flight; a broker keeps the last five per producer, so a
/// retry within the window is recognised as a duplicate). Without a producer id or a leader
/// the batch goes the slow way, after the window has settled.
async fn send(
    w: &Arc<ShardWriter>,
    st: &mut LaneState,
    jobs: Vec<Job>,
    inflight: &mut VecDeque<Sent>,
) {
    let leader = w.pool.topology.load().leader(&st.topic, st.partition);
    let (Some(producer), Some(leader)) = (st.producer, leader) else {
        recover(w, st, None, inflight).await;
        write_now(w, st, jobs).await;
        return;
    };
    let count: i32 = jobs.iter().map(|j| j.records.len() as i32).sum();
    let frame = encode_jobs(&jobs, producer, st.next_seq).and_then(|batch| {
        let req = produce_request(st, &jobs, jobs_deadline(&jobs), batch);
        encode_request(ApiKey::Produce, PRODUCE_VERSION, None, &req).map_err(|e| WriteError {
            code: super::reroute::CORRUPT_MESSAGE,
            message: Some(e.to_string()),
        })
    });
    let frame = match frame {
        Ok(f) => f,
        Err(err) => {
            for job in jobs {
                fail(st, job, &Failure::Refused(err.clone()), err.clone());
            }
            return;
        }
    };
    match w
        .pool
        .send_raw(leader, st.pin, ApiKey::Produce, frame, true)
        .await
    {
        Ok(pending) => {
            let seq = st.next_seq;
            st.next_seq = next_sequence(seq, count);
            let partition = st.partition;
            let answer = tokio::spawn(async move { parse_answer(pending.wait().await, partition) });
            inflight.push_back(Sent {
                jobs,
                producer,
                seq,
                answer,
            });
        }
        Err(_) => {
            recover(w, st, None, inflight).await;
            write_now(w, st, jobs).await;
        }
    }
}

/// The jobs' records as one batch of `producer` starting at sequence `seq`, with the first
/// job's codec and timestamp type.
fn encode_jobs(jobs: &[Job], producer: (i64, i16), seq: i32) -> Result<bytes::Bytes, WriteError> {
    let records: Vec<&Record> = jobs.iter().flat_map(|j| j.records.iter()).collect();
    let info = BatchInfo {
        producer_id: producer.0,
        producer_epoch: producer.1,
        base_sequence: seq,
        partition_leader_epoch: -1,
        ..jobs[0].info.clone()
    };
    encode_batch(&records, &info).map_err(|e| WriteError {
        code: super::reroute::CORRUPT_MESSAGE,
        message: Some(format!("cannot re-encode records: {e}")),
    })
}

/// The latest deadline of the jobs: a batch is retried while any of them may still wait.
fn jobs_deadline(jobs: &[Job]) -> Instant {
    jobs.iter()
        .map(|j| j.deadline)
        .max()
        .unwrap_or_else(Instant::now)
}

fn produce_request(
    st: &LaneState,
    jobs: &[Job],
    deadline: Instant,
    batch: bytes::Bytes,
) -> ProduceRequest {
    let acks = if jobs.iter().any(|j| j.acks == -1) {
        -1
    } else {
        1
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(remaining.as_millis().clamp(1, 30_000) as i32)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(st.topic.clone())))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(st.partition)
                        .with_records(Some(batch)),
                ]),
        ])
}

fn parse_answer(
    result: Result<Option<bytes::Bytes>, UpstreamError>,
    partition: i32,
) -> Result<Written, WriteError> {
    let raw = result.map_err(upstream_error)?.ok_or(WriteError {
        code: NETWORK_EXCEPTION,
        message: Some("no answer".into()),
    })?;
    let resp: ProduceResponse =
        decode_response(ApiKey::Produce, PRODUCE_VERSION, raw).map_err(|e| WriteError {
            code: NETWORK_EXCEPTION,
            message: Some(e.to_string()),
        })?;
    let p = resp
        .responses
        .into_iter()
        .flat_map(|t| t.partition_responses)
        .find(|p| p.index == partition)
        .ok_or(WriteError {
            code: NETWORK_EXCEPTION,
            message: Some("answer without the partition".into()),
        })?;
    crate::telemetry::upstream_code(ApiKey::Produce, p.error_code);
    match p.error_code {
        codes::NONE | DUPLICATE_SEQUENCE => Ok(Written {
            base_offset: p.base_offset,
            log_append_time_ms: p.log_append_time_ms,
            log_start_offset: p.log_start_offset,
        }),
        code => Err(WriteError {
            code,
            message: p.error_message.map(|m| m.to_string()),
        }),
    }
}

/// Settles the window after a failure (or before a slow-path write): waits for every batch
/// still in flight, then retries the failed ones in sequence order with their own sequences
/// (`write`). A batch answered after an earlier one failed was written, so the earlier one
/// was too and its retry is answered as a duplicate. Once a retry gives up, the failed
/// batches after it are not written either (that would put them before it): they fail, and
/// their client streams get a gap.
async fn recover(
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
async fn write_now(w: &Arc<ShardWriter>, st: &mut LaneState, jobs: Vec<Job>) -> Option<WriteError> {
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
                    fail(st, job, &Failure::GaveUp(e.clone()), e.clone());
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
fn reply_written(st: &mut LaneState, jobs: Vec<Job>, written: Written) {
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

fn finish_single(st: &mut LaneState, job: Job, result: Result<Written, Failure>) {
    match result {
        Ok(written) => {
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

fn fail(st: &mut LaneState, job: Job, f: &Failure, e: WriteError) {
    if matches!(f, Failure::GaveUp(_))
        && let Some((stream, seq)) = &job.client
    {
        st.gaps.retain(|_, (_, since)| since.elapsed() < GAP_TTL);
        st.gaps
            .entry(stream.clone())
            .or_insert((*seq, Instant::now()));
    }
    let _ = job.reply.send(Err(e));
}

/// A later batch of a client stream with an unresolved failed batch in this lane.
fn gap_refusal(st: &LaneState, job: &Job) -> Option<WriteError> {
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

fn coalescable(a: &Job, b: &Job) -> bool {
    a.info.attributes == b.info.attributes
}

fn job_bytes(j: &Job) -> usize {
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

enum Failure {
    /// The broker refused the batch; it was not written.
    Refused(WriteError),
    /// Retries ran out; the batch may have been written.
    GaveUp(WriteError),
}

impl Failure {
    fn error(&self) -> WriteError {
        match self {
            Failure::Refused(e) => e.clone(),
            Failure::GaveUp(error) => error.clone(),
        }
    }
}

/// Writes `jobs` as one batch, retrying with the same producer id and sequence until the
/// latest deadline of the jobs.
async fn write(w: &ShardWriter, st: &mut LaneState, jobs: &[Job]) -> Result<Written, Failure> {
    let deadline = jobs_deadline(jobs);
    let count: i32 = jobs.iter().map(|j| j.records.len() as i32).sum();
    let mut encoded: Option<((i64, i16, i32), bytes::Bytes)> = None;
    let mut uncertain = false;
    let mut backoff = Duration::from_millis(20);
    let mut last = WriteError {
        code: codes::REQUEST_TIMED_OUT,
        message: None,
    };
    let give_up = |st: &mut LaneState, uncertain: bool, error: WriteError| {
        if uncertain {
            // The batch may be written under this sequence; a new producer id lets the next
            // batch start clean instead of failing with OUT_OF_ORDER_SEQUENCE.
            st.dropped = st.producer.take();
            metrics::counter!("shardgate_writer_indeterminate_total").increment(1);
        }
        tracing::warn!(topic = %st.topic, partition = st.partition, code = error.code, message = ?error.message, uncertain, "managed produce gave up");
        Failure::GaveUp(error)
    };
    loop {
        if Instant::now() >= deadline {
            return Err(give_up(st, uncertain, last));
        }
        let (pid, epoch) = match st.producer {
            Some(p) => p,
            None => match w.producer_id(st.dropped).await {
                Ok(p) => {
                    st.producer = Some(p);
                    st.next_seq = 0;
                    p
                }
                Err(e) => {
                    last = e;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let ident = (pid, epoch, st.next_seq);
        let batch = match &encoded {
            Some((i, b)) if *i == ident => b.clone(),
            _ => {
                let b = encode_jobs(jobs, (pid, epoch), st.next_seq).map_err(Failure::Refused)?;
                encoded = Some((ident, b.clone()));
                b
            }
        };
        let topo = w.pool.topology.load();
        let Some(leader) = topo.leader(&st.topic, st.partition) else {
            last = WriteError {
                code: codes::NOT_LEADER_OR_FOLLOWER,
                message: None,
            };
            w.pool
                .topology
                .refresh_after(topo.version, Duration::from_secs(1))
                .await;
            continue;
        };
        let req = produce_request(st, jobs, deadline, batch);
        let result: Result<ProduceResponse, _> = w
            .pool
            .call(leader, st.pin, ApiKey::Produce, PRODUCE_VERSION, None, &req)
            .await;
        let p = match result {
            Ok(resp) => resp
                .responses
                .into_iter()
                .flat_map(|t| t.partition_responses)
                .find(|p| p.index == st.partition),
            Err(e) => {
                uncertain = true;
                last = upstream_error(e);
                None
            }
        };
        if let Some(p) = p {
            crate::telemetry::upstream_code(ApiKey::Produce, p.error_code);
            match p.error_code {
                codes::NONE | DUPLICATE_SEQUENCE => {
                    if p.error_code == DUPLICATE_SEQUENCE {
                        metrics::counter!("shardgate_writer_duplicates_avoided_total").increment(1);
                    }
                    st.next_seq = next_sequence(st.next_seq, count);
                    return Ok(Written {
                        base_offset: p.base_offset,
                        log_append_time_ms: p.log_append_time_ms,
                        log_start_offset: p.log_start_offset,
                    });
                }
                OUT_OF_ORDER_SEQUENCE
                | UNKNOWN_PRODUCER_ID
                | INVALID_PRODUCER_EPOCH
                | INVALID_PRODUCER_ID_MAPPING => {
                    // The broker lost or rejects our producer state; the batch was not
                    // written, so a fresh producer id and sequence 0 are safe.
                    tracing::info!(topic = %st.topic, partition = st.partition, code = p.error_code, "upstream producer state reset");
                    metrics::counter!("shardgate_writer_producer_resets_total").increment(1);
                    st.dropped = st.producer.take();
                    continue;
                }
                c if codes::stale_leader(c)
                    || matches!(
                        c,
                        codes::REQUEST_TIMED_OUT
                            | NOT_ENOUGH_REPLICAS
                            | NOT_ENOUGH_REPLICAS_AFTER_APPEND
                            | NETWORK_EXCEPTION
                            | KAFKA_STORAGE_ERROR
                            | COORDINATOR_LOAD_IN_PROGRESS
                    ) =>
                {
                    uncertain |= matches!(
                        c,
                        codes::REQUEST_TIMED_OUT | NOT_ENOUGH_REPLICAS_AFTER_APPEND
                    );
                    last = WriteError {
                        code: c,
                        message: p.error_message.map(|m| m.to_string()),
                    };
                }
                c => {
                    return Err(Failure::Refused(WriteError {
                        code: c,
                        message: p.error_message.map(|m| m.to_string()).or_else(|| {
                            (!p.record_errors.is_empty())
                                .then(|| format!("upstream refused records: {:?}", p.record_errors))
                        }),
                    }));
                }
            }
        }
        w.pool.topology.request_refresh();
        let sleep = backoff.min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(sleep).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

fn next_sequence(seq: i32, count: i32) -> i32 {
    // Kafka wraps sequences from i32::MAX to 0.
    ((seq as i64 + count as i64) % (i32::MAX as i64 + 1)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_wrap_like_kafka() {
        assert_eq!(next_sequence(5, 3), 8);
        assert_eq!(next_sequence(i32::MAX, 1), 0);
        assert_eq!(next_sequence(i32::MAX - 1, 3), 1);
    }

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
