//! An HTTP/2 connection's bytes, followed frame by frame in both directions, so that the
//! server can cut a connection with `GOAWAY ENHANCE_YOUR_CALM` (RFC 9113 §6.8), which
//! hyper cannot send on a caller's behalf: once [`Frames`] is told to cut, it lets the
//! frame being written finish, writes its own GOAWAY after it, and ends the connection.
//!
//! Nothing is parsed beyond the 9-byte frame headers and a GOAWAY's last stream id:
//! the highest stream the client opened (its HEADERS) becomes the GOAWAY's last stream
//! id, never above one the server already announced in a GOAWAY of its own.
//!
//! Whenever the connection ends, after this GOAWAY or one of h2's own (a graceful close,
//! or h2's ENHANCE_YOUR_CALM), what the client still sends is read and dropped until it
//! closes, for at most [`LINGER`]: closing a socket with unread bytes would send a TCP
//! reset, and the client could lose the GOAWAY with it.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The client's connection preface, before its first frame (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;
/// The error code of a GOAWAY sent to a peer that abuses the protocol.
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The GOAWAY's debug data, which says why.
const WHY: &[u8] = b"too_many_stream_resets";
const GOAWAY_LEN: usize = HEADER_LEN + 8 + WHY.len();
const MAX_STREAM_ID: u32 = 0x7fff_ffff;
/// How long a closing connection waits for the client to close its side.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// Where one direction's bytes stand among its frames.
#[derive(Default)]
struct Cursor {
    /// Bytes of the preface still to come (the client's direction only).
    preface: usize,
    header: [u8; HEADER_LEN],
    have: usize,
    kind: u8,
    payload_left: usize,
    /// The first four payload bytes of the frame, while they arrive.
    prefix: [u8; 4],
    prefix_have: usize,
    /// The highest stream of a HEADERS frame.
    highest_stream: u32,
    /// The last stream id of the latest GOAWAY.
    goaway_last: Option<u32>,
}

impl Cursor {
    fn at_boundary(&self) -> bool {
        self.preface == 0 && self.have == 0 && self.payload_left == 0
    }

    /// How many of the next bytes belong to the frame under way (or its header).
    fn left_in_frame(&self) -> usize {
        if self.have > 0 {
            HEADER_LEN - self.have
        } else {
            self.payload_left
        }
    }

    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                if self.kind == GOAWAY && self.prefix_have < 4 {
                    let take = (4 - self.prefix_have).min(n);
                    self.prefix[self.prefix_have..self.prefix_have + take]
                        .copy_from_slice(&bytes[..take]);
                    self.prefix_have += take;
                    if self.prefix_have == 4 {
                        let last = u32::from_be_bytes(self.prefix) & MAX_STREAM_ID;
                        self.goaway_last = Some(self.goaway_last.map_or(last, |l| l.min(last)));
                    }
                }
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (HEADER_LEN - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == HEADER_LEN {
                    self.have = 0;
                    let h = self.header;
                    self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    self.kind = h[3];
                    self.prefix_have = 0;
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & MAX_STREAM_ID;
                    if self.kind == HEADERS {
                        self.highest_stream = self.highest_stream.max(stream);
                    }
                }
            }
        }
    }
}

/// How far the cut has gone.
enum Cut {
    No,
    /// The GOAWAY frame, and how much of it is written.
    Writing([u8; GOAWAY_LEN], usize),
    Flushing,
    ShuttingDown,
    Done,
}

/// An HTTP/2 server connection's IO that can be cut with `GOAWAY ENHANCE_YOUR_CALM`
/// (see the module's documentation) when `calm` is cancelled.
pub(crate) struct Frames<IO> {
    io: IO,
    calm: Pin<Box<WaitForCancellationFutureOwned>>,
    calm_now: bool,
    inbound: Cursor,
    outbound: Cursor,
    cut: Cut,
    /// Armed once the connection closes: the end of the wait for the client to close.
    linger: Option<Pin<Box<Sleep>>>,
}

impl<IO> Frames<IO> {
    pub(crate) fn new(io: IO, calm: CancellationToken) -> Frames<IO> {
        Frames {
            io,
            calm: Box::pin(calm.cancelled_owned()),
            calm_now: false,
            inbound: Cursor {
                preface: PREFACE_LEN,
                ..Cursor::default()
            },
            outbound: Cursor::default(),
            cut: Cut::No,
            linger: None,
        }
    }

    /// Whether the connection is to be cut (registers for the news when not).
    fn cutting(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.calm_now && self.calm.as_mut().poll(cx).is_ready() {
            self.calm_now = true;
        }
        self.calm_now
    }
}

fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection cut: GOAWAY ENHANCE_YOUR_CALM sent",
    )
}

impl<IO: AsyncWrite + Unpin> Frames<IO> {
    /// Writes the GOAWAY and ends the connection; call only at a frame boundary.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.cut {
                Cut::No => {
                    let last = self
                        .inbound
                        .highest_stream
                        .min(self.outbound.goaway_last.unwrap_or(MAX_STREAM_ID));
                    let mut frame = [0u8; GOAWAY_LEN];
                    frame[2] = (GOAWAY_LEN - HEADER_LEN) as u8;
                    frame[3] = GOAWAY;
                    frame[9..13].copy_from_slice(&last.to_be_bytes());
                    frame[13..17].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
                    frame[17..].copy_from_slice(WHY);
                    self.cut = Cut::Writing(frame, 0);
                }
                Cut::Writing(frame, written) => {
                    match ready!(Pin::new(&mut self.io).poll_write(cx, &frame[*written..])) {
                        Ok(n) if n > 0 => {
                            *written += n;
                            if *written == frame.len() {
                                self.cut = Cut::Flushing;
                            }
                        }
                        _ => self.cut = Cut::Done,
                    }
                }
                Cut::Flushing => {
                    let _ = ready!(Pin::new(&mut self.io).poll_flush(cx));
                    self.cut = Cut::ShuttingDown;
                }
                Cut::ShuttingDown => {
                    let _ = ready!(Pin::new(&mut self.io).poll_shutdown(cx));
                    self.cut = Cut::Done;
                }
                Cut::Done => return Poll::Ready(()),
            }
        }
    }

    /// Once closing: reads and drops what the client sends until it closes, or for at
    /// most [`LINGER`].
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()>
    where
        IO: AsyncRead,
    {
        let linger = self
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        if linger.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => continue,
                _ => return Poll::Ready(()),
            }
        }
    }

    /// With a cut under way, how many of `len` bytes hyper may still write: those that
    /// finish its frame; `None` once at a boundary, when the cut goes on instead.
    fn allowed(&mut self, cx: &mut Context<'_>, len: usize) -> Option<usize> {
        if !self.cutting(cx) {
            return Some(len);
        }
        if matches!(self.cut, Cut::No) && !self.outbound.at_boundary() {
            return Some(len.min(self.outbound.left_in_frame()));
        }
        None
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Frames<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A cut at a boundary goes on from here when hyper has nothing to write;
        // mid-frame, reading goes on until hyper's write finishes the frame.
        if this.cutting(cx) && (!matches!(this.cut, Cut::No) || this.outbound.at_boundary()) {
            ready!(this.poll_cut(cx));
            ready!(this.poll_linger(cx));
            return Poll::Ready(Err(cut_error()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.inbound.advance(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Frames<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(allowed) = this.allowed(cx, buf.len()) else {
            ready!(this.poll_cut(cx));
            // Nothing more goes out after the GOAWAY: what hyper writes is dropped.
            return Poll::Ready(Ok(buf.len()));
        };
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, &buf[..allowed]))?;
        this.outbound.advance(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.cutting(cx) {
            // Cutting: one slice at a time, each held to its frame.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return Pin::new(this).poll_write(cx, first);
        }
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for buf in bufs {
            let take = left.min(buf.len());
            this.outbound.advance(&buf[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.cut, Cut::Done) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.cut, Cut::Done) {
            return Poll::Ready(Ok(()));
        }
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
        }
        this.poll_linger(cx).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut bytes = len.to_be_bytes()[1..].to_vec();
        bytes.push(kind);
        bytes.push(0);
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    /// Frames split anywhere are followed to their boundaries; HEADERS raise the
    /// highest stream, and a GOAWAY's last stream id is read.
    #[test]
    fn frames_are_followed_across_any_split() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, &[0; 6]));
        bytes.extend(frame(HEADERS, 5, &[1, 2, 3]));
        bytes.extend(frame(0x0, 5, &[9; 40]));
        bytes.extend(frame(HEADERS, 3, &[]));
        let mut goaway = 7u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&0u32.to_be_bytes());
        bytes.extend(frame(GOAWAY, 0, &goaway));
        for step in [1, 2, 5, 9, 17, bytes.len()] {
            let mut cursor = Cursor {
                preface: PREFACE_LEN,
                ..Cursor::default()
            };
            for chunk in bytes.chunks(step) {
                cursor.advance(chunk);
            }
            assert!(cursor.at_boundary(), "step {step}");
            assert_eq!(cursor.highest_stream, 5, "step {step}");
            assert_eq!(cursor.goaway_last, Some(7), "step {step}");
        }
        let mut cursor = Cursor::default();
        cursor.advance(&frame(0x0, 1, &[0; 10])[..4]);
        assert_eq!(cursor.left_in_frame(), 5);
        cursor.advance(&[0; 5]);
        assert_eq!(cursor.left_in_frame(), 10);
    }
}
