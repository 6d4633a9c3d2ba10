//! A bounded set of recently seen message ids, so a message that reaches a replica
//! twice (a redelivery, an overlapping subscription) is delivered once.

use std::collections::{HashSet, VecDeque};

use crate::envelope::MessageId;

/// Remembers the last `capacity` ids; older ones are forgotten first.
#[derive(Debug)]
pub struct RecentIds {
    seen: HashSet<MessageId>,
    order: VecDeque<MessageId>,
    capacity: usize,
}

impl RecentIds {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            seen: HashSet::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Records `id`; returns false when it was already among the recent ones.
    pub fn insert(&mut self, id: MessageId) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.order.push_back(id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::RecentIds;

    #[test]
    fn drops_repeats_and_forgets_the_oldest() {
        let mut recent = RecentIds::new(2);
        assert!(recent.insert(1));
        assert!(!recent.insert(1));
        assert!(recent.insert(2));
        assert!(recent.insert(3));
        assert!(recent.insert(1), "1 was evicted by 3");
        assert!(!recent.insert(3));
    }
}
