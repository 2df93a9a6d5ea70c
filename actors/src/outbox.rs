//! A connection's outbound queue as the rest of the tree sees it: bounded, never awaited.
//! Producers (live queries, the connection itself) `try_send` encoded frames; when the queue is
//! full the connection is marked overflowed and its writer closes it with a reason, so a slow
//! client can neither block a fan-out nor grow memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

/// The sending side, cloned into every subscription of the connection.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// Unique per connection on this node.
    pub conn_id: u64,
    tx: mpsc::Sender<Bytes>,
    overflow: Arc<Overflow>,
}

#[derive(Debug, Default)]
struct Overflow {
    happened: AtomicBool,
    notify: Notify,
}

/// The receiving side, owned by the connection's writer.
#[derive(Debug)]
pub struct OutboxReceiver {
    pub rx: mpsc::Receiver<Bytes>,
    pub overflow: OverflowSignal,
}

/// Resolves once the queue has overflowed.
#[derive(Debug)]
pub struct OverflowSignal(Arc<Overflow>);

/// The frame was not queued: the connection is overflowed or gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection's outbound queue is full or closed")]
pub struct NotQueued;

/// A queue holding at most `capacity` frames.
pub fn outbox(conn_id: u64, capacity: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let overflow = Arc::new(Overflow::default());
    (
        Outbox {
            conn_id,
            tx,
            overflow: overflow.clone(),
        },
        OutboxReceiver {
            rx,
            overflow: OverflowSignal(overflow),
        },
    )
}

impl Outbox {
    /// Queues a frame without waiting. A full queue marks the connection overflowed: nothing
    /// more is queued for it, and its writer closes it.
    pub fn send(&self, frame: Bytes) -> Result<(), NotQueued> {
        if self.overflow.happened.load(Ordering::Relaxed) {
            return Err(NotQueued);
        }
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflow.happened.swap(true, Ordering::Relaxed) {
                    metrics::counter!("vibe_ws_queue_overflows_total").increment(1);
                    self.overflow.notify.notify_one();
                }
                Err(NotQueued)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(NotQueued),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl OverflowSignal {
    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.0.happened.load(Ordering::Relaxed) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_is_sticky_and_signalled() {
        let (tx, mut rx) = outbox(1, 2);
        tx.send(Bytes::from_static(b"a")).unwrap();
        tx.send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(tx.send(Bytes::from_static(b"c")), Err(NotQueued));
        rx.overflow.wait().await;
        assert_eq!(rx.rx.recv().await.unwrap(), "a");
        // Room again, but an overflowed connection takes nothing more.
        assert_eq!(tx.send(Bytes::from_static(b"d")), Err(NotQueued));
    }
}
