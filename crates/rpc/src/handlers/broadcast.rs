//! `broadcast`: sends the caller's params (a client) or its `data` (the server API),
//! as the `broadcast` notification, to every client of every replica, the caller
//! included.

use serde_json::value::RawValue;

use crate::{Access, Context, Delivery, Method, Params, Reply, RpcError, notification};

pub struct Broadcast;

impl Method for Broadcast {
    type Params<'p> = &'p RawValue;

    fn parse<'p>(&self, params: Params<'p>) -> Result<Self::Params<'p>, RpcError> {
        params
            .raw()
            .filter(|_| params.is_object())
            .ok_or_else(|| RpcError::invalid_params("broadcast takes an object"))
    }

    fn access<'a>(&self, params: &'a Self::Params<'_>) -> Access<'a> {
        Access::Broadcast {
            bytes: params.get().len(),
        }
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        match cx
            .node()
            .broadcast(notification::raw("broadcast", params.get()))
        {
            Delivery::Cluster => Ok(Reply::Static(r#"{"status":"broadcasted"}"#)),
            Delivery::LocalOnly => Err(RpcError::delivered_locally()),
        }
    }
}

/// `broadcast {"data"}` of the server API.
pub struct ApiBroadcast;

impl Method for ApiBroadcast {
    type Params<'p> = &'p RawValue;

    fn parse<'p>(&self, params: Params<'p>) -> Result<Self::Params<'p>, RpcError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Data<'a> {
            #[serde(borrow)]
            data: &'a RawValue,
        }
        let Data { data } = params.named()?;
        Ok(data)
    }

    fn access<'a>(&self, data: &'a Self::Params<'_>) -> Access<'a> {
        Access::Broadcast {
            bytes: data.get().len(),
        }
    }

    fn call<'p>(&self, cx: &Context<'_>, data: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        Broadcast.call(cx, data)
    }
}
