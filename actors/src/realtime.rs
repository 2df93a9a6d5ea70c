//! The realtime tree above the live queries: the root (`Realtime`) routes each page of changes
//! to the document-type actors and subscriptions to the right type; a type actor (`DocType`)
//! owns the live queries of its type — one per distinct normalised query — and supervises them.
//! It routes each change only to the live queries it concerns: candidates from the type's
//! [`QueryIndex`], then [`QuerySpec::concerns`]; the time this takes per change is the
//! `vibe_live_query_match_seconds` histogram.
//!
//! Supervision: a live query that fails is restarted one-for-one with its subscribers (which
//! the type actor keeps) and re-syncs them with a `reset`; more than `RESTARTS` failures within
//! `RESTART_WINDOW` end the query and its subscribers get an `error` event. Ordering: the root
//! forwards pages in feed order and answers the listener only after forwarding, so the listener
//! never runs more than one page ahead of the routing.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use chrono::{DateTime, Utc};

use crate::certs::{CERTIFICATE_TYPE, CertificateBook};
use crate::change::{Change, Cursor};
use crate::live_query::{
    ByConnection, CredentialsMsg, Exit, LiveQueryArgs, LiveQueryMsg, LiveQueryRef, ResyncMsg,
    SnapshotSource, Subscriber,
};
use crate::query::QuerySpec;
use crate::query_index::{QueryId, QueryIndex};

/// Restart budget per live query.
const RESTARTS: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(10);

/// A page's claim on the tree's budget of pages in flight: the feed reader takes one permit per
/// page and every message carrying (part of) the page holds a clone, so the permit returns when
/// the last live query has handled it. This bounds the actors' (unbounded) mailboxes.
#[derive(Debug, Clone)]
pub struct InFlight(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

impl InFlight {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self(Arc::new(permit))
    }
}

/// Pages of changes one live query may have waiting before the type actor sends it no more:
/// a query whose handling is slow (a refill's load can take up to the statement timeout) holds
/// at most these of the tree's pages in flight, so it cannot stall the feed for every other
/// live query of the node. Past it the query skips pages and, when it gets to it, reloads (see
/// [`DocTypeState::route`]).
pub const MAX_QUEUED_PAGES: usize = 4;

/// Settings shared by the whole tree.
#[derive(Debug, Clone)]
pub struct RealtimeConfig {
    pub source: Arc<dyn SnapshotSource>,
    /// What each live query keeps for resuming clients.
    pub replay: crate::live_query::ReplayLimit,
    /// Most bytes one live query's window holds.
    pub window_bytes: usize,
    /// How long a live query outlives its last subscriber, so a client that reconnects within
    /// it resumes exactly (its events kept flowing into the replay buffer).
    pub linger: Duration,
    /// Distinct live queries this node runs at most, over all types.
    pub max_live_queries: usize,
    /// How many it runs now (shared by the type actors).
    pub live_queries: Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes (as JSON) the windows of all live queries keep together, beyond which no new one
    /// starts: distinct queries share nothing, so without it one client's many distinct queries
    /// of large documents each kept a full window.
    pub max_live_bytes: usize,
    /// What they keep now (each live query keeps its own share up to date).
    pub live_bytes: Arc<std::sync::atomic::AtomicUsize>,
}

/// Why a subscription did not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("this node runs its maximum of {0} live queries")]
    TooManyLiveQueries(usize),
    #[error("this node's live queries keep their maximum of {0} bytes of documents")]
    LiveQueryBytes(usize),
    #[error("the live query could not start")]
    Unavailable,
}

/// A subscription request on its way to a live query.
#[derive(Debug)]
pub struct SubscribeRequest {
    pub spec: Arc<QuerySpec>,
    pub subscriber: Subscriber,
    pub request_id: serde_json::Value,
    pub since: Option<Cursor>,
    /// The subscription id, or why the query could not start.
    pub reply: RpcReplyPort<Result<Arc<str>, SubscribeError>>,
}

#[derive(Debug)]
pub struct Realtime;

#[derive(Debug)]
pub enum RealtimeMsg {
    /// A page of changes in feed order and the position after it; answered once routed.
    Changes(Vec<Change>, Cursor, InFlight, RpcReplyPort<()>),
    Subscribe(SubscribeRequest),
    /// Releases one `read` of subscription `sub` (to `spec`) by `conn_id`. A subscription that
    /// ended (its live query failed for good) is not released twice: a new live query for the
    /// same spec has another id. A live query left without subscribers lingers
    /// (`RealtimeConfig::linger`, for a client that reconnects and resumes) only if `linger`:
    /// the connection ended, rather than the client asked to stop — so a client cannot keep
    /// thousands of queries alive by subscribing and unsubscribing in a loop.
    Unsubscribe {
        spec: Arc<QuerySpec>,
        sub: Arc<str>,
        conn_id: u64,
        linger: bool,
    },
    /// Fault injection for tests: make the live query for `spec` fail.
    CrashQuery(QuerySpec),
    /// Fault injection for tests: make the actor of a document type fail.
    CrashType(String),
    /// Distinct live queries and subscriptions, for metrics and tests.
    Stats(RpcReplyPort<(usize, usize)>),
    /// Document-type actors running, for tests.
    TypeActors(RpcReplyPort<usize>),
    /// The type actor `actor` of `doc_type` has no live query left, after handling `subscribes`
    /// subscriptions: it is stopped unless another was sent to it meanwhile.
    TypeIdle {
        doc_type: String,
        actor: ractor::ActorId,
        subscribes: u64,
    },
    /// The feed skipped ahead to `position` (changes were lost to this node): every live query
    /// reloads and resets its subscribers. The certificates issued or revoked in the skipped
    /// changes were lost too: `book` is the book read again after `position` (the feed reader
    /// sends this only once it could read one).
    Resync {
        position: Cursor,
        book: CertificateBook,
    },
    /// A certificate may have expired: drop expired ones and re-evaluate their subjects.
    ExpireCertificates,
}

impl ractor::Message for RealtimeMsg {}

#[derive(Debug)]
struct TypeActor {
    actor: ActorRef<DocTypeMsg>,
    /// Subscriptions sent to it: an idle report that counts fewer raced one still on its way.
    subscribes: u64,
}

#[derive(Debug)]
pub struct RealtimeState {
    config: RealtimeConfig,
    position: Cursor,
    /// The type actors running: one per type with a live query. Any valid type name may be
    /// subscribed to, so one that has lost its last query stops ([`RealtimeMsg::TypeIdle`]);
    /// otherwise the map would only grow, and every page is sent to every entry.
    types: HashMap<String, TypeActor>,
    next_sub: Arc<AtomicU64>,
    /// Every valid certificate, as of `position`.
    book: CertificateBook,
    /// The expiry the pending [`RealtimeMsg::ExpireCertificates`] timer is set for.
    expiry_timer: Option<DateTime<Utc>>,
    /// Where the last certificate re-evaluation was numbered: the next one at the same place in
    /// the feed goes after it.
    last_reevaluation: Option<Cursor>,
}

impl Actor for Realtime {
    type Msg = RealtimeMsg;
    type State = RealtimeState;
    /// The configuration, the feed position to start from, and the certificates valid then.
    type Arguments = (RealtimeConfig, Cursor, CertificateBook);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (config, position, book): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = RealtimeState {
            config,
            position,
            types: HashMap::new(),
            next_sub: Arc::new(AtomicU64::new(1)),
            book,
            expiry_timer: None,
            last_reevaluation: None,
        };
        state.schedule_expiry(&myself);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RealtimeMsg::Changes(changes, position, in_flight, done) => {
                // A certificate change splits the page: the changes before it are routed with
                // the old book, then every type learns of the new book, then the rest follow.
                let mut start = 0;
                for (i, change) in changes.iter().enumerate() {
                    if change.doc_type != CERTIFICATE_TYPE {
                        continue;
                    }
                    let before = state.book.clone();
                    let subjects = state.book.apply(change, Utc::now());
                    state.route(&changes[start..=i], change.cursor, &in_flight);
                    start = i + 1;
                    if !subjects.is_empty() {
                        state.broadcast_credentials(before, subjects, change.cursor);
                    }
                }
                state.route(&changes[start..], position, &in_flight);
                state.position = position;
                state.schedule_expiry(&myself);
                let _ = done.send(());
            }
            RealtimeMsg::ExpireCertificates => {
                state.expiry_timer = None;
                let before = state.book.clone();
                let subjects = state.book.expire(Utc::now());
                if !subjects.is_empty() {
                    let position = state.position;
                    state.broadcast_credentials(before, subjects, position);
                }
                state.schedule_expiry(&myself);
            }
            RealtimeMsg::Subscribe(request) => {
                let doc_type = request.spec.doc_type.clone();
                let entry = match state.types.entry(doc_type.clone()) {
                    std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                    std::collections::hash_map::Entry::Vacant(vacant) => {
                        let args = DocTypeArgs {
                            config: state.config.clone(),
                            position: state.position,
                            next_sub: state.next_sub.clone(),
                            book: state.book.clone(),
                            doc_type,
                            root: myself.clone(),
                        };
                        let (actor, _) =
                            Actor::spawn_linked(None, DocType, args, myself.get_cell()).await?;
                        vacant.insert(TypeActor {
                            actor,
                            subscribes: 0,
                        })
                    }
                };
                entry.subscribes += 1;
                let _ = entry.actor.cast(DocTypeMsg::Subscribe(request));
            }
            RealtimeMsg::TypeIdle {
                doc_type,
                actor,
                subscribes,
            } => {
                let idle = state
                    .types
                    .get(&doc_type)
                    .is_some_and(|t| t.actor.get_id() == actor && t.subscribes == subscribes);
                if let Some(t) = idle.then(|| state.types.remove(&doc_type)).flatten() {
                    t.actor.stop(None);
                }
            }
            RealtimeMsg::Unsubscribe {
                spec,
                sub,
                conn_id,
                linger,
            } => {
                if let Some(t) = state.types.get(&spec.doc_type) {
                    let _ = t.actor.cast(DocTypeMsg::Unsubscribe {
                        spec,
                        sub,
                        conn_id,
                        linger,
                    });
                }
            }
            RealtimeMsg::CrashQuery(spec) => {
                if let Some(t) = state.types.get(&spec.doc_type) {
                    let _ = t.actor.cast(DocTypeMsg::CrashQuery(spec));
                }
            }
            RealtimeMsg::CrashType(doc_type) => {
                if let Some(t) = state.types.get(&doc_type) {
                    let _ = t.actor.cast(DocTypeMsg::Crash);
                }
            }
            RealtimeMsg::Resync { position, book } => {
                state.position = position;
                state.book = book;
                state.expiry_timer = None;
                state.schedule_expiry(&myself);
                for t in state.types.values() {
                    let _ = t
                        .actor
                        .cast(DocTypeMsg::Resync(position, state.book.clone()));
                }
            }
            RealtimeMsg::Stats(reply) => {
                let mut totals = (0, 0);
                for t in state.types.values() {
                    if let Ok((q, s)) = ractor::call!(t.actor, DocTypeMsg::Stats) {
                        totals.0 += q;
                        totals.1 += s;
                    }
                }
                let _ = reply.send(totals);
            }
            RealtimeMsg::TypeActors(reply) => {
                let _ = reply.send(state.types.len());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let stopped = match &event {
            SupervisionEvent::ActorFailed(cell, error) => Some((cell, error.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                Some((cell, reason.clone().unwrap_or_default()))
            }
            _ => None,
        };
        if let Some((cell, reason)) = stopped {
            // A type actor holds no state worth rebuilding beyond its queries, which stopped
            // with it; the next subscription of that type starts a fresh one. One stopped for
            // being idle was taken out of the map before.
            let before = state.types.len();
            state.types.retain(|_, t| t.actor.get_id() != cell.get_id());
            if state.types.len() < before {
                tracing::error!(actor = %cell.get_id(), %reason, "document-type actor stopped");
            }
        }
        Ok(())
    }
}

impl RealtimeState {
    /// Sends each type actor the changes of `changes` of its type (an empty page still moves
    /// its position).
    fn route(&self, changes: &[Change], position: Cursor, in_flight: &InFlight) {
        let mut by_type: HashMap<&str, Vec<Change>> = HashMap::new();
        for change in changes {
            if self.types.contains_key(&change.doc_type) {
                by_type
                    .entry(&change.doc_type)
                    .or_default()
                    .push(change.clone());
            }
        }
        for (doc_type, t) in &self.types {
            let page = by_type.remove(doc_type.as_str()).map(Arc::from);
            let _ = t
                .actor
                .cast(DocTypeMsg::Changes(page, position, in_flight.clone()));
        }
    }

    fn broadcast_credentials(
        &mut self,
        before: CertificateBook,
        subjects: Vec<String>,
        cursor: Cursor,
    ) {
        // After the events of the change at `cursor` (the certificate change itself, or the last
        // change routed before an expiry), which a live query may have sent already — and after
        // an earlier re-evaluation at the same place (two expiries with no change between).
        let mut at = cursor.after_events();
        if let Some(last) = self.last_reevaluation.filter(|last| *last >= at) {
            at = last.after_reevaluation();
        }
        self.last_reevaluation = Some(at);
        let message = Arc::new(CredentialsMsg {
            book: self.book.clone(),
            before,
            subjects,
            cursor: at,
        });
        for t in self.types.values() {
            let _ = t.actor.cast(DocTypeMsg::Credentials(message.clone()));
        }
    }

    /// Arms a timer for the book's next expiry, unless one is set for it or earlier.
    fn schedule_expiry(&mut self, myself: &ActorRef<RealtimeMsg>) {
        let Some(next) = self.book.next_expiry() else {
            return;
        };
        if self.expiry_timer.is_some_and(|t| t <= next) {
            return;
        }
        self.expiry_timer = Some(next);
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        myself.send_after(wait, || RealtimeMsg::ExpireCertificates);
    }
}

#[derive(Debug)]
pub struct DocType;

#[derive(Debug)]
pub struct DocTypeArgs {
    config: RealtimeConfig,
    position: Cursor,
    next_sub: Arc<AtomicU64>,
    book: CertificateBook,
    doc_type: String,
    root: ActorRef<RealtimeMsg>,
}

#[derive(Debug)]
pub enum DocTypeMsg {
    /// This type's changes in the page (None: the page had none) and the position after it.
    Changes(Option<Arc<[Change]>>, Cursor, InFlight),
    Subscribe(SubscribeRequest),
    /// See [`RealtimeMsg::Unsubscribe`].
    Unsubscribe {
        spec: Arc<QuerySpec>,
        sub: Arc<str>,
        conn_id: u64,
        linger: bool,
    },
    CrashQuery(QuerySpec),
    Crash,
    Stats(RpcReplyPort<(usize, usize)>),
    /// The linger after the last unsubscribe ended; `generation` tells stale timers apart.
    Expire {
        id: QueryId,
        generation: u64,
    },
    /// See [`RealtimeMsg::Resync`]: the position and the book as of it.
    Resync(Cursor, CertificateBook),
    /// Certificates changed (in feed order with the changes): every live query re-evaluates.
    Credentials(Arc<CredentialsMsg>),
    /// The subscription of `conn_id` to live query `id` was not answered (the query stopped
    /// first): release the reference taken for it.
    SubscribeFailed {
        id: QueryId,
        conn_id: u64,
    },
    /// The task `instance` of live query `id` failed: restart it (if it is still the current
    /// one).
    QueryFailed {
        id: QueryId,
        instance: u64,
        error: String,
    },
}

impl ractor::Message for DocTypeMsg {}

/// One live query of the type. Kept small: a node holds hundreds of thousands.
#[derive(Debug)]
struct Entry {
    spec: Arc<QuerySpec>,
    actor: LiveQueryRef,
    /// The running task's number: a failure report from an earlier one is stale.
    instance: u64,
    sub_id: Arc<str>,
    /// Per connection: the subscriber (shared with the live query) and how many `read`s of this
    /// query it holds.
    subscribers: ByConnection<(Arc<Subscriber>, usize)>,
    failures: VecDeque<Instant>,
    /// Bumped each time the query loses its last subscriber.
    idle_generation: u64,
    /// Pages were skipped for it (it had [`MAX_QUEUED_PAGES`] waiting) and a reload is queued.
    lagging: bool,
}

#[derive(Debug)]
pub struct DocTypeState {
    config: RealtimeConfig,
    position: Cursor,
    next_sub: Arc<AtomicU64>,
    /// Live queries by id, and the id of each distinct spec.
    entries: HashMap<QueryId, Entry>,
    ids: HashMap<Arc<QuerySpec>, QueryId>,
    index: QueryIndex,
    next_id: QueryId,
    next_instance: u64,
    /// Reused across changes: the index's candidates for one change.
    candidates: Vec<QueryId>,
    match_seconds: metrics::Histogram,
    /// The certificate book as of `position`.
    book: CertificateBook,
    doc_type: String,
    root: ActorRef<RealtimeMsg>,
    /// Subscriptions handled, and that count when it last told the root it was idle.
    subscribes: u64,
    idle_reported: Option<u64>,
}

impl Drop for DocTypeState {
    /// A type actor that stops holding live queries failed (an idle one holds none, and the
    /// root's shutdown ends their connections first): its queries stop with it, their places in
    /// `query.max_live_queries` come back, and their subscribers are told, as when one query
    /// fails for good — else the places were lost for the node's life and the subscribers kept
    /// counting against their connections' limit, waiting for events that never come.
    fn drop(&mut self) {
        for (_, entry) in self.entries.drain() {
            self.config.live_queries.fetch_sub(1, Ordering::Relaxed);
            entry.actor.stop();
            let subscribers: Vec<Arc<Subscriber>> =
                entry.subscribers.values().map(|(s, _)| s.clone()).collect();
            fail_subscribers(&entry.sub_id, &subscribers);
        }
    }
}

impl Actor for DocType {
    type Msg = DocTypeMsg;
    type State = DocTypeState;
    type Arguments = DocTypeArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: DocTypeArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(DocTypeState {
            config: args.config,
            position: args.position,
            next_sub: args.next_sub,
            entries: HashMap::new(),
            ids: HashMap::new(),
            index: QueryIndex::default(),
            next_id: 1,
            next_instance: 1,
            candidates: Vec::new(),
            match_seconds: metrics::histogram!("vibe_live_query_match_seconds"),
            book: args.book,
            doc_type: args.doc_type,
            root: args.root,
            subscribes: 0,
            idle_reported: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DocTypeMsg::Changes(page, position, in_flight) => {
                state.position = position;
                if let Some(page) = page {
                    state.route(&page, position, &in_flight);
                }
            }
            DocTypeMsg::Subscribe(request) => {
                state.subscribes += 1;
                state.subscribe(&myself, request);
            }
            DocTypeMsg::Unsubscribe {
                spec,
                sub,
                conn_id,
                linger,
            } => {
                let current = state
                    .ids
                    .get(&spec)
                    .copied()
                    .filter(|id| state.entries.get(id).is_some_and(|e| e.sub_id == sub));
                if let Some(id) = current {
                    state.release(&myself, id, conn_id, linger);
                }
            }
            DocTypeMsg::SubscribeFailed { id, conn_id } => {
                state.release(&myself, id, conn_id, false);
            }
            DocTypeMsg::Expire { id, generation } => state.expire(id, generation),
            DocTypeMsg::Resync(position, book) => {
                state.position = position;
                state.book = book;
                for entry in state.entries.values() {
                    let _ = entry.actor.cast(LiveQueryMsg::Resync(Box::new(ResyncMsg {
                        position,
                        book: state.book.clone(),
                    })));
                }
            }
            DocTypeMsg::Credentials(message) => {
                state.book = message.book.clone();
                for entry in state.entries.values() {
                    let _ = entry.actor.cast(LiveQueryMsg::Credentials(message.clone()));
                }
            }
            DocTypeMsg::CrashQuery(spec) => {
                if let Some(entry) = state.ids.get(&spec).and_then(|id| state.entries.get(id)) {
                    let _ = entry.actor.cast(LiveQueryMsg::Crash);
                }
            }
            DocTypeMsg::Crash => return Err("crash requested".into()),
            DocTypeMsg::Stats(reply) => {
                let subs = state.entries.values().map(|e| e.subscribers.len()).sum();
                let _ = reply.send((state.entries.len(), subs));
            }
            DocTypeMsg::QueryFailed {
                id,
                instance,
                error,
            } => {
                let Some(entry) = state.entries.get(&id) else {
                    return Ok(());
                };
                if entry.instance != instance {
                    return Ok(());
                }
                tracing::warn!(doc_type = %entry.spec.doc_type, %error, "live query failed; restarting");
                metrics::counter!("vibe_live_query_restarts_total").increment(1);
                state.restart(&myself, id);
            }
        }
        if state.entries.is_empty() && state.idle_reported != Some(state.subscribes) {
            state.idle_reported = Some(state.subscribes);
            let _ = state.root.cast(RealtimeMsg::TypeIdle {
                doc_type: state.doc_type.clone(),
                actor: myself.get_id(),
                subscribes: state.subscribes,
            });
        }
        Ok(())
    }
}

impl DocTypeState {
    /// Drops one reference of `conn_id` to live query `id`; a query left without subscribers
    /// stops after the linger if `linger`, else at once — and at once while the node runs half
    /// its `max_live_queries` or more: lingering queries (kept for clients that may come back)
    /// never take the room of live ones, however fast clients connect, subscribe and leave.
    fn release(&mut self, myself: &ActorRef<DocTypeMsg>, id: QueryId, conn_id: u64, linger: bool) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        if let Some((_, refs)) = entry.subscribers.get_mut(conn_id) {
            *refs -= 1;
            if *refs == 0 {
                entry.subscribers.remove(conn_id);
                let _ = entry.actor.cast(LiveQueryMsg::Unsubscribe { conn_id });
            }
        }
        if entry.subscribers.is_empty() {
            entry.idle_generation += 1;
            let generation = entry.idle_generation;
            let room = self.config.live_queries.load(Ordering::Relaxed)
                < self.config.max_live_queries / 2
                && self.config.live_bytes.load(Ordering::Relaxed) < self.config.max_live_bytes / 2;
            let linger = if linger && room {
                self.config.linger
            } else {
                Duration::ZERO
            };
            if linger.is_zero() {
                self.expire(id, generation);
            } else {
                myself.send_after(linger, move || DocTypeMsg::Expire { id, generation });
            }
        }
    }

    /// Sends each live query the changes of `page` that concern it (and nothing when none do).
    fn route(&mut self, page: &Arc<[Change]>, position: Cursor, in_flight: &InFlight) {
        let mut per_query: HashMap<QueryId, Vec<u32>> = HashMap::new();
        let mut candidates = std::mem::take(&mut self.candidates);
        for (i, change) in page.iter().enumerate() {
            let started = Instant::now();
            self.index.candidates(change, &mut candidates);
            for id in &candidates {
                if self
                    .entries
                    .get(id)
                    .is_some_and(|e| e.spec.concerns(change))
                {
                    // Pages hold at most a few thousand changes.
                    per_query.entry(*id).or_default().push(i as u32);
                }
            }
            self.match_seconds.record(started.elapsed());
        }
        self.candidates = candidates;
        for (id, only) in per_query {
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            if entry.actor.pages_queued() >= MAX_QUEUED_PAGES {
                // It falls behind: this page is skipped, and a reload queued behind the pages
                // it holds. The reload's snapshot is read after every skipped page's changes
                // were committed (pages are skipped only while the ones before the reload
                // wait), so it holds them; its subscribers get a `reset`.
                if !entry.lagging {
                    entry.lagging = true;
                    metrics::counter!("vibe_live_query_lagging_total").increment(1);
                    let _ = entry.actor.cast(LiveQueryMsg::Resync(Box::new(ResyncMsg {
                        position,
                        book: self.book.clone(),
                    })));
                }
                continue;
            }
            entry.lagging = false;
            let _ = entry.actor.cast(LiveQueryMsg::changes(
                page.clone(),
                only,
                position,
                in_flight.clone(),
            ));
        }
    }

    /// Forgets live query `id` (its task stops once its queue is handled).
    fn forget(&mut self, id: QueryId) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        self.config.live_queries.fetch_sub(1, Ordering::Relaxed);
        self.ids.remove(&entry.spec);
        self.index.remove(id, &entry.spec);
        entry.actor.stop();
        Some(entry)
    }

    /// Stops a live query that has had no subscriber since `generation` began.
    fn expire(&mut self, id: QueryId, generation: u64) {
        let idle = self
            .entries
            .get(&id)
            .is_some_and(|e| e.subscribers.is_empty() && e.idle_generation == generation);
        if idle {
            self.forget(id);
        }
    }

    /// Starts a live query task; its failure comes back as [`DocTypeMsg::QueryFailed`].
    fn spawn(
        &mut self,
        myself: &ActorRef<DocTypeMsg>,
        id: QueryId,
        spec: Arc<QuerySpec>,
        sub_id: Arc<str>,
        resync: Vec<Arc<Subscriber>>,
    ) -> (LiveQueryRef, u64) {
        let args = LiveQueryArgs {
            spec,
            sub_id,
            start: self.position,
            resync,
            source: self.config.source.clone(),
            replay: self.config.replay,
            window_bytes: self.config.window_bytes,
            live_bytes: self.config.live_bytes.clone(),
            book: self.book.clone(),
        };
        let instance = self.next_instance;
        self.next_instance += 1;
        let supervisor = myself.clone();
        let on_exit = move |exit| {
            if let Exit::Failed(error) = exit {
                let _ = supervisor.cast(DocTypeMsg::QueryFailed {
                    id,
                    instance,
                    error,
                });
            }
        };
        (crate::live_query::start(args, on_exit), instance)
    }

    /// Starts the query if it is new (without waiting for its load), takes a reference for the
    /// connection, and answers the request once the query has handled the subscription.
    fn subscribe(&mut self, myself: &ActorRef<DocTypeMsg>, request: SubscribeRequest) {
        let SubscribeRequest {
            spec,
            subscriber,
            request_id,
            since,
            reply,
        } = request;
        let id = match self.ids.get(&spec) {
            Some(id) => *id,
            None => {
                // The bytes are a soft bound (a window's are known once it has loaded); the
                // count is claimed in one step, as type actors subscribe in parallel: a check
                // and a later add let several pass at `max - 1`.
                let max_bytes = self.config.max_live_bytes;
                if self.config.live_bytes.load(Ordering::Relaxed) >= max_bytes {
                    let _ = reply.send(Err(SubscribeError::LiveQueryBytes(max_bytes)));
                    return;
                }
                let max = self.config.max_live_queries;
                let claimed = self.config.live_queries.fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |n| (n < max).then_some(n + 1),
                );
                if claimed.is_err() {
                    let _ = reply.send(Err(SubscribeError::TooManyLiveQueries(max)));
                    return;
                }
                let id = self.next_id;
                self.next_id += 1;
                let sub_id: Arc<str> =
                    format!("q{}", self.next_sub.fetch_add(1, Ordering::Relaxed)).into();
                let (actor, instance) =
                    self.spawn(myself, id, spec.clone(), sub_id.clone(), Vec::new());
                self.index.insert(id, &spec);
                self.ids.insert(spec.clone(), id);
                self.entries.insert(
                    id,
                    Entry {
                        spec,
                        actor,
                        instance,
                        sub_id,
                        subscribers: ByConnection::default(),
                        failures: VecDeque::new(),
                        idle_generation: 0,
                        lagging: false,
                    },
                );
                id
            }
        };
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let conn_id = subscriber.outbox.conn_id;
        let subscriber = match entry.subscribers.get_mut(conn_id) {
            Some((known, refs)) => {
                *refs += 1;
                known.clone()
            }
            None => {
                let subscriber = Arc::new(subscriber);
                entry.subscribers.insert(conn_id, (subscriber.clone(), 1));
                subscriber
            }
        };
        let answer = entry
            .actor
            .subscribe(subscriber, request_id, since, self.position);
        let supervisor = myself.clone();
        tokio::spawn(async move {
            match answer.await {
                Ok(sub) => {
                    let _ = reply.send(Ok(sub));
                }
                Err(_) => {
                    // The client is told the subscription failed: it will not unsubscribe.
                    let _ = supervisor.cast(DocTypeMsg::SubscribeFailed { id, conn_id });
                    let _ = reply.send(Err(SubscribeError::Unavailable));
                }
            }
        });
    }

    fn restart(&mut self, myself: &ActorRef<DocTypeMsg>, id: QueryId) {
        let now = Instant::now();
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        entry
            .failures
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        entry.failures.push_back(now);
        let subscribers: Vec<Arc<Subscriber>> =
            entry.subscribers.values().map(|(s, _)| s.clone()).collect();
        if entry.failures.len() > RESTARTS {
            tracing::error!(doc_type = %entry.spec.doc_type, "live query keeps failing; giving up");
            if let Some(entry) = self.forget(id) {
                fail_subscribers(&entry.sub_id, &subscribers);
            }
            return;
        }
        let spec = entry.spec.clone();
        let sub_id = entry.sub_id.clone();
        let (actor, instance) = self.spawn(myself, id, spec, sub_id, subscribers);
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.actor = actor;
            entry.instance = instance;
        }
    }
}

/// Tells subscribers their subscription ended for good (their connections stop counting it).
fn fail_subscribers(sub_id: &str, subscribers: &[Arc<Subscriber>]) {
    let bytes = bytes::Bytes::from(crate::wire::subscription_error(
        sub_id,
        "subscription_failed",
        "the live query failed repeatedly; subscribe again",
    ));
    for s in subscribers {
        let _ = s.send(bytes.clone());
        s.gate.mark_failed();
    }
}
