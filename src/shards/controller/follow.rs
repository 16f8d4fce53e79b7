//! Following the store: maps written by other instances are installed, this instance
//! reports the epochs it applied (the seal protocol waits for them) and campaigns for the
//! leader lock; a store that lost maps is refilled.

use super::*;

impl Controller {
    /// This instance as the store's registry shows it.
    pub fn me(&self) -> InstanceInfo {
        let admin = self.settings.admin_bind;
        let host = if admin.ip().is_unspecified() {
            self.settings.advertised.host.clone()
        } else {
            admin.ip().to_string()
        };
        let applied: Vec<_> = self
            .shards
            .all()
            .into_iter()
            .filter(|m| self.shards.inflight_before(&m.config.name, m.map.epoch) == 0)
            .collect();
        // Read after `inflight_before` said no older produce is in flight: the writer records
        // acknowledgements before answering jobs, so these ends cover all of them.
        let acked = applied
            .iter()
            .filter_map(|m| {
                // Parents being sealed, and partitions whose leader is about to change
                // (writers on acks=all for them): both wait for what was acknowledged.
                let ends: BTreeMap<i32, i64> = m
                    .map
                    .sealing()
                    .flat_map(|g| g.after.iter().filter(|a| a.seal_offset.is_none()))
                    .map(|a| a.partition)
                    .chain(
                        m.map
                            .moves
                            .iter()
                            .filter(|mv| mv.acks_all)
                            .map(|mv| mv.partition),
                    )
                    .map(|p| (p, self.managed.acked_end(&m.config.name, p)))
                    .filter(|(_, end)| *end >= 0)
                    .collect();
                (!ends.is_empty()).then(|| (m.config.name.clone(), ends))
            })
            .collect();
        InstanceInfo {
            node_id: self.settings.node_id,
            advertised: self.settings.advertised.to_string(),
            admin: format!(
                "{}://{host}:{}",
                if self.settings.admin_auth.tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                admin.port()
            ),
            applied: applied
                .iter()
                .map(|m| (m.config.name.clone(), m.map.epoch))
                .collect(),
            acked,
        }
    }

    /// Background work every instance does with the store: follow map changes (blocking
    /// queries), publish which epochs it applied, and campaign for the leader lock. With the
    /// store unreachable, routing goes on with the last maps and the controller pauses.
    pub async fn follow_store(self: Arc<Self>) {
        let watcher = {
            let this = self.clone();
            async move {
                let mut index = 0;
                loop {
                    match this.store.watch_topics(index).await {
                        Ok((i, topics)) => {
                            index = i;
                            for t in topics {
                                if this.shards.install(t.config, t.map.clone()) {
                                    tracing::info!(topic = %t.map.topic, epoch = t.map.epoch, "installed shard map from the store");
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watching the shard store failed; routing with the last maps");
                            metrics::counter!("shardgate_store_errors_total", "op" => "watch")
                                .increment(1);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        };
        let heartbeat = {
            let shards = self.shards.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tick.tick().await;
                    shards.heartbeat();
                }
            }
        };
        let reporter = async move {
            let mut last: Option<InstanceInfo> = None;
            let mut generation = self.store.session_generation();
            let mut last_sent = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let me = self.me();
                // Renew the session (and registry entry) every 3 s, and at once when the
                // applied epochs change: the seal protocol is waiting for them.
                if last.as_ref() != Some(&me)
                    || last_sent.elapsed() >= Duration::from_secs(3)
                    || self.shards.fenced()
                {
                    // Read before the session is confirmed: a fence raised after this (a
                    // stall during the report) keeps the fence up.
                    let fence_before = self.shards.fence_generation();
                    match self.store.report(&me).await {
                        Ok(()) => {
                            metrics::gauge!("shardgate_store_reachable").set(1.0);
                            last = Some(me.clone());
                            last_sent = Instant::now();
                            let now = self.store.session_generation();
                            if now != generation {
                                // A new session: the old one expired (or this is the first).
                                generation = now;
                                self.shards.session_lost();
                            }
                            self.reread_if_fenced(fence_before).await;
                        }
                        Err(e) => {
                            metrics::gauge!("shardgate_store_reachable").set(0.0);
                            metrics::counter!("shardgate_store_errors_total", "op" => "report")
                                .increment(1);
                            tracing::warn!(error = %e, "cannot report to the shard store");
                            last = None;
                        }
                    }
                    if let Ok(Some(live)) = self.store.instances().await {
                        let members = live
                            .iter()
                            .filter_map(|i| {
                                crate::config::parse_host_port("instances", &i.advertised)
                                    .ok()
                                    .map(|a| (i.node_id, a))
                            })
                            .collect();
                        self.members.send_replace(members);
                    }
                    let lead = match self.store.campaign(&me).await {
                        Ok(l) => l,
                        Err(e) => {
                            metrics::counter!("shardgate_store_errors_total", "op" => "campaign")
                                .increment(1);
                            tracing::warn!(error = %e, "leader election unavailable; controller paused");
                            false
                        }
                    };
                    let was = self.leader.swap(lead, std::sync::atomic::Ordering::AcqRel);
                    if was != lead {
                        tracing::info!(leader = lead, node_id = me.node_id, "leadership changed");
                    }
                    if was && !lead {
                        // Moves this instance drove are cancelled in Kafka; the next leader
                        // removes their records.
                        let me = self.clone();
                        tokio::spawn(async move { me.abandon_moves().await });
                    }
                    metrics::gauge!("shardgate_controller_leader").set(if lead {
                        1.0
                    } else {
                        0.0
                    });
                }
            }
        };
        tokio::join!(watcher, reporter, heartbeat);
    }

    /// After a report confirmed this instance's session: an instance that was fenced
    /// (starting, stalled, or given a new session) re-reads every map before it writes again,
    /// since the others may have split and sealed without it.
    async fn reread_if_fenced(&self, fence_before: u64) {
        if !self.shards.fenced() {
            return;
        }
        match self.store.load_topics().await {
            Ok(topics) => {
                for t in topics {
                    self.shards.install(t.config, t.map);
                }
                if self.shards.unfence_if(fence_before) {
                    tracing::info!(
                        "store session confirmed and maps re-read; managed writes go on"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-read the maps; managed writes stay fenced")
            }
        }
    }

    /// A store that lost maps (a Consul agent restarted without its data) is refilled from the
    /// maps the instances still route by, so check-and-set writes can go on.
    pub(super) async fn republish(&self) {
        let stored = match self.store.load_topics().await {
            Ok(s) => s,
            Err(_) => return,
        };
        for m in self.shards.all() {
            if stored.iter().any(|t| t.config.name == m.config.name) {
                continue;
            }
            let _op = self.ops.lock().await;
            let t = StoredTopic {
                config: m.config.clone(),
                map: m.map.clone(),
            };
            match self.store.put_topic(&t, None).await {
                Ok(()) => {
                    tracing::warn!(topic = %m.config.name, epoch = m.map.epoch, "shard store had lost the map; republished it")
                }
                Err(e) => {
                    tracing::warn!(topic = %m.config.name, error = %e, "republishing a lost map failed")
                }
            }
        }
    }
}
