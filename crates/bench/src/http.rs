//! A minimal HTTP/1.1 client for loopback targets: keep-alive `POST` (the server API,
//! `POST /api`) and `GET` (the NATS monitoring endpoint), one request at a time per
//! connection. Enough for the load generator; no TLS, no redirects, no pipelining.

use std::net::SocketAddr;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Largest response body read (the NATS `/jsz` document is the biggest here).
const MAX_BODY: usize = 64 << 20;
/// Largest response head.
const MAX_HEAD: usize = 64 << 10;

/// The parts of an `http://host:port/path` URL, loopback hosts only.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let target = crate::conn::Target::parse(&format!("ws://{authority}/"))?;
    Ok((target.addr, path.to_string()))
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct HttpConn {
    stream: BufReader<TcpStream>,
    host: String,
}

/// A response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
            host: addr.to_string(),
        })
    }

    /// `POST path` with a JSON body and an optional bearer token.
    pub async fn post(
        &mut self,
        path: &str,
        bearer: Option<&str>,
        body: &str,
    ) -> std::io::Result<Response> {
        let auth = bearer
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut request = Vec::with_capacity(head.len() + body.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(body.as_bytes());
        self.stream.get_mut().write_all(&request).await?;
        read_response(&mut self.stream).await
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> std::io::Result<Response> {
        let head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.stream.get_mut().write_all(head.as_bytes()).await?;
        read_response(&mut self.stream).await
    }
}

/// One `GET` on a fresh connection.
pub async fn get(url: &str) -> Result<Response, String> {
    let (addr, path) = parse_url(url)?;
    let mut conn = HttpConn::connect(addr)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    conn.get(&path).await.map_err(|e| format!("{url}: {e}"))
}

fn invalid(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// Reads one line into `line` (replacing it), counting `head` bytes against
/// [`MAX_HEAD`].
async fn read_line<R: AsyncBufRead + Unpin>(
    line: &mut String,
    r: &mut R,
    head: &mut usize,
) -> std::io::Result<()> {
    line.clear();
    let n = r.read_line(line).await?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before the response",
        ));
    }
    *head += n;
    if *head > MAX_HEAD {
        return Err(invalid("response head too large"));
    }
    Ok(())
}

/// Reads one response (status line, headers, a `Content-Length` or chunked body).
pub async fn read_response<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Response> {
    let mut line = String::new();
    let mut head = 0usize;
    read_line(&mut line, r, &mut head).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        read_line(&mut line, r, &mut head).await?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| invalid("bad content-length"))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            // The head bound is for the head; chunk lines are bounded one by one.
            head = 0;
            read_line(&mut line, r, &mut head).await?;
            let size_text = line.trim_end().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text.trim(), 16)
                .map_err(|_| invalid(format!("bad chunk size {size_text:?}")))?;
            if body.len() + size > MAX_BODY {
                return Err(invalid("response body too large"));
            }
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    read_line(&mut line, r, &mut head).await?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).await?;
            read_line(&mut line, r, &mut head).await?;
        }
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(invalid("response body too large"));
        }
        body.resize(n, 0);
        r.read_exact(&mut body).await?;
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        // No length: the body runs to the end of the connection.
        r.take(MAX_BODY as u64).read_to_end(&mut body).await?;
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(raw: &str) -> std::io::Result<Response> {
        let mut r = BufReader::new(raw.as_bytes());
        read_response(&mut r).await
    }

    #[tokio::test]
    async fn reads_sized_chunked_and_empty_bodies() {
        let r = parse("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"a\":1}")
            .await
            .expect("sized");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{\"a\":1}");
        let r = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            .await
            .expect("chunked");
        assert_eq!(r.body, b"abcde");
        let r = parse("HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .expect("empty");
        assert_eq!((r.status, r.body.len()), (204, 0));
        let r = parse("HTTP/1.0 401 Unauthorized\r\n\r\n{\"error\":\"missing\"}")
            .await
            .expect("to the end");
        assert_eq!(r.body, b"{\"error\":\"missing\"}");
        assert!(parse("garbage\r\n\r\n").await.is_err());
        assert!(
            parse("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort")
                .await
                .is_err()
        );
        assert!(parse("").await.is_err());
    }

    #[tokio::test]
    async fn keeps_the_connection_for_the_next_response() {
        let raw = "HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\naHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb";
        let mut r = BufReader::new(raw.as_bytes());
        assert_eq!(read_response(&mut r).await.expect("first").body, b"a");
        assert_eq!(read_response(&mut r).await.expect("second").body, b"b");
    }

    #[test]
    fn urls_are_loopback_only() {
        let (addr, path) = parse_url("http://127.0.0.1:8222/jsz?streams=true").expect("url");
        assert_eq!(addr.to_string(), "127.0.0.1:8222");
        assert_eq!(path, "/jsz?streams=true");
        assert_eq!(parse_url("http://localhost:9").expect("url").1, "/");
        assert!(parse_url("http://10.1.2.3:80/").is_err());
        assert!(parse_url("https://127.0.0.1/").is_err());
    }
}
