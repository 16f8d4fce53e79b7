//! Fetch sessions (KIP-227) offered to clients: after a full fetch that opens a session, a
//! consumer sends only the partitions whose fetch state changed and gets back only the
//! partitions with something new (records, an error, or moved offsets). Sessions belong to
//! this instance (a client keeps one per broker it fetches from, and the virtual brokers are
//! the instances), are bounded in number, and the least recently used goes first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use kafka_protocol::messages::FetchRequest;
use kafka_protocol::messages::fetch_request::FetchPartition;
use kafka_protocol::messages::fetch_response::PartitionData;

use super::plan::{Key, Marks};
use crate::protocol::{TopicRef, codes};

/// A session not used for this long is forgotten (clients fetch every few hundred ms).
const IDLE: Duration = Duration::from_secs(120);

pub struct FetchSessions {
    max: usize,
    inner: Mutex<Sessions>,
}

struct Sessions {
    next_id: i32,
    map: HashMap<i32, Session>,
}

struct Session {
    /// The epoch the next incremental request must carry.
    epoch: i32,
    parts: IndexMap<Key, FetchPartition>,
    /// What the client was last told per partition (an incremental response includes a
    /// partition only when this changes or records come).
    sent: HashMap<Key, Marks>,
    used: Instant,
}

/// How a fetch request relates to sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Epoch -1: a full fetch without a session.
    Sessionless,
    /// Epoch 0: a full fetch that opened session `id` (0 when no slot was free: then the
    /// client goes on sessionless).
    Full { id: i32 },
    /// Epoch > 0 on session `id`.
    Incremental { id: i32 },
}

impl Kind {
    pub fn session_id(self) -> i32 {
        match self {
            Kind::Sessionless => 0,
            Kind::Full { id } | Kind::Incremental { id } => id,
        }
    }

    /// Whether every requested partition must be in the response.
    pub fn full(self) -> bool {
        !matches!(self, Kind::Incremental { .. })
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Sessionless => "sessionless",
            Kind::Full { .. } => "full",
            Kind::Incremental { .. } => "incremental",
        }
    }
}

/// The partitions a request covers, in the order the response lists them.
pub struct Opened {
    pub kind: Kind,
    pub parts: Vec<(Key, FetchPartition)>,
}

fn next_epoch(e: i32) -> i32 {
    if e == i32::MAX { 1 } else { e + 1 }
}

/// The partitions a request names, keyed as it names their topics (by id from v13).
pub fn listed(body: &FetchRequest, by_id: bool) -> Vec<(Key, FetchPartition)> {
    let mut out = Vec::new();
    for t in &body.topics {
        let tref = topic_ref(&t.topic.0, t.topic_id, by_id);
        for p in &t.partitions {
            out.push(((tref.clone(), p.partition), p.clone()));
        }
    }
    out
}

fn topic_ref(name: &kafka_protocol::protocol::StrBytes, id: uuid::Uuid, by_id: bool) -> TopicRef {
    // One field only: a v13 request names topics by id (name empty), older ones by name.
    if by_id {
        TopicRef {
            name: Default::default(),
            id,
        }
    } else {
        TopicRef {
            name: name.clone(),
            id: uuid::Uuid::nil(),
        }
    }
}

impl FetchSessions {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            inner: Mutex::new(Sessions {
                next_id: 1,
                map: HashMap::new(),
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("fetch sessions").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the request to the sessions: opens, updates or closes one. `Err` is the
    /// top-level error code for an unknown session or a wrong epoch.
    pub fn open(&self, body: &FetchRequest, by_id: bool) -> Result<Opened, i16> {
        let listed = listed(body, by_id);
        let mut st = self.inner.lock().expect("fetch sessions");
        let now = Instant::now();
        st.map.retain(|_, s| now.duration_since(s.used) < IDLE);
        let (id, epoch) = (body.session_id, body.session_epoch);
        let opened = if epoch == -1 || epoch == 0 {
            // A full fetch closes the session it names.
            if id != 0 {
                st.map.remove(&id);
            }
            if epoch == -1 || self.max == 0 {
                Opened {
                    kind: Kind::Sessionless,
                    parts: listed,
                }
            } else {
                if st.map.len() >= self.max
                    && let Some(oldest) = st.map.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k)
                {
                    st.map.remove(&oldest);
                    metrics::counter!("shardgate_fetch_sessions_evicted_total").increment(1);
                }
                let id = loop {
                    let id = st.next_id;
                    st.next_id = if id == i32::MAX { 1 } else { id + 1 };
                    if !st.map.contains_key(&id) {
                        break id;
                    }
                };
                st.map.insert(
                    id,
                    Session {
                        epoch: 1,
                        parts: listed.iter().cloned().collect(),
                        sent: HashMap::new(),
                        used: now,
                    },
                );
                Opened {
                    kind: Kind::Full { id },
                    parts: listed,
                }
            }
        } else {
            let Some(s) = st.map.get_mut(&id) else {
                return Err(codes::FETCH_SESSION_ID_NOT_FOUND);
            };
            if s.epoch != epoch {
                return Err(codes::INVALID_FETCH_SESSION_EPOCH);
            }
            let listed_n = listed.len();
            for (k, p) in listed {
                s.parts.insert(k, p);
            }
            for t in &body.forgotten_topics_data {
                let tref = topic_ref(&t.topic.0, t.topic_id, by_id);
                for p in &t.partitions {
                    let k = (tref.clone(), *p);
                    s.parts.shift_remove(&k);
                    s.sent.remove(&k);
                }
            }
            s.epoch = next_epoch(epoch);
            s.used = now;
            metrics::counter!("shardgate_fetch_session_partitions_total", "direction" => "request")
                .increment(listed_n as u64);
            Opened {
                kind: Kind::Incremental { id },
                parts: s
                    .parts
                    .iter()
                    .map(|(k, p)| (k.clone(), p.clone()))
                    .collect(),
            }
        };
        drop(st);
        metrics::counter!("shardgate_fetch_session_requests_total", "kind" => opened.kind.label())
            .increment(1);
        metrics::gauge!("shardgate_fetch_sessions").set(self.len() as f64);
        Ok(opened)
    }

    /// Keeps in an incremental response only the partitions with news for the client, and
    /// remembers what a session's client was told.
    pub fn select(&self, kind: Kind, answers: &mut Vec<(Key, PartitionData)>) {
        let id = kind.session_id();
        if id == 0 {
            return;
        }
        let mut st = self.inner.lock().expect("fetch sessions");
        let Some(s) = st.map.get_mut(&id) else {
            return;
        };
        let mut served = Vec::new();
        answers.retain(|(k, p)| {
            let marks = Marks::of(p);
            if p.records.as_ref().is_some_and(|r| !r.is_empty()) {
                served.push(k.clone());
            }
            let news = kind.full()
                || p.error_code != codes::NONE
                || p.records.as_ref().is_some_and(|r| !r.is_empty())
                || p.diverging_epoch.epoch >= 0
                || p.snapshot_id.epoch >= 0
                || s.sent.get(k) != Some(&marks);
            if news {
                s.sent.insert(k.clone(), marks);
            }
            news
        });
        // Partitions that got records go last next time, so a response filled up to
        // max_bytes by the first partitions does not starve the others (as Kafka does).
        if !served.is_empty() {
            let moved: IndexMap<Key, FetchPartition> = served
                .into_iter()
                .filter_map(|k| s.parts.get(&k).cloned().map(|p| (k, p)))
                .collect();
            s.parts.retain(|k, _| !moved.contains_key(k));
            s.parts.extend(moved);
        }
        if let Kind::Incremental { .. } = kind {
            metrics::counter!("shardgate_fetch_session_partitions_total", "direction" => "response")
                .increment(answers.len() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::TopicName;
    use kafka_protocol::messages::fetch_request::{FetchTopic, ForgottenTopic};

    fn req(id: i32, epoch: i32, parts: &[(i32, i64)], forget: &[i32]) -> FetchRequest {
        let t = FetchTopic::default()
            .with_topic(TopicName("t".into()))
            .with_partitions(
                parts
                    .iter()
                    .map(|(p, o)| {
                        FetchPartition::default()
                            .with_partition(*p)
                            .with_fetch_offset(*o)
                    })
                    .collect(),
            );
        let mut r = FetchRequest::default()
            .with_session_id(id)
            .with_session_epoch(epoch)
            .with_topics(if parts.is_empty() { vec![] } else { vec![t] });
        if !forget.is_empty() {
            r.forgotten_topics_data = vec![
                ForgottenTopic::default()
                    .with_topic(TopicName("t".into()))
                    .with_partitions(forget.to_vec()),
            ];
        }
        r
    }

    fn offsets(o: &Opened) -> Vec<(i32, i64)> {
        o.parts.iter().map(|(k, p)| (k.1, p.fetch_offset)).collect()
    }

    #[test]
    fn a_session_carries_partitions_between_incremental_fetches() {
        let s = FetchSessions::new(10);
        let full = s.open(&req(0, 0, &[(0, 5), (1, 7)], &[]), false).unwrap();
        let Kind::Full { id } = full.kind else {
            panic!("no session opened")
        };
        assert!(id > 0);
        // Only partition 0 moved; partition 1 is still fetched from 7.
        let inc = s.open(&req(id, 1, &[(0, 9)], &[]), false).unwrap();
        assert_eq!(inc.kind, Kind::Incremental { id });
        assert_eq!(offsets(&inc), vec![(0, 9), (1, 7)]);
        // Forgetting partition 1, adding 2.
        let inc = s.open(&req(id, 2, &[(2, 0)], &[1]), false).unwrap();
        assert_eq!(offsets(&inc), vec![(0, 9), (2, 0)]);
    }

    #[test]
    fn wrong_epochs_and_unknown_sessions_are_refused() {
        let s = FetchSessions::new(10);
        let id = s
            .open(&req(0, 0, &[(0, 0)], &[]), false)
            .unwrap()
            .kind
            .session_id();
        assert_eq!(
            s.open(&req(id, 5, &[], &[]), false).err(),
            Some(codes::INVALID_FETCH_SESSION_EPOCH)
        );
        assert_eq!(
            s.open(&req(id + 100, 1, &[], &[]), false).err(),
            Some(codes::FETCH_SESSION_ID_NOT_FOUND)
        );
        // Epoch -1 closes it.
        assert_eq!(
            s.open(&req(id, -1, &[(0, 0)], &[]), false).unwrap().kind,
            Kind::Sessionless
        );
        assert!(s.is_empty());
    }

    #[test]
    fn sessions_are_bounded_least_recently_used_first() {
        let s = FetchSessions::new(2);
        let a = s
            .open(&req(0, 0, &[(0, 0)], &[]), false)
            .unwrap()
            .kind
            .session_id();
        std::thread::sleep(Duration::from_millis(2));
        let b = s
            .open(&req(0, 0, &[(0, 0)], &[]), false)
            .unwrap()
            .kind
            .session_id();
        std::thread::sleep(Duration::from_millis(2));
        s.open(&req(a, 1, &[], &[]), false).unwrap(); // a used after b
        let c = s
            .open(&req(0, 0, &[(0, 0)], &[]), false)
            .unwrap()
            .kind
            .session_id();
        assert_eq!(s.len(), 2);
        assert!(
            s.open(&req(b, 1, &[], &[]), false).is_err(),
            "b was least recently used"
        );
        assert!(s.open(&req(a, 2, &[], &[]), false).is_ok());
        assert!(s.open(&req(c, 1, &[], &[]), false).is_ok());
    }

    #[test]
    fn incremental_answers_list_only_what_changed() {
        let s = FetchSessions::new(10);
        let id = s
            .open(&req(0, 0, &[(0, 0), (1, 0)], &[]), false)
            .unwrap()
            .kind
            .session_id();
        let part = |i: i32, hw: i64, recs: &'static [u8]| {
            (
                (
                    TopicRef {
                        name: "t".into(),
                        id: uuid::Uuid::nil(),
                    },
                    i,
                ),
                PartitionData::default()
                    .with_partition_index(i)
                    .with_high_watermark(hw)
                    .with_records(Some(bytes::Bytes::from_static(recs))),
            )
        };
        let mut full = vec![part(0, 10, b""), part(1, 10, b"")];
        s.select(Kind::Full { id }, &mut full);
        assert_eq!(full.len(), 2);
        s.open(&req(id, 1, &[], &[]), false).unwrap();
        let mut inc = vec![part(0, 10, b""), part(1, 11, b"")];
        s.select(Kind::Incremental { id }, &mut inc);
        assert_eq!(inc.iter().map(|(k, _)| k.1).collect::<Vec<_>>(), vec![1]);
        let mut inc = vec![part(0, 10, b"x"), part(1, 11, b"")];
        s.select(Kind::Incremental { id }, &mut inc);
        assert_eq!(inc.iter().map(|(k, _)| k.1).collect::<Vec<_>>(), vec![0]);
        // Partition 0 got records: it goes last in the next fetch.
        let next = s.open(&req(id, 2, &[], &[]), false).unwrap();
        assert_eq!(offsets(&next), vec![(1, 0), (0, 0)]);
    }
}
