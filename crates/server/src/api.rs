//! The server API: `POST /api`, JSON-RPC 2.0 over HTTP for backends (section 10),
//! behind `Authorization: Bearer <WS_API_KEY>`. The same router machinery as client
//! calls, with the API's own method set and a caller that no budget or grant limits.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::http::{Body, json};

/// Answers one `/api` request.
pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let Some(key) = app.config.users.api_key.as_deref() else {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        );
    };
    if request.method() != Method::POST {
        let mut response = json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "use POST"}),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| chorus_gate::bearer_token(value.as_bytes()));
    match presented {
        None => return refused("missing"),
        Some(presented) if !bool::from(presented.as_bytes().ct_eq(key.as_bytes())) => {
            return refused("invalid");
        }
        Some(_) => {}
    }
    let limit = app.config.transport.max_message_size;
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            return if error.is::<http_body_util::LengthLimitError>() {
                rpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &chorus_rpc::RpcError::with_detail(
                        chorus_rpc::ErrorCode::PayloadTooLarge,
                        "request body larger than WS_MAX_MESSAGE_SIZE",
                    )
                    .data(serde_json::json!({ "limit": limit })),
                )
            } else {
                json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "the request body could not be read"}),
                )
            };
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return rpc_error(
            StatusCode::OK,
            &chorus_rpc::RpcError::with_detail(
                chorus_rpc::ErrorCode::ParseError,
                "body is not UTF-8",
            ),
        );
    };
    let caller = Arc::new(chorus_rpc::Caller::api(app.config.transport.send_buffer));
    let cx = chorus_rpc::Context {
        services: &app.services,
        caller: &caller,
    };
    let reply = match app.api_router.handle(text, &cx) {
        chorus_rpc::Handled::Now(reply) => Some(reply),
        chorus_rpc::Handled::Later { reply, .. } => {
            let answer = reply.await;
            for effect in answer.effects {
                effect();
            }
            answer.text
        }
        // No budget limits the server API, so it cannot flood.
        chorus_rpc::Handled::Nothing | chorus_rpc::Handled::Flooding => None,
    };
    match reply {
        Some(reply) => {
            let mut response = Response::new(Full::new(Bytes::from(reply)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        // Only notifications: nothing is owed.
        None => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
    }
}

fn refused(reason: &str) -> Response<Body> {
    let mut response = json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({ "error": reason }),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"chorus-api\""),
    );
    response
}

/// A JSON-RPC error object (id null) as the whole answer.
fn rpc_error(status: StatusCode, error: &chorus_rpc::RpcError) -> Response<Body> {
    let mut body = serde_json::json!({
        "jsonrpc": "2.0",
        "error": {"code": error.code.code(), "message": error.message},
        "id": null,
    });
    if let Some(data) = &error.data {
        body["error"]["data"] = data.clone();
    }
    json(status, &body)
}
