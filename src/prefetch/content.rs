//! Content sampling: what consumers read, turned into routing-value histograms and content
//! centroids in their profiles, off the request path.
//!
//! The fetch path offers the record set it just delivered; a global rate
//! (`prefetch.samples_per_sec`) decides with one atomic compare-and-swap whether this one is
//! taken. Taken sets (a reference to the response's buffer, no copy) go through a bounded queue
//! to one sampling thread, which decodes a few records, counts their routing values and hands
//! their text to the embedding pool. A full queue drops the sample (counted): the request never
//! waits, and no more than the rate's worth of decoding happens per second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Instant;

use bytes::Bytes;

use super::Profiles;
use super::embed::{self, EmbedError, Embedded, Pool};
use crate::config::PrefetchConfig;
use crate::config::RouteField;
use crate::protocol::records;

/// Record sets waiting for the sampling thread.
const QUEUE: usize = 64;
/// Records of one sampled set that are looked at (spread over the set).
const RECORDS_PER_SAMPLE: usize = 8;
/// Bytes of whole batches one sample decodes (at least one batch).
const SAMPLE_BYTES: usize = 64 * 1024;
/// Decompressed bytes one sample may cost (a set of large compressed batches is cut short).
const DECOMPRESS_ALLOWANCE: usize = 4 * 1024 * 1024;
/// Longest routing value kept (longer ones are cut).
const MAX_VALUE_CHARS: usize = 64;

/// Where a sampled record was delivered.
#[derive(Debug, Clone)]
pub struct SampleKey {
    pub conn: u64,
    pub topic: Arc<str>,
    pub partition: i32,
}

struct Sample {
    key: SampleKey,
    records: Bytes,
}

pub struct Sampler {
    tx: SyncSender<Sample>,
    epoch: Instant,
    interval_us: u64,
    /// Microseconds since `epoch` when the next sample may be taken.
    next_us: AtomicU64,
}

impl Sampler {
    /// The sampler `cfg` describes, or None when prefetch or sampling is off.
    pub fn start(
        cfg: &PrefetchConfig,
        profiles: Arc<Profiles>,
    ) -> Result<Option<Self>, EmbedError> {
        if cfg.mode() == crate::config::PrefetchMode::Off || cfg.samples_per_sec() == 0 {
            return Ok(None);
        }
        let embedder = embed::from_config(cfg)?;
        let sink_profiles = profiles.clone();
        let pool = Pool::from_config(cfg, embedder, move |e: Embedded<SampleKey>| {
            sink_profiles.content(e.key.conn, &e.key.topic, e.key.partition, &e.vector);
        })?;
        let (tx, rx) = sync_channel::<Sample>(QUEUE);
        let fields = cfg.routing_fields.clone();
        std::thread::Builder::new()
            .name("sg-sample".into())
            .spawn(move || {
                // Ends when the sender (the Sampler) is dropped; the pool goes with it.
                for s in rx {
                    sample(&s, &fields, &profiles, &pool);
                }
            })
            .map_err(|source| EmbedError::Spawn { index: 0, source })?;
        Ok(Some(Self {
            tx,
            epoch: Instant::now(),
            interval_us: 1_000_000 / u64::from(cfg.samples_per_sec()),
            next_us: AtomicU64::new(0),
        }))
    }

    /// Whether a sample is due (and claims it): at most `samples_per_sec` over all callers.
    pub fn due(&self) -> bool {
        let now = self.epoch.elapsed().as_micros() as u64;
        let next = self.next_us.load(Ordering::Relaxed);
        now >= next
            && self
                .next_us
                .compare_exchange(
                    next,
                    now + self.interval_us,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Offers a record set delivered on a connection; call only when `due()` said so.
    /// False when the queue was full (the sample is dropped and counted).
    pub fn offer(&self, key: SampleKey, records: Bytes) -> bool {
        match self.tx.try_send(Sample { key, records }) {
            Ok(()) => {
                metrics::counter!("shardgate_prefetch_content_samples_total").increment(1);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                metrics::counter!("shardgate_prefetch_content_dropped_total").increment(1);
                false
            }
        }
    }
}

fn sample(s: &Sample, fields: &[RouteField], profiles: &Profiles, pool: &Pool<SampleKey>) {
    // Only the whole batches at the start of the set (a fetch answer may end in a partial
    // batch; Kafka cuts at max_bytes), within SAMPLE_BYTES: a delivered set can be megabytes,
    // and decoding all of it for RECORDS_PER_SAMPLE records cost more CPU than the copying
    // of the whole fetch path (`bench/consume --perf`, session 9).
    let Some(prefix) = whole_batches_within(&s.records, SAMPLE_BYTES) else {
        return;
    };
    let mut allowance = DECOMPRESS_ALLOWANCE;
    let Ok(batches) = records::decode_batches_limited(prefix, &mut allowance) else {
        return;
    };
    let all: Vec<&records::Record> = batches
        .iter()
        .filter(|(info, _)| !info.is_control())
        .flat_map(|(_, recs)| recs.iter())
        .collect();
    if all.is_empty() {
        return;
    }
    let step = all.len().div_ceil(RECORDS_PER_SAMPLE).max(1);
    for r in all.iter().step_by(step) {
        for f in fields {
            if let Some(v) = field_value(r, f) {
                profiles.routed(
                    s.key.conn,
                    &s.key.topic,
                    s.key.partition,
                    &String::from(f.clone()),
                    &v,
                );
            }
        }
        if let Some(v) = &r.value {
            let text = String::from_utf8_lossy(&v[..v.len().min(embed::MAX_SAMPLE_BYTES)]);
            pool.try_submit(s.key.clone(), &text);
        }
    }
}

/// The prefix of `data` made of complete batches within `limit` bytes, or the first batch
/// alone when it is larger; None when not even one batch is complete.
fn whole_batches_within(data: &Bytes, limit: usize) -> Option<Bytes> {
    let mut pos = 0usize;
    while data.len() >= pos + 12 {
        let len = i32::from_be_bytes(data[pos + 8..pos + 12].try_into().ok()?);
        // Shorter than a batch header: the cut tail of a response, not a batch.
        if len < 49 {
            break;
        }
        let end = pos + 12 + len as usize;
        if end > data.len() || (pos > 0 && end > limit) {
            break;
        }
        pos = end;
    }
    (pos > 0).then(|| data.slice(..pos))
}

/// The value of a routing field in a record, as text.
fn field_value(r: &records::Record, f: &RouteField) -> Option<String> {
    let text = match f {
        RouteField::Key => String::from_utf8_lossy(r.key.as_ref()?).into_owned(),
        RouteField::Header(name) => {
            let (_, v) = r
                .headers
                .iter()
                .find(|(k, _)| k.as_ref() == name.as_bytes())?;
            String::from_utf8_lossy(v.as_ref()?).into_owned()
        }
        RouteField::Json(pointer) => {
            let doc: serde_json::Value = serde_json::from_slice(r.value.as_ref()?).ok()?;
            match doc.pointer(pointer)? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => return None,
                other => other.to_string(),
            }
        }
    };
    Some(text.chars().take(MAX_VALUE_CHARS).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::records::{BatchInfo, Record, encode_batch};

    fn record(value: &str) -> Record {
        Record {
            attributes: 0,
            timestamp: 0,
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from(value.to_string())),
            headers: vec![(Bytes::from_static(b"h"), Some(Bytes::from_static(b"hv")))],
        }
    }

    fn info() -> BatchInfo {
        BatchInfo {
            attributes: 0,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            partition_leader_epoch: 0,
            records: 0,
        }
    }

    #[test]
    fn routing_values_come_from_keys_headers_and_json_pointers() {
        let r = record(r#"{"type":"order","n":3,"user":{"id":7}}"#);
        let v = |f: &str| field_value(&r, &RouteField::try_from(f.to_string()).unwrap());
        assert_eq!(v("key").as_deref(), Some("k"));
        assert_eq!(v("header:h").as_deref(), Some("hv"));
        assert_eq!(v("json:/type").as_deref(), Some("order"));
        assert_eq!(v("json:/user/id").as_deref(), Some("7"));
        assert_eq!(v("json:/missing"), None);
        assert_eq!(
            field_value(&record("not json"), &RouteField::Json("/type".into())),
            None
        );
    }

    #[test]
    fn a_sampled_set_fills_the_connection_profile() {
        let profiles = Arc::new(Profiles::new(10));
        profiles.fetched(
            1,
            "127.0.0.1".parse().unwrap(),
            "c",
            0,
            Instant::now(),
            [super::super::profiles::Fetched {
                topic: "t",
                partition: 0,
                from: 0,
                next: Some(20),
                bytes: 100,
            }],
        );
        let cfg = PrefetchConfig {
            samples_per_sec: Some(1000),
            ..PrefetchConfig::default()
        };
        let sampler = Sampler::start(&cfg, profiles.clone()).unwrap().unwrap();
        let recs: Vec<Record> = (0..20)
            .map(|i| {
                record(&format!(
                    r#"{{"type":"{}","text":"a red apple"}}"#,
                    if i % 4 == 0 { "b" } else { "a" }
                ))
            })
            .collect();
        let refs: Vec<&Record> = recs.iter().collect();
        let mut set = encode_batch(&refs[..10], &info()).unwrap().to_vec();
        set.extend_from_slice(&encode_batch(&refs[10..], &info()).unwrap());
        // A partial batch at the end, as a fetch cut at max_bytes has.
        set.extend_from_slice(&[0u8; 20]);
        assert!(sampler.due());
        let key = SampleKey {
            conn: 1,
            topic: "t".into(),
            partition: 0,
        };
        assert!(sampler.offer(key, Bytes::from(set)));
        let started = Instant::now();
        loop {
            let view = profiles.snapshot();
            let c = &view[0];
            if c.content_samples >= 5 && !c.top_routing_values.is_empty() {
                let types = &c.top_routing_values["json:/type"];
                assert_eq!(types[0].0, "a", "{types:?}");
                assert!(c.partitions[0].content_similarity.unwrap() > 0.99);
                break;
            }
            assert!(started.elapsed().as_secs() < 10, "no samples: {c:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The rate: at 1000/s, a second call within the same millisecond is not due.
        assert!(!sampler.due() || !sampler.due());
    }

    #[test]
    fn a_sample_decodes_only_whole_batches_within_its_bytes() {
        let recs: Vec<Record> = (0..4).map(|i| record(&format!("value {i}"))).collect();
        let refs: Vec<&Record> = recs.iter().collect();
        let one = encode_batch(&refs[..2], &info()).unwrap();
        let two = encode_batch(&refs[2..], &info()).unwrap();
        let mut set = one.to_vec();
        set.extend_from_slice(&two);
        set.extend_from_slice(&[0u8; 20]);
        let set = Bytes::from(set);
        let both = one.len() + two.len();
        assert_eq!(whole_batches_within(&set, both).unwrap().len(), both);
        assert_eq!(
            whole_batches_within(&set, both - 1).unwrap().len(),
            one.len()
        );
        // The first batch is taken even when it alone is over the limit.
        assert_eq!(whole_batches_within(&set, 1).unwrap().len(), one.len());
        assert!(whole_batches_within(&set.slice(..one.len() - 1), 1 << 20).is_none());
    }
}
