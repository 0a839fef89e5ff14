//! One data-plane connection type over two paths: a direct TCP connection, or
//! a libp2p stream on the DHT's connection (for peers with no usable data
//! address). Both carry the same preamble, frames and AEAD; an enum rather
//! than a trait object, so the TCP path pays one branch per poll and no
//! allocation.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use colony_dht::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

/// How a data-plane connection travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataPath {
    /// A TCP connection to the member's announced data address.
    Direct,
    /// A libp2p stream on the DHT connection (noise-authenticated peer id).
    Libp2p,
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Libp2p => "libp2p",
        })
    }
}

/// A data-plane connection.
#[derive(Debug)]
pub(crate) enum DataStream {
    Tcp(TcpStream),
    P2p(Compat<Stream>),
}

impl DataStream {
    /// A libp2p stream made a tokio stream.
    pub(crate) fn p2p(stream: Stream) -> Self {
        Self::P2p(stream.compat())
    }

    pub(crate) fn path(&self) -> DataPath {
        match self {
            Self::Tcp(_) => DataPath::Direct,
            Self::P2p(_) => DataPath::Libp2p,
        }
    }

    /// Owned read and write halves, driven by separate futures of one task.
    pub(crate) fn into_split(self) -> (DataReadHalf, DataWriteHalf) {
        match self {
            Self::Tcp(s) => {
                let (r, w) = s.into_split();
                (DataReadHalf::Tcp(r), DataWriteHalf::Tcp(w))
            }
            Self::P2p(s) => {
                let (r, w) = tokio::io::split(s);
                (DataReadHalf::P2p(r), DataWriteHalf::P2p(w))
            }
        }
    }
}

/// The read half of a [`DataStream`].
#[derive(Debug)]
pub(crate) enum DataReadHalf {
    Tcp(OwnedReadHalf),
    P2p(tokio::io::ReadHalf<Compat<Stream>>),
}

/// The write half of a [`DataStream`].
#[derive(Debug)]
pub(crate) enum DataWriteHalf {
    Tcp(OwnedWriteHalf),
    P2p(tokio::io::WriteHalf<Compat<Stream>>),
}

macro_rules! delegate_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    Self::P2p(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    Self::P2p(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_flush(cx),
                    Self::P2p(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    Self::P2p(s) => Pin::new(s).poll_shutdown(cx),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    Self::P2p(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Tcp(s) => s.is_write_vectored(),
                    Self::P2p(s) => s.is_write_vectored(),
                }
            }
        }
    };
}

delegate_read!(DataStream);
delegate_write!(DataStream);
delegate_read!(DataReadHalf);
delegate_write!(DataWriteHalf);
