//! `backend`: a trivial application backend for the rpc proxy (`WS_PROXY_RPC_URL`):
//! every POST is a relayed JSON-RPC call, answered with its own params as the result.
//! What it costs is what any backend costs at least, so `rpc --proxied` measures the
//! proxy, not an application.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;

#[derive(Deserialize)]
struct Relayed<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = request
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    let text = match serde_json::from_slice::<Relayed<'_>>(&body) {
        Ok(call) => format!(
            r#"{{"jsonrpc":"2.0","result":{},"id":{}}}"#,
            call.params.map_or("null", RawValue::get),
            call.id.map_or("null", RawValue::get)
        ),
        Err(_) => r#"{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}"#
            .to_owned(),
    };
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// Serves until the process is stopped.
pub async fn serve(listen: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("chorus-bench backend: answering rpc proxy requests on http://{local}/rpc");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("chorus-bench backend: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
