//! The history scenarios against the in-process store.

mod history_suite;

use std::sync::Arc;

use chorus_pubsub::history::memory::MemoryHistory;
use history_suite::Stores;

async fn fresh() -> Stores {
    let store = MemoryHistory::new();
    let lost = store.clone();
    Stores {
        a: Arc::new(store.clone()),
        b: Arc::new(store),
        lose_everything: Box::new(move || {
            lost.lose_everything();
            Box::pin(async {})
        }),
        guard: None,
    }
}

history_suite!(fresh());
