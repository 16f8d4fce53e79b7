//! Forgetting groups and links that went away. Every map of `GroupTracker` is keyed by names
//! clients choose (group ids, client ids), so a client inventing names must not grow them
//! without bound, and a group that stopped consuming must stop counting at gates.

use std::time::{Duration, Instant};

use super::GroupTracker;

/// A group with no activity on the wire for this long is forgotten. If it comes back, Kafka's
/// view (its committed offsets, read while a gate wants it) brings its positions back.
pub const GROUP_IDLE: Duration = Duration::from_secs(3600);
/// At most this many groups and client links are remembered; beyond it the least recently
/// active go first.
pub const MAX_GROUPS: usize = 100_000;
pub const MAX_LINKS: usize = 100_000;

impl GroupTracker {
    pub(super) fn touch(&self, group: &str) {
        let mut a = self.activity.lock().expect("activity lock");
        match a.get_mut(group) {
            Some(t) => *t = Instant::now(),
            None => {
                a.insert(group.to_string(), Instant::now());
            }
        }
    }

    /// Forgets groups idle longer than `idle` (and the oldest beyond `max_groups`), and client
    /// links idle as long or beyond `max_links`. Returns how many groups were forgotten.
    pub fn sweep(&self, idle: Duration, max_groups: usize, max_links: usize) -> usize {
        let now = Instant::now();
        let gone: Vec<String> = {
            let mut a = self.activity.lock().expect("activity lock");
            // Groups known only from positions (never touched) count as active now.
            for g in self.groups.lock().expect("groups lock").keys() {
                a.entry(g.clone()).or_insert(now);
            }
            let mut gone: Vec<String> = a
                .iter()
                .filter(|(_, t)| now.duration_since(**t) > idle)
                .map(|(g, _)| g.clone())
                .collect();
            if a.len() - gone.len() > max_groups {
                let mut by_age: Vec<(Instant, String)> = a
                    .iter()
                    .filter(|(_, t)| now.duration_since(**t) <= idle)
                    .map(|(g, t)| (*t, g.clone()))
                    .collect();
                by_age.sort();
                let extra = by_age.len() - max_groups;
                gone.extend(by_age.into_iter().take(extra).map(|(_, g)| g));
            }
            for g in &gone {
                a.remove(g);
            }
            gone
        };
        if !gone.is_empty() {
            let gone_set: std::collections::HashSet<&str> =
                gone.iter().map(String::as_str).collect();
            self.groups
                .lock()
                .expect("groups lock")
                .retain(|g, _| !gone_set.contains(g.as_str()));
            self.group_fetched
                .lock()
                .expect("group fetched lock")
                .retain(|g, _| !gone_set.contains(g.as_str()));
            self.assignments
                .lock()
                .expect("assignments lock")
                .retain(|g, _| !gone_set.contains(g.as_str()));
            // Hold labels are comma-joined group lists (or conn-N): drop any naming a gone group.
            self.held_since
                .lock()
                .expect("held lock")
                .retain(|(who, ..), _| !who.split(',').any(|g| gone_set.contains(g)));
            self.kafka_owners
                .lock()
                .expect("kafka owners lock")
                .values_mut()
                .for_each(|v| v.retain(|g| !gone_set.contains(g.as_str())));
            let mut l = self.links.lock().expect("links lock");
            for (groups, _) in l.values_mut() {
                groups.retain(|g| !gone_set.contains(g.as_str()));
            }
            l.retain(|_, (groups, _)| !groups.is_empty());
        }
        {
            let mut l = self.links.lock().expect("links lock");
            l.retain(|_, (_, t)| now.duration_since(*t) <= idle);
            if l.len() > max_links {
                let mut by_age: Vec<(Instant, _)> =
                    l.iter().map(|(k, (_, t))| (*t, k.clone())).collect();
                by_age.sort();
                let extra = by_age.len() - max_links;
                for (_, k) in by_age.into_iter().take(extra) {
                    l.remove(&k);
                }
            }
        }
        if !gone.is_empty() {
            metrics::counter!("shardgate_groups_forgotten_total").increment(gone.len() as u64);
            tracing::debug!(groups = gone.len(), "forgot idle consumer groups");
        }
        gone.len()
    }

    /// Groups and client links remembered (for metrics and tests).
    pub fn remembered(&self) -> (usize, usize) {
        (
            self.activity.lock().expect("activity lock").len(),
            self.links.lock().expect("links lock").len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn idle_groups_and_their_links_are_forgotten() {
        let t = GroupTracker::default();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        t.link(ip, "c1", "g1");
        t.committed("g1", "orders", 0, 10);
        t.assigned("g1", 1, "m1", vec![("orders".into(), 0)]);
        assert_eq!(t.remembered(), (1, 1));
        assert_eq!(t.sweep(Duration::from_secs(60), 10, 10), 0, "still active");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(t.sweep(Duration::from_millis(10), 10, 10), 1);
        assert_eq!(t.remembered(), (0, 0));
        assert!(t.groups.lock().unwrap().is_empty());
        assert!(t.assignments.lock().unwrap().is_empty());
    }

    #[test]
    fn invented_names_are_capped_oldest_first() {
        let t = GroupTracker::default();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for i in 0..50 {
            std::thread::sleep(Duration::from_millis(1));
            t.link(ip, &format!("client-{i}"), &format!("group-{i}"));
            t.committed(&format!("group-{i}"), "orders", 0, i);
        }
        t.sweep(Duration::from_secs(3600), 20, 30);
        let (groups, links) = t.remembered();
        assert_eq!(groups, 20);
        assert!(links <= 20, "links of forgotten groups go too: {links}");
        let g = t.groups.lock().unwrap();
        assert!(g.contains_key("group-49") && !g.contains_key("group-0"));
    }
}
