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

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::messages::{ApiKey, InitProducerIdRequest, InitProducerIdResponse};
use tokio::sync::{mpsc, oneshot};

mod lane;
mod request;

use lane::*;
use request::*;

use crate::protocol::codes::{
    self, COORDINATOR_LOAD_IN_PROGRESS, DUPLICATE_SEQUENCE, INVALID_PRODUCER_EPOCH,
    INVALID_PRODUCER_ID_MAPPING, KAFKA_STORAGE_ERROR, NETWORK_EXCEPTION, NOT_ENOUGH_REPLICAS,
    NOT_ENOUGH_REPLICAS_AFTER_APPEND, OUT_OF_ORDER_SEQUENCE, UNKNOWN_PRODUCER_ID,
};
use crate::protocol::records::{BatchInfo, Record};
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
/// How long a batch given up with an unknown outcome keeps its map epoch in flight: a broker
/// appends or drops a request it has read within its request.timeout.ms (30 s by default).
const UNKNOWN_OUTCOME_HOLD: Duration = Duration::from_secs(30);

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
    /// Keeps the map epoch the records were routed under in flight (seal protocol) until the
    /// lane is done with the job.
    pub _routed: Arc<crate::shards::registry::InflightGuard>,
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

type Lane = mpsc::Sender<Job>;

/// Jobs one lane may have queued. Their bytes are bounded by the client memory budget
/// anyway (a request stays charged until its jobs are answered); this bounds their number.
/// A job refused here gets a retriable error; that can reorder the refused client's batches
/// like any failed write, which is why the bound sits far above what the budget admits in
/// practice (thousands of concurrent small batches to one partition).
const LANE_CAPACITY: usize = 16_384;

pub struct ShardWriter {
    pool: Arc<Pool>,
    /// For the fence: no new batch goes out while the store session may have lapsed.
    registry: Arc<crate::shards::registry::Registry>,
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
    /// Per lane: the end (last offset + 1) of what the broker acknowledged to it, the seal
    /// offset's lower bound (with acks=1 it may lie above the high watermark).
    acked: Mutex<HashMap<(String, i32), Arc<AtomicI64>>>,
}

impl ShardWriter {
    pub fn new(pool: Arc<Pool>, registry: Arc<crate::shards::registry::Registry>) -> Arc<Self> {
        Arc::new(Self {
            pool,
            registry,
            lanes: Mutex::new(HashMap::new()),
            restarted: Mutex::new(Default::default()),
            producer: Mutex::new(None),
            acquiring: tokio::sync::Mutex::new(()),
            pins: AtomicU64::new(1 << 40),
            acked: Mutex::new(HashMap::new()),
        })
    }

    /// The end of what this instance's lane of (topic, partition) had acknowledged (-1: none).
    /// Updated before the jobs are answered, so once no produce of an epoch is in flight, it
    /// covers every record this instance wrote under that epoch.
    pub fn acked_end(&self, topic: &str, partition: i32) -> i64 {
        self.acked
            .lock()
            .expect("writer acked")
            .get(&(topic.to_string(), partition))
            .map_or(-1, |a| a.load(Ordering::Acquire))
    }

    fn acked_slot(&self, topic: &str, partition: i32) -> Arc<AtomicI64> {
        self.acked
            .lock()
            .expect("writer acked")
            .entry((topic.to_string(), partition))
            .or_insert_with(|| Arc::new(AtomicI64::new(-1)))
            .clone()
    }

    /// Queues a job on the lane of (topic, partition). Synchronous, so jobs keep the order of
    /// the calls.
    pub fn submit(self: &Arc<Self>, topic: &str, partition: i32, job: Job) {
        let mut lanes = self.lanes.lock().expect("writer lanes");
        let key = (topic.to_string(), partition);
        let tx = lanes.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(LANE_CAPACITY);
            let pin = self.pins.fetch_add(1, Ordering::Relaxed);
            let fresh = self
                .restarted
                .lock()
                .expect("writer restarted")
                .remove(&key);
            tokio::spawn(run_lane(self.clone(), key.0.clone(), key.1, pin, fresh, rx));
            tx
        });
        let job = match tx.try_send(job) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(job)) => {
                metrics::counter!("shardgate_writer_lane_full_total").increment(1);
                let _ = job.reply.send(Err(WriteError {
                    code: codes::REQUEST_TIMED_OUT,
                    message: Some(format!(
                        "shardgate's writer for {topic}-{partition} has {LANE_CAPACITY} batches queued; retry"
                    )),
                }));
                return;
            }
            Err(mpsc::error::TrySendError::Closed(job)) => job,
        };
        {
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
