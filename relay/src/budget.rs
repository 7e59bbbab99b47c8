//! A relay-wide byte budget: what every SSE connection together may hold of replay pages.
//!
//! A connection reserves an estimate before it reads a page from Redis and holds the
//! reservation, set to the page's real size, until it has written the page out. When the
//! budget is spent, readers wait (their clients get keep-alives and live entries meanwhile);
//! so the relay's replay memory is at most the budget, however many clients replay at once.
//! One reservation larger than the whole budget is let through alone, so that nothing waits
//! forever; a page found larger than its estimate keeps its real size (the budget is then over
//! by that page, until it is written out).

use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub struct ByteBudget {
    limit: usize,
    used: Mutex<usize>,
    freed: Notify,
}

/// A reservation; returned to the budget when dropped.
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            used: Mutex::new(0),
            freed: Notify::new(),
        })
    }

    fn used(&self) -> std::sync::MutexGuard<'_, usize> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> usize {
        *self.used()
    }

    /// Waits until `bytes` fit in the budget (or nothing else is reserved) and reserves them.
    pub async fn reserve(self: &Arc<Self>, bytes: usize) -> Reservation {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut used = self.used();
                if *used == 0 || *used + bytes <= self.limit {
                    *used += bytes;
                    return Reservation {
                        budget: self.clone(),
                        bytes,
                    };
                }
            }
            freed.await;
        }
    }
}

impl Reservation {
    /// Sets the reservation to what was really read.
    pub fn resize(&mut self, bytes: usize) {
        let mut used = self.budget.used();
        *used = *used - self.bytes + bytes;
        let shrank = bytes < self.bytes;
        self.bytes = bytes;
        drop(used);
        if shrank {
            self.budget.freed.notify_waiters();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        *self.budget.used() -= self.bytes;
        self.budget.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_room_and_give_it_back() {
        let budget = ByteBudget::new(100);
        let mut a = budget.reserve(60).await;
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(60).await.bytes })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        a.resize(30);
        assert_eq!(waiting.await.unwrap(), 60);
        assert_eq!(budget.in_use(), 30);
        drop(a);
        assert_eq!(budget.in_use(), 0);
        // Alone, a reservation over the whole budget goes through.
        let big = budget.reserve(500).await;
        assert_eq!(budget.in_use(), 500);
        drop(big);
    }
}
