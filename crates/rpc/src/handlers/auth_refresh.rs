//! `auth.refresh`: hands the connection a fresh token before its JWT expires, so it
//! stays open past the first token's `exp`. The new token must be for the same user;
//! its grants, info and expiry replace the old ones.

use serde::Deserialize;

use crate::{Context, ErrorCode, Method, Params, Reply, RpcError};

pub struct AuthRefresh;

#[derive(Deserialize)]
pub struct RefreshParams {
    token: String,
}

impl From<(String,)> for RefreshParams {
    fn from((token,): (String,)) -> Self {
        Self { token }
    }
}

impl Method for AuthRefresh {
    type Params<'p> = RefreshParams;

    fn parse(&self, params: Params<'_>) -> Result<RefreshParams, RpcError> {
        params.named_or_positional::<_, (String,)>()
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        if !cx.services.gate.verifier().accepts_jwt() {
            return Err(RpcError::with_detail(
                ErrorCode::MethodNotFound,
                "auth.refresh needs JWT authentication (WS_JWT_*)",
            ));
        }
        let services = std::sync::Arc::clone(cx.services);
        let caller = std::sync::Arc::clone(cx.caller);
        let token = params.token.clone();
        Ok(Reply::later(async move {
            let fresh = services
                .gate
                .verifier()
                .check(&token)
                .await
                .map_err(|error| RpcError::unauthorized(&error))?;
            if fresh.user.is_none() || fresh.user != caller.identity().user {
                return Err(RpcError::with_detail(
                    ErrorCode::Forbidden,
                    "the token is for another user",
                ));
            }
            let exp = fresh.expires_at;
            caller.refresh(fresh);
            Ok(Reply::Json(serde_json::json!({ "exp": exp })))
        }))
    }
}
