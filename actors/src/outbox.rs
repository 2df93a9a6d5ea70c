//! A connection's outbound queue as the rest of the tree sees it: bounded, never awaited.
//! Producers (live queries, call rooms, the connection itself) `send` encoded frames; when the
//! queue is full (in frames or in bytes) the connection is marked overflowed and its writer closes it with a reason, so a
//! slow client can neither block a fan-out nor grow memory.
//!
//! The queue is a `VecDeque` behind a mutex, not a channel: a broadcast pushes one frame into
//! every subscriber's queue, and a channel's per-push semaphore, linked blocks (a new one every
//! few dozen frames, zeroed by the kernel) and waker dance cost more than the lock of a queue
//! nobody else holds. The writer takes the whole queue at once (swapping in its own emptied one,
//! so neither side allocates in steady state), and a queue that never held a frame holds no
//! memory: an idle connection pays for its `Arc` only.
//!
//! The queue is also the connection's doorbell for things outside the tree: its
//! [`Outbox::alarm`] waker (held, say, by the revocation list) makes the writer's next
//! [`OutboxReceiver::recv`] report [`Received::Alerted`], so a connection needs no channel or
//! `Notify` of its own for them.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;

/// One producer's right to queue frames on a connection (a subscription's): once
/// [`Outbox::close_gate`] closed it, nothing sent through it is queued. Open when made. The
/// check and the close both take the queue's lock, so a close orders every frame: those sent
/// through the gate before it are queued before whatever the connection queues after it (the
/// reply to `unsub`, an `error` event), and none after.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<GateState>);

#[derive(Debug, Default)]
struct GateState {
    closed: AtomicBool,
    /// The producer ended the stream itself (a live query that failed for good).
    failed: AtomicBool,
}

impl Gate {
    /// The producer ended the stream for good (it sent its last frame).
    pub fn mark_failed(&self) {
        self.0.failed.store(true, Ordering::Relaxed);
    }

    /// Whether [`Gate::mark_failed`] was called.
    pub fn failed(&self) -> bool {
        self.0.failed.load(Ordering::Relaxed)
    }
}

/// The sending side, cloned into every subscription of the connection.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// Unique per connection on this node.
    pub conn_id: u64,
    shared: Arc<Shared>,
}

/// How much one connection's queue holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimit {
    pub frames: usize,
    /// The frames' encoded bytes: a few large frames (snapshots of big documents) are as much a
    /// slow client's burden as many small ones.
    pub bytes: usize,
}

impl QueueLimit {
    /// A limit in frames alone.
    pub fn frames(frames: usize) -> Self {
        Self {
            frames,
            bytes: usize::MAX,
        }
    }
}

#[derive(Debug)]
struct Shared {
    limit: QueueLimit,
    state: Mutex<State>,
    /// The receiver is gone. Outside the lock: a fan-out asks once per subscriber per event.
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    /// The encoded size of `frames`.
    bytes: usize,
    /// The writer, when it waits.
    waker: Option<Waker>,
    /// Whether a send wakes the writer (it waits for frames), or only the alarm does (it is busy
    /// writing, and watches for that meanwhile).
    wants_frames: bool,
    /// Sticky: an overflowed connection takes nothing more.
    overflowed: bool,
    /// The alarm rang since the writer last looked (see [`Outbox::alarm`]).
    alerted: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock (pushes, swaps and flag writes only), so a
        // poisoned lock cannot leave the state half-updated: use it as it is.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The receiving side, owned by the connection's writer.
#[derive(Debug)]
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

/// What the writer finds when it looks at its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Frames were moved into the batch, oldest first.
    Frames,
    /// The queue overflowed: what it held is dropped, the connection must close.
    Overflowed,
    /// The alarm rang (once however often it rang since the last look); queued frames, if
    /// any, come with the next call.
    Alerted,
}

/// The frame was not queued: the connection is overflowed or gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection's outbound queue is full or closed")]
pub struct NotQueued;

/// A queue holding at most `limit`.
pub fn outbox(conn_id: u64, limit: QueueLimit) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        limit: QueueLimit {
            frames: limit.frames.max(1),
            bytes: limit.bytes.max(1),
        },
        state: Mutex::new(State::default()),
        closed: AtomicBool::new(false),
    });
    (
        Outbox {
            conn_id,
            shared: shared.clone(),
        },
        OutboxReceiver { shared },
    )
}

impl Outbox {
    /// Queues a frame without waiting. A full queue marks the connection overflowed: nothing
    /// more is queued for it, and its writer closes it.
    pub fn send(&self, frame: Bytes) -> Result<(), NotQueued> {
        self.push(None, 1, frame.len(), |queue| queue.push_back(frame))
    }

    /// [`Outbox::send`] unless `gate` is closed (then the frame is dropped: `NotQueued`).
    pub fn send_through(&self, gate: &Gate, frame: Bytes) -> Result<(), NotQueued> {
        self.push(Some(gate), 1, frame.len(), |queue| queue.push_back(frame))
    }

    /// [`Outbox::send_all`] unless `gate` is closed (then `frames` are dropped: `NotQueued`).
    pub fn send_all_through(&self, gate: &Gate, frames: &mut Vec<Bytes>) -> Result<(), NotQueued> {
        self.push_all(Some(gate), frames)
    }

    /// Closes `gate`: nothing sent through it from now on is queued.
    pub fn close_gate(&self, gate: &Gate) {
        let _queue = self.shared.lock();
        gate.0.closed.store(true, Ordering::Relaxed);
    }

    /// Queues every frame of `frames` (emptying it) in order, under one lock and with at most one
    /// wake-up: a fan-out pass hands a subscriber all its frames of a batch at once. All or
    /// nothing: frames that would not all fit overflow the connection as [`Outbox::send`] does.
    pub fn send_all(&self, frames: &mut Vec<Bytes>) -> Result<(), NotQueued> {
        self.push_all(None, frames)
    }

    fn push_all(&self, gate: Option<&Gate>, frames: &mut Vec<Bytes>) -> Result<(), NotQueued> {
        if frames.is_empty() {
            return Ok(());
        }
        let count = frames.len();
        let bytes = frames.iter().map(Bytes::len).sum();
        let queued = self.push(gate, count, bytes, |queue| queue.extend(frames.drain(..)));
        frames.clear();
        queued
    }

    /// Queues `count` frames of `bytes` in all with `fill` unless the queue is closed,
    /// overflowed, `gate` is closed, or the queue would hold more than its limit (then it is
    /// marked overflowed and emptied).
    fn push(
        &self,
        gate: Option<&Gate>,
        count: usize,
        bytes: usize,
        fill: impl FnOnce(&mut VecDeque<Bytes>),
    ) -> Result<(), NotQueued> {
        let mut state = self.shared.lock();
        if state.overflowed
            || self.shared.closed.load(Ordering::Relaxed)
            || gate.is_some_and(|g| g.0.closed.load(Ordering::Relaxed))
        {
            return Err(NotQueued);
        }
        let limit = self.shared.limit;
        let queued = if state.frames.len() + count > limit.frames
            || state.bytes.saturating_add(bytes) > limit.bytes
        {
            state.overflowed = true;
            state.frames = VecDeque::new();
            state.bytes = 0;
            metrics::counter!("vibe_ws_queue_overflows_total").increment(1);
            Err(NotQueued)
        } else {
            fill(&mut state.frames);
            state.bytes += bytes;
            Ok(())
        };
        // Only the first push after the writer went to sleep finds a waker: later pushes of the
        // same burst cost no wake-up. A writer busy writing learns of an overflow when it comes
        // for more frames.
        let waker = if state.wants_frames {
            state.waker.take()
        } else {
            None
        };
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        queued
    }

    /// The connection's writer is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// A waker that rings this connection's alarm: the writer's next look at its queue reports
    /// [`Received::Alerted`]. It keeps the queue's shared state alive (not the connection), so
    /// whoever holds it should drop it with the connection.
    pub fn alarm(&self) -> Waker {
        Waker::from(self.shared.clone())
    }
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.lock();
        state.alerted = true;
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl OutboxReceiver {
    /// Moves every queued frame into `batch` (which must be empty: the writer comes for more
    /// once it wrote the last batch), or reports the overflow; pending (the task woken by the
    /// next send) while the queue is empty. What the writer took no longer counts against the
    /// limit: a client holds at most one batch being written besides a full queue.
    pub fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<Bytes>,
    ) -> Poll<Received> {
        let mut state = self.shared.lock();
        if state.overflowed {
            return Poll::Ready(Received::Overflowed);
        }
        if std::mem::take(&mut state.alerted) {
            return Poll::Ready(Received::Alerted);
        }
        if state.frames.is_empty() {
            Self::register(&mut state, cx, true);
            return Poll::Pending;
        }
        debug_assert!(batch.is_empty());
        batch.clear();
        std::mem::swap(&mut state.frames, batch);
        state.bytes = 0;
        Poll::Ready(Received::Frames)
    }

    /// The alarm ([`Received::Alerted`]), leaving queued frames and an overflow to the next
    /// [`OutboxReceiver::poll_recv`]: what a writer busy writing the last batch watches for
    /// (neither sends nor an overflow wake it meanwhile).
    pub fn poll_signal(&mut self, cx: &mut Context<'_>) -> Poll<Received> {
        let mut state = self.shared.lock();
        if std::mem::take(&mut state.alerted) {
            return Poll::Ready(Received::Alerted);
        }
        Self::register(&mut state, cx, false);
        Poll::Pending
    }

    fn register(state: &mut State, cx: &mut Context<'_>, wants_frames: bool) {
        state.wants_frames = wants_frames;
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
    }

    /// Waits for frames (moved into `batch`), the overflow or the alarm. Cancel-safe: frames
    /// are only moved, and the alarm only taken, when it completes.
    pub async fn recv(&mut self, batch: &mut VecDeque<Bytes>) -> Received {
        poll_fn(|cx| self.poll_recv(cx, batch)).await
    }

    /// Takes what is queued without waiting; `None` when nothing is (or after an overflow).
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let mut state = self.shared.lock();
        if state.overflowed {
            return None;
        }
        let frame = state.frames.pop_front()?;
        state.bytes -= frame.len();
        Some(frame)
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        // Set under the lock: no send that saw it clear can queue after the frames are dropped.
        self.shared.closed.store(true, Ordering::Relaxed);
        state.frames = VecDeque::new();
        state.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_is_sticky_and_signalled() {
        let (tx, mut rx) = outbox(1, QueueLimit::frames(2));
        tx.send(Bytes::from_static(b"a")).unwrap();
        tx.send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(tx.send(Bytes::from_static(b"c")), Err(NotQueued));
        let mut batch = VecDeque::new();
        assert_eq!(rx.recv(&mut batch).await, Received::Overflowed);
        assert!(
            batch.is_empty(),
            "an overflowed queue delivers nothing more"
        );
        assert_eq!(tx.send(Bytes::from_static(b"d")), Err(NotQueued));
    }

    #[tokio::test]
    async fn the_writer_takes_everything_queued_in_order_and_is_woken_by_a_send() {
        let (tx, mut rx) = outbox(1, QueueLimit::frames(8));
        let mut batch = VecDeque::new();
        let waiting = tokio::spawn(async move {
            let got = rx.recv(&mut batch).await;
            (got, batch, rx)
        });
        // The writer is parked on an empty queue before anything is sent.
        tokio::task::yield_now().await;
        tx.send(Bytes::from_static(b"a")).unwrap();
        tx.send(Bytes::from_static(b"b")).unwrap();
        let (got, mut batch, mut rx) = waiting.await.unwrap();
        assert_eq!(got, Received::Frames);
        // Either both frames were queued before the writer ran, or it took the first alone.
        let mut all: Vec<Bytes> = batch.drain(..).collect();
        all.extend(rx.try_recv());
        assert_eq!(
            all,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn send_all_queues_in_order_after_what_was_queued_or_overflows_whole() {
        let (tx, mut rx) = outbox(1, QueueLimit::frames(3));
        tx.send(Bytes::from_static(b"a")).unwrap();
        let mut frames = vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")];
        tx.send_all(&mut frames).unwrap();
        assert!(frames.is_empty(), "the frames were moved into the queue");
        let mut batch = VecDeque::new();
        assert_eq!(rx.recv(&mut batch).await, Received::Frames);
        assert_eq!(
            Vec::from(std::mem::take(&mut batch)),
            vec![
                Bytes::from_static(b"a"),
                Bytes::from_static(b"b"),
                Bytes::from_static(b"c")
            ]
        );
        // Two queued and two more would make four of three: nothing of them is queued.
        tx.send(Bytes::from_static(b"d")).unwrap();
        tx.send(Bytes::from_static(b"e")).unwrap();
        let mut frames = vec![Bytes::from_static(b"f"), Bytes::from_static(b"g")];
        assert_eq!(tx.send_all(&mut frames), Err(NotQueued));
        assert!(frames.is_empty());
        assert_eq!(rx.recv(&mut batch).await, Received::Overflowed);
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn a_few_large_frames_overflow_the_byte_limit() {
        let limit = QueueLimit {
            frames: 100,
            bytes: 10,
        };
        let (tx, mut rx) = outbox(1, limit);
        tx.send(Bytes::from_static(b"12345")).unwrap();
        // What the writer takes no longer counts.
        let mut batch = VecDeque::new();
        assert_eq!(rx.recv(&mut batch).await, Received::Frames);
        batch.clear();
        tx.send(Bytes::from_static(b"12345")).unwrap();
        assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"12345")));
        tx.send(Bytes::from_static(b"123456")).unwrap();
        let mut frames = vec![Bytes::from_static(b"1234"), Bytes::from_static(b"5")];
        assert_eq!(tx.send_all(&mut frames), Err(NotQueued));
        assert_eq!(rx.recv(&mut batch).await, Received::Overflowed);
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_writer_busy_writing_is_woken_by_the_alarm_only() {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || wakes.0.load(Ordering::SeqCst);

        let (tx, mut rx) = outbox(1, QueueLimit::frames(3));
        tx.send(Bytes::from_static(b"a")).unwrap();
        let mut batch = VecDeque::new();
        assert_eq!(
            rx.poll_recv(&mut cx, &mut batch),
            Poll::Ready(Received::Frames)
        );
        // Writing that batch, the writer watches for signals only.
        assert_eq!(rx.poll_signal(&mut cx), Poll::Pending);
        tx.send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(woken(), 0, "a frame does not wake a busy writer");
        tx.alarm().wake_by_ref();
        assert_eq!(woken(), 1, "the alarm does");
        assert_eq!(rx.poll_signal(&mut cx), Poll::Ready(Received::Alerted));
        assert_eq!(rx.poll_signal(&mut cx), Poll::Pending);
        // One queued: two more fit, a fourth overflows, which the writer learns when it comes
        // for more.
        tx.send(Bytes::from_static(b"c")).unwrap();
        tx.send(Bytes::from_static(b"d")).unwrap();
        assert_eq!(tx.send(Bytes::from_static(b"e")), Err(NotQueued));
        assert_eq!(woken(), 1);
        assert_eq!(rx.poll_signal(&mut cx), Poll::Pending);
        assert_eq!(
            rx.poll_recv(&mut cx, &mut VecDeque::new()),
            Poll::Ready(Received::Overflowed)
        );

        // A writer waiting for frames is woken by the first of them.
        let (tx, mut rx) = outbox(2, QueueLimit::frames(3));
        assert_eq!(rx.poll_recv(&mut cx, &mut VecDeque::new()), Poll::Pending);
        tx.send(Bytes::from_static(b"a")).unwrap();
        assert_eq!(woken(), 2);
    }

    #[tokio::test]
    async fn the_alarm_wakes_the_writer_once_and_frames_follow() {
        let (tx, mut rx) = outbox(1, QueueLimit::frames(8));
        let alarm = tx.alarm();
        let mut batch = VecDeque::new();
        let waiting = tokio::spawn(async move {
            let got = rx.recv(&mut batch).await;
            (got, batch, rx)
        });
        // The writer is parked on an empty queue before the alarm rings.
        tokio::task::yield_now().await;
        alarm.wake_by_ref();
        alarm.wake_by_ref();
        let (got, mut batch, mut rx) = waiting.await.unwrap();
        assert_eq!(got, Received::Alerted);
        tx.send(Bytes::from_static(b"a")).unwrap();
        // Rung twice before the look: one alert, then the frame.
        assert_eq!(rx.recv(&mut batch).await, Received::Frames);
        assert_eq!(Vec::from(batch), vec![Bytes::from_static(b"a")]);
    }

    #[test]
    fn a_closed_receiver_refuses_frames() {
        let (tx, rx) = outbox(1, QueueLimit::frames(8));
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(Bytes::from_static(b"a")), Err(NotQueued));
    }
}
