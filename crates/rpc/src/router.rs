//! The router: method names to handlers, and one text message in to at most one text
//! reply out, batches included.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chorus_hub::ClientHandle;
use serde_json::value::RawValue;

use crate::error::{ErrorCode, RpcError};
use crate::node::Node;
use crate::params::Params;
use crate::request::{Call, Entry, Message, parse};
use crate::response::{write_error, write_result};

/// Method label for requests that never reached a handler.
const INVALID: &str = "invalid";
/// Method label for names nobody registered (kept bounded for metrics).
const UNKNOWN: &str = "unknown";

/// What a handler sees of the call's surroundings.
pub struct Context<'a> {
    pub client: &'a ClientHandle,
    pub node: &'a dyn Node,
}

/// A successful result.
#[derive(Debug)]
pub enum Reply<'p> {
    /// JSON taken from the request as is (e.g. `self.reply` echoing params).
    Raw(&'p RawValue),
    /// A constant JSON text.
    Static(&'static str),
    Json(serde_json::Value),
}

/// One method. Handlers run on the connection's task and must not block: anything
/// slow is queued elsewhere (the hub and backbone APIs never wait).
pub trait Handler: Send + Sync + 'static {
    fn call<'p>(&self, cx: &Context<'_>, params: Params<'p>) -> Result<Reply<'p>, RpcError>;
}

/// How a call ended, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    Error(ErrorCode),
}

impl CallOutcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error(_) => "error",
        }
    }
}

/// One finished call.
#[derive(Clone, Copy, Debug)]
pub struct CallRecord {
    /// A registered method name, `unknown` or `invalid`: always a bounded set.
    pub method: &'static str,
    pub outcome: CallOutcome,
    pub elapsed: Duration,
}

/// Receives a record of every call (the server turns them into metrics).
pub trait Observer {
    fn record(&self, record: CallRecord);
}

/// An [`Observer`] that ignores everything.
#[derive(Debug, Default)]
pub struct NoObserver;
impl Observer for NoObserver {
    fn record(&self, _: CallRecord) {}
}

/// Method names to handlers.
#[derive(Default)]
pub struct Router {
    methods: HashMap<&'static str, Box<dyn Handler>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.methods.keys().collect();
        names.sort();
        f.debug_struct("Router").field("methods", &names).finish()
    }
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, name: &'static str, handler: impl Handler) -> &mut Self {
        self.methods.insert(name, Box::new(handler));
        self
    }

    /// The registered method names, sorted.
    pub fn method_names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.methods.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// Handles one text message; returns the reply text, or `None` when nothing is
    /// owed (notifications only).
    pub fn handle(&self, text: &str, cx: &Context<'_>, observer: &dyn Observer) -> Option<String> {
        match parse(text) {
            Message::Single(entry) => {
                let mut out = String::new();
                self.entry(entry, cx, observer, &mut out).then_some(out)
            }
            Message::Batch(entries) => {
                let mut out = String::from("[");
                let mut answered = false;
                for entry in entries {
                    let mark = out.len();
                    if answered {
                        out.push(',');
                    }
                    if self.entry(entry, cx, observer, &mut out) {
                        answered = true;
                    } else {
                        out.truncate(mark);
                    }
                }
                out.push(']');
                answered.then_some(out)
            }
            Message::Rejected(error) => {
                observer.record(CallRecord {
                    method: INVALID,
                    outcome: CallOutcome::Error(error.code),
                    elapsed: Duration::ZERO,
                });
                let mut out = String::new();
                write_error(&mut out, None, &error);
                Some(out)
            }
        }
    }

    /// Writes the entry's response into `out`; returns false when none is owed.
    fn entry(
        &self,
        entry: Entry<'_>,
        cx: &Context<'_>,
        observer: &dyn Observer,
        out: &mut String,
    ) -> bool {
        match entry {
            Entry::Invalid { id, error } => {
                observer.record(CallRecord {
                    method: INVALID,
                    outcome: CallOutcome::Error(error.code),
                    elapsed: Duration::ZERO,
                });
                write_error(out, id, &error);
                true
            }
            Entry::Call(call) => self.call(call, cx, observer, out),
        }
    }

    fn call(
        &self,
        call: Call<'_>,
        cx: &Context<'_>,
        observer: &dyn Observer,
        out: &mut String,
    ) -> bool {
        let started = Instant::now();
        let (method, result) = match self.methods.get_key_value(call.method.as_ref()) {
            Some((name, handler)) => (*name, handler.call(cx, Params(call.params))),
            None => (
                UNKNOWN,
                Err(RpcError::with_detail(
                    ErrorCode::MethodNotFound,
                    truncated(&call.method),
                )),
            ),
        };
        observer.record(CallRecord {
            method,
            outcome: match &result {
                Ok(_) => CallOutcome::Ok,
                Err(error) => CallOutcome::Error(error.code),
            },
            elapsed: started.elapsed(),
        });
        let Some(id) = call.id else {
            return false;
        };
        match result {
            Ok(reply) => write_result(out, id, &reply),
            Err(error) => write_error(out, Some(id), &error),
        }
        true
    }
}

/// A method name as quoted back in an error: bounded, so a huge name is not echoed.
fn truncated(name: &str) -> &str {
    let mut end = name.len().min(64);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}
