//! The router: method names to handlers, and one text message in to at most one text
//! reply out (now, or later when a call answers later), batches included.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_gate::RequestVerdict;
use futures_util::future::join_all;
use serde_json::value::RawValue;

use crate::context::{CallOutcome, CallRecord, Context, Effect, Observer, Reply};
use crate::error::{ErrorCode, RpcError};
use crate::method::{Handler, Method};
use crate::params::Params;
use crate::request::{Call, Entry, Message, parse_with_limit};
use crate::response::{write_error, write_result};

/// Method label for requests that never reached a handler.
const INVALID: &str = "invalid";
/// Method label for names nobody registered (kept bounded for metrics).
const UNKNOWN: &str = "unknown";
/// Method label for calls relayed to the application's backend.
pub const PROXIED: &str = "proxied";

/// A reply that is not ready yet.
pub type LaterMessage = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// What a deferred message comes to: the reply text (`None` when nothing is owed after
/// all: notifications only), and what to do once it is queued.
pub struct Answer {
    pub text: Option<String>,
    pub effects: Vec<Effect>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("text", &self.text)
            .field("effects", &self.effects.len())
            .finish()
    }
}

/// One deferred call's response and effect.
type LaterPiece = Pin<Box<dyn Future<Output = (Option<String>, Option<Effect>)> + Send>>;

/// What became of one inbound message.
pub enum Handled {
    /// Nothing is owed (notifications only).
    Nothing,
    /// The reply, ready now.
    Now(String),
    /// Some calls answer later; `calls` of them are pending inside `reply`.
    Later { reply: LaterMessage, calls: usize },
    /// The client floods past its request budget: close the connection (1008).
    Flooding,
}

impl std::fmt::Debug for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nothing => f.write_str("Nothing"),
            Self::Now(text) => f.debug_tuple("Now").field(text).finish(),
            Self::Later { calls, .. } => f.debug_struct("Later").field("calls", calls).finish(),
            Self::Flooding => f.write_str("Flooding"),
        }
    }
}

/// One element's response.
enum Piece {
    /// A notification: nothing owed.
    None,
    Now(String),
    Later(LaterPiece),
}

/// Method names to handlers, sorted by name: a binary search over a dozen names is
/// cheaper than hashing the name of every call.
#[derive(Default)]
pub struct Router {
    methods: Vec<(&'static str, Arc<dyn Handler>)>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("methods", &self.method_names())
            .finish()
    }
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, name: &'static str, method: impl Method) -> &mut Self {
        let handler: Arc<dyn Handler> = Arc::new(method);
        match self.find(name) {
            Ok(index) => self.methods[index].1 = handler,
            Err(index) => self.methods.insert(index, (name, handler)),
        }
        self
    }

    /// The registered method names, sorted.
    pub fn method_names(&self) -> Vec<&'static str> {
        self.methods.iter().map(|(name, _)| *name).collect()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.methods
            .binary_search_by(|(registered, _)| (*registered).cmp(name))
    }

    fn get(&self, name: &str) -> Option<&(&'static str, Arc<dyn Handler>)> {
        self.find(name).ok().map(|index| &self.methods[index])
    }

    /// Handles one text message.
    ///
    /// Every call (each element of a batch) is admitted by the caller's request budget
    /// first. The reply to one message is bounded by the caller's send budget: a
    /// response that would take it past the budget is replaced by `-32013`, and so is
    /// every later element of the batch, which is then not executed.
    pub fn handle(&self, text: &str, cx: &Context<'_>) -> Handled {
        let max_batch = cx.services.gate.limits().max_batch;
        let observer = &cx.services.observer;
        let mut budget = ReplyBudget::new(cx.caller.reply_budget());
        match parse_with_limit(text, max_batch) {
            Message::Single(entry) => match self.entry(entry, cx, &mut budget) {
                Err(Flooding) => Handled::Flooding,
                Ok(Piece::None) => Handled::Nothing,
                Ok(Piece::Now(text)) => Handled::Now(text),
                Ok(Piece::Later(reply)) => Handled::Later {
                    reply: Box::pin(async move {
                        let (text, effect) = reply.await;
                        Answer {
                            text,
                            effects: effect.into_iter().collect(),
                        }
                    }),
                    calls: 1,
                },
            },
            Message::Batch(entries) => {
                let mut pieces = Vec::with_capacity(entries.len());
                for entry in entries {
                    match self.entry(entry, cx, &mut budget) {
                        Err(Flooding) => return Handled::Flooding,
                        Ok(piece) => pieces.push(piece),
                    }
                }
                batch(pieces, budget.limit, observer)
            }
            Message::Rejected(error) => rejected(&error, cx),
            Message::TooLong(limit) => rejected(&RpcError::batch_too_long(limit), cx),
        }
    }

    /// One element: admitted, executed (unless the reply budget is spent), answered.
    fn entry(
        &self,
        entry: Entry<'_>,
        cx: &Context<'_>,
        budget: &mut ReplyBudget,
    ) -> Result<Piece, Flooding> {
        let id = match &entry {
            Entry::Call(call) => call.id,
            Entry::Invalid { id, .. } => *id,
        };
        let owes_reply = id.is_some() || matches!(entry, Entry::Invalid { .. });
        match cx.caller.admit_request() {
            RequestVerdict::Allowed => {}
            RequestVerdict::Flooding => return Err(Flooding),
            RequestVerdict::Refused(refusal) => {
                if let Some(scope) = refusal.scope() {
                    cx.services.observer.rate_limited(scope);
                }
                let error = RpcError::refused(&refusal, None);
                record(
                    cx.services.observer.as_ref(),
                    method_of(&entry, self),
                    &error,
                    Duration::ZERO,
                );
                return Ok(if owes_reply {
                    Piece::Now(budget.fit(error_text(id, &error), id, cx))
                } else {
                    Piece::None
                });
            }
        }
        if budget.spent {
            // An earlier element used up the reply budget: not executed.
            return Ok(if owes_reply {
                cx.services.observer.reply_cut();
                Piece::Now(error_text(id, &RpcError::reply_too_large(budget.limit)))
            } else {
                Piece::None
            });
        }
        let piece = match entry {
            Entry::Invalid { id, error } => {
                record(
                    cx.services.observer.as_ref(),
                    INVALID,
                    &error,
                    Duration::ZERO,
                );
                Piece::Now(error_text(id, &error))
            }
            Entry::Call(call) => self.call(call, cx),
        };
        Ok(match piece {
            Piece::Now(text) => Piece::Now(budget.fit(text, id, cx)),
            other => other,
        })
    }

    fn call(&self, call: Call<'_>, cx: &Context<'_>) -> Piece {
        let started = Instant::now();
        let observer = cx.services.observer.as_ref();
        let (method, result) = match self.get(call.method.as_ref()) {
            Some((name, handler)) => (*name, handler.dispatch(handler, cx, Params(call.params))),
            None => match cx
                .services
                .backend
                .as_ref()
                .and_then(|backend| backend.rpc(cx.caller, &call.method, call.params, call.id))
            {
                Some(relayed) => (PROXIED, Ok(Reply::Later(relayed))),
                None => (
                    UNKNOWN,
                    Err(RpcError::with_detail(
                        ErrorCode::MethodNotFound,
                        truncated(&call.method),
                    )),
                ),
            },
        };
        let result = match result {
            // An effect needs the deferred path, which runs it after the reply.
            Ok(reply @ Reply::Then(..)) => match reply.into_owned() {
                Ok(owned) => Ok(Reply::later(std::future::ready(Ok(owned)))),
                Err(error) => Err(error),
            },
            other => other,
        };
        let reply = match result {
            Ok(Reply::Later(later)) => {
                let id: Option<Box<RawValue>> = call.id.map(RawValue::to_owned);
                let observer = Arc::clone(&cx.services.observer);
                let limit = cx.caller.reply_budget();
                return Piece::Later(Box::pin(async move {
                    let result = later.await;
                    observer.record(CallRecord {
                        method,
                        outcome: outcome(&result),
                        elapsed: started.elapsed(),
                    });
                    let (result, effect) = match result {
                        Ok(reply) => {
                            let (reply, effect) = reply.split();
                            (Ok(reply), effect)
                        }
                        Err(error) => (Err(error), None),
                    };
                    let Some(id) = id else {
                        return (None, effect);
                    };
                    let text = response_text(Some(&id), result);
                    let text = if text.len() > limit {
                        observer.reply_cut();
                        error_text(Some(&id), &RpcError::reply_too_large(limit))
                    } else {
                        text
                    };
                    (Some(text), effect)
                }));
            }
            now => now,
        };
        observer.record(CallRecord {
            method,
            outcome: outcome(&reply),
            elapsed: started.elapsed(),
        });
        match call.id {
            Some(id) => Piece::Now(response_text(Some(id), reply)),
            None => Piece::None,
        }
    }
}

/// The request budget said the client floods.
struct Flooding;

/// What is left of the caller's send budget for the reply to one message.
struct ReplyBudget {
    limit: usize,
    used: usize,
    spent: bool,
}

impl ReplyBudget {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            used: 0,
            spent: false,
        }
    }

    /// `text`, or `-32013` in its place when it does not fit what is left.
    fn fit(&mut self, text: String, id: Option<&RawValue>, cx: &Context<'_>) -> String {
        if !self.spent && self.used + text.len() < self.limit {
            self.used += text.len() + 1;
            return text;
        }
        self.spent = true;
        cx.services.observer.reply_cut();
        error_text(id, &RpcError::reply_too_large(self.limit))
    }
}

/// Joins a batch's responses into one array, now or once every deferred one is in.
fn batch(pieces: Vec<Piece>, limit: usize, observer: &Arc<dyn Observer>) -> Handled {
    let calls = pieces
        .iter()
        .filter(|piece| matches!(piece, Piece::Later(_)))
        .count();
    if calls == 0 {
        let texts: Vec<String> = pieces
            .into_iter()
            .filter_map(|piece| match piece {
                Piece::Now(text) => Some(text),
                Piece::None | Piece::Later(_) => None,
            })
            .collect();
        return if texts.is_empty() {
            Handled::Nothing
        } else {
            Handled::Now(join(&texts))
        };
    }
    let observer = Arc::clone(observer);
    let reply = Box::pin(async move {
        let mut ready = Vec::new();
        let mut later = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Now(text) => ready.push(text),
                Piece::Later(future) => later.push(future),
                Piece::None => {}
            }
        }
        let mut used: usize = ready.iter().map(|text| text.len() + 1).sum();
        let mut effects = Vec::new();
        for (text, effect) in join_all(later).await {
            effects.extend(effect);
            let Some(text) = text else { continue };
            if used + text.len() < limit {
                used += text.len() + 1;
                ready.push(text);
            } else {
                observer.reply_cut();
                ready.push(cut_text(&text, limit));
            }
        }
        Answer {
            text: (!ready.is_empty()).then(|| join(&ready)),
            effects,
        }
    });
    Handled::Later { reply, calls }
}

fn join(texts: &[String]) -> String {
    let mut out = String::with_capacity(texts.iter().map(|text| text.len() + 1).sum::<usize>() + 1);
    out.push('[');
    for (index, text) in texts.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        out.push_str(text);
    }
    out.push(']');
    out
}

/// `-32013` for a deferred response that did not fit, keeping its id.
fn cut_text(response: &str, limit: usize) -> String {
    #[derive(serde::Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
    }
    let id = serde_json::from_str::<IdOnly<'_>>(response)
        .ok()
        .and_then(|only| only.id);
    error_text(id, &RpcError::reply_too_large(limit))
}

/// The answer to a message that is not a batch of calls (unreadable, empty, too long).
fn rejected(error: &RpcError, cx: &Context<'_>) -> Handled {
    if let RequestVerdict::Flooding = cx.caller.admit_request() {
        return Handled::Flooding;
    }
    record(
        cx.services.observer.as_ref(),
        INVALID,
        error,
        Duration::ZERO,
    );
    Handled::Now(error_text(None, error))
}

fn method_of(entry: &Entry<'_>, router: &Router) -> &'static str {
    match entry {
        Entry::Call(call) => router
            .get(call.method.as_ref())
            .map_or(UNKNOWN, |(name, _)| *name),
        Entry::Invalid { .. } => INVALID,
    }
}

fn record(observer: &dyn Observer, method: &'static str, error: &RpcError, elapsed: Duration) {
    observer.record(CallRecord {
        method,
        outcome: CallOutcome::Error(error.code),
        elapsed,
    });
}

fn outcome<T>(result: &Result<T, RpcError>) -> CallOutcome {
    match result {
        Ok(_) => CallOutcome::Ok,
        Err(error) => CallOutcome::Error(error.code),
    }
}

fn response_text(id: Option<&RawValue>, result: Result<Reply<'_>, RpcError>) -> String {
    let result_len = match &result {
        Ok(Reply::Raw(raw)) => raw.get().len(),
        Ok(Reply::Static(text)) => text.len(),
        Ok(Reply::Text(text)) => text.len(),
        _ => 64,
    };
    let mut out = String::with_capacity(40 + result_len + id.map_or(4, |id| id.get().len()));
    match result {
        Ok(reply) => match id {
            Some(id) => write_result(&mut out, id, &reply),
            None => write_error(&mut out, None, &RpcError::new(ErrorCode::Internal)),
        },
        Err(error) => write_error(&mut out, id, &error),
    }
    out
}

fn error_text(id: Option<&RawValue>, error: &RpcError) -> String {
    let mut out = String::with_capacity(96 + error.message.len());
    write_error(&mut out, id, error);
    out
}

/// A method name as quoted back in an error: bounded, so a huge name is not echoed.
fn truncated(name: &str) -> &str {
    let mut end = name.len().min(64);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}
