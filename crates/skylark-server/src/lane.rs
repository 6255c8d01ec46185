//! Bounded queues that hold no buffer while they are empty: every actor's
//! mailbox and a connection's two event queues.
//!
//! There is one of each per live account or connection, and most of them
//! are idle most of the time. tokio's `mpsc` allocates a block of 32 slots
//! and a cache-padded channel of about 512 bytes when it is created: about
//! 1.5 KB for an actor's mailbox and 2.6 KB for a connection's two queues,
//! paid by every idle connection. A lane is one small allocation; its buffer
//! grows while messages wait and is given back once it is drained.
//!
//! Semantics follow tokio's bounded `mpsc`: many senders, one receiver, FIFO;
//! [`Sender::send`] waits while the lane is full, [`Sender::try_send`] does
//! not; the receiver sees the end once it is closed (or every sender is
//! gone) and everything queued was received; a [`WeakSender`] does not keep
//! the lane open.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

struct State<T> {
    queue: VecDeque<T>,
    capacity: usize,
    senders: usize,
    closed: bool,
    /// The receiver, waiting for a message.
    receiving: Option<Waker>,
    /// Senders waiting for room (all are woken when room appears).
    sending: Vec<Waker>,
}

struct Shared<T>(Mutex<State<T>>);

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct Sender<T>(Arc<Shared<T>>);

/// A sender that does not keep the lane open.
pub struct WeakSender<T>(Weak<Shared<T>>);

pub struct Receiver<T>(Arc<Shared<T>>);

#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The lane holds `capacity` messages; the message is handed back.
    Full(T),
    /// The receiver is closed or gone; the message is handed back.
    Closed(T),
}

/// The lane is closed; the message is handed back.
#[derive(Debug, PartialEq, Eq)]
pub struct SendError<T>(pub T);

/// A lane that holds at most `capacity` messages at once.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let state = State {
        queue: VecDeque::new(),
        capacity: capacity.max(1),
        senders: 1,
        closed: false,
        receiving: None,
        sending: Vec::new(),
    };
    let shared = Arc::new(Shared(Mutex::new(state)));
    (Sender(shared.clone()), Receiver(shared))
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

fn remember(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        slot => *slot = Some(cx.waker().clone()),
    }
}

impl<T> Sender<T> {
    /// Messages waiting to be received now.
    pub fn queued(&self) -> usize {
        self.0.lock().queue.len()
    }

    /// Queues `message` if there is room, without waiting.
    pub fn try_send(&self, message: T) -> Result<(), TrySendError<T>> {
        let receiver = {
            let mut state = self.0.lock();
            if state.closed {
                return Err(TrySendError::Closed(message));
            }
            if state.queue.len() >= state.capacity {
                return Err(TrySendError::Full(message));
            }
            state.queue.push_back(message);
            state.receiving.take()
        };
        wake(receiver);
        Ok(())
    }

    /// Queues `message`, waiting while the lane is full. Cancel-safe in
    /// the sense that a cancelled send queued nothing.
    pub async fn send(&self, message: T) -> Result<(), SendError<T>> {
        let mut message = Some(message);
        poll_fn(|cx| {
            let mut state = self.0.lock();
            let Some(m) = message.take() else { return Poll::Ready(Ok(())) };
            if state.closed {
                return Poll::Ready(Err(SendError(m)));
            }
            if state.queue.len() >= state.capacity {
                message = Some(m);
                if !state.sending.iter().any(|w| w.will_wake(cx.waker())) {
                    state.sending.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
            state.queue.push_back(m);
            let receiver = state.receiving.take();
            drop(state);
            wake(receiver);
            Poll::Ready(Ok(()))
        })
        .await
    }

    pub fn downgrade(&self) -> WeakSender<T> {
        WeakSender(Arc::downgrade(&self.0))
    }

    /// Whether the receiver closed the lane or is gone.
    pub fn is_closed(&self) -> bool {
        self.0.lock().closed
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let receiver = {
            let mut state = self.0.lock();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            state.receiving.take()
        };
        wake(receiver);
    }
}

impl<T> WeakSender<T> {
    /// A sender, unless every sender is gone already.
    pub fn upgrade(&self) -> Option<Sender<T>> {
        let shared = self.0.upgrade()?;
        {
            let mut state = shared.lock();
            if state.senders == 0 {
                return None;
            }
            state.senders += 1;
        }
        Some(Sender(shared))
    }
}

impl<T> Clone for WeakSender<T> {
    fn clone(&self) -> Self {
        WeakSender(self.0.clone())
    }
}

impl<T> Receiver<T> {
    /// Moves up to `limit` waiting messages into `into`, waiting for at
    /// least one. Returns how many; 0 means the lane has ended (closed, or
    /// every sender gone, and nothing left). Cancel-safe.
    pub async fn recv_many(&mut self, into: &mut Vec<T>, limit: usize) -> usize {
        poll_fn(|cx| {
            self.poll_take(cx, |queue| {
                let n = limit.max(1).min(queue.len());
                into.extend(queue.drain(..n));
                n
            })
        })
        .await
        .unwrap_or(0)
    }

    /// The next message; `None` once the lane has ended. Cancel-safe.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_take(cx, |queue| queue.pop_front())).await.flatten()
    }

    /// Runs `take` on the queue once it holds something; `Ready(None)` once
    /// the lane has ended.
    fn poll_take<R>(&self, cx: &Context<'_>, take: impl FnOnce(&mut VecDeque<T>) -> R) -> Poll<Option<R>> {
        let mut state = self.0.lock();
        if state.queue.is_empty() {
            if state.closed || state.senders == 0 {
                return Poll::Ready(None);
            }
            remember(&mut state.receiving, cx);
            return Poll::Pending;
        }
        let taken = take(&mut state.queue);
        if state.queue.is_empty() {
            // Given back at once, so an idle lane holds no buffer; the cost
            // is one allocation per burst of messages.
            state.queue = VecDeque::new();
        }
        let senders = std::mem::take(&mut state.sending);
        drop(state);
        senders.into_iter().for_each(Waker::wake);
        Poll::Ready(Some(taken))
    }

    /// Refuses further messages; those queued can still be received.
    pub fn close(&mut self) {
        let senders = {
            let mut state = self.0.lock();
            state.closed = true;
            std::mem::take(&mut state.sending)
        };
        senders.into_iter().for_each(Waker::wake);
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().queue.is_empty()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Queued messages are dropped here (outside the lock), and waiting
        // senders learn that the lane is closed.
        let (queued, senders) = {
            let mut state = self.0.lock();
            state.closed = true;
            state.receiving = None;
            (std::mem::take(&mut state.queue), std::mem::take(&mut state.sending))
        };
        drop(queued);
        senders.into_iter().for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn messages_arrive_in_order_up_to_the_capacity() {
        let (tx, mut rx) = channel(3);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        tx.try_send(3).unwrap();
        assert_eq!(tx.try_send(4), Err(TrySendError::Full(4)));
        assert_eq!(tx.queued(), 3);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(tx.queued(), 2);
        tx.try_send(4).unwrap();
        let mut got = Vec::new();
        assert_eq!(rx.recv_many(&mut got, 10).await, 3);
        assert_eq!(got, [2, 3, 4]);
        assert!(rx.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send() {
        let (tx, mut rx) = channel(8);
        let waiter = tokio::spawn(async move { rx.recv().await });
        settle().await;
        assert!(!waiter.is_finished());
        tx.try_send("hello").unwrap();
        assert_eq!(waiter.await.unwrap(), Some("hello"));
    }

    #[tokio::test]
    async fn a_sender_waits_for_room() {
        let (tx, mut rx) = channel(1);
        tx.send(1).await.unwrap();
        let blocked = tokio::spawn(async move { tx.send(2).await });
        settle().await;
        assert!(!blocked.is_finished(), "the lane is full");
        assert_eq!(rx.recv().await, Some(1));
        blocked.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test]
    async fn the_lane_ends_when_every_sender_is_gone_and_it_is_drained() {
        let (tx, mut rx) = channel(8);
        let second = tx.clone();
        let weak = tx.downgrade();
        tx.try_send(7).unwrap();
        drop(tx);
        second.try_send(8).unwrap();
        drop(second);
        assert!(weak.upgrade().is_none(), "a weak sender does not revive a lane");
        assert_eq!(rx.recv().await, Some(7));
        assert_eq!(rx.recv().await, Some(8));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn the_last_sender_leaving_wakes_a_waiting_receiver() {
        let (tx, mut rx) = channel::<u8>(8);
        let waiter = tokio::spawn(async move { rx.recv().await });
        settle().await;
        drop(tx);
        assert_eq!(waiter.await.unwrap(), None);
    }

    #[tokio::test]
    async fn close_refuses_new_messages_but_keeps_queued_ones() {
        let (tx, mut rx) = channel(1);
        tx.send(1).await.unwrap();
        let other = tx.clone();
        let blocked = tokio::spawn(async move { other.send(2).await });
        settle().await;
        rx.close();
        assert_eq!(blocked.await.unwrap(), Err(SendError(2)), "a waiting sender learns of the close");
        assert_eq!(tx.try_send(3), Err(TrySendError::Closed(3)));
        assert!(tx.is_closed());
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_weak_sender_works_while_a_strong_one_lives() {
        let (tx, mut rx) = channel(8);
        let weak = tx.downgrade();
        weak.upgrade().unwrap().send(5).await.unwrap();
        assert_eq!(rx.recv().await, Some(5));
        drop(tx);
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn sending_to_a_dropped_receiver_fails_and_drops_what_was_queued() {
        let (tx, rx) = channel(8);
        let message = Arc::new(());
        tx.try_send(message.clone()).unwrap();
        assert_eq!(Arc::strong_count(&message), 2);
        drop(rx);
        assert_eq!(Arc::strong_count(&message), 1, "queued messages go with the receiver");
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(message), Err(TrySendError::Closed(_))));
    }

    #[tokio::test]
    async fn a_drained_lane_gives_its_grown_buffer_back() {
        let (tx, mut rx) = channel(1000);
        for i in 0..500 {
            tx.try_send(i).unwrap();
        }
        assert!(tx.0.lock().queue.capacity() >= 500);
        let mut got = Vec::new();
        while got.len() < 500 {
            rx.recv_many(&mut got, 64).await;
        }
        assert_eq!(got, (0..500).collect::<Vec<_>>());
        assert_eq!(tx.0.lock().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn many_senders_under_back_pressure_lose_nothing() {
        let (tx, mut rx) = channel(4);
        let mut tasks = Vec::new();
        for s in 0..8u32 {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u32 {
                    tx.send((s, i)).await.unwrap();
                }
            }));
        }
        drop(tx);
        let mut last = [None::<u32>; 8];
        let mut count = 0;
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, 3).await > 0 {
            for (s, i) in batch.drain(..) {
                assert!(last[s as usize].is_none_or(|l| l + 1 == i), "each sender's order is kept");
                last[s as usize] = Some(i);
                count += 1;
            }
        }
        assert_eq!(count, 8 * 200);
        for t in tasks {
            t.await.unwrap();
        }
    }
}
