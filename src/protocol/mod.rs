//! The Kafka wire format as shardgate needs it: framing, headers, the supported-version table,
//! and helpers to encode responses. Message bodies come from the `kafka-protocol` crate.

pub mod frame;
pub mod records;
pub mod splice;
pub mod versions;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes is shorter than a request header")]
    ShortFrame(usize),
    #[error("unknown api key {0}")]
    UnknownApiKey(i16),
    #[error("api {api:?} v{version} is not supported (supported: {min}..={max})")]
    UnsupportedVersion {
        api: ApiKey,
        version: i16,
        min: i16,
        max: i16,
    },
    #[error("cannot decode {what}: {message}")]
    Decode { what: String, message: String },
    #[error("cannot encode {what}: {message}")]
    Encode { what: String, message: String },
}

impl ProtocolError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::ShortFrame(_) => "short_frame",
            ProtocolError::UnknownApiKey(_) => "unknown_api_key",
            ProtocolError::UnsupportedVersion { .. } => "unsupported_version",
            ProtocolError::Decode { .. } => "decode",
            ProtocolError::Encode { .. } => "encode",
        }
    }
}

pub fn decode_err(what: impl Into<String>, e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Decode {
        what: what.into(),
        message: e.to_string(),
    }
}

pub fn encode_err(what: impl Into<String>, e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Encode {
        what: what.into(),
        message: e.to_string(),
    }
}

/// The first three header fields, readable from any request frame whatever its API: enough to
/// answer or log even a request we cannot decode.
#[derive(Debug, Clone, Copy)]
pub struct FramePrefix {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

pub fn peek_prefix(frame: &[u8]) -> Result<FramePrefix, ProtocolError> {
    if frame.len() < 8 {
        return Err(ProtocolError::ShortFrame(frame.len()));
    }
    let mut b = &frame[..8];
    Ok(FramePrefix {
        api_key: b.get_i16(),
        api_version: b.get_i16(),
        correlation_id: b.get_i32(),
    })
}

/// A decoded request header plus the body still as the client's bytes.
#[derive(Debug, Clone)]
pub struct RequestFrame {
    pub api_key: ApiKey,
    pub api_version: i16,
    pub header: RequestHeader,
    /// The whole frame as received (without the length prefix), for byte-level forwarding.
    pub frame: Bytes,
    /// The body (after the header): a slice of `frame`.
    pub body: Bytes,
}

impl RequestFrame {
    /// Parses the header of a frame whose api key and version were already checked.
    pub fn parse(api_key: ApiKey, api_version: i16, frame: Bytes) -> Result<Self, ProtocolError> {
        let mut body = frame.clone();
        let header = RequestHeader::decode(&mut body, api_key.request_header_version(api_version))
            .map_err(|e| decode_err(format!("{api_key:?} request header"), e))?;
        Ok(Self {
            api_key,
            api_version,
            header,
            frame,
            body,
        })
    }

    pub fn correlation_id(&self) -> i32 {
        self.header.correlation_id
    }

    /// The same request (header as the client sent it) with another body: what is left of
    /// it after resources the client may not touch were taken out.
    pub fn with_body<T: Encodable + HeaderVersion>(&self, body: &T) -> Result<Self, ProtocolError> {
        let hv = T::header_version(self.api_version);
        let what = || format!("{:?} v{} request", self.api_key, self.api_version);
        let size = self
            .header
            .compute_size(hv)
            .and_then(|h| body.compute_size(self.api_version).map(|b| h + b))
            .map_err(|e| encode_err(what(), e))?;
        let mut buf = BytesMut::with_capacity(size);
        self.header
            .encode(&mut buf, hv)
            .map_err(|e| encode_err(what(), e))?;
        body.encode(&mut buf, self.api_version)
            .map_err(|e| encode_err(what(), e))?;
        Self::parse(self.api_key, self.api_version, buf.freeze())
    }

    pub fn decode_body<T: Decodable>(&self) -> Result<T, ProtocolError> {
        let mut b = self.body.clone();
        T::decode(&mut b, self.api_version).map_err(|e| {
            decode_err(
                format!("{:?} v{} request", self.api_key, self.api_version),
                e,
            )
        })
    }
}

/// Encodes a response frame (length prefix, header, body) for the client.
pub fn encode_response<T: Encodable>(
    api_key: ApiKey,
    api_version: i16,
    correlation_id: i32,
    body: &T,
) -> Result<Bytes, ProtocolError> {
    encode_response_into(api_key, api_version, correlation_id, body, |size| {
        BytesMut::with_capacity(4 + size)
    })
    .map(BytesMut::freeze)
}

/// Encodes a response frame into the buffer `buf(size of header + body)` makes.
pub(crate) fn encode_response_into<T: Encodable, B: ByteBufMut>(
    api_key: ApiKey,
    api_version: i16,
    correlation_id: i32,
    body: &T,
    buf: impl FnOnce(usize) -> B,
) -> Result<B, ProtocolError> {
    // ApiVersions responses always use header v0 so that old clients can read the error.
    let header_version = api_key.response_header_version(api_version);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let what = || format!("{api_key:?} v{api_version} response");
    let size = header
        .compute_size(header_version)
        .and_then(|h| body.compute_size(api_version).map(|b| h + b))
        .map_err(|e| encode_err(what(), e))?;
    let mut buf = buf(size);
    buf.put_u32(size as u32);
    header
        .encode(&mut buf, header_version)
        .map_err(|e| encode_err(what(), e))?;
    body.encode(&mut buf, api_version)
        .map_err(|e| encode_err(what(), e))?;
    Ok(buf)
}

/// Encodes a request frame without length prefix (the upstream writer adds it and its own
/// correlation id).
pub fn encode_request<T: Encodable + HeaderVersion>(
    api_key: ApiKey,
    api_version: i16,
    client_id: Option<StrBytes>,
    body: &T,
) -> Result<Bytes, ProtocolError> {
    let header = RequestHeader::default()
        .with_request_api_key(api_key as i16)
        .with_request_api_version(api_version)
        .with_client_id(client_id);
    let hv = T::header_version(api_version);
    let what = || format!("{api_key:?} v{api_version} request");
    let size = header
        .compute_size(hv)
        .and_then(|h| body.compute_size(api_version).map(|b| h + b))
        .map_err(|e| encode_err(what(), e))?;
    let mut buf = BytesMut::with_capacity(size);
    header
        .encode(&mut buf, hv)
        .map_err(|e| encode_err(what(), e))?;
    body.encode(&mut buf, api_version)
        .map_err(|e| encode_err(what(), e))?;
    Ok(buf.freeze())
}

/// Splits an upstream response frame (without length prefix) into header and decoded body.
pub fn decode_response<T: Decodable>(
    api_key: ApiKey,
    api_version: i16,
    frame: Bytes,
) -> Result<T, ProtocolError> {
    let mut b = frame;
    let what = || format!("{api_key:?} v{api_version} response");
    ResponseHeader::decode(&mut b, api_key.response_header_version(api_version))
        .map_err(|e| decode_err(what(), e))?;
    T::decode(&mut b, api_version).map_err(|e| decode_err(what(), e))
}

/// A topic as a client named it in a request: by name (older versions) or by id (Produce and
/// Fetch v13+); the other field is empty or nil.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicRef {
    pub name: kafka_protocol::protocol::StrBytes,
    pub id: uuid::Uuid,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_prefix_refuses_short_frames() {
        assert!(matches!(
            peek_prefix(&[0, 1, 2]),
            Err(ProtocolError::ShortFrame(3))
        ));
        let p = peek_prefix(&[0, 3, 0, 9, 0, 0, 0, 42, 1]).unwrap();
        assert_eq!((p.api_key, p.api_version, p.correlation_id), (3, 9, 42));
    }
}

/// Kafka error codes shardgate answers or acts on (the one place they are defined).
pub mod codes {
    pub const NONE: i16 = 0;
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    pub const CORRUPT_MESSAGE: i16 = 2;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const REQUEST_TIMED_OUT: i16 = 7;
    pub const NETWORK_EXCEPTION: i16 = 13;
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const NOT_ENOUGH_REPLICAS: i16 = 19;
    pub const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
    pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
    pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
    pub const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
    pub const ILLEGAL_SASL_STATE: i16 = 34;
    pub const UNSUPPORTED_VERSION: i16 = 35;
    pub const INVALID_REQUEST: i16 = 42;
    pub const OUT_OF_ORDER_SEQUENCE: i16 = 45;
    pub const DUPLICATE_SEQUENCE: i16 = 46;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const INVALID_PRODUCER_ID_MAPPING: i16 = 49;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    pub const OPERATION_NOT_ATTEMPTED: i16 = 55;
    pub const KAFKA_STORAGE_ERROR: i16 = 56;
    pub const SASL_AUTHENTICATION_FAILED: i16 = 58;
    pub const UNKNOWN_PRODUCER_ID: i16 = 59;
    pub const FETCH_SESSION_ID_NOT_FOUND: i16 = 70;
    pub const INVALID_FETCH_SESSION_EPOCH: i16 = 71;
    pub const FENCED_LEADER_EPOCH: i16 = 74;
    pub const UNKNOWN_LEADER_EPOCH: i16 = 75;
    pub const OFFSET_NOT_AVAILABLE: i16 = 78;
    pub const INVALID_RECORD: i16 = 87;
    pub const UNKNOWN_TOPIC_ID: i16 = 100;

    /// Errors after which the partition's leader must be looked up again.
    pub fn stale_leader(code: i16) -> bool {
        matches!(
            code,
            NOT_LEADER_OR_FOLLOWER
                | LEADER_NOT_AVAILABLE
                | UNKNOWN_TOPIC_OR_PARTITION
                | FENCED_LEADER_EPOCH
                | UNKNOWN_LEADER_EPOCH
                | UNKNOWN_TOPIC_ID
                | OFFSET_NOT_AVAILABLE
        )
    }
}
