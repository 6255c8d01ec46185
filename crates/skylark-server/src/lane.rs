//! A bounded queue from the server to one connection, with one sender and
//! one receiver, that holds no buffer while it is empty.
//!
//! Every live connection has two of these (its account's log events and its
//! presence and typing events), and most connections are idle most of the
//! time. tokio's `mpsc` allocates its first block of 32 slots and a
//! cache-padded channel of about 512 bytes when it is created, which cost an
//! idle connection about 2.6 KB for the two queues. A lane is one small
//! allocation; its buffer grows when events are queued and is given back
//! once it is drained.
//!
//! Senders never wait: `try_send` fails with [`Full`](TrySendError::Full)
//! when the receiver is `capacity` events behind, which both users handle
//! (the actor by pausing the device's feed, presence by dropping the event).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

/// A buffer that grew past this many events is freed once it is empty, so
/// a burst does not cost an idle connection memory for the rest of its life.
const KEEP_BUFFER: usize = 32;

struct State<T> {
    queue: VecDeque<T>,
    capacity: usize,
    waiting: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

struct Shared<T>(Mutex<State<T>>);

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending half; not `Clone` (each queue has one writer).
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving half.
pub struct Receiver<T>(Arc<Shared<T>>);

#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// `capacity` events are waiting; the event is handed back.
    Full(T),
    /// The receiver is gone; the event is handed back.
    Closed(T),
}

/// A lane that holds at most `capacity` events at once.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let state = State {
        queue: VecDeque::new(),
        capacity: capacity.max(1),
        waiting: None,
        sender_gone: false,
        receiver_gone: false,
    };
    let shared = Arc::new(Shared(Mutex::new(state)));
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    pub fn try_send(&self, event: T) -> Result<(), TrySendError<T>> {
        let waiting = {
            let mut state = self.0.lock();
            if state.receiver_gone {
                return Err(TrySendError::Closed(event));
            }
            if state.queue.len() >= state.capacity {
                return Err(TrySendError::Full(event));
            }
            state.queue.push_back(event);
            state.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
        Ok(())
    }

    /// Whether the receiver was dropped.
    pub fn is_closed(&self) -> bool {
        self.0.lock().receiver_gone
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.0.lock();
            state.sender_gone = true;
            state.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// The next event, or `None` once the sender is gone and every event it
    /// queued was received. Cancel-safe: an event is taken only when this
    /// returns it.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            let mut state = self.0.lock();
            if let Some(event) = state.queue.pop_front() {
                if state.queue.is_empty() && state.queue.capacity() > KEEP_BUFFER {
                    state.queue = VecDeque::new();
                }
                return Poll::Ready(Some(event));
            }
            if state.sender_gone {
                return Poll::Ready(None);
            }
            match &mut state.waiting {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// An event if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<T> {
        let mut state = self.0.lock();
        let event = state.queue.pop_front();
        if state.queue.is_empty() && state.queue.capacity() > KEEP_BUFFER {
            state.queue = VecDeque::new();
        }
        event
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Events still queued are dropped here, not when the sender goes.
        let queued = {
            let mut state = self.0.lock();
            state.receiver_gone = true;
            state.waiting = None;
            std::mem::take(&mut state.queue)
        };
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn events_arrive_in_order_and_the_sender_waits_for_nobody() {
        let (tx, mut rx) = channel(3);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        tx.try_send(3).unwrap();
        assert_eq!(tx.try_send(4), Err(TrySendError::Full(4)));
        assert_eq!(rx.recv().await, Some(1));
        tx.try_send(4).unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(rx.recv().await, Some(4));
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send() {
        let (tx, mut rx) = channel(8);
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        tx.try_send("hello").unwrap();
        assert_eq!(waiter.await.unwrap(), Some("hello"));
    }

    #[tokio::test]
    async fn the_receiver_drains_what_was_queued_before_the_sender_left() {
        let (tx, mut rx) = channel(8);
        tx.try_send(7).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(7));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_dropped_sender_wakes_a_waiting_receiver() {
        let (tx, mut rx) = channel::<u8>(8);
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        assert_eq!(waiter.await.unwrap(), None);
    }

    #[test]
    fn sending_to_a_dropped_receiver_fails_and_hands_the_event_back() {
        let (tx, rx) = channel(8);
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(5), Err(TrySendError::Closed(5)));
    }

    #[tokio::test]
    async fn a_drained_lane_gives_its_grown_buffer_back() {
        let (tx, mut rx) = channel(1000);
        for i in 0..500 {
            tx.try_send(i).unwrap();
        }
        assert!(tx.0.lock().queue.capacity() >= 500);
        for i in 0..500 {
            assert_eq!(rx.recv().await, Some(i));
        }
        assert_eq!(tx.0.lock().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn queued_events_are_dropped_with_the_receiver() {
        let (tx, rx) = channel(8);
        let event = Arc::new(());
        tx.try_send(event.clone()).unwrap();
        assert_eq!(Arc::strong_count(&event), 2);
        drop(rx);
        assert_eq!(Arc::strong_count(&event), 1);
    }
}
