//! Produce to managed topics: every record goes to the partition of the shard its routing
//! hash falls in (`reroute`), written by shardgate's own idempotent producer (`writer`), and
//! retries of idempotent clients are answered from `memory` instead of written twice.
//! `proxy::produce` hands managed topics' partitions here and merges the answers.

pub mod memory;
pub mod reroute;
pub mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::produce_request::PartitionProduceData;
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::protocol::StrBytes;
use tokio::sync::oneshot;

use memory::{MemoryKey, ProducerMemory, Remembered};
use reroute::{ClientPart, reroute};
use writer::{ClientStream, Job, ShardWriter, WriteError, Written};

use super::registry::{InflightGuard, Managed, Registry};
use crate::protocol::codes;
use crate::upstream::pool::Pool;

/// The managed-topic produce service, one per process.
/// What a client's produce request asks of every topic it writes.
pub struct ProduceTerms {
    pub acks: i16,
    pub timeout_ms: i32,
    pub transactional: bool,
    /// Decompressed bytes the request's batches may still expand to (shared by its topics).
    pub allowance: usize,
}

pub struct ManagedProduce {
    registry: Arc<Registry>,
    memory: ProducerMemory,
    writer: Arc<ShardWriter>,
    max_decompressed: usize,
}

/// A client partition of a managed topic and the writer jobs carrying its records.
pub struct ManagedPart {
    part: ClientPart,
    /// (record positions, answer) per target partition.
    jobs: Vec<(Vec<u32>, JobAnswer)>,
}

impl ManagedPart {
    /// The partition the client named.
    pub fn index(&self) -> i32 {
        self.part.index
    }
}

type JobAnswer = oneshot::Receiver<Result<Written, WriteError>>;

/// How long the writer may retry a batch: clearly less than the client's own timeout, so the
/// client does not retry a batch shardgate is still writing.
fn write_deadline(timeout_ms: i32) -> Instant {
    let t = timeout_ms.clamp(1_000, 300_000) as u64;
    Instant::now() + Duration::from_millis(t - (t / 5).max(500))
}

impl ManagedProduce {
    pub fn new(registry: Arc<Registry>, pool: Arc<Pool>, max_decompressed: usize) -> Self {
        Self {
            writer: ShardWriter::new(pool, registry.clone()),
            registry,
            memory: ProducerMemory::default(),
            max_decompressed,
        }
    }

    /// The end of what this instance's writer had acknowledged on (topic, partition); -1: none.
    pub fn acked_end(&self, topic: &str, partition: i32) -> i64 {
        self.writer.acked_end(topic, partition)
    }

    /// Decompressed bytes one client request may expand to (shared by all its batches).
    pub fn decompression_allowance(&self) -> usize {
        self.max_decompressed
    }

    /// Routes one topic's partitions of a client produce and queues their records on the
    /// writer lanes. Synchronous, so lanes see records in the order clients' requests arrived.
    pub fn route(
        &self,
        guard: &Arc<InflightGuard>,
        m: &Managed,
        data: &[PartitionProduceData],
        terms: &mut ProduceTerms,
    ) -> Vec<ManagedPart> {
        let ProduceTerms {
            acks,
            timeout_ms,
            transactional,
            ref mut allowance,
        } = *terms;
        let r = reroute(
            &self.registry,
            m,
            data,
            &self.memory,
            transactional,
            allowance,
        );
        for (shard, (records, bytes)) in &r.records_per_shard {
            let labels = [
                ("topic", m.config.name.clone()),
                ("shard", shard.to_string()),
            ];
            metrics::counter!("shardgate_shard_records_in_total", &labels).increment(*records);
            metrics::counter!("shardgate_shard_bytes_in_total", &labels).increment(*bytes);
        }
        let deadline = write_deadline(timeout_ms);
        let mut out = Vec::with_capacity(r.parts.len());
        for mut part in r.parts {
            let mut jobs = Vec::new();
            if let Some(key) = &part.memory_key {
                // Replaced by the outcome when the jobs answer; the margin only guards
                // against an answer that never comes.
                self.memory.remember(
                    key.clone(),
                    Remembered::InFlight(deadline + Duration::from_secs(60)),
                );
            }
            for w in std::mem::take(&mut part.writes) {
                let (tx, rx) = oneshot::channel();
                let client = part.memory_key.as_ref().map(|k| {
                    (
                        ClientStream {
                            producer_id: k.producer_id,
                            producer_epoch: k.producer_epoch,
                            topic: k.topic.clone(),
                            partition: k.partition,
                        },
                        k.base_sequence,
                    )
                });
                self.writer.submit(
                    &m.config.name,
                    w.target,
                    Job {
                        info: w.info,
                        records: w.records,
                        // A leader change under a replica move could drop what the old
                        // leader alone acknowledged: acks=all while the move lasts.
                        acks: if acks == 1
                            && m.map
                                .moves
                                .iter()
                                .any(|mv| mv.acks_all && mv.partition == w.target)
                        {
                            -1
                        } else {
                            acks
                        },
                        deadline,
                        client,
                        reply: tx,
                        _routed: guard.clone(),
                    },
                );
                jobs.push((w.indices, rx));
            }
            out.push(ManagedPart { part, jobs });
        }
        out
    }

    /// The answer for one client partition, from the answers of the writer jobs its records
    /// went to.
    pub async fn answer(&self, mp: ManagedPart) -> PartitionProduceResponse {
        let ManagedPart { part, jobs } = mp;
        let base = PartitionProduceResponse::default()
            .with_index(part.index)
            .with_base_offset(-1)
            .with_log_append_time_ms(-1)
            .with_log_start_offset(-1);
        if let Some((code, message)) = &part.refused {
            tracing::warn!(partition = part.index, code, %message, "produce to a managed topic refused");
            metrics::counter!("shardgate_produce_refused_total", "code" => code.to_string())
                .increment(1);
            return base
                .with_error_code(*code)
                .with_error_message(Some(StrBytes::from_string(message.clone())));
        }
        if let Some(offset) = part.remembered {
            metrics::counter!("shardgate_produce_retries_answered_total").increment(1);
            return base.with_base_offset(offset);
        }
        if part.written_before.is_some() {
            metrics::counter!("shardgate_produce_partial_retries_total").increment(1);
        }
        let single = jobs.len() == 1 && part.written_before.is_none();
        let mut written = part
            .written_before
            .clone()
            .unwrap_or_else(|| vec![false; part.record_count as usize]);
        let mut first_error: Option<WriteError> = None;
        let mut answer = base.clone();
        for (indices, rx) in jobs {
            let result = rx.await.unwrap_or_else(|_| {
                Err(WriteError {
                    code: codes::NOT_LEADER_OR_FOLLOWER,
                    message: Some("writer lane stopped".into()),
                })
            });
            match result {
                Ok(w) => {
                    for i in indices {
                        if let Some(slot) = written.get_mut(i as usize) {
                            *slot = true;
                        }
                    }
                    if single {
                        answer = answer
                            .with_base_offset(w.base_offset)
                            .with_log_append_time_ms(w.log_append_time_ms)
                            .with_log_start_offset(w.log_start_offset);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(key) = part.memory_key.clone() {
            self.remember_outcome(key, &first_error, &answer, written);
        }
        match first_error {
            None => answer,
            Some(e) => base
                .with_error_code(e.code)
                .with_error_message(e.message.map(StrBytes::from_string)),
        }
    }

    fn remember_outcome(
        &self,
        key: MemoryKey,
        error: &Option<WriteError>,
        answer: &PartitionProduceResponse,
        written: Vec<bool>,
    ) {
        let what = match error {
            None => Remembered::Done(answer.base_offset),
            Some(_) => Remembered::Partial(written),
        };
        self.memory.remember(key, what);
    }
}
