//! The presence scenarios against the in-process store.

mod presence_suite;

use std::sync::Arc;

use chorus_pubsub::presence::memory::MemoryPresence;
use presence_suite::Stores;

async fn fresh() -> Stores {
    let store = MemoryPresence::new();
    Stores {
        a: Arc::new(store.clone()),
        b: Arc::new(store),
        guard: None,
    }
}

presence_suite!(fresh());
