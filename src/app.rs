//! The state every request handler and connection shares: configuration, store, feed, the
//! realtime tree, the token authority, metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use ractor::ActorRef;
use tokio::sync::watch;
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
    pub metrics: PrometheusHandle,
    /// The root of the realtime actor tree.
    pub realtime: ActorRef<RealtimeMsg>,
    /// The position this node's feed reader has reached (long-polls wait on it).
    pub feed_head: watch::Receiver<Cursor>,
    pub(crate) router: matchit::Router<crate::http::Route>,
    next_connection: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

/// What [`App::new`] needs beyond configuration.
#[derive(Debug)]
pub struct AppParts {
    pub store: Store,
    pub feed: Feed,
    pub tokens: TokenAuthority,
    pub metrics: PrometheusHandle,
    pub realtime: ActorRef<RealtimeMsg>,
    pub feed_head: watch::Receiver<Cursor>,
    pub shutdown: watch::Receiver<bool>,
}

impl App {
    pub fn new(config: Config, parts: AppParts) -> Self {
        Self {
            config,
            store: parts.store,
            feed: parts.feed,
            tokens: parts.tokens,
            metrics: parts.metrics,
            realtime: parts.realtime,
            feed_head: parts.feed_head,
            router: crate::http::router(),
            next_connection: AtomicU64::new(1),
            shutdown: parts.shutdown,
        }
    }

    /// A connection id unique on this node.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Changes to true when the node begins shutting down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
}
