//! KIP-227 fetch sessions towards the brokers, one per client connection and broker (the
//! connection's polls of a broker run one at a time, on a socket of its own). A poll lists
//! only the partitions whose fetch position changed since the connection's last poll of that
//! broker and forgets those it no longer reads; the broker answers only partitions with news.
//! A consumer of 1,000 partitions then costs upstream what changed, not 1,000 partitions
//! each way per poll.
//!
//! Polls of fewer than `MIN_PARTITIONS` partitions go without a session: they gain little,
//! and a broker caches a bounded number of sessions (`max.incremental.fetch.session.cache.slots`,
//! 1,000 by default), which thousands of small consumers would only churn. A session error
//! (the broker evicted it, an epoch mismatch) or a failed poll drops the session; the next
//! poll starts a new one.

use std::collections::HashMap;
use std::sync::Mutex;

use kafka_protocol::messages::fetch_request::FetchPartition;

use super::plan::{Key, Want};
use crate::protocol::codes;

/// Partitions a poll must cover to use a session.
pub const MIN_PARTITIONS: usize = 16;

/// The sessions of one client connection, by broker.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<i32, State>>,
}

#[derive(Default)]
struct State {
    /// The broker's session id; 0 while there is none.
    id: i32,
    /// The epoch the next poll sends.
    epoch: i32,
    /// What the broker holds for each partition of the session (as last sent).
    parts: HashMap<Key, FetchPartition>,
    /// A poll using the session is out: another poll goes without it (never two epochs out).
    busy: bool,
}

/// How one poll uses its broker's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Sessionless: every partition listed (session id 0, epoch -1).
    None,
    /// Asks for a new session: every partition listed (session id 0, epoch 0).
    New,
    /// Lists what changed in session `id` at `epoch`.
    Incremental { id: i32, epoch: i32 },
}

impl Use {
    pub fn label(self) -> &'static str {
        match self {
            Use::None => "none",
            Use::New => "new",
            Use::Incremental { .. } => "incremental",
        }
    }

    /// (session_id, session_epoch) as the request carries them.
    pub fn fields(self) -> (i32, i32) {
        match self {
            Use::None => (0, -1),
            Use::New => (0, 0),
            Use::Incremental { id, epoch } => (id, epoch),
        }
    }
}

/// What one poll sends.
#[derive(Debug)]
pub struct Planned {
    pub used: Use,
    /// Indexes (into the poll's wants) of the partitions to list.
    pub listed: Vec<usize>,
    /// Partitions of the session the poll no longer reads.
    pub forgotten: Vec<Key>,
}

impl Planned {
    pub fn sessionless(n: usize) -> Self {
        Self::all(Use::None, n)
    }

    fn all(used: Use, n: usize) -> Self {
        Self {
            used,
            listed: (0..n).collect(),
            forgotten: Vec::new(),
        }
    }
}

impl Sessions {
    /// Plans a poll of `wants` on `broker`. `enabled`: sessions configured on and the
    /// request version has them (Fetch v7+).
    pub fn plan(&self, broker: i32, enabled: bool, wants: &[&Want]) -> Planned {
        if !enabled || wants.len() < MIN_PARTITIONS {
            return Planned::all(Use::None, wants.len());
        }
        let mut map = self.inner.lock().expect("upstream sessions");
        let st = map.entry(broker).or_default();
        if st.busy {
            return Planned::all(Use::None, wants.len());
        }
        st.busy = true;
        let next: HashMap<Key, FetchPartition> = wants
            .iter()
            .map(|w| (w.key.clone(), w.part.clone()))
            .collect();
        if st.id == 0 {
            st.parts = next;
            return Planned::all(Use::New, wants.len());
        }
        let listed = wants
            .iter()
            .enumerate()
            .filter(|(_, w)| st.parts.get(&w.key) != Some(&w.part))
            .map(|(i, _)| i)
            .collect();
        let forgotten = st
            .parts
            .keys()
            .filter(|k| !next.contains_key(*k))
            .cloned()
            .collect();
        st.parts = next;
        Planned {
            used: Use::Incremental {
                id: st.id,
                epoch: st.epoch,
            },
            listed,
            forgotten,
        }
    }

    /// The broker answered a poll planned with `used`: its top-level `error` and the
    /// `session_id` it gave.
    pub fn answered(&self, broker: i32, used: Use, error: i16, session_id: i32) {
        if used == Use::None {
            return;
        }
        let mut map = self.inner.lock().expect("upstream sessions");
        let Some(st) = map.get_mut(&broker) else {
            return;
        };
        if error != codes::NONE {
            let reason = match error {
                codes::FETCH_SESSION_ID_NOT_FOUND => "not_found",
                codes::INVALID_FETCH_SESSION_EPOCH => "epoch",
                _ => "error",
            };
            metrics::counter!("shardgate_upstream_fetch_session_resets_total", "reason" => reason)
                .increment(1);
            *st = State::default();
            return;
        }
        st.busy = false;
        match used {
            // No session given (the broker's cache is full): the next poll asks again.
            Use::New if session_id == 0 => *st = State::default(),
            Use::New => {
                st.id = session_id;
                st.epoch = 1;
            }
            Use::Incremental { .. } => {
                st.epoch = if st.epoch == i32::MAX {
                    1
                } else {
                    st.epoch + 1
                };
            }
            Use::None => {}
        }
    }

    /// A poll planned with `used` got no answer (timeout, socket closed): what the broker
    /// holds is unknown, the session is dropped.
    pub fn failed(&self, broker: i32, used: Use) {
        if used == Use::None {
            return;
        }
        metrics::counter!("shardgate_upstream_fetch_session_resets_total", "reason" => "failed")
            .increment(1);
        if let Some(st) = self
            .inner
            .lock()
            .expect("upstream sessions")
            .get_mut(&broker)
        {
            *st = State::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TopicRef;

    fn want(p: i32, offset: i64) -> Want {
        Want {
            key: (
                TopicRef {
                    name: "t".into(),
                    id: uuid::Uuid::nil(),
                },
                p,
            ),
            part: FetchPartition::default()
                .with_partition(p)
                .with_fetch_offset(offset),
            name: Some("t".into()),
            leader: Ok(1),
        }
    }

    fn wants(offsets: &[(i32, i64)]) -> Vec<Want> {
        offsets.iter().map(|(p, o)| want(*p, *o)).collect()
    }

    #[test]
    fn a_session_lists_only_what_changed_and_forgets_what_is_no_longer_read() {
        let s = Sessions::default();
        let first = wants(&(0..20).map(|p| (p, 0)).collect::<Vec<_>>());
        let refs: Vec<&Want> = first.iter().collect();
        let plan = s.plan(1, true, &refs);
        assert_eq!(plan.used, Use::New);
        assert_eq!(plan.listed.len(), 20);
        // Out: a second poll goes without the session.
        assert_eq!(s.plan(1, true, &refs).used, Use::None);
        s.answered(1, Use::New, codes::NONE, 77);

        // Partition 3 moved on, partition 19 is no longer read.
        let mut next = wants(&(0..19).map(|p| (p, 0)).collect::<Vec<_>>());
        next[3].part.fetch_offset = 10;
        let refs: Vec<&Want> = next.iter().collect();
        let plan = s.plan(1, true, &refs);
        assert_eq!(plan.used, Use::Incremental { id: 77, epoch: 1 });
        assert_eq!(plan.listed, vec![3]);
        assert_eq!(plan.forgotten.len(), 1);
        assert_eq!(plan.forgotten[0].1, 19);
        s.answered(1, plan.used, codes::NONE, 77);

        // Nothing changed: nothing listed, the epoch moves on.
        let plan = s.plan(1, true, &refs);
        assert_eq!(plan.used, Use::Incremental { id: 77, epoch: 2 });
        assert!(plan.listed.is_empty() && plan.forgotten.is_empty());

        // Evicted by the broker: the next poll asks for a new session, listing everything.
        s.answered(1, plan.used, codes::FETCH_SESSION_ID_NOT_FOUND, 0);
        let plan = s.plan(1, true, &refs);
        assert_eq!(plan.used, Use::New);
        assert_eq!(plan.listed.len(), 19);
        s.failed(1, plan.used);
        assert_eq!(s.plan(1, true, &refs).used, Use::New);
    }

    #[test]
    fn small_polls_and_old_versions_go_without_a_session() {
        let s = Sessions::default();
        let few = wants(&[(0, 0), (1, 0)]);
        let refs: Vec<&Want> = few.iter().collect();
        assert_eq!(s.plan(1, true, &refs).used, Use::None);
        let many = wants(&(0..20).map(|p| (p, 0)).collect::<Vec<_>>());
        let refs: Vec<&Want> = many.iter().collect();
        assert_eq!(s.plan(1, false, &refs).used, Use::None);
        // A broker that gives no session (its cache full) is asked again next time.
        assert_eq!(s.plan(2, true, &refs).used, Use::New);
        s.answered(2, Use::New, codes::NONE, 0);
        assert_eq!(s.plan(2, true, &refs).used, Use::New);
    }
}
