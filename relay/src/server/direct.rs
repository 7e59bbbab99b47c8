//! SSE streams served straight onto the socket, without hyper's per-connection buffers.
//!
//! Most of a relay's connections are SSE streams that stay open for hours and are idle most
//! of that time. hyper keeps an 8 KiB read buffer and an 8 KiB header buffer per HTTP/1.1
//! connection for as long as it lives: more than everything else an idle stream holds. So the
//! relay reads the first request head of an HTTP/1.1 connection (plain, or over its TLS when
//! the client did not choose HTTP/2) itself, into a buffer it frees once the head is parsed:
//!
//! - `GET /api/runs/{run}/events` (the SSE endpoint) is answered here: the request goes
//!   through the same router (auth, CORS, limits) as any other, and its response is written
//!   to the socket as it comes, chunk by chunk (`Transfer-Encoding: chunked`), ending the
//!   connection after it (`Connection: close`). An answer that is not a stream (an error) is
//!   written whole, with its length.
//! - Anything else (other paths and methods, a body, HTTP/1.0, a head that does not parse,
//!   bytes sent after the head) is handed to hyper with the bytes already read, and served
//!   there as before, with keep-alive.
//!
//! While a stream is written, what the client sends is read into a small stack buffer and
//! dropped, only to notice that it closed the connection (which ends the stream at once).

use axum::extract::ConnectInfo;
use axum::http::{self, HeaderName, HeaderValue, Request, Response, header};
use bytes::Bytes;
use futures::StreamExt;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Longest a client may take to send its first request head (hyper's `header_read_timeout`
/// for the heads after it).
pub(super) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest first request head read here; a longer one goes to hyper, which answers it.
const MAX_HEAD: usize = 16 * 1024;

/// Most header lines in a head answered here (a head with more goes to hyper).
const MAX_HEADERS: usize = 64;

/// Largest non-stream answer (an error) written here.
const MAX_WHOLE_BODY: usize = 1024 * 1024;

/// What the first request head of a connection asked for.
pub(super) enum First {
    /// A request for an SSE stream, answered here.
    Stream(Box<Request<axum::body::Body>>),
    /// Anything else: hyper serves the connection, starting with these bytes.
    Other(Bytes),
    /// The client closed the connection, or sent nothing in time, or the socket failed.
    Gone,
}

/// Reads the connection's first request head and tells what to do with it.
pub(super) async fn read_first(stream: &TcpStream) -> First {
    match tokio::time::timeout(HEAD_TIMEOUT, read_head(stream)).await {
        Ok(first) => first,
        Err(_) => First::Gone,
    }
}

/// [`read_first`] over TLS.
pub(super) async fn read_first_tls(stream: &mut TlsStream) -> First {
    match tokio::time::timeout(HEAD_TIMEOUT, read_head_tls(stream)).await {
        Ok(first) => first,
        Err(_) => First::Gone,
    }
}

async fn read_head_tls(stream: &mut TlsStream) -> First {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        make_room(&mut buf);
        match tokio::io::AsyncReadExt::read_buf(stream, &mut buf).await {
            Ok(0) | Err(_) => return First::Gone,
            Ok(_) => {}
        }
        if let Some(first) = judge(&mut buf) {
            return first;
        }
    }
}

async fn read_head(stream: &TcpStream) -> First {
    // Allocated when the first bytes arrive: a connection that sends nothing holds nothing.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if stream.readable().await.is_err() {
            return First::Gone;
        }
        make_room(&mut buf);
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return First::Gone,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return First::Gone,
        }
        if let Some(first) = judge(&mut buf) {
            return first;
        }
    }
}

/// Room for the next read of a head: 1 KiB at first, then twice as much each time.
fn make_room(buf: &mut Vec<u8>) {
    if buf.capacity() == buf.len() {
        buf.reserve(if buf.is_empty() { 1024 } else { buf.len() });
    }
}

/// What the bytes read so far say; `None` while the head is incomplete and may still grow.
fn judge(buf: &mut Vec<u8>) -> Option<First> {
    match parse(buf) {
        Parsed::Partial if buf.len() < MAX_HEAD => None,
        Parsed::Partial | Parsed::Other => Some(First::Other(Bytes::from(std::mem::take(buf)))),
        Parsed::Stream(request) => Some(First::Stream(request)),
    }
}

enum Parsed {
    Partial,
    Stream(Box<Request<axum::body::Body>>),
    Other,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some("GET"), Some(path), Some(1)) = (head.method, head.path, head.version) else {
        return Parsed::Other;
    };
    // Pipelined bytes after the head are hyper's to serve.
    if len != buf.len() || !is_events_path(path) {
        return Parsed::Other;
    }
    let Ok(uri) = path.parse::<http::Uri>() else {
        return Parsed::Other;
    };
    let mut request = Request::new(axum::body::Body::empty());
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_11;
    for h in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Other;
        };
        // A body, an upgrade or an expectation: not a plain stream request.
        if name == header::CONTENT_LENGTH && value.as_bytes() != b"0"
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Parsed::Other;
        }
        request.headers_mut().append(name, value);
    }
    Parsed::Stream(Box::new(request))
}

/// `/api/runs/{run}/events`, with or without a query.
fn is_events_path(target: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    path.strip_prefix("/api/runs/")
        .and_then(|rest| rest.strip_suffix("/events"))
        .is_some_and(|run| !run.is_empty() && !run.contains('/'))
}

/// The TLS connections answered here (HTTP/1.1 over the relay's TLS).
pub(super) type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The connection a stream is written to.
pub(super) enum Link {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Link {
    /// Writes every byte of `parts`, waiting for room as needed.
    async fn write_all(&mut self, parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        match self {
            Link::Plain(stream) => write_all(stream, parts).await,
            Link::Tls(stream) => {
                use tokio::io::AsyncWriteExt;
                let mut parts = parts;
                while !parts.is_empty() {
                    match stream.write_vectored(parts).await? {
                        0 => return Err(std::io::ErrorKind::WriteZero.into()),
                        n => IoSlice::advance_slices(&mut parts, n),
                    }
                }
                // rustls holds the records until they are flushed to the socket.
                stream.flush().await
            }
        }
    }

    /// Resolves when the client has closed the connection (or it failed).
    async fn closed(&mut self) {
        match self {
            Link::Plain(stream) => closed(stream).await,
            Link::Tls(stream) => {
                let mut sink = [0u8; 64];
                while let Ok(n) = tokio::io::AsyncReadExt::read(stream, &mut sink).await {
                    if n == 0 {
                        return;
                    }
                }
            }
        }
    }

    /// Ends the sending side (over TLS: with a `close_notify` first).
    async fn shutdown(&mut self) -> std::io::Result<()> {
        let result = match self {
            Link::Plain(stream) => tokio::io::AsyncWriteExt::shutdown(stream).await,
            Link::Tls(stream) => tokio::io::AsyncWriteExt::shutdown(stream).await,
        };
        match result {
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
            other => other,
        }
    }
}

/// Answers a stream request with `app` and writes the answer to `stream`.
pub(super) async fn answer(
    mut stream: Link,
    mut request: Box<Request<axum::body::Body>>,
    peer: SocketAddr,
    app: axum::Router,
) {
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = match tower::ServiceExt::oneshot(app, *request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let streamed = response.status() == http::StatusCode::OK
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
    let result = if streamed {
        write_stream(&mut stream, response).await
    } else {
        write_whole(&mut stream, response).await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "SSE connection ended with an error");
    }
}

/// The status line and headers of `response`, without the framing headers, which the caller
/// adds.
fn head_of(response: &Response<axum::body::Body>) -> Vec<u8> {
    let status = response.status();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        if [
            header::CONNECTION,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
        ]
        .contains(name)
            || name.as_str() == "keep-alive"
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !response.headers().contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn write_whole(
    stream: &mut Link,
    response: Response<axum::body::Body>,
) -> std::io::Result<()> {
    let mut head = head_of(&response);
    let body = axum::body::to_bytes(response.into_body(), MAX_WHOLE_BODY)
        .await
        .map_err(std::io::Error::other)?;
    head.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    head.extend_from_slice(b"connection: close\r\n\r\n");
    stream
        .write_all(&mut [IoSlice::new(&head), IoSlice::new(&body)])
        .await?;
    stream.shutdown().await
}

async fn write_stream(
    stream: &mut Link,
    response: Response<axum::body::Body>,
) -> std::io::Result<()> {
    let mut head = head_of(&response);
    head.extend_from_slice(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    stream.write_all(&mut [IoSlice::new(&head)]).await?;
    drop(head);
    let mut body = response.into_body().into_data_stream();
    loop {
        let next = tokio::select! {
            next = body.next() => next,
            () = stream.closed() => return Ok(()),
        };
        match next {
            Some(Ok(chunk)) => write_chunk(stream, &chunk).await?,
            // The stream failed: end the connection without the last chunk, so that the
            // client sees a broken stream rather than a finished one.
            Some(Err(e)) => return Err(std::io::Error::other(e)),
            None => break,
        }
    }
    stream.write_all(&mut [IoSlice::new(b"0\r\n\r\n")]).await?;
    stream.shutdown().await
}

async fn write_chunk(stream: &mut Link, chunk: &Bytes) -> std::io::Result<()> {
    if chunk.is_empty() {
        // An empty chunk would end the body.
        return Ok(());
    }
    let mut size = [0u8; 18];
    let size = chunk_size_line(chunk.len(), &mut size);
    stream
        .write_all(&mut [
            IoSlice::new(size),
            IoSlice::new(chunk),
            IoSlice::new(b"\r\n"),
        ])
        .await
}

/// `{len:x}\r\n` written into `buf`.
fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut at = 16;
    let mut n = len;
    loop {
        at -= 1;
        buf[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[at..]
}

/// Writes every byte of `parts`, waiting for room in the socket as needed.
async fn write_all(stream: &TcpStream, mut parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !parts.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(parts) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Resolves when the client has closed the connection (or it failed); what the client sends
/// meanwhile is dropped.
async fn closed(stream: &TcpStream) {
    let mut sink = [0u8; 64];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// A connection whose first bytes were already read: they are read again first.
pub(super) struct Rewind<S> {
    read: Bytes,
    io: S,
}

impl<S> Rewind<S> {
    pub(super) fn new(read: Bytes, io: S) -> Self {
        Self { read, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            if self.read.is_empty() {
                // Free the bytes' allocation once they are all handed over.
                self.read = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_events_path_is_served_here() {
        assert!(is_events_path("/api/runs/ns.run/events"));
        assert!(is_events_path("/api/runs/ns.run/events?variation=a&from=0"));
        assert!(!is_events_path("/api/runs//events"));
        assert!(!is_events_path("/api/runs/a/b/events"));
        assert!(!is_events_path("/api/runs/ns.run"));
        assert!(!is_events_path("/api/runs/ns.run/events/x"));
        assert!(!is_events_path("http://host/api/runs/ns.run/events"));
    }

    #[test]
    fn a_stream_request_is_taken_and_everything_else_is_left_to_hyper() {
        let stream =
            b"GET /api/runs/ns.r/events?from=0 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 5\r\n\r\n";
        match parse(stream) {
            Parsed::Stream(r) => {
                assert_eq!(r.uri(), "/api/runs/ns.r/events?from=0");
                assert_eq!(r.headers()["last-event-id"], "5");
                assert_eq!(r.headers()["host"], "x");
            }
            _ => panic!("a stream request was not taken"),
        }
        assert!(matches!(parse(&stream[..20]), Parsed::Partial));
        for other in [
            &b"GET /healthz HTTP/1.1\r\n\r\n"[..],
            b"POST /api/runs/ns.r/events HTTP/1.1\r\n\r\n",
            b"GET /api/runs/ns.r/events HTTP/1.0\r\n\r\n",
            b"GET /api/runs/ns.r/events HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /api/runs/ns.r/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /api/runs/ns.r/events HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GET /api/runs/ns.r/events HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
            b"GET /api/runs/ns.r/events HTTP/1.1\r\nBad Header\r\n\r\n",
            b"\x16\x03\x01 not http",
        ] {
            assert!(
                matches!(parse(other), Parsed::Other),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        let mut buf = [0u8; 18];
        for len in [1usize, 9, 10, 15, 16, 255, 4096, 65535, usize::MAX] {
            assert_eq!(
                chunk_size_line(len, &mut buf),
                format!("{len:x}\r\n").as_bytes()
            );
        }
    }
}
