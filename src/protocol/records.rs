//! Record batches (magic v2), decoded and encoded here rather than with the protocol crate's
//! record codec because that one collapses duplicate header keys (Kafka allows them) and
//! shardgate must reroute records without losing anything: key, value, every header in order,
//! timestamps, attributes. Only the produce path of managed topics looks inside batches;
//! unmanaged topics never get here.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::compression::{Compressor, Gzip, Lz4, None as NoCompression, Snappy, Zstd};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordsError {
    #[error("record batch truncated")]
    Truncated,
    #[error("unsupported record batch magic {0} (only v2 batches are accepted)")]
    Magic(i8),
    #[error("record batch CRC mismatch")]
    Crc,
    #[error("unknown compression codec {0}")]
    Codec(i16),
    #[error("malformed record: {0}")]
    Malformed(&'static str),
    #[error("compression: {0}")]
    Compression(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Gzip = 1,
    Snappy = 2,
    Lz4 = 3,
    Zstd = 4,
}

impl Compression {
    fn from_attributes(attr: i16) -> Result<Self, RecordsError> {
        Ok(match attr & 0x7 {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Snappy,
            3 => Compression::Lz4,
            4 => Compression::Zstd,
            c => return Err(RecordsError::Codec(c)),
        })
    }
}

/// The batch-level fields a rerouted batch keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    pub attributes: i16,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub partition_leader_epoch: i32,
    pub records: i32,
}

impl BatchInfo {
    pub fn compression(&self) -> Result<Compression, RecordsError> {
        Compression::from_attributes(self.attributes)
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes & 0x10 != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes & 0x20 != 0
    }
    pub fn log_append_time(&self) -> bool {
        self.attributes & 0x08 != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub attributes: i8,
    /// Absolute timestamp (batch base timestamp + delta).
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// In wire order, duplicates kept.
    pub headers: Vec<(Bytes, Option<Bytes>)>,
}

fn get_varint(b: &mut Bytes) -> Result<i64, RecordsError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        if !b.has_remaining() {
            return Err(RecordsError::Truncated);
        }
        let byte = b.get_u8();
        v |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
        }
    }
    Err(RecordsError::Malformed("varint longer than 10 bytes"))
}

fn put_varint(b: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        b.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    b.put_u8(z as u8);
}

fn varint_len(v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

fn get_bytes(b: &mut Bytes) -> Result<Option<Bytes>, RecordsError> {
    let len = get_varint(b)?;
    if len < 0 {
        return Ok(None);
    }
    let len = len as usize;
    if b.remaining() < len {
        return Err(RecordsError::Truncated);
    }
    Ok(Some(b.split_to(len)))
}

/// Default bound on one batch's decompressed size (see `decode_batches_limited`).
pub const DEFAULT_MAX_DECOMPRESSED: usize = 128 * 1024 * 1024;

/// Decodes every batch of a produce partition's `records` field.
pub fn decode_batches(data: Bytes) -> Result<Vec<(BatchInfo, Vec<Record>)>, RecordsError> {
    decode_batches_limited(data, &mut DEFAULT_MAX_DECOMPRESSED.clone())
}

/// `decode_batches` within an allowance of decompressed bytes, shared by every batch the
/// caller decodes with it (one allowance per client request: a request of many small bombs
/// is bounded like one large one).
pub fn decode_batches_limited(
    mut data: Bytes,
    allowance: &mut usize,
) -> Result<Vec<(BatchInfo, Vec<Record>)>, RecordsError> {
    let mut out = Vec::new();
    while data.has_remaining() {
        if data.remaining() < 61 {
            return Err(RecordsError::Truncated);
        }
        let mut h = data.clone();
        let _base_offset = h.get_i64();
        let batch_len = h.get_i32();
        if batch_len < 49 || (batch_len as usize) > data.remaining() - 12 {
            return Err(RecordsError::Truncated);
        }
        let mut batch = data.split_to(12 + batch_len as usize);
        batch.advance(12);
        let partition_leader_epoch = batch.get_i32();
        let magic = batch.get_i8();
        if magic != 2 {
            return Err(RecordsError::Magic(magic));
        }
        let crc = batch.get_u32();
        if crc32c::crc32c(&batch) != crc {
            return Err(RecordsError::Crc);
        }
        let attributes = batch.get_i16();
        let _last_offset_delta = batch.get_i32();
        let base_timestamp = batch.get_i64();
        let _max_timestamp = batch.get_i64();
        let producer_id = batch.get_i64();
        let producer_epoch = batch.get_i16();
        let base_sequence = batch.get_i32();
        let count = batch.get_i32();
        if count < 0 {
            return Err(RecordsError::Malformed("negative record count"));
        }
        let info = BatchInfo {
            attributes,
            producer_id,
            producer_epoch,
            base_sequence,
            partition_leader_epoch,
            records: count,
        };
        let compression = info.compression()?;
        let compressed = !matches!(compression, Compression::None);
        let body = decompress(compression, batch, *allowance)?;
        if compressed {
            *allowance = allowance.saturating_sub(body.len());
        }
        let records = decode_records(body, count, base_timestamp)?;
        out.push((info, records));
    }
    Ok(out)
}

/// Decompresses a batch body, refusing to produce more than `limit` bytes: the compressed size
/// is bounded by the frame limit, the decompressed size is not (a few bytes of snappy can
/// declare 4 GiB), so every codec is read through a bound instead of the protocol crate's
/// unbounded decompressors.
fn decompress(c: Compression, b: Bytes, limit: usize) -> Result<Bytes, RecordsError> {
    use std::io::Read;
    let too_big =
        || RecordsError::Compression(format!("batch decompresses to more than {limit} bytes"));
    let bounded = |r: &mut dyn Read| -> Result<Bytes, RecordsError> {
        let mut out = Vec::new();
        r.take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| RecordsError::Compression(e.to_string()))?;
        if out.len() > limit {
            return Err(too_big());
        }
        Ok(Bytes::from(out))
    };
    match c {
        Compression::None => Ok(b),
        Compression::Gzip => bounded(&mut flate2::read::GzDecoder::new(&b[..])),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(&b[..])
                .map_err(|e| RecordsError::Compression(e.to_string()))?;
            bounded(&mut d)
        }
        Compression::Lz4 => {
            let mut d =
                lz4::Decoder::new(&b[..]).map_err(|e| RecordsError::Compression(e.to_string()))?;
            bounded(&mut d)
        }
        Compression::Snappy => snappy(b, limit),
    }
}

/// Kafka's snappy: xerial framing (magic header, then length-prefixed blocks), or a raw
/// snappy buffer without it. Each block's declared length is checked before allocating.
fn snappy(mut b: Bytes, limit: usize) -> Result<Bytes, RecordsError> {
    const MAGIC: &[u8; 16] = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01";
    let err = |e: snap::Error| RecordsError::Compression(format!("snappy: {e}"));
    let too_big =
        || RecordsError::Compression(format!("batch decompresses to more than {limit} bytes"));
    let mut out = Vec::new();
    let block = |data: &[u8], out: &mut Vec<u8>| -> Result<(), RecordsError> {
        let n = snap::raw::decompress_len(data).map_err(err)?;
        if out.len() + n > limit {
            return Err(too_big());
        }
        let start = out.len();
        out.resize(start + n, 0);
        snap::raw::Decoder::new()
            .decompress(data, &mut out[start..])
            .map_err(err)?;
        Ok(())
    };
    if b.len() < MAGIC.len() || b[..8] != MAGIC[..8] {
        block(&b, &mut out)?;
        return Ok(Bytes::from(out));
    }
    b.advance(MAGIC.len());
    while b.has_remaining() {
        if b.remaining() < 4 {
            return Err(RecordsError::Truncated);
        }
        let len = b.get_u32() as usize;
        if b.remaining() < len {
            return Err(RecordsError::Truncated);
        }
        let data = b.split_to(len);
        block(&data, &mut out)?;
    }
    Ok(Bytes::from(out))
}

fn decode_records(
    mut b: Bytes,
    count: i32,
    base_timestamp: i64,
) -> Result<Vec<Record>, RecordsError> {
    // Each record takes at least 7 bytes: never trust `count` for the allocation.
    let mut out = Vec::with_capacity((count as usize).min(b.remaining() / 7 + 1));
    for _ in 0..count {
        let len = get_varint(&mut b)?;
        if len < 0 || len as usize > b.remaining() {
            return Err(RecordsError::Truncated);
        }
        let mut r = b.split_to(len as usize);
        if !r.has_remaining() {
            return Err(RecordsError::Truncated);
        }
        let attributes = r.get_i8();
        let ts_delta = get_varint(&mut r)?;
        let _offset_delta = get_varint(&mut r)?;
        let key = get_bytes(&mut r)?;
        let value = get_bytes(&mut r)?;
        let n_headers = get_varint(&mut r)?;
        if n_headers < 0 || n_headers as usize > r.remaining() {
            return Err(RecordsError::Malformed("bad header count"));
        }
        let mut headers = Vec::with_capacity(n_headers as usize);
        for _ in 0..n_headers {
            let k = get_bytes(&mut r)?.ok_or(RecordsError::Malformed("null header key"))?;
            let v = get_bytes(&mut r)?;
            headers.push((k, v));
        }
        out.push(Record {
            attributes,
            timestamp: base_timestamp.wrapping_add(ts_delta),
            key,
            value,
            headers,
        });
    }
    if b.has_remaining() {
        return Err(RecordsError::Malformed("bytes after the last record"));
    }
    Ok(out)
}

fn put_opt(b: &mut BytesMut, v: &Option<Bytes>) {
    match v {
        None => put_varint(b, -1),
        Some(v) => {
            put_varint(b, v.len() as i64);
            b.put_slice(v);
        }
    }
}

fn opt_len(v: &Option<Bytes>) -> usize {
    match v {
        None => varint_len(-1),
        Some(v) => varint_len(v.len() as i64) + v.len(),
    }
}

/// Encoded size of a record (without its own length prefix).
fn record_len(r: &Record, ts_delta: i64, offset_delta: i64) -> usize {
    1 + varint_len(ts_delta)
        + varint_len(offset_delta)
        + opt_len(&r.key)
        + opt_len(&r.value)
        + varint_len(r.headers.len() as i64)
        + r.headers
            .iter()
            .map(|(k, v)| varint_len(k.len() as i64) + k.len() + opt_len(v))
            .sum::<usize>()
}

/// Encodes `records` as one v2 batch. `info` gives attributes (compression, timestamp type;
/// the transactional bit is cleared), producer id/epoch and base sequence for the new batch.
pub fn encode_batch(records: &[&Record], info: &BatchInfo) -> Result<Bytes, RecordsError> {
    let compression = info.compression()?;
    let base_ts = records.iter().map(|r| r.timestamp).min().unwrap_or(-1);
    let max_ts = records.iter().map(|r| r.timestamp).max().unwrap_or(-1);
    // Each record is written once, straight into the batch body: its length prefix is
    // computed first instead of encoding it into a buffer of its own.
    let lens: Vec<usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| record_len(r, r.timestamp - base_ts, i as i64))
        .collect();
    let mut body = BytesMut::with_capacity(lens.iter().map(|l| l + varint_len(*l as i64)).sum());
    for ((i, r), len) in records.iter().enumerate().zip(lens) {
        put_varint(&mut body, len as i64);
        body.put_i8(r.attributes);
        put_varint(&mut body, r.timestamp - base_ts);
        put_varint(&mut body, i as i64);
        put_opt(&mut body, &r.key);
        put_opt(&mut body, &r.value);
        put_varint(&mut body, r.headers.len() as i64);
        for (k, v) in &r.headers {
            put_varint(&mut body, k.len() as i64);
            body.put_slice(k);
            put_opt(&mut body, v);
        }
    }
    let mut compressed = BytesMut::new();
    let err = |e: anyhow::Error| RecordsError::Compression(e.to_string());
    let fill = |buf: &mut BytesMut| {
        buf.put_slice(&body);
        Ok(())
    };
    match compression {
        Compression::None => NoCompression::compress(&mut compressed, fill).map_err(err)?,
        Compression::Gzip => Gzip::compress(&mut compressed, fill).map_err(err)?,
        Compression::Snappy => Snappy::compress(&mut compressed, fill).map_err(err)?,
        Compression::Lz4 => Lz4::compress(&mut compressed, fill).map_err(err)?,
        Compression::Zstd => Zstd::compress(&mut compressed, fill).map_err(err)?,
    }
    let attributes = info.attributes & !0x10 & !0x20;
    let mut after_crc = BytesMut::with_capacity(40 + compressed.len());
    after_crc.put_i16(attributes);
    after_crc.put_i32(records.len().saturating_sub(1) as i32);
    after_crc.put_i64(base_ts);
    after_crc.put_i64(max_ts);
    after_crc.put_i64(info.producer_id);
    after_crc.put_i16(info.producer_epoch);
    after_crc.put_i32(info.base_sequence);
    after_crc.put_i32(records.len() as i32);
    after_crc.put_slice(&compressed);
    let mut out = BytesMut::with_capacity(21 + after_crc.len());
    out.put_i64(0); // base offset: assigned by the broker
    out.put_i32((4 + 1 + 4 + after_crc.len()) as i32);
    out.put_i32(info.partition_leader_epoch);
    out.put_i8(2);
    out.put_u32(crc32c::crc32c(&after_crc));
    out.put_slice(&after_crc);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u8) -> Record {
        Record {
            attributes: 0,
            timestamp: 1_700_000_000_000 + i as i64,
            key: if i.is_multiple_of(3) {
                None
            } else {
                Some(Bytes::from(vec![b'k', i]))
            },
            value: Some(Bytes::from(vec![i; (i as usize) * 7])),
            headers: vec![
                (Bytes::from_static(b"type"), Some(Bytes::from_static(b"a"))),
                (Bytes::from_static(b"type"), Some(Bytes::from_static(b"b"))),
                (Bytes::from_static(b"empty"), None),
            ],
        }
    }

    #[test]
    fn every_codec_round_trips_with_duplicate_headers_kept() {
        let records: Vec<Record> = (0..50).map(rec).collect();
        let refs: Vec<&Record> = records.iter().collect();
        for codec in [0i16, 1, 2, 3, 4] {
            let info = BatchInfo {
                attributes: codec,
                producer_id: 7,
                producer_epoch: 1,
                base_sequence: 100,
                partition_leader_epoch: -1,
                records: 50,
            };
            let bytes = encode_batch(&refs, &info).unwrap();
            let decoded = decode_batches(bytes).unwrap();
            assert_eq!(decoded.len(), 1, "codec {codec}");
            assert_eq!(decoded[0].0, info, "codec {codec}");
            assert_eq!(decoded[0].1, records, "codec {codec}");
        }
    }

    #[test]
    fn crate_encoded_batches_decode_identically() {
        use kafka_protocol::records::{
            Compression as C, Record as KRecord, RecordBatchEncoder, RecordEncodeOptions,
            TimestampType,
        };
        let recs: Vec<KRecord> = (0..5)
            .map(|i| KRecord {
                transactional: false,
                control: false,
                partition_leader_epoch: 0,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i,
                sequence: i as i32,
                timestamp: 1000 + i,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(format!("v{i}"))),
                headers: Default::default(),
                delete_horizon: false,
            })
            .collect();
        for c in [C::None, C::Gzip, C::Snappy, C::Lz4, C::Zstd] {
            let mut buf = BytesMut::new();
            RecordBatchEncoder::encode(
                &mut buf,
                &recs,
                &RecordEncodeOptions {
                    version: 2,
                    compression: c,
                },
            )
            .unwrap();
            let d = decode_batches(buf.freeze()).unwrap();
            let got: Vec<_> = d
                .iter()
                .flat_map(|(_, r)| {
                    r.iter()
                        .map(|r| (r.key.clone(), r.value.clone(), r.timestamp))
                })
                .collect();
            let want: Vec<_> = recs
                .iter()
                .map(|r| (r.key.clone(), r.value.clone(), r.timestamp))
                .collect();
            assert_eq!(got, want, "{c:?}");
        }
    }

    #[test]
    fn decompression_is_bounded_for_every_codec() {
        // 1 MiB of zeros compresses to almost nothing; with a 64 KiB bound it must be refused.
        let big = Record {
            attributes: 0,
            timestamp: 0,
            key: None,
            value: Some(Bytes::from(vec![0u8; 1 << 20])),
            headers: vec![],
        };
        for codec in [1i16, 2, 3, 4] {
            let info = BatchInfo {
                attributes: codec,
                producer_id: -1,
                producer_epoch: -1,
                base_sequence: -1,
                partition_leader_epoch: -1,
                records: 1,
            };
            let bytes = encode_batch(&[&big], &info).unwrap();
            assert!(
                bytes.len() < 64 * 1024,
                "codec {codec} compressed to {}",
                bytes.len()
            );
            assert!(
                matches!(
                    decode_batches_limited(bytes.clone(), &mut (64 * 1024)),
                    Err(RecordsError::Compression(_))
                ),
                "codec {codec}"
            );
            assert_eq!(
                decode_batches_limited(bytes, &mut (2 << 20)).unwrap()[0].1[0],
                big,
                "codec {codec}"
            );
        }
    }

    #[test]
    fn snappy_block_declaring_4_gib_is_refused_before_allocating() {
        // The fuzzing finding: xerial header, one block whose varint length says 2^32-1.
        let mut body = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01".to_vec();
        body.extend_from_slice(&[0, 0, 0, 6, 0xff, 0xff, 0xff, 0xff, 0x0f, 0]);
        assert!(matches!(
            snappy(Bytes::from(body), DEFAULT_MAX_DECOMPRESSED),
            Err(RecordsError::Compression(_))
        ));
    }

    #[test]
    fn corrupt_batches_are_errors_not_panics() {
        let records: Vec<Record> = (0..3).map(rec).collect();
        let refs: Vec<&Record> = records.iter().collect();
        let info = BatchInfo {
            attributes: 0,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            partition_leader_epoch: -1,
            records: 3,
        };
        let good = encode_batch(&refs, &info).unwrap();
        let mut bad = BytesMut::from(&good[..]);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert_eq!(decode_batches(bad.freeze()), Err(RecordsError::Crc));
        assert_eq!(
            decode_batches(good.slice(..good.len() - 3)),
            Err(RecordsError::Truncated)
        );
        for cut in 0..good.len() {
            let _ = decode_batches(good.slice(..cut));
        }
    }
}
