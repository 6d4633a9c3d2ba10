//! `chorus health`: asks a running server's `/health` and exits 0 when it answers 200,
//! so that a container image without a shell or curl can still have a health check.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

pub fn run(args: &[String]) -> ExitCode {
    let url = args.first().cloned().unwrap_or_else(|| {
        let port = std::env::var("WS_PORT")
            .ok()
            .filter(|port| !port.is_empty())
            .unwrap_or_else(|| "8080".into());
        format!("http://127.0.0.1:{port}/health")
    });
    match check(&url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("chorus health: {url}: {why}");
            ExitCode::FAILURE
        }
    }
}

fn check(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are checked")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let address: SocketAddr = authority
        .to_socket_addrs()
        .map_err(|err| err.to_string())?
        .next()
        .ok_or("no address")?;
    let mut stream =
        TcpStream::connect_timeout(&address, TIMEOUT).map_err(|err| err.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|err| err.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|err| err.to_string())?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .map_err(|err| err.to_string())?;
    match &head[9..12] {
        b"200" => Ok(()),
        status => Err(format!("answered {}", String::from_utf8_lossy(status))),
    }
}
