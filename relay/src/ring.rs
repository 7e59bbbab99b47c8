//! A bounded broadcast ring: one writer, any number of readers, bounded both in items and in
//! bytes, and holding only what some reader has still to take.
//!
//! Each run's live feed is one ring shared by all of its clients. Pushing never waits for a
//! reader: when the ring is over either bound, the oldest items are dropped, and a reader that
//! had not taken them is told it lagged ([`TryRecvError::Lagged`]) and continues from the
//! oldest item still held (the relay's clients then catch up from the Redis stream). So the
//! ring's memory is at most `max_bytes` (by the weights the writer gives, plus one item), however
//! many clients read slowly, and no client can slow the writer down. An item every reader has
//! taken is let go at once (a new reader starts with the items pushed after it came), so a
//! run whose clients keep up holds next to nothing, however many runs a relay follows.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Why [`RingReader::try_recv`] returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing new yet.
    Empty,
    /// Items this reader had not taken were dropped (how many); the next call continues
    /// with the oldest item still held.
    Lagged(u64),
}

struct State<T> {
    items: VecDeque<Slot<T>>,
    /// Index of `items[0]` in the sequence of everything ever pushed.
    first: u64,
    bytes: usize,
    /// Readers there are now.
    readers: usize,
}

struct Slot<T> {
    item: Arc<T>,
    weight: usize,
    /// Readers that have yet to take this item.
    unread: usize,
}

impl<T> State<T> {
    /// Drops the oldest item.
    fn pop(&mut self) {
        if let Some(slot) = self.items.pop_front() {
            self.bytes -= slot.weight;
            self.first += 1;
        }
    }

    /// Drops the oldest items while every reader has taken them.
    fn let_go_of_taken(&mut self) {
        while self.items.front().is_some_and(|s| s.unread == 0) {
            self.pop();
        }
    }
}

/// The shared ring; push with [`Ring::push`], read through [`Ring::reader`].
pub struct Ring<T> {
    state: Mutex<State<T>>,
    notify: Notify,
    max_items: usize,
    max_bytes: usize,
}

impl<T> Ring<T> {
    /// A ring that holds at most `max_items` items and `max_bytes` of weight (it always keeps
    /// the newest item, even a heavier one).
    pub fn new(max_items: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                first: 0,
                bytes: 0,
                readers: 0,
            }),
            notify: Notify::new(),
            max_items: max_items.max(1),
            max_bytes: max_bytes.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an item of the given weight (bytes), dropping the oldest items beyond the
    /// bounds, and wakes the readers. With no reader, the item is let go at once.
    pub fn push(&self, item: T, weight: usize) {
        {
            let mut s = self.lock();
            if s.readers == 0 {
                s.first += 1 + s.items.len() as u64;
                s.items.clear();
                s.bytes = 0;
                return;
            }
            let unread = s.readers;
            s.items.push_back(Slot {
                item: Arc::new(item),
                weight,
                unread,
            });
            s.bytes += weight;
            while s.items.len() > 1 && (s.items.len() > self.max_items || s.bytes > self.max_bytes)
            {
                s.pop();
            }
        }
        self.notify.notify_waiters();
    }

    /// The weight held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Items held now.
    pub fn items_held(&self) -> usize {
        self.lock().items.len()
    }

    /// A reader that sees every item pushed from now on.
    pub fn reader(self: &Arc<Self>) -> RingReader<T> {
        let next = {
            let mut s = self.lock();
            s.readers += 1;
            s.first + s.items.len() as u64
        };
        RingReader {
            ring: self.clone(),
            next,
        }
    }
}

/// One reader's position in a [`Ring`].
pub struct RingReader<T> {
    ring: Arc<Ring<T>>,
    next: u64,
}

impl<T> RingReader<T> {
    /// The next item, if there is one.
    pub fn try_recv(&mut self) -> Result<Arc<T>, TryRecvError> {
        take_next(&self.ring, &mut self.next)
    }

    /// Waits for the next item (or for the news that this reader lagged).
    pub async fn recv(&mut self) -> Result<Arc<T>, TryRecvError> {
        loop {
            let notified = self.ring.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so a push between the look and the wait wakes us.
            notified.as_mut().enable();
            match take_next(&self.ring, &mut self.next) {
                Err(TryRecvError::Empty) => notified.await,
                other => return other,
            }
        }
    }
}

impl<T> Drop for RingReader<T> {
    fn drop(&mut self) {
        let mut s = self.ring.lock();
        s.readers -= 1;
        let from = self.next.saturating_sub(s.first) as usize;
        for slot in s.items.iter_mut().skip(from) {
            slot.unread -= 1;
        }
        s.let_go_of_taken();
    }
}

/// The item at `next` in `ring`, moving `next` on (a reader's step; a free function so that
/// [`RingReader::recv`] can look while it holds its registration with the ring's `Notify`).
fn take_next<T>(ring: &Ring<T>, next: &mut u64) -> Result<Arc<T>, TryRecvError> {
    let mut s = ring.lock();
    if *next < s.first {
        let missed = s.first - *next;
        *next = s.first;
        return Err(TryRecvError::Lagged(missed));
    }
    let at = (*next - s.first) as usize;
    let Some(slot) = s.items.get_mut(at) else {
        return Err(TryRecvError::Empty);
    };
    *next += 1;
    slot.unread -= 1;
    let item = slot.item.clone();
    if at == 0 {
        s.let_go_of_taken();
    }
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_is_bounded_in_bytes_and_laggards_are_told() {
        let ring = Ring::new(100, 1000);
        let mut slow = ring.reader();
        let mut fast = ring.reader();
        for i in 0..10u32 {
            ring.push(i, 300);
            assert_eq!(*fast.try_recv().unwrap(), i);
        }
        assert!(ring.bytes() <= 1000, "{}", ring.bytes());
        assert_eq!(slow.try_recv(), Err(TryRecvError::Lagged(7)));
        assert_eq!(*slow.try_recv().unwrap(), 7);
        assert_eq!(fast.try_recv(), Err(TryRecvError::Empty));
        // One item heavier than the whole budget is still delivered.
        ring.push(99, 5000);
        assert_eq!(*fast.try_recv().unwrap(), 99);
        assert_eq!(ring.bytes(), 5000);
        // The item bound holds too.
        let small = Ring::new(3, usize::MAX);
        let mut r = small.reader();
        for i in 0..5u32 {
            small.push(i, 1);
        }
        assert_eq!(r.try_recv(), Err(TryRecvError::Lagged(2)));
    }

    #[test]
    fn items_every_reader_has_taken_are_let_go() {
        let ring = Ring::new(100, 1000);
        // Nobody to read them: nothing is kept.
        ring.push(0u32, 10);
        assert_eq!((ring.items_held(), ring.bytes()), (0, 0));
        let mut fast = ring.reader();
        let mut slow = ring.reader();
        for i in 1..=3u32 {
            ring.push(i, 10);
            assert_eq!(*fast.try_recv().unwrap(), i);
        }
        assert_eq!((ring.items_held(), ring.bytes()), (3, 30));
        assert_eq!(*slow.try_recv().unwrap(), 1);
        assert_eq!(*slow.try_recv().unwrap(), 2);
        assert_eq!((ring.items_held(), ring.bytes()), (1, 10));
        // A reader that joins now sees only what comes next, and holds nothing back.
        let mut late = ring.reader();
        ring.push(4, 10);
        assert_eq!(*late.try_recv().unwrap(), 4);
        assert_eq!(*fast.try_recv().unwrap(), 4);
        assert_eq!(ring.items_held(), 2);
        // A reader that leaves no longer holds back what it had not taken.
        drop(slow);
        assert_eq!((ring.items_held(), ring.bytes()), (0, 0));
        assert_eq!(fast.try_recv(), Err(TryRecvError::Empty));
        drop(late);
        ring.push(5, 10);
        assert_eq!(*fast.try_recv().unwrap(), 5);
        assert_eq!(ring.items_held(), 0);
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_on_push() {
        let ring = Ring::new(10, 10);
        let mut r = ring.reader();
        let writer = {
            let ring = ring.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                ring.push(5u8, 1);
            })
        };
        assert_eq!(*r.recv().await.unwrap(), 5);
        writer.await.unwrap();
    }
}
