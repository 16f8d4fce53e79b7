//! TOML configuration, validated at start-up.
//!
//! Every validation error names the key and says how to fix it, because the operator reading it
//! has only the message and the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod admin;
mod authorization;
mod placement;
mod prefetch;
mod sasl;
mod tls;
mod topic;
pub use admin::{
    AdminAuth, AdminConfig, AdminRole, AdminTls, AdminTlsConfig, AdminToken, ResolvedToken,
};
pub use authorization::{AclConfig, AclDocument, Authorization, AuthorizationConfig};
pub use placement::PlacementConfig;
pub use prefetch::{
    EMBEDDERS, HASHING_DIMS, MINILM_TOKENIZER_FILES, MinilmConfig, PrefetchConfig, PrefetchMode,
};
pub use sasl::{OAuthBearer, SaslListenerConfig, TokenSource, UpstreamSasl, UpstreamSaslConfig};
pub use tls::{ClientAuth, PrincipalFrom, TlsClientConfig, TlsServerConfig};
pub use topic::{AutoscaleConfig, RouteField, TopicConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for shardgate: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {problem}; {fix}")]
    Invalid {
        key: String,
        problem: String,
        fix: String,
    },
}

fn invalid(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listener: ListenerConfig,
    /// The shardgate instances forming the virtual cluster. Empty means "just this one".
    #[serde(default)]
    pub instances: Vec<InstanceConfig>,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub authorization: AuthorizationConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// Managed topics declared in the file (more can be added through the admin API).
    #[serde(default)]
    pub topics: Vec<TopicConfig>,
    #[serde(default)]
    pub prefetch: PrefetchConfig,
    #[serde(default)]
    pub placement: PlacementConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// How log lines are written to stderr (the level filter is `SHARDGATE_LOG`, e.g. `info`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, message and fields), for log
    /// shippers.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// "embedded" (a local directory; one instance) or "consul".
    #[serde(default = "default_store_kind")]
    pub kind: String,
    /// Directory of the embedded store.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// Consul HTTP address, e.g. "http://127.0.0.1:8500".
    #[serde(default = "default_consul_addr")]
    pub consul_addr: String,
    /// Name of this virtual cluster: keys live under shardgate/<cluster>/.
    #[serde(default = "default_cluster")]
    pub cluster: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: default_store_kind(),
            path: default_store_path(),
            consul_addr: default_consul_addr(),
            cluster: default_cluster(),
        }
    }
}

fn default_store_kind() -> String {
    "embedded".into()
}
fn default_store_path() -> PathBuf {
    PathBuf::from("shardgate-data")
}
fn default_consul_addr() -> String {
    "http://127.0.0.1:8500".into()
}
fn default_cluster() -> String {
    "default".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address the client listener binds, e.g. "127.0.0.1:29092".
    pub bind: String,
    /// host:port advertised to clients in Metadata/FindCoordinator. Defaults to `bind`.
    #[serde(default)]
    pub advertised: Option<String>,
    /// Node id of this instance in the virtual cluster.
    #[serde(default)]
    pub node_id: i32,
    #[serde(default)]
    pub tls: Option<TlsServerConfig>,
    /// SASL authentication of clients (with `tls`: SASL_SSL).
    #[serde(default)]
    pub sasl: Option<SaslListenerConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    pub node_id: i32,
    pub advertised: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Kafka bootstrap servers, "host:port".
    pub bootstrap: Vec<String>,
    /// Upstream connections per broker shared by all clients (each client connection is pinned
    /// to one of them so its requests keep their order).
    #[serde(default = "default_connections_per_broker")]
    pub connections_per_broker: usize,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How often the topology (brokers, leaders) is refreshed even without errors.
    #[serde(default = "default_metadata_refresh_ms")]
    pub metadata_refresh_ms: u64,
    /// KIP-227 fetch sessions on shardgate's own polls of the brokers (polls of 16 partitions
    /// or more): a poll lists only what changed. Off: every poll lists every partition.
    #[serde(default = "default_fetch_sessions")]
    pub fetch_sessions: bool,
    #[serde(default)]
    pub tls: Option<TlsClientConfig>,
    /// shardgate's own SASL identity towards the brokers.
    #[serde(default)]
    pub sasl: Option<UpstreamSaslConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Frames larger than this are refused before any allocation (Kafka's
    /// socket.request.max.bytes default is 100 MiB).
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests of one client connection being processed at once; beyond that the socket is
    /// not read (backpressure), never dropped.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_per_connection: usize,
    /// A client connection with no request for this long is closed (Kafka's
    /// connections.max.idle.ms is 10 minutes).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Longest a client's fetch may wait for data (its `max_wait_ms` is capped to this).
    #[serde(default = "default_max_fetch_wait_ms")]
    pub max_fetch_wait_ms: u64,
    /// Longest interval between re-checks of a fetch whose records an ordering gate holds
    /// back (data waits are upstream long-polls, not polls).
    #[serde(default = "default_fetch_poll_max_ms")]
    pub fetch_poll_max_ms: u64,
    /// Fetch sessions (KIP-227) kept for clients at once; the least recently used is evicted
    /// beyond this (Kafka's max.incremental.fetch.session.cache.slots). 0 = no sessions.
    #[serde(default = "default_max_fetch_sessions")]
    pub max_fetch_sessions: usize,
    /// Managed topics decompress client batches to reroute them; a produce request whose
    /// batches would decompress to more than this in total is refused (decompression bombs).
    #[serde(
        default = "default_max_decompressed",
        alias = "max_decompressed_batch_bytes"
    )]
    pub max_decompressed_request_bytes: usize,
    /// Bytes held for clients at once: requests from the moment their size is read until
    /// answered, and responses until written. When used up, client sockets are not read.
    #[serde(default = "default_memory_budget")]
    pub memory_budget_bytes: usize,
    /// A new connection must finish its TLS handshake, and send its first request's size,
    /// within this.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Once a request's size is read, the whole request must arrive within this.
    #[serde(default = "default_request_read_timeout_ms")]
    pub request_read_timeout_ms: u64,
    /// Connections from one source address at once; 0 = no limit (Kafka's
    /// max.connections.per.ip).
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// On SIGTERM, how long requests already read may take to be answered before exit.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: default_max_frame_bytes(),
            max_connections: default_max_connections(),
            max_in_flight_per_connection: default_max_in_flight(),
            idle_timeout_ms: default_idle_timeout_ms(),
            fetch_poll_max_ms: default_fetch_poll_max_ms(),
            max_fetch_sessions: default_max_fetch_sessions(),
            max_fetch_wait_ms: default_max_fetch_wait_ms(),
            max_decompressed_request_bytes: default_max_decompressed(),
            memory_budget_bytes: default_memory_budget(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            request_read_timeout_ms: default_request_read_timeout_ms(),
            max_connections_per_source: default_max_connections_per_source(),
            drain_timeout_ms: default_drain_timeout_ms(),
        }
    }
}

fn default_connections_per_broker() -> usize {
    4
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_metadata_refresh_ms() -> u64 {
    30_000
}
fn default_max_frame_bytes() -> usize {
    100 * 1024 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_in_flight() -> usize {
    64
}
fn default_idle_timeout_ms() -> u64 {
    600_000
}
fn default_max_fetch_wait_ms() -> u64 {
    30_000
}
fn default_max_fetch_sessions() -> usize {
    1000
}
fn default_fetch_poll_max_ms() -> u64 {
    50
}
fn default_fetch_sessions() -> bool {
    true
}
fn default_memory_budget() -> usize {
    512 * 1024 * 1024
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_request_read_timeout_ms() -> u64 {
    30_000
}
fn default_max_connections_per_source() -> usize {
    0
}
fn default_drain_timeout_ms() -> u64 {
    30_000
}
fn default_max_decompressed() -> usize {
    crate::protocol::records::DEFAULT_MAX_DECOMPRESSED
}

/// A host:port pair as clients will be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

pub fn parse_host_port(key: &str, value: &str) -> Result<HostPort, ConfigError> {
    let fix = "write it as host:port, e.g. \"127.0.0.1:29092\"";
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| invalid(key, format!("\"{value}\" has no port"), fix))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid(key, format!("\"{value}\" has no host"), fix));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| invalid(key, format!("\"{port}\" is not a port number"), fix))?;
    if port == 0 {
        return Err(invalid(key, "port 0 cannot be advertised", fix));
    }
    Ok(HostPort {
        host: host.to_string(),
        port,
    })
}

/// The validated form the rest of the program uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub raw: Config,
    pub bind: SocketAddr,
    pub admin_bind: SocketAddr,
    /// Admin API tokens, resolved (secrets read from the environment where named).
    pub admin_auth: AdminAuth,
    /// The listener's SASL mechanisms (empty: no SASL).
    pub sasl_mechanisms: Vec<crate::auth::Mechanism>,
    /// How shardgate authenticates to the brokers (None: it does not).
    pub upstream_sasl: Option<UpstreamSasl>,
    /// What each client principal may do (ACLs off unless `[authorization] enabled`).
    pub authorization: Authorization,
    pub node_id: i32,
    pub advertised: HostPort,
    /// All instances of the virtual cluster, this one included, sorted by node id.
    pub instances: Vec<(i32, HostPort)>,
    pub bootstrap: Vec<HostPort>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate()
    }

    pub fn validate(self) -> Result<Settings, ConfigError> {
        let bind: SocketAddr = self.listener.bind.parse().map_err(|_| {
            invalid(
                "listener.bind",
                format!("\"{}\" is not an IP:port", self.listener.bind),
                "use an address such as \"127.0.0.1:29092\" or \"0.0.0.0:9092\"",
            )
        })?;
        let admin_bind: SocketAddr = self.admin.bind.parse().map_err(|_| {
            invalid(
                "admin.bind",
                format!("\"{}\" is not an IP:port", self.admin.bind),
                "use an address such as \"127.0.0.1:29100\"",
            )
        })?;
        let admin_auth = self.admin.resolve(admin_bind)?;
        let sasl_mechanisms = match &self.listener.sasl {
            Some(s) => s.validate()?,
            None => Vec::new(),
        };
        let upstream_sasl = match &self.upstream.sasl {
            Some(s) => Some(s.resolve()?),
            None => None,
        };
        let authorization = self.authorization.resolve()?;
        let advertised = match &self.listener.advertised {
            Some(a) => parse_host_port("listener.advertised", a)?,
            None => {
                if bind.ip().is_unspecified() {
                    return Err(invalid(
                        "listener.advertised",
                        "missing while listener.bind is a wildcard address",
                        "set the host:port clients should connect to",
                    ));
                }
                HostPort {
                    host: bind.ip().to_string(),
                    port: bind.port(),
                }
            }
        };
        if self.listener.node_id < 0 {
            return Err(invalid(
                "listener.node_id",
                "is negative",
                "use a node id >= 0",
            ));
        }
        let mut instances = Vec::new();
        for (i, inst) in self.instances.iter().enumerate() {
            let key = format!("instances[{i}].advertised");
            instances.push((inst.node_id, parse_host_port(&key, &inst.advertised)?));
        }
        if instances.is_empty() {
            instances.push((self.listener.node_id, advertised.clone()));
        } else if !instances.iter().any(|(id, _)| *id == self.listener.node_id) {
            return Err(invalid(
                "instances",
                format!(
                    "does not list this instance (node_id {})",
                    self.listener.node_id
                ),
                "add an entry with this instance's node_id and advertised address",
            ));
        }
        instances.sort_by_key(|(id, _)| *id);
        if instances.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(invalid(
                "instances",
                "two instances share a node_id",
                "give every instance its own node_id",
            ));
        }
        if self.upstream.bootstrap.is_empty() {
            return Err(invalid(
                "upstream.bootstrap",
                "is empty",
                "list at least one Kafka broker, e.g. [\"127.0.0.1:19092\"]",
            ));
        }
        let mut bootstrap = Vec::new();
        for (i, b) in self.upstream.bootstrap.iter().enumerate() {
            bootstrap.push(parse_host_port(&format!("upstream.bootstrap[{i}]"), b)?);
        }
        if self.upstream.connections_per_broker == 0 || self.upstream.connections_per_broker > 64 {
            return Err(invalid(
                "upstream.connections_per_broker",
                format!("{} is out of range", self.upstream.connections_per_broker),
                "use a value from 1 to 64",
            ));
        }
        let l = &self.limits;
        if l.max_frame_bytes < 1024 || l.max_frame_bytes > i32::MAX as usize {
            return Err(invalid(
                "limits.max_frame_bytes",
                format!("{} is out of range", l.max_frame_bytes),
                "use a value from 1024 to 2147483647 (Kafka's default is 104857600)",
            ));
        }
        if l.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections",
                "is 0",
                "use a positive number",
            ));
        }
        if l.memory_budget_bytes < 2 * l.max_frame_bytes {
            return Err(invalid(
                "limits.memory_budget_bytes",
                format!(
                    "{} is less than twice limits.max_frame_bytes ({})",
                    l.memory_budget_bytes, l.max_frame_bytes
                ),
                "raise it, or lower limits.max_frame_bytes: frames over an eighth of the budget may use only half of it together",
            ));
        }
        if l.max_in_flight_per_connection == 0 {
            return Err(invalid(
                "limits.max_in_flight_per_connection",
                "is 0",
                "use a positive number (Kafka clients pipeline up to 5 requests)",
            ));
        }
        for (key, v) in [
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            (
                "upstream.request_timeout_ms",
                self.upstream.request_timeout_ms,
            ),
            (
                "upstream.metadata_refresh_ms",
                self.upstream.metadata_refresh_ms,
            ),
            ("limits.idle_timeout_ms", l.idle_timeout_ms),
            ("limits.handshake_timeout_ms", l.handshake_timeout_ms),
            ("limits.request_read_timeout_ms", l.request_read_timeout_ms),
            ("limits.drain_timeout_ms", l.drain_timeout_ms),
            ("limits.fetch_poll_max_ms", l.fetch_poll_max_ms),
            ("limits.max_fetch_wait_ms", l.max_fetch_wait_ms),
        ] {
            if v == 0 {
                return Err(invalid(
                    key,
                    "is 0",
                    "use a positive number of milliseconds",
                ));
            }
        }
        match self.store.kind.as_str() {
            "embedded" | "consul" => {}
            other => {
                return Err(invalid(
                    "store.kind",
                    format!("\"{other}\" is not a store"),
                    "use \"embedded\" (the default) or \"consul\"",
                ));
            }
        }
        let in_store = [
            (
                "listener.sasl.credentials_in_store",
                self.listener
                    .sasl
                    .as_ref()
                    .is_some_and(|s| s.credentials_in_store),
            ),
            (
                "authorization.acls_in_store",
                self.authorization.acls_in_store,
            ),
        ];
        for (key, on) in in_store {
            if on && self.store.kind != "consul" {
                return Err(invalid(
                    key,
                    "needs the Consul store (instances share it)",
                    "set store.kind = \"consul\", or keep the file in the config",
                ));
            }
        }
        if self.store.kind == "consul" && !self.store.consul_addr.starts_with("http://") {
            return Err(invalid(
                "store.consul_addr",
                format!("\"{}\" is not an http:// URL", self.store.consul_addr),
                "use e.g. \"http://127.0.0.1:8500\"",
            ));
        }
        if self.store.cluster.is_empty() || self.store.cluster.contains('/') {
            return Err(invalid(
                "store.cluster",
                "is empty or contains '/'",
                "use a plain name such as \"prod\"",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.topics.iter().enumerate() {
            t.validate().map_err(|(field, problem, fix)| {
                invalid(&format!("topics[{i}].{field}"), problem, fix)
            })?;
            if !names.insert(t.name.clone()) {
                return Err(invalid(
                    &format!("topics[{i}].name"),
                    format!("topic \"{}\" is declared twice", t.name),
                    "declare each managed topic once",
                ));
            }
        }
        self.prefetch
            .validate()
            .map_err(|(field, problem, fix)| invalid(&format!("prefetch.{field}"), problem, fix))?;
        self.placement.validate().map_err(|(field, problem, fix)| {
            invalid(&format!("placement.{field}"), problem, fix)
        })?;
        if let Some(tls) = &self.listener.tls {
            tls.validate()?;
        }
        if let Some(tls) = &self.upstream.tls {
            tls.validate()?;
        }
        Ok(Settings {
            node_id: self.listener.node_id,
            bind,
            admin_bind,
            admin_auth,
            sasl_mechanisms,
            upstream_sasl,
            authorization,
            advertised,
            instances,
            bootstrap,
            raw: self,
        })
    }
}

#[cfg(test)]
mod tests;
