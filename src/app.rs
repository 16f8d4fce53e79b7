//! The composition root: builds the long-lived parts of one shardgate process (upstream pool
//! and topology refresher, shard registry and group tracker, shard controller, proxy context,
//! admin HTTP) and hands each only the handles it needs. Nothing else constructs them.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Settings;
use crate::proxy::Ctx;
use crate::shards::controller::{Controller, Handles};
use crate::shards::gates::GroupTracker;
use crate::shards::produce::ManagedProduce;
use crate::shards::registry::Registry;
use crate::upstream::pool::Pool;
use crate::upstream::refresh::run_refresher;
use crate::upstream::topology::TopologyHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Prefetch(#[from] crate::prefetch::embed::EmbedError),
    #[error("listener.sasl.credentials: {0}")]
    Credentials(#[from] crate::auth::credentials::CredentialsError),
}

pub struct Running {
    pub ctx: Arc<Ctx>,
    pub controller: Arc<Controller>,
    pub client_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub async fn start(settings: Settings) -> Result<Running, StartError> {
    let prometheus = crate::telemetry::install().map_err(|e| StartError::Metrics(e.to_string()))?;
    let upstream_tls = match &settings.raw.upstream.tls {
        Some(t) => {
            let identity = t.cert.as_deref().zip(t.key.as_deref());
            Some((
                crate::tls::connector(&t.ca, identity)?,
                t.server_name.clone(),
            ))
        }
        None => None,
    };
    let client_tls = match &settings.raw.listener.tls {
        Some(t) => Some(crate::tls::acceptor(
            &t.cert,
            &t.key,
            t.client_ca.as_deref().map(|ca| crate::tls::ClientCerts {
                ca,
                required: t.client_auth == crate::config::ClientAuth::Required,
            }),
        )?),
        None => None,
    };
    let topology = Arc::new(TopologyHandle::new());
    let upstream_login = match &settings.upstream_sasl {
        Some(sasl) => Some(crate::upstream::sasl::Login::new(sasl.clone())?),
        None => None,
    };
    let pool = Arc::new(Pool::new(&settings, topology, upstream_tls, upstream_login));
    let store: Arc<dyn crate::store::ShardStore> = match settings.raw.store.kind.as_str() {
        "consul" => Arc::new(crate::store::consul::ConsulStore::new(&settings.raw.store)),
        _ => Arc::new(crate::store::embedded::EmbeddedStore::open(
            &settings.raw.store.path,
        )?),
    };
    tracing::info!(store = %store.describe(), "shard store");
    let shards = Arc::new(Registry::default());
    let groups = Arc::new(GroupTracker::default());
    let profiles = Arc::new(crate::prefetch::Profiles::new(
        crate::prefetch::profiles::MAX_MEMBERS,
    ));
    let sampler =
        crate::prefetch::content::Sampler::start(&settings.raw.prefetch, profiles.clone())?;
    let managed = Arc::new(ManagedProduce::new(
        shards.clone(),
        pool.clone(),
        settings.raw.limits.max_decompressed_request_bytes,
    ));
    let controller = Arc::new(Controller::new(
        store.clone(),
        Handles {
            settings: settings.clone(),
            pool: pool.clone(),
            shards: shards.clone(),
            groups: groups.clone(),
            managed: managed.clone(),
        },
    ));
    if settings.raw.listener.tls.is_none()
        && settings
            .sasl_mechanisms
            .contains(&crate::auth::Mechanism::Plain)
    {
        tracing::warn!(
            "listener.sasl offers PLAIN without listener.tls: clients send passwords in clear"
        );
    }
    if settings.raw.upstream.tls.is_none()
        && settings
            .upstream_sasl
            .as_ref()
            .is_some_and(|s| matches!(s.mechanism_name(), "PLAIN" | "OAUTHBEARER"))
    {
        tracing::warn!(
            "upstream.sasl uses PLAIN or OAUTHBEARER without upstream.tls: the password or token goes to Kafka in clear"
        );
    }
    let sasl = match &settings.raw.listener.sasl {
        Some(cfg) => Some(Arc::new(crate::auth::Authenticator::new(
            settings.sasl_mechanisms.clone(),
            match &cfg.credentials {
                Some(path) => crate::auth::Credentials::load(path)?,
                // Filled from the store before the listener opens (`security`).
                None => crate::auth::Credentials::none(),
            },
            Duration::from_millis(cfg.session_lifetime_ms),
            cfg.max_failures_per_minute,
        ))),
        None => None,
    };
    let mut ctx = Ctx::new(
        settings.clone(),
        pool.clone(),
        shards.clone(),
        groups.clone(),
        managed,
        profiles.clone(),
        sampler,
    );
    ctx.sasl = sasl;
    let ctx = Arc::new(ctx);
    // Users and rules kept in the store: read before the listener opens, followed after.
    let security = Arc::new(crate::security::Targets {
        authenticator: ctx.sasl.clone(),
        acls: ctx.acls.clone(),
        authorization: settings.raw.authorization.clone(),
        file_rules: settings.authorization.rules.clone(),
    });
    if settings.raw.authorization.acls_in_store {
        // Closed until the store's rules are read (`security::load`).
        ctx.acls
            .store(Some(Arc::new(crate::auth::acl::Authorizer::closed(
                settings.raw.authorization.super_users.clone(),
            ))));
    }
    let mut followed = Vec::new();
    for (on, key) in [
        (
            settings
                .raw
                .listener
                .sasl
                .as_ref()
                .is_some_and(|s| s.credentials_in_store),
            crate::security::CREDENTIALS_KEY,
        ),
        (
            settings.raw.authorization.acls_in_store,
            crate::security::ACLS_KEY,
        ),
    ] {
        if on {
            let index =
                crate::security::load(store.as_ref(), &security, key, Duration::from_secs(10))
                    .await;
            followed.push((key, index));
        }
    }

    let listener = TcpListener::bind(settings.bind)
        .await
        .map_err(|source| StartError::Bind {
            what: "client listener (listener.bind)",
            addr: settings.bind.to_string(),
            source,
        })?;
    let admin = TcpListener::bind(settings.admin_bind)
        .await
        .map_err(|source| StartError::Bind {
            what: "admin HTTP (admin.bind)",
            addr: settings.admin_bind.to_string(),
            source,
        })?;
    let client_addr = listener.local_addr().map_err(|source| StartError::Bind {
        what: "client listener",
        addr: settings.bind.to_string(),
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        what: "admin HTTP",
        addr: settings.admin_bind.to_string(),
        source,
    })?;
    let (admin_tls, forward_trust) = match &settings.admin_auth.tls {
        None => (None, None),
        Some(t) => (
            Some(crate::tls::admin_acceptor(&t.cert, &t.key)?),
            Some(crate::http::Trust::from_pem("admin.tls.ca", &t.ca)?),
        ),
    };
    if admin_tls.is_none() && !settings.admin_bind.ip().is_loopback() {
        tracing::warn!(admin = %settings.admin_bind, "the admin API is plain HTTP on an address other hosts reach: its tokens cross the network in clear; configure [admin.tls]");
    }
    let (shutdown, shutdown_rx) = watch::channel(false);

    let mut tasks = Vec::new();
    for (key, index) in followed {
        tasks.push(tokio::spawn(crate::security::follow(
            store.clone(),
            security.clone(),
            key,
            index,
        )));
    }
    tasks.push(tokio::spawn(run_refresher(
        pool.clone(),
        Duration::from_millis(settings.raw.upstream.metadata_refresh_ms),
    )));
    let server = tokio::spawn(crate::proxy::server::run(
        listener,
        ctx.clone(),
        client_tls,
        shutdown_rx.clone(),
    ));
    // Shard maps: load what the store has, create topics the config declares, then run the
    // controller. Upstream may not be reachable yet: keep retrying in the background.
    {
        let (controller, shards) = (controller.clone(), shards.clone());
        tasks.push(tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match controller.load().await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "loading shard maps failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            shards.mark_loaded();
            tokio::join!(controller.clone().follow_store(), controller.clone().run());
        }));
    }
    tasks.push(tokio::spawn({
        let profiles = profiles.clone();
        let shared_reads = ctx.shared_reads.clone();
        async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                every.tick().await;
                shared_reads.sweep();
                profiles.sweep();
                let (members, conns) = profiles.sizes();
                metrics::gauge!("shardgate_prefetch_profiles", "kind" => "member")
                    .set(members as f64);
                metrics::gauge!("shardgate_prefetch_profiles", "kind" => "connection")
                    .set(conns as f64);
            }
        }
    }));
    // Which client ids have a Kafka quota (their sockets get muted when throttled).
    tasks.push(tokio::spawn(crate::proxy::quotas::run(
        pool.clone(),
        ctx.quotas.clone(),
    )));
    // Kafka's view of consumer groups for the ordering gates (read while fetches are held).
    tasks.push(tokio::spawn(crate::shards::group_state::run(
        pool.clone(),
        shards.clone(),
        groups.clone(),
    )));
    // The virtual cluster follows the store's registry of live instances.
    {
        let (mut members, ctx) = (controller.members(), ctx.clone());
        tasks.push(tokio::spawn(async move {
            while members.changed().await.is_ok() {
                let live = members.borrow_and_update().clone();
                ctx.cluster.set_live(live);
            }
        }));
    }
    let router = crate::admin::router(crate::admin::AdminState {
        settings: settings.clone(),
        topology: pool.topology.clone(),
        shards,
        groups,
        profiles,
        controller: controller.clone(),
        prometheus,
        forward_trust,
    });
    tasks.push(tokio::spawn(async move {
        if let Err(e) = crate::admin::serve(admin, router, admin_tls, shutdown_rx).await {
            tracing::error!(error = %e, "admin HTTP server failed");
        }
    }));
    tracing::info!(%client_addr, %admin_addr, advertised = %settings.advertised, "shardgate listening");
    Ok(Running {
        ctx,
        controller,
        client_addr,
        admin_addr,
        shutdown,
        server,
        tasks,
    })
}

impl Running {
    /// Stops accepting and reading, waits (up to `limits.drain_timeout_ms`) until requests
    /// already read are answered, then stops everything else.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        for t in self.tasks {
            t.abort();
        }
    }
}
