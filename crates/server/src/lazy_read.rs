//! A socket wrapper that lets tungstenite's read buffer stay tiny.
//!
//! tungstenite allocates its read buffer up front, for every connection, idle or not.
//! With this wrapper that buffer can be a few hundred bytes: a socket read goes into
//! a scratch buffer on the stack, as large as a burst, and whatever the caller had no
//! room for waits in a heap buffer sized to it, freed as soon as it is taken. An idle
//! connection keeps no read memory here; a busy one still reads its socket in large
//! chunks rather than a few hundred bytes per system call.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes one socket read takes (stack scratch).
const SCRATCH: usize = 8 * 1024;

pub struct LazyRead<S> {
    inner: S,
    /// Bytes read from the socket that the caller has not taken yet.
    spill: Vec<u8>,
    /// How much of `spill` was taken.
    taken: usize,
}

impl<S> LazyRead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            spill: Vec::new(),
            taken: 0,
        }
    }

    /// Hands over spilled bytes; frees the spill once it is all taken.
    fn take_spill(&mut self, buf: &mut ReadBuf<'_>) {
        let left = &self.spill[self.taken..];
        let n = left.len().min(buf.remaining());
        buf.put_slice(&left[..n]);
        self.taken += n;
        if self.taken == self.spill.len() {
            self.spill = Vec::new();
            self.taken = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LazyRead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken < this.spill.len() {
            this.take_spill(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= SCRATCH {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut scratch = [const { MaybeUninit::<u8>::uninit() }; SCRATCH];
        let mut read = ReadBuf::uninit(&mut scratch);
        match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let filled = read.filled();
                let n = filled.len().min(buf.remaining());
                buf.put_slice(&filled[..n]);
                if n < filled.len() {
                    this.spill = filled[n..].to_vec();
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LazyRead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_and_free_the_spill() {
        let (mut peer, socket) = duplex(64 * 1024);
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.expect("writes");
        drop(peer);
        let mut reader = LazyRead::new(socket);
        let mut got = Vec::new();
        let mut small = [0u8; 100];
        loop {
            let n = reader.read(&mut small).await.expect("reads");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(reader.spill.capacity(), 0, "nothing kept once drained");
    }

    #[tokio::test]
    async fn a_large_read_goes_straight_to_the_caller() {
        let (mut peer, socket) = duplex(64 * 1024);
        peer.write_all(b"hello").await.expect("writes");
        let mut reader = LazyRead::new(socket);
        let mut large = vec![0u8; SCRATCH];
        let n = reader.read(&mut large).await.expect("reads");
        assert_eq!(&large[..n], b"hello");
        assert!(reader.spill.is_empty());
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut peer, socket) = duplex(1024);
        let mut writer = LazyRead::new(socket);
        writer.write_all(b"out").await.expect("writes");
        writer.flush().await.expect("flushes");
        let mut got = [0u8; 3];
        peer.read_exact(&mut got).await.expect("reads");
        assert_eq!(&got, b"out");
    }
}
