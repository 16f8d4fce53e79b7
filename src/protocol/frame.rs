//! Length-prefixed framing. The size is checked before anything is allocated for the frame, so
//! a client announcing a 2 GiB frame costs four bytes of reading, not 2 GiB of memory.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame size {size} exceeds the limit of {max} bytes")]
    TooLarge { size: i64, max: usize },
    #[error("negative frame size {0}")]
    Negative(i32),
    #[error("connection closed in the middle of a frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Negative(_) => "negative_size",
            FrameError::Truncated { .. } => "truncated",
            FrameError::Io(_) => "io",
        }
    }
}

/// Reads frames from a stream; each frame handed out is a `Bytes` view of the read buffer (no
/// copy). The buffer starts small and grows to a frame's size only once the caller has read
/// that size (`next_size`) and chose to go on, so an idle connection holds no buffer and a
/// large frame is allocated once, after admission.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max: usize,
}

/// What is read ahead while a frame's size is not yet known.
const LOOKAHEAD: usize = 16 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            max,
        }
    }

    /// The size of the next frame (without its length prefix), validated against the limit,
    /// without consuming it; `Ok(None)` at a clean end of stream. Cancel-safe.
    pub async fn next_size(&mut self) -> Result<Option<usize>, FrameError> {
        while self.buf.len() < 4 {
            if self.buf.capacity() - self.buf.len() < 4 {
                self.buf.reserve(LOOKAHEAD);
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
        let size = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if size < 0 {
            return Err(FrameError::Negative(size));
        }
        let size = size as usize;
        if size > self.max {
            return Err(FrameError::TooLarge {
                size: size as i64,
                max: self.max,
            });
        }
        Ok(Some(size))
    }

    /// The next frame without its length prefix; `Ok(None)` at a clean end of stream.
    /// Cancel-safe: bytes already read stay buffered for the next call.
    pub async fn next(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some(size) = self.next_size().await? else {
            return Ok(None);
        };
        while self.buf.len() < 4 + size {
            // Room for the rest of this frame plus a little of the next one, so pipelined
            // small frames are read several per call.
            let want = 4 + size - self.buf.len() + LOOKAHEAD.min(size.max(4096));
            if self.buf.capacity() - self.buf.len() < want.min(LOOKAHEAD) {
                self.buf.reserve(want);
            }
            if self.fill().await? == 0 {
                return Err(self.truncated());
            }
        }
        self.buf.advance(4);
        let frame = self.buf.split_to(size).freeze();
        if self.buf.is_empty() {
            // Let go of the frame's allocation: the frame alone keeps it alive now.
            self.buf = BytesMut::new();
        }
        Ok(Some(frame))
    }

    async fn fill(&mut self) -> Result<usize, FrameError> {
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == 0 && !self.buf.is_empty() {
            return Err(self.truncated());
        }
        Ok(n)
    }

    fn truncated(&self) -> FrameError {
        let want = if self.buf.len() >= 4 {
            i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize + 4
        } else {
            4
        };
        FrameError::Truncated {
            have: self.buf.len(),
            want,
        }
    }
}

/// Bytes to write as one vectored write: small pieces are copied together (one syscall slice
/// each would cost more than the copy), large ones (record data) are kept as the `Bytes` they
/// came in, so they reach the socket without a copy.
#[derive(Default)]
pub struct WriteBatch {
    chunks: std::collections::VecDeque<Bytes>,
    small: BytesMut,
    len: usize,
}

/// Pieces at least this long are written from their own buffer.
const COPY_BELOW: usize = 4096;
/// Slices per `writev` call.
const MAX_SLICES: usize = 64;

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn put_slice(&mut self, b: &[u8]) {
        self.small.extend_from_slice(b);
        self.len += b.len();
    }

    pub fn put_bytes(&mut self, b: Bytes) {
        if b.len() < COPY_BELOW {
            self.put_slice(&b);
            return;
        }
        self.seal_small();
        self.len += b.len();
        self.chunks.push_back(b);
    }

    fn seal_small(&mut self) {
        if !self.small.is_empty() {
            self.chunks.push_back(self.small.split().freeze());
        }
    }

    /// Writes everything queued; the batch is empty afterwards (also after an error).
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.seal_small();
        let result = self.write_chunks(w).await;
        self.chunks.clear();
        self.small.clear();
        self.len = 0;
        result
    }

    async fn write_chunks<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        while !self.chunks.is_empty() {
            let n = if self.chunks.len() == 1 || !w.is_write_vectored() {
                w.write(&self.chunks[0]).await?
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut k = 0;
                for c in self.chunks.iter().take(MAX_SLICES) {
                    slices[k] = IoSlice::new(c);
                    k += 1;
                }
                w.write_vectored(&slices[..k]).await?
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let mut left = n;
            while left > 0 {
                let first = self.chunks.front_mut().expect("written bytes were queued");
                if first.len() <= left {
                    left -= first.len();
                    self.chunks.pop_front();
                } else {
                    first.advance(left);
                    left = 0;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8], max: usize) -> Vec<Result<Option<Bytes>, String>> {
        let mut r = FrameReader::new(input, max);
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(Some(f)) => out.push(Ok(Some(f))),
                Ok(None) => {
                    out.push(Ok(None));
                    break;
                }
                Err(e) => {
                    out.push(Err(e.kind().to_string()));
                    break;
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn reads_consecutive_frames_then_clean_eof() {
        let input = [0, 0, 0, 2, 1, 2, 0, 0, 0, 1, 9];
        let got = frames(&input, 1024).await;
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap().as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(got[1].as_ref().unwrap().as_deref(), Some(&[9u8][..]));
        assert!(matches!(got[2], Ok(None)));
    }

    #[tokio::test]
    async fn refuses_oversized_frame_before_reading_it() {
        let input = [0x7f, 0xff, 0xff, 0xff];
        let got = frames(&input, 1024).await;
        assert_eq!(got, vec![Err("too_large".to_string())]);
    }

    #[tokio::test]
    async fn refuses_negative_size() {
        let got = frames(&[0xff, 0xff, 0xff, 0xfe], 1024).await;
        assert_eq!(got, vec![Err("negative_size".to_string())]);
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let got = frames(&[0, 0, 0, 10, 1, 2], 1024).await;
        assert_eq!(got, vec![Err("truncated".to_string())]);
        let got = frames(&[0, 0], 1024).await;
        assert_eq!(got, vec![Err("truncated".to_string())]);
    }

    #[tokio::test]
    async fn size_is_known_before_the_frame_is_read() {
        let input = [0, 0, 0, 3, 7, 8, 9];
        let mut r = FrameReader::new(&input[..], 1024);
        assert_eq!(r.next_size().await.unwrap(), Some(3));
        assert_eq!(r.next_size().await.unwrap(), Some(3), "not consumed");
        assert_eq!(r.next().await.unwrap().as_deref(), Some(&[7u8, 8, 9][..]));
        assert_eq!(r.next_size().await.unwrap(), None);
    }

    /// A writer that takes at most 5 bytes per call, to exercise partial vectored writes.
    struct Trickle(Vec<u8>);
    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = b.len().min(5);
            self.0.extend_from_slice(&b[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(5 - n);
                self.0.extend_from_slice(&b[..take]);
                n += take;
                if n == 5 {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn write_batch_keeps_byte_order_across_partial_writes() {
        let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut batch = WriteBatch::default();
        batch.put_slice(b"head");
        batch.put_bytes(Bytes::from(big.clone()));
        batch.put_bytes(Bytes::from_static(b"tail"));
        assert_eq!(batch.len(), 10_008);
        let mut out = Trickle(Vec::new());
        batch.write_to(&mut out).await.unwrap();
        let mut want = b"head".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"tail");
        assert_eq!(out.0, want);
        assert!(batch.is_empty());
    }
}
