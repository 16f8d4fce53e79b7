//! Everything that talks to the real Kafka cluster: multiplexed connections, the shared pool,
//! the topology snapshot (brokers, partition leaders, topic ids) and its refresher.

pub mod connection;
pub mod oauth;
pub mod pool;
pub mod refresh;
pub mod sasl;
pub mod topology;

use crate::protocol::ProtocolError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to broker {broker} at {addr}: {message}")]
    Connect {
        broker: i32,
        addr: String,
        message: String,
    },
    #[error("connection to broker {broker} lost: {message}")]
    Disconnected { broker: i32, message: String },
    #[error("broker {broker} did not answer within {ms} ms")]
    Timeout { broker: i32, ms: u64 },
    #[error("broker {0} is not in the current topology")]
    UnknownBroker(i32),
    #[error("no upstream broker is reachable")]
    NoBroker,
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("SASL authentication to broker {broker} failed: {message}")]
    Sasl { broker: i32, message: String },
}

impl From<ProtocolError> for UpstreamError {
    fn from(e: ProtocolError) -> Self {
        UpstreamError::Protocol(e.to_string())
    }
}

impl UpstreamError {
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Disconnected { .. } => "disconnected",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::UnknownBroker(_) => "unknown_broker",
            UpstreamError::NoBroker => "no_broker",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Sasl { .. } => "sasl",
        }
    }
}
