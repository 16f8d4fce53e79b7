//! Length-prefixed framing. The size is checked before anything is allocated for the frame, so
//! a client announcing a 2 GiB frame costs four bytes of reading, not 2 GiB of memory.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

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

/// Reads frames from a stream into one reusable buffer; each frame handed out is a `Bytes`
/// view of that buffer (no copy).
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
            max,
        }
    }

    /// The next frame without its length prefix; `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if self.buf.len() >= 4 {
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
                if self.buf.len() >= 4 + size {
                    self.buf.advance(4);
                    return Ok(Some(self.buf.split_to(size).freeze()));
                }
                // Reserve only what this frame still needs (already bounded by `max`).
                self.buf.reserve(4 + size - self.buf.len());
            } else if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 * 1024);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let want = if self.buf.len() >= 4 {
                    i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                        as usize
                        + 4
                } else {
                    4
                };
                return Err(FrameError::Truncated {
                    have: self.buf.len(),
                    want,
                });
            }
        }
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
}
