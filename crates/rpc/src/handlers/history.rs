//! `history`: a page of a channel's kept publications, for a client with the right to
//! subscribe to the channel, and for the server API.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Deserialize;

use crate::{
    Access, Context, HistoryPage, HistoryQuery, Method, Params, Reply, RpcError, StreamPosition,
    validate_channel,
};

/// Publications per page unless the caller asks for another size.
const DEFAULT_LIMIT: usize = 100;
/// Most publications per page.
const MAX_LIMIT: usize = 1000;

pub struct History;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    since: Option<StreamPosition>,
    limit: Option<usize>,
    #[serde(default)]
    reverse: bool,
}

/// `{"publications": [{"offset", "data"}], "offset", "epoch", "truncated"?}`.
fn page_result(page: &HistoryPage) -> String {
    let mut out = String::with_capacity(
        64 + page
            .publications
            .iter()
            .map(|p| p.data.len() + 32)
            .sum::<usize>(),
    );
    out.push_str(r#"{"publications":["#);
    for (index, publication) in page.publications.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let _ = write!(out, r#"{{"offset":{},"data":"#, publication.offset);
        out.push_str(&String::from_utf8_lossy(&publication.data));
        out.push('}');
    }
    let _ = write!(
        out,
        r#"],"offset":{},"epoch":{}"#,
        page.position.offset,
        serde_json::Value::from(page.position.epoch.as_str())
    );
    if page.truncated {
        out.push_str(r#","truncated":true"#);
    }
    out.push('}');
    out
}

impl Method for History {
    type Params<'p> = HistoryParams<'p>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<HistoryParams<'p>, RpcError> {
        let parsed: HistoryParams<'p> = params.named()?;
        validate_channel(&parsed.channel)?;
        if parsed
            .limit
            .is_some_and(|limit| limit == 0 || limit > MAX_LIMIT)
        {
            return Err(RpcError::invalid_params(format!(
                "limit must be 1 to {MAX_LIMIT}"
            )));
        }
        Ok(parsed)
    }

    fn access<'a>(&self, params: &'a HistoryParams<'_>) -> Access<'a> {
        Access::Read(&params.channel)
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        if !cx.node().keeps_history(&params.channel) {
            return Err(RpcError::history_not_enabled(&params.channel));
        }
        let page = cx.node().history(
            &params.channel,
            HistoryQuery {
                since: params.since.clone(),
                limit: params.limit.unwrap_or(DEFAULT_LIMIT),
                reverse: params.reverse,
                max_bytes: cx.caller.reply_budget() / 2,
            },
        );
        Ok(Reply::later(async move {
            let page = page.await?;
            Ok(Reply::Text(page_result(&page)))
        }))
    }
}
