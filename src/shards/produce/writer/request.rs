//! One batch upstream: encode jobs with the lane's producer id and sequence, send, read the
//! answer, retry with the same sequence until the jobs' deadline.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::*;
use crate::protocol::records::encode_batch;
use crate::protocol::{decode_response, encode_request};
use crate::upstream::UpstreamError;
use crate::upstream::pool::Socket;

pub(super) fn upstream_error(e: UpstreamError) -> WriteError {
    WriteError {
        code: match e {
            UpstreamError::Timeout { .. } => codes::REQUEST_TIMED_OUT,
            _ => NETWORK_EXCEPTION,
        },
        message: Some(e.to_string()),
    }
}

/// A batch sent upstream and not answered yet.
pub(super) struct Sent {
    pub(super) jobs: Vec<Job>,
    pub(super) producer: (i64, i16),
    pub(super) seq: i32,
    pub(super) answer: tokio::task::JoinHandle<Result<Written, WriteError>>,
}

/// The fast path: encode with the next sequence and queue on the leader's connection without
/// waiting (up to DEPTH batches in flight; a broker keeps the last five per producer, so a
/// retry within the window is recognised as a duplicate). Without a producer id or a leader
/// the batch goes the slow way, after the window has settled.
pub(super) async fn send(
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
            code: codes::CORRUPT_MESSAGE,
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
        .send(
            leader,
            Socket::Own(st.pin),
            ApiKey::Produce,
            frame,
            true,
            Some(answer_wait(&jobs)),
        )
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
pub(super) fn encode_jobs(
    jobs: &[Job],
    producer: (i64, i16),
    seq: i32,
) -> Result<bytes::Bytes, WriteError> {
    let records: Vec<&Record> = jobs.iter().flat_map(|j| j.records.iter()).collect();
    let info = BatchInfo {
        producer_id: producer.0,
        producer_epoch: producer.1,
        base_sequence: seq,
        partition_leader_epoch: -1,
        ..jobs[0].info.clone()
    };
    encode_batch(&records, &info).map_err(|e| WriteError {
        code: codes::CORRUPT_MESSAGE,
        message: Some(format!("cannot re-encode records: {e}")),
    })
}

/// The latest deadline of the jobs: a batch is retried while any of them may still wait.
pub(super) fn jobs_deadline(jobs: &[Job]) -> Instant {
    jobs.iter()
        .map(|j| j.deadline)
        .max()
        .unwrap_or_else(Instant::now)
}

/// How long to wait for the answer of a batch of `jobs`: the broker answers at the request's
/// timeout (what remains until their deadline, at most 25 s), so a little more than that.
pub(super) fn answer_wait(jobs: &[Job]) -> Duration {
    let remaining = jobs_deadline(jobs).saturating_duration_since(Instant::now());
    remaining.min(Duration::from_secs(25)) + Duration::from_secs(5)
}

pub(super) fn produce_request(
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
        // Below the pool's default 30 s answer wait, so the broker's timeout answer arrives
        // before shardgate gives up on the socket.
        .with_timeout_ms(remaining.as_millis().clamp(1, 25_000) as i32)
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

pub(super) fn parse_answer(
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

pub(super) enum Failure {
    /// The broker refused the batch; it was not written.
    Refused(WriteError),
    /// Retries ran out; the batch may have been written.
    GaveUp(WriteError),
    /// Not written, and later batches of its client stream must wait for its retry (a gap):
    /// routed by a map that may be stale (fencing), queued past its deadline, or queued behind
    /// a batch given up.
    Skipped(WriteError),
}

impl Failure {
    pub(super) fn error(&self) -> WriteError {
        match self {
            Failure::Refused(e) | Failure::GaveUp(e) | Failure::Skipped(e) => e.clone(),
        }
    }
}

pub(super) fn fenced_error() -> WriteError {
    WriteError {
        code: codes::NOT_LEADER_OR_FOLLOWER,
        message: Some("shardgate instance fenced: its store session may have lapsed".into()),
    }
}

/// Writes `jobs` as one batch, retrying with the same producer id and sequence until the
/// latest deadline of the jobs.
pub(super) async fn write(
    w: &ShardWriter,
    st: &mut LaneState,
    jobs: &[Job],
) -> Result<Written, Failure> {
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
        if !jobs.iter().all(|j| w.registry.may_write(&j._routed)) {
            // A fence went up while retrying: the map these were routed by may be stale.
            if uncertain {
                return Err(give_up(st, uncertain, fenced_error()));
            }
            return Err(Failure::Skipped(fenced_error()));
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
            .call_on(
                leader,
                Socket::Own(st.pin),
                ApiKey::Produce,
                PRODUCE_VERSION,
                None,
                &req,
            )
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

pub(super) fn next_sequence(seq: i32, count: i32) -> i32 {
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
}
