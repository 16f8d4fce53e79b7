//! Encoding a response without copying its record data: the protocol crate's encoder writes
//! every field through `BufMut::put_slice`, records included. `SpliceBuf` recognises the record
//! buffers it was told about (by address and length) and keeps them as the `Bytes` they are
//! (slices of upstream response frames) instead of copying them; everything else is written
//! into small buffers. The pieces, written in order, are byte for byte what the crate's encoder
//! would have produced (tested below), so the wire format stays the crate's responsibility.

use std::collections::HashMap;

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::Encodable;
use kafka_protocol::protocol::buf::ByteBufMut;

use super::ProtocolError;

/// Record buffers shorter than this are copied like any field (a separate piece costs more).
pub const SPLICE_MIN: usize = 4096;

/// A `BufMut` that keeps known large buffers by reference.
pub struct SpliceBuf {
    pieces: Vec<Bytes>,
    current: BytesMut,
    /// Bytes in `pieces`.
    sealed: usize,
    known: HashMap<(usize, usize), Bytes>,
}

impl SpliceBuf {
    /// `known`: buffers that, when the encoder writes exactly their bytes (same address and
    /// length), are kept by reference.
    pub fn new(known: impl IntoIterator<Item = Bytes>) -> Self {
        let known = known
            .into_iter()
            .filter(|b| b.len() >= SPLICE_MIN)
            .map(|b| ((b.as_ptr() as usize, b.len()), b))
            .collect();
        Self {
            pieces: Vec::new(),
            current: BytesMut::with_capacity(1024),
            sealed: 0,
            known,
        }
    }

    fn seal(&mut self) {
        if !self.current.is_empty() {
            let piece = self.current.split().freeze();
            self.sealed += piece.len();
            self.pieces.push(piece);
        }
    }

    /// The pieces in write order.
    pub fn finish(mut self) -> Vec<Bytes> {
        self.seal();
        self.pieces
    }

    pub fn len(&self) -> usize {
        self.sealed + self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

unsafe impl BufMut for SpliceBuf {
    fn remaining_mut(&self) -> usize {
        self.current.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: forwarded; the caller initialised `cnt` bytes of `chunk_mut`, which is the
        // current buffer's.
        unsafe { self.current.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.current.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= SPLICE_MIN
            && let Some(b) = self.known.get(&(src.as_ptr() as usize, src.len()))
        {
            let b = b.clone();
            self.seal();
            self.sealed += b.len();
            self.pieces.push(b);
            return;
        }
        self.current.extend_from_slice(src);
    }
}

impl ByteBufMut for SpliceBuf {
    fn offset(&self) -> usize {
        self.len()
    }

    // Message encoders never seek (only record batch and snappy encoders do, into buffers of
    // their own); a seek into a spliced piece cannot be served.
    fn seek(&mut self, offset: usize) {
        let base = self.sealed;
        assert!(offset >= base, "SpliceBuf: seek before a spliced piece");
        self.current.resize(offset - base, 0);
    }

    fn range(&mut self, r: std::ops::Range<usize>) -> &mut [u8] {
        let base = self.sealed;
        assert!(r.start >= base, "SpliceBuf: range before a spliced piece");
        &mut self.current[r.start - base..r.end - base]
    }
}

/// Encodes a response frame (length prefix, header, body) as pieces; `records` are the large
/// buffers the body holds that must not be copied.
pub fn encode_response_pieces<T: Encodable>(
    api_key: ApiKey,
    api_version: i16,
    correlation_id: i32,
    body: &T,
    records: impl IntoIterator<Item = Bytes>,
) -> Result<Vec<Bytes>, ProtocolError> {
    super::encode_response_into(api_key, api_version, correlation_id, body, |_| {
        SpliceBuf::new(records)
    })
    .map(SpliceBuf::finish)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::FetchResponse;
    use kafka_protocol::messages::fetch_response::{
        AbortedTransaction, EpochEndOffset, FetchableTopicResponse, PartitionData,
    };
    use kafka_protocol::messages::{ProducerId, TopicName};
    use proptest::prelude::*;

    fn response(parts: &[(usize, bool, bool)], version: i16) -> (FetchResponse, Vec<Bytes>) {
        let mut records = Vec::new();
        let mut topic = if version >= 13 {
            FetchableTopicResponse::default().with_topic_id(uuid::Uuid::from_u128(7))
        } else {
            FetchableTopicResponse::default().with_topic(TopicName("t".into()))
        };
        for (i, (len, aborted, diverging)) in parts.iter().enumerate() {
            let data = Bytes::from((0..*len).map(|x| (x * 31 + i) as u8).collect::<Vec<_>>());
            records.push(data.clone());
            let mut p = PartitionData::default()
                .with_partition_index(i as i32)
                .with_high_watermark(100 + i as i64)
                .with_last_stable_offset(90)
                .with_log_start_offset(3)
                .with_records(Some(data));
            if *aborted {
                p.aborted_transactions = Some(vec![
                    AbortedTransaction::default()
                        .with_producer_id(ProducerId(5))
                        .with_first_offset(17),
                ]);
            }
            if *diverging && version >= 12 {
                p.diverging_epoch = EpochEndOffset::default().with_epoch(4).with_end_offset(44);
            }
            topic.partitions.push(p);
        }
        let resp = FetchResponse::default()
            .with_throttle_time_ms(3)
            .with_session_id(if version >= 7 { 12 } else { 0 })
            .with_responses(vec![topic]);
        (resp, records)
    }

    proptest! {
        #[test]
        fn pieces_are_the_crate_encoding(
            parts in proptest::collection::vec((0usize..20_000, any::<bool>(), any::<bool>()), 0..6),
            version in 4i16..=16,
        ) {
            let (resp, records) = response(&parts, version);
            let whole = super::super::encode_response(ApiKey::Fetch, version, 99, &resp).unwrap();
            let pieces = encode_response_pieces(ApiKey::Fetch, version, 99, &resp, records.clone()).unwrap();
            let joined: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
            prop_assert_eq!(&joined[..], &whole[..]);
            // Every large record buffer went out by reference, not copied.
            for r in records.iter().filter(|r| r.len() >= SPLICE_MIN) {
                prop_assert!(pieces.iter().any(|p| p.as_ptr() == r.as_ptr() && p.len() == r.len()));
            }
        }
    }
}
