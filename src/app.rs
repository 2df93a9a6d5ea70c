//! The state every request handler and connection shares: configuration, store, feed, the
//! realtime tree, the token authority, metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use ractor::ActorRef;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use vibe_actors::call::actor::CallsMsg;
use vibe_actors::change::Cursor;
use vibe_actors::realtime::RealtimeMsg;

use crate::auth::TokenAuthority;
use crate::config::Config;
use crate::feed::Feed;
use crate::store::Store;

#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub store: Store,
    pub feed: Feed,
    pub tokens: TokenAuthority,
    pub identity: crate::identity::Identity,
    pub metrics: PrometheusHandle,
    pub governance: Arc<crate::governance::Governance>,
    /// The root of the realtime actor tree.
    pub realtime: ActorRef<RealtimeMsg>,
    /// The call rooms' supervisor.
    pub calls: ActorRef<CallsMsg>,
    /// The position this node's feed reader has reached (long-polls wait on it).
    pub feed_head: watch::Receiver<Cursor>,
    pub(crate) router: matchit::Router<crate::http::Route>,
    next_connection: AtomicU64,
    draining: watch::Receiver<bool>,
    /// One permit held by each open WebSocket, so shutdown can wait for them to close.
    open_sockets: Arc<Semaphore>,
}

/// More sockets than any node holds: shutdown takes them all to know every socket closed.
const SOCKET_PERMITS: u32 = 1 << 24;

/// What [`App::new`] needs beyond configuration.
#[derive(Debug)]
pub struct AppParts {
    pub store: Store,
    pub feed: Feed,
    pub tokens: TokenAuthority,
    pub identity: crate::identity::Identity,
    pub metrics: PrometheusHandle,
    pub governance: Arc<crate::governance::Governance>,
    pub realtime: ActorRef<RealtimeMsg>,
    pub calls: ActorRef<CallsMsg>,
    pub feed_head: watch::Receiver<Cursor>,
    /// Turns true when the node begins shutting down.
    pub draining: watch::Receiver<bool>,
}

impl App {
    pub fn new(config: Config, parts: AppParts) -> Self {
        Self {
            config,
            store: parts.store,
            feed: parts.feed,
            tokens: parts.tokens,
            identity: parts.identity,
            metrics: parts.metrics,
            governance: parts.governance,
            realtime: parts.realtime,
            calls: parts.calls,
            feed_head: parts.feed_head,
            router: crate::http::router(),
            next_connection: AtomicU64::new(1),
            draining: parts.draining,
            open_sockets: Arc::new(Semaphore::new(SOCKET_PERMITS as usize)),
        }
    }

    /// A connection id unique on this node.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Held by a WebSocket for its lifetime (None: shutting down, refuse the socket).
    pub fn open_socket(&self) -> Option<OwnedSemaphorePermit> {
        self.open_sockets.clone().try_acquire_owned().ok()
    }

    /// Resolves when every WebSocket has closed (they close with 1001 once shutdown is signalled).
    pub async fn sockets_closed(&self) {
        let _ = self.open_sockets.acquire_many(SOCKET_PERMITS).await;
    }

    /// Changes to true when the node begins shutting down: what holds a client waiting
    /// (a WebSocket, a long-poll) answers it then.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.draining.clone()
    }

    /// Whether `cursor` is past the feed's head: it was never issued (a reader resuming from it
    /// would wait for nothing, then skip whatever lands before it). The node's head may trail
    /// the database's, so that is asked when the node's alone says so.
    pub async fn is_ahead_of_feed(&self, cursor: Cursor) -> Result<bool, crate::feed::FeedError> {
        // An event's place within its change (`sub`) does not count: the events a certificate
        // expiry causes at the head are numbered after it (`Cursor::after_events`).
        let cursor = cursor.event(0);
        let past_node_head = cursor > *self.feed_head.borrow();
        Ok(past_node_head && cursor > self.feed.head().await?)
    }
}
