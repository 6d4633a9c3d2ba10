//! The server's own outgoing HTTP: one pooled client for `http://` and `https://`
//! (rustls with the system's roots), with a timeout and a bounded response body.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A pooled client, cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl HttpClient {
    pub fn new() -> Result<Self, String> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            .map_err(|error| format!("cannot load the system's root certificates: {error}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// `GET uri`: the body of a 200 answer, at most `max_body` bytes, within `timeout`.
    pub async fn get(
        &self,
        uri: &Uri,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Vec<u8>, String> {
        let request = Request::get(uri.clone())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::default())
            .map_err(|error| error.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| format!("request failed: {error}"))?;
            if response.status() != StatusCode::OK {
                return Err(format!("answered {}", response.status()));
            }
            let body = Limited::new(response.into_body(), max_body)
                .collect()
                .await
                .map_err(|error| format!("body: {error}"))?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }
}

impl HttpClient {
    /// `POST uri` with a JSON `body` and extra `headers`: the answer's status, within
    /// `timeout` (the answer's body is read and dropped, so the connection is reused).
    pub async fn post_json(
        &self,
        uri: &Uri,
        headers: &[(&'static str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<StatusCode, String> {
        let mut request =
            Request::post(uri.clone()).header(hyper::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|error| error.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| format!("request failed: {error}"))?;
            let status = response.status();
            // A body we do not need, bounded so that a huge answer costs nothing.
            let _ = Limited::new(response.into_body(), 64 << 10).collect().await;
            Ok(status)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }
}

impl HttpClient {
    /// `POST uri` with a JSON `body` and `headers`: the answer's status and body (at
    /// most `max_body` bytes). No timeout of its own: the caller bounds it.
    pub async fn post(
        &self,
        uri: &Uri,
        headers: hyper::HeaderMap,
        body: Bytes,
        max_body: usize,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut request = Request::post(uri.clone())
            .body(Full::new(body))
            .map_err(|error| error.to_string())?;
        *request.headers_mut() = headers;
        request.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        let response = self
            .client
            .request(request)
            .await
            .map_err(|error| format!("request failed: {error}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|error| format!("body: {error}"))?;
        Ok((status, body.to_bytes()))
    }
}

/// A JWKS URL as the gate's key source.
pub struct JwksSource {
    pub client: HttpClient,
    pub uri: Uri,
}

/// How long a JWKS fetch may take, and how large the document may be.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
const JWKS_MAX_BYTES: usize = 1 << 20;

impl chorus_gate::FetchKeys for JwksSource {
    fn fetch(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>> {
        let client = self.client.clone();
        let uri = self.uri.clone();
        Box::pin(async move { client.get(&uri, JWKS_TIMEOUT, JWKS_MAX_BYTES).await })
    }
}
