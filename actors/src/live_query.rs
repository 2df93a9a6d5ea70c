//! One live query: the actor that owns a query's result window, applies each change of its type
//! once, encodes each resulting event once, and fans the frames out to its subscribers' outboxes
//! in one pass per message (a page of changes): each subscriber gets all its frames of the page
//! under one lock of its queue, with at most one wake-up (per-subscriber ACL checks in memory, no
//! database round trip).
//!
//! Guarantees: changes are applied in feed order, each at most once (a cursor at or behind the
//! actor's position, or a change the loaded snapshot already saw, is skipped); a subscriber's
//! first frame is its reply (snapshot or resume), queued before any event for it; events carry
//! the cursor of the change that caused them. A restarted actor loads a fresh snapshot and sends
//! every subscriber a `reset`. Recent events stay in a bounded replay buffer, so a client that
//! reconnects with a cursor inside it gets exactly the events it missed; older cursors get a
//! `reset`.
//!
//! Certificates: the query holds the node's certificate book as of its own position in the
//! stream (a [`LiveQueryMsg::Credentials`] arrives between the changes before and after a
//! certificate change). When a subscriber's holdings change, each window document whose read
//! rule tests the changed certificate is re-evaluated for that subscriber, who gets `add` or
//! `remove`; such per-subscriber events are not in the replay buffer, so resumes from before
//! them get a fresh snapshot.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_util::{FutureExt, StreamExt};
use serde::Serialize;
use std::panic::AssertUnwindSafe;
use uuid::Uuid;

use crate::acl::{Acl, Operation};
use crate::certs::CertificateBook;
use crate::change::{Change, Cursor, SnapshotView};
use crate::outbox::{Gate, NotQueued, Outbox};
use crate::query::{QuerySpec, Scope};
use crate::window::{Window, WindowEvent, encoded_len};
use crate::wire::{Document, DocumentView, views};

/// A future the snapshot source returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A query's first `limit + 1` documents and the database snapshot they were read in.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub docs: Vec<Document>,
    /// The load stopped early: the documents passed the byte budget it was given.
    pub cut: bool,
    pub view: SnapshotView,
    /// A feed position by which every change this snapshot saw has been cut into a batch: a
    /// client resuming from before it may have missed a change the snapshot absorbed.
    pub settled: Cursor,
}

impl Snapshot {
    /// For a shared query, the documents its caller may read under `book` — the node's clock —
    /// and not only under the database's: a certificate the node dropped as expired still
    /// counts in the load's SQL while the database's clock is behind, and no later change
    /// would judge those documents again. A load that knew of more documents than the limit
    /// and lost one here no longer knows what follows its last: it is marked incomplete.
    fn admitted(mut self, spec: &QuerySpec, book: &CertificateBook) -> Self {
        let Scope::Shared(caller) = &spec.scope else {
            return self;
        };
        let loaded = self.docs.len();
        let held = book.view(caller);
        self.docs
            .retain(|d| d.acl.allows(Operation::Read, Some(caller), &d.owner, &held));
        if self.docs.len() < loaded && loaded > spec.limit as usize {
            self.cut = true;
        }
        self
    }
}

/// Where live queries load their windows from (the server's store implements it).
pub trait SnapshotSource: Send + Sync + std::fmt::Debug + 'static {
    /// The query's documents, stopping once they hold more than `budget` bytes as
    /// [`crate::window::encoded_len`] counts them — with the one that crosses it, and never before
    /// two, so the window knows the document past what it holds ([`Snapshot::cut`] then says so).
    fn load(&self, spec: Arc<QuerySpec>, budget: usize) -> BoxFuture<Result<Snapshot, String>>;
}

/// A connection subscribed to a live query.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub outbox: Outbox,
    /// Closed by the connection when the subscription ends (`unsub`, a lost permission): no
    /// event after that reaches the client, however late the live query learns of it.
    pub gate: Gate,
    /// The DID whose read access decides what this subscriber sees.
    pub caller: String,
    /// Events at or before this cursor are not sent: a client resuming from a cursor this node
    /// has not reached yet (it came from a node further ahead) already has them.
    pub seen_up_to: Option<Cursor>,
}

impl Subscriber {
    /// Queues `frame` for this subscriber, unless its subscription ended.
    pub fn send(&self, frame: Bytes) -> Result<(), NotQueued> {
        self.outbox.send_through(&self.gate, frame)
    }

    /// Queues all `frames` (emptying it) for this subscriber, unless its subscription ended.
    pub fn send_all(&self, frames: &mut Vec<Bytes>) -> Result<(), NotQueued> {
        self.outbox.send_all_through(&self.gate, frames)
    }
}

/// A running live query's address. Messages queue without bound (the page budget bounds what the
/// feed can queue; subscriptions are bounded per connection) and its task handles them one at a
/// time. A plain task rather than a ractor actor: an idle live query is a few hundred bytes this
/// way, about 10 KB as an actor, and a node holds hundreds of thousands of them.
#[derive(Debug, Clone)]
pub struct LiveQueryRef {
    mailbox: mpsc::UnboundedSender<LiveQueryMsg>,
    /// Pages of changes sent and not yet handled (the one being handled included).
    pages: Arc<AtomicUsize>,
}

/// The live query's task has ended.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the live query has stopped")]
pub struct Stopped;

impl LiveQueryRef {
    pub fn cast(&self, message: LiveQueryMsg) -> Result<(), Stopped> {
        let page = matches!(message, LiveQueryMsg::Changes(_));
        self.mailbox.unbounded_send(message).map_err(|_| Stopped)?;
        if page {
            self.pages.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// How many pages of changes wait for this query (the one it handles included): the type
    /// actor stops sending more past a few (see `realtime::MAX_QUEUED_PAGES`).
    pub fn pages_queued(&self) -> usize {
        self.pages.load(Ordering::Relaxed)
    }

    /// Stops the query once the messages already queued are handled.
    pub fn stop(&self) {
        self.mailbox.close_channel();
    }

    /// Adds a subscriber (see [`SubscribeMsg`]); the answer resolves to its subscription id
    /// once the query has loaded and handled it, or fails if the query stops first.
    pub fn subscribe(
        &self,
        subscriber: Arc<Subscriber>,
        request_id: serde_json::Value,
        since: Option<Cursor>,
        position: Cursor,
    ) -> oneshot::Receiver<Arc<str>> {
        let (reply, answer) = oneshot::channel();
        // A stopped query drops the message, and with it `reply`: the answer fails.
        let _ = self.cast(LiveQueryMsg::Subscribe(Box::new(SubscribeMsg {
            subscriber,
            request_id,
            since,
            position,
            reply,
        })));
        answer
    }
}

/// How a live query's task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop, or every address was dropped.
    Stopped,
    /// A message failed (a load error, a panic): the supervisor restarts it.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LiveQueryError {
    #[error("loading the window failed: {0}")]
    Load(String),
    #[error("live query crash requested")]
    CrashRequested,
}

#[derive(Debug)]
pub struct LiveQueryArgs {
    pub spec: Arc<QuerySpec>,
    /// The id events carry; stays the same across restarts.
    pub sub_id: Arc<str>,
    /// The feed position the window must be consistent with.
    pub start: Cursor,
    /// On a restart: the subscribers to re-sync with a `reset`.
    pub resync: Vec<Arc<Subscriber>>,
    pub source: Arc<dyn SnapshotSource>,
    pub replay: ReplayLimit,
    /// Most bytes the window's documents hold (see [`Window`]).
    pub window_bytes: usize,
    /// The bytes every live query's window of the node keeps, which this one adds its own to
    /// (see `RealtimeConfig::live_bytes`).
    pub live_bytes: Arc<AtomicUsize>,
    /// The certificate book as of `start`.
    pub book: CertificateBook,
}

/// A live query's share of the node's window bytes: kept equal to its window's, and given back
/// when the query's state drops (it stopped, failed or panicked).
#[derive(Debug)]
struct Tally {
    total: Arc<AtomicUsize>,
    mine: usize,
}

impl Tally {
    fn set(&mut self, bytes: usize) {
        if bytes > self.mine {
            self.total.fetch_add(bytes - self.mine, Ordering::Relaxed);
            metrics::gauge!("vibe_live_query_bytes").increment((bytes - self.mine) as f64);
        } else {
            self.total.fetch_sub(self.mine - bytes, Ordering::Relaxed);
            metrics::gauge!("vibe_live_query_bytes").decrement((self.mine - bytes) as f64);
        }
        self.mine = bytes;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// A certificate change, between the changes before and after it in the feed.
#[derive(Debug)]
pub struct CredentialsMsg {
    /// The book after the change.
    pub book: CertificateBook,
    /// The book before it.
    pub before: CertificateBook,
    /// The subjects whose holdings changed.
    pub subjects: Vec<String>,
    /// Where its events go: after the events of the certificate change (or, for an expiry, of
    /// the last change routed) and of any earlier re-evaluation there, before the next change
    /// ([`Cursor::after_events`], [`Cursor::after_reevaluation`]).
    pub cursor: Cursor,
}

/// A message to a live query. Large payloads are boxed: an idle query's mailbox keeps one
/// message-sized node.
pub enum LiveQueryMsg {
    Changes(Box<ChangesMsg>),
    Subscribe(Box<SubscribeMsg>),
    Unsubscribe {
        conn_id: u64,
    },
    /// Changes were lost to this node: reload, and reset every subscriber.
    Resync(Box<ResyncMsg>),
    /// Certificates changed: re-evaluate what the affected subscribers may see.
    Credentials(Arc<CredentialsMsg>),
    /// Fault injection for tests: the handler fails, as a bug would.
    Crash,
}

// Every idle live query's mailbox holds a message-sized node, so a payload of more than a pointer
// is boxed: an inline certificate book once cost each of 100,000 idle live queries ~240 B
// (docs/benchmarks.md, live queries at scale).
const _: () = assert!(std::mem::size_of::<LiveQueryMsg>() <= 16);

/// What an event costs the replay buffer besides its document: the event itself, a remove's
/// frame, the buffer's slot.
const EVENT_OVERHEAD: usize = 256;

/// Changes before `position` were lost to this node; `book` is the certificate book as of it.
#[derive(Debug)]
pub struct ResyncMsg {
    pub position: Cursor,
    pub book: CertificateBook,
}

/// A page of changes of this query's type in feed order, the indexes of those that concern
/// this query, and the position after the page.
#[derive(Debug)]
pub struct ChangesMsg {
    pub page: Arc<[Change]>,
    pub only: Vec<u32>,
    pub position: Cursor,
    pub in_flight: crate::realtime::InFlight,
}

/// Adds a subscriber (or re-sends its snapshot), queueing the reply frame for `request_id`.
#[derive(Debug)]
pub struct SubscribeMsg {
    pub subscriber: Arc<Subscriber>,
    pub request_id: serde_json::Value,
    pub since: Option<Cursor>,
    /// The type actor's position: no change that concerns this query lies between it and ours.
    pub position: Cursor,
    pub reply: oneshot::Sender<Arc<str>>,
}

impl LiveQueryMsg {
    pub fn changes(
        page: Arc<[Change]>,
        only: Vec<u32>,
        position: Cursor,
        in_flight: crate::realtime::InFlight,
    ) -> Self {
        LiveQueryMsg::Changes(Box::new(ChangesMsg {
            page,
            only,
            position,
            in_flight,
        }))
    }
}

impl std::fmt::Debug for LiveQueryMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiveQueryMsg::Changes(c) => {
                write!(f, "Changes({} up to {})", c.only.len(), c.position)
            }
            LiveQueryMsg::Subscribe(s) => write!(f, "Subscribe(since {:?})", s.since),
            LiveQueryMsg::Unsubscribe { conn_id } => write!(f, "Unsubscribe({conn_id})"),
            LiveQueryMsg::Resync(r) => write!(f, "Resync({})", r.position),
            LiveQueryMsg::Credentials(c) => write!(f, "Credentials({})", c.cursor),
            LiveQueryMsg::Crash => f.write_str("Crash"),
        }
    }
}

#[derive(Debug)]
pub struct LiveQueryState {
    sub_id: Arc<str>,
    window: Window,
    /// Every change at or before this position has been applied (or skipped).
    position: Cursor,
    /// Changes this snapshot saw are already in the window.
    snapshot: SnapshotView,
    subscribers: ByConnection<Arc<Subscriber>>,
    /// Recent events, oldest first; together they cover every event after `replay_from`.
    replay: VecDeque<Arc<Encoded>>,
    replay_from: Cursor,
    /// What `replay` holds, as [`Encoded::bytes`] counts it.
    replay_bytes: usize,
    replay_limit: ReplayLimit,
    /// Events emitted while handling the current message, not yet sent: one pass over the
    /// subscribers sends them all (see [`LiveQueryState::flush`]).
    pending: Vec<Arc<Encoded>>,
    /// A subscriber's frames of one pass; kept to reuse its allocation.
    frames: Vec<Bytes>,
    source: Arc<dyn SnapshotSource>,
    book: CertificateBook,
    /// The window's bytes as counted in the node's total.
    tally: Tally,
}

/// Per-connection entries of one live query, in a vector: most live queries have one
/// subscriber, and a hash map's smallest table has room for four.
#[derive(Debug, Clone)]
pub(crate) struct ByConnection<T>(Vec<(u64, T)>);

impl<T> Default for ByConnection<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> ByConnection<T> {
    pub(crate) fn get_mut(&mut self, conn_id: u64) -> Option<&mut T> {
        self.0
            .iter_mut()
            .find(|(c, _)| *c == conn_id)
            .map(|(_, v)| v)
    }

    pub(crate) fn insert(&mut self, conn_id: u64, value: T) {
        if let Some(slot) = self.get_mut(conn_id) {
            *slot = value;
            return;
        }
        // Exact room while small; doubling beyond (broadcast queries have thousands).
        if self.0.len() == self.0.capacity() && self.0.len() < 4 {
            self.0.reserve_exact(1);
        }
        self.0.push((conn_id, value));
    }

    pub(crate) fn remove(&mut self, conn_id: u64) -> Option<T> {
        let at = self.0.iter().position(|(c, _)| *c == conn_id)?;
        Some(self.0.swap_remove(at).1)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|(_, v)| v)
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.0.retain(|(_, v)| keep(v));
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Starts the query's task, which loads the window (messages queue meanwhile), re-syncs
/// `args.resync`, then handles its messages; `on_exit` runs when the task ends (a failed load
/// is a failure like any other). The caller does not wait for the load: one slow query does not
/// hold up its type.
pub fn start(args: LiveQueryArgs, on_exit: impl FnOnce(Exit) + Send + 'static) -> LiveQueryRef {
    let (mailbox, messages) = mpsc::unbounded();
    let pages = Arc::new(AtomicUsize::new(0));
    metrics::gauge!("vibe_live_queries").increment(1.0);
    // A panicking handler must not take the node down, nor leave its subscribers waiting for
    // events that never come: it fails like an error, and the supervisor restarts it. Built from
    // combinators rather than an async block, which would hold the loop's state twice.
    let task = AssertUnwindSafe(run(Box::new(args), messages, pages.clone()))
        .catch_unwind()
        .map(move |result| {
            let exit = match result {
                Ok(Ok(())) => Exit::Stopped,
                Ok(Err(e)) => Exit::Failed(e.to_string()),
                Err(_) => Exit::Failed("the live query panicked".into()),
            };
            metrics::gauge!("vibe_live_queries").decrement(1.0);
            on_exit(exit);
        });
    tokio::spawn(task);
    LiveQueryRef { mailbox, pages }
}

/// The query's task: the load, then one message at a time until every address is gone or one
/// fails.
async fn run(
    args: Box<LiveQueryArgs>,
    mut messages: mpsc::UnboundedReceiver<LiveQueryMsg>,
    pages: Arc<AtomicUsize>,
) -> Result<(), LiveQueryError> {
    // The task an idle query keeps is this future, allocated once per live query: everything
    // in it is boxed (the arguments, the load's future, the state), because a future keeps a
    // value it awaits or returns in a slot of its own beside its locals — with the state inline
    // the task took 1,384 bytes for a 416-byte state; now 88.
    let mut state = Box::pin(LiveQueryState::load(args)).await?;
    while let Some(message) = messages.next().await {
        let page = matches!(message, LiveQueryMsg::Changes(_));
        // Boxed per message, so the task an idle query keeps is small: handling a page (with
        // its snapshot reload) needs far more room than waiting does.
        Box::pin(state.handle(message)).await?;
        state.flush();
        state.tally.set(state.window.bytes());
        if page {
            pages.fetch_sub(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

impl LiveQueryState {
    async fn load(args: Box<LiveQueryArgs>) -> Result<Box<Self>, LiveQueryError> {
        let snapshot = args
            .source
            .load(args.spec.clone(), args.window_bytes)
            .await
            .map_err(LiveQueryError::Load)?
            .admitted(&args.spec, &args.book);
        let args = *args;
        let mut state = Box::new(LiveQueryState {
            sub_id: args.sub_id,
            window: Window::new(args.spec, args.window_bytes, snapshot.docs, snapshot.cut),
            position: args.start,
            snapshot: snapshot.view,
            subscribers: ByConnection::default(),
            replay: VecDeque::new(),
            replay_from: args.start.max(snapshot.settled),
            replay_bytes: 0,
            replay_limit: args.replay,
            pending: Vec::new(),
            frames: Vec::new(),
            source: args.source,
            book: args.book,
            tally: Tally {
                total: args.live_bytes,
                mine: 0,
            },
        });
        state.tally.set(state.window.bytes());
        for subscriber in args.resync {
            let frame = state.reset_frame(&subscriber.caller, args.start);
            let _ = subscriber.send(frame);
            state
                .subscribers
                .insert(subscriber.outbox.conn_id, subscriber);
        }
        Ok(state)
    }

    async fn handle(&mut self, message: LiveQueryMsg) -> Result<(), LiveQueryError> {
        match message {
            LiveQueryMsg::Changes(message) => {
                let ChangesMsg {
                    page,
                    only,
                    position,
                    ..
                } = *message;
                for i in only {
                    if let Some(change) = page.get(i as usize) {
                        self.apply(change).await?;
                    }
                }
                self.position = self.position.max(position);
            }
            LiveQueryMsg::Subscribe(message) => {
                let SubscribeMsg {
                    subscriber,
                    request_id,
                    since,
                    position,
                    reply,
                } = *message;
                self.position = self.position.max(position);
                self.subscribe(subscriber, &request_id, since);
                let _ = reply.send(self.sub_id.clone());
            }
            LiveQueryMsg::Unsubscribe { conn_id } => {
                self.subscribers.remove(conn_id);
            }
            LiveQueryMsg::Resync(resync) => {
                let ResyncMsg { position, book } = *resync;
                self.book = book;
                let spec = self.window.spec().clone();
                let snapshot = self
                    .source
                    .load(spec.clone(), self.window.budget())
                    .await
                    .map_err(LiveQueryError::Load)?
                    .admitted(&spec, &self.book);
                self.window = self.window.reload(snapshot.docs, snapshot.cut);
                self.snapshot = snapshot.view;
                self.position = position;
                self.forget_replay(position.max(snapshot.settled));
                for subscriber in self.subscribers.values() {
                    let frame = self.reset_frame(&subscriber.caller, position);
                    let _ = subscriber.send(frame);
                }
            }
            LiveQueryMsg::Credentials(message) => self.credentials_changed(&message).await?,
            LiveQueryMsg::Crash => return Err(LiveQueryError::CrashRequested),
        }
        Ok(())
    }

    /// Sends each affected subscriber `add` or `remove` for the window documents whose
    /// visibility to them the certificate change flipped.
    async fn credentials_changed(
        &mut self,
        message: &CredentialsMsg,
    ) -> Result<(), LiveQueryError> {
        self.book = message.book.clone();
        match &self.window.spec().scope {
            Scope::Own(_) => return Ok(()),
            Scope::Shared(caller) if message.subjects.contains(caller) => {
                return self.reload_shared(message.cursor).await;
            }
            Scope::Shared(_) => return Ok(()),
            Scope::Global => {}
        }
        let tests_certificates = |d: &&Document| d.acl.uses_certificates(Operation::Read);
        let window_tests = self.window.docs().iter().any(|d| tests_certificates(&d));
        // A replayed event is judged by the book at the resume, not the one at the event: for
        // an ACL that tests certificates, a document denied then would be shown, or a `remove`
        // dropped for a reader who since lost the right.
        let replay_tests = self.replay.iter().any(|e| {
            [&e.acl_before, &e.acl_after]
                .into_iter()
                .flatten()
                .any(|acl| acl.uses_certificates(Operation::Read))
        });
        if window_tests || replay_tests {
            // Frames for these events are per subscriber and not replayable: a resume from
            // before this point gets a fresh snapshot.
            self.forget_replay(self.replay_from.max(message.cursor));
        }
        if !window_tests {
            return Ok(());
        }
        let tested: Vec<&Document> = self
            .window
            .docs()
            .iter()
            .filter(tests_certificates)
            .collect();
        for subscriber in self.subscribers.values() {
            // One that resumed from further ahead got these frames from that node already.
            if !message.subjects.contains(&subscriber.caller)
                || subscriber
                    .seen_up_to
                    .is_some_and(|seen| seen >= message.cursor)
            {
                continue;
            }
            let caller = subscriber.caller.as_str();
            for doc in &tested {
                let can = |book: &CertificateBook| {
                    doc.acl.allows(
                        Operation::Read,
                        Some(caller),
                        &doc.owner,
                        &book.view(caller),
                    )
                };
                let (event, body, id) = match (can(&message.before), can(&message.book)) {
                    (false, true) => ("add", Some(*doc), None),
                    (true, false) => ("remove", None, Some(doc.id)),
                    _ => continue,
                };
                let frame = encode(&EventFrame {
                    sub: &self.sub_id,
                    event,
                    cursor: message.cursor.to_string(),
                    doc: body.map(|d| d.view(Some(caller))),
                    id,
                    docs: None,
                });
                let _ = subscriber.send(frame);
            }
        }
        Ok(())
    }

    /// The caller of a shared query gained or lost certificates: documents anywhere may have
    /// come into or gone out of reach, so the window is read again and the difference sent as
    /// events.
    async fn reload_shared(&mut self, cursor: Cursor) -> Result<(), LiveQueryError> {
        let spec = self.window.spec().clone();
        let snapshot = self
            .source
            .load(spec.clone(), self.window.budget())
            .await
            .map_err(LiveQueryError::Load)?
            .admitted(&spec, &self.book);
        let old: Vec<Document> = self.window.docs().to_vec();
        self.window = self.window.reload(snapshot.docs, snapshot.cut);
        self.snapshot = snapshot.view;
        self.replay_from = self.replay_from.max(snapshot.settled);
        let mut events = Vec::new();
        for doc in &old {
            match self.window.docs().iter().find(|d| d.id == doc.id) {
                None => events.push(WindowEvent::Remove(doc.clone())),
                Some(now) if now.rev != doc.rev => events.push(WindowEvent::Change {
                    doc: now.clone(),
                    old: Box::new(doc.clone()),
                }),
                Some(_) => {}
            }
        }
        for doc in self.window.docs() {
            if !old.iter().any(|d| d.id == doc.id) {
                events.push(WindowEvent::Add(doc.clone()));
            }
        }
        let count = u64::try_from(events.len()).unwrap_or(u64::MAX);
        for (i, event) in (0..count).zip(events) {
            self.emit(event, cursor.event(cursor.sub.saturating_add(i)));
        }
        // As after a refill: the load may have absorbed changes a subscriber resumed from
        // further ahead has not seen.
        self.reset_subscribers_ahead(cursor, count);
        Ok(())
    }

    async fn apply(&mut self, change: &Change) -> Result<(), LiveQueryError> {
        if change.cursor <= self.position || self.snapshot.sees(change.xid) {
            return Ok(());
        }
        let shared_view;
        let change = match &self.window.spec().scope {
            // The window holds only what the caller may read: each version of the document
            // the caller may not read counts as absent.
            Scope::Shared(caller) => {
                shared_view = readable_versions(change, caller, &self.book);
                &shared_view
            }
            _ => change,
        };
        let applied = self.window.apply(change);
        // Each event of this change gets its own position, so a client that received only the
        // first ones resumes right after them.
        let mut sub = 0;
        for event in applied.events {
            self.emit(event, change.cursor.event(sub));
            sub += 1;
        }
        if applied.needs_refill {
            // What this change emitted so far goes out before the load's round trip.
            self.flush();
            let snapshot = self
                .source
                .load(self.window.spec().clone(), self.window.budget())
                .await
                .map_err(LiveQueryError::Load)?
                .admitted(self.window.spec(), &self.book);
            self.snapshot = snapshot.view;
            // Changes this load absorbed produce no events: resumes from before it are not exact.
            self.replay_from = self.replay_from.max(snapshot.settled);
            for event in self.window.refill(snapshot.docs, snapshot.cut) {
                self.emit(event, change.cursor.event(sub));
                sub += 1;
            }
            self.reset_subscribers_ahead(change.cursor, sub);
        }
        // At its last event, not at the change: a page of the feed can end at this change, and a
        // subscriber replied to here must not get the change's later events again on resume.
        self.position = change.cursor.event(sub.saturating_sub(1));
        Ok(())
    }

    /// After a refill or reload at `at` (which emitted `events` events from there): a subscriber
    /// that resumed from a cursor at or past `at` (it came from a node further ahead) would have
    /// the refill's events skipped as already seen, yet the load may have absorbed later changes
    /// it has not seen, which then make no event of their own. It gets a `reset` with the window
    /// instead.
    fn reset_subscribers_ahead(&mut self, at: Cursor, events: u64) {
        let ahead: Vec<Arc<Subscriber>> = self
            .subscribers
            .values()
            .filter(|s| s.seen_up_to.is_some_and(|seen| seen >= at))
            .cloned()
            .collect();
        if ahead.is_empty() {
            return;
        }
        // Everyone else gets the refill's events first.
        self.flush();
        let cursor = at.event(at.sub.saturating_add(events.saturating_sub(1)));
        for subscriber in ahead {
            let frame = self.reset_frame(&subscriber.caller, cursor);
            let _ = subscriber.send(frame);
            let caught_up = Arc::new(Subscriber {
                seen_up_to: None,
                ..Subscriber::clone(&subscriber)
            });
            self.subscribers
                .insert(subscriber.outbox.conn_id, caught_up);
        }
    }

    /// Queues the event for the next [`LiveQueryState::flush`] and keeps it for replays, as far
    /// as the replay limit allows (the oldest events go first; an event larger than the byte
    /// limit is not kept at all).
    fn emit(&mut self, event: WindowEvent, cursor: Cursor) {
        let encoded = Arc::new(Encoded::new(self.sub_id.clone(), event, cursor));
        self.pending.push(encoded.clone());
        self.replay_bytes += encoded.bytes;
        self.replay.push_back(encoded);
        while self.replay.len() > self.replay_limit.events
            || self.replay_bytes > self.replay_limit.bytes
        {
            let Some(evicted) = self.replay.pop_front() else {
                break;
            };
            self.replay_bytes -= evicted.bytes;
            self.replay_from = evicted.cursor;
        }
    }

    /// Empties the replay buffer: resumes from before `from` get a fresh snapshot.
    fn forget_replay(&mut self, from: Cursor) {
        self.replay.clear();
        self.replay_bytes = 0;
        self.replay_from = from;
    }

    /// Sends the pending events in one pass over the subscribers: each gets all of its frames
    /// under one lock of its queue and at most one wake-up, however many events a page of
    /// changes made (an insert into a full window is an `add` and a `remove`). Subscribers
    /// whose connection has gone are dropped on the way.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let spec = self.window.spec();
        let (pending, frames, book) = (&self.pending, &mut self.frames, &self.book);
        let mut delivered = 0;
        let started = std::time::Instant::now();
        self.subscribers.retain(|s| {
            frames.extend(pending.iter().filter_map(|e| frame_for(e, s, spec, book)));
            let count = frames.len() as u64;
            if s.send_all(frames).is_ok() {
                delivered += count;
            }
            !s.outbox.is_closed()
        });
        self.pending.clear();
        // Once per pass, not per subscriber: a metrics update is a registry lookup.
        metrics::histogram!("vibe_live_query_fanout_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("vibe_ws_events_total").increment(delivered);
    }

    fn subscribe(
        &mut self,
        mut subscriber: Arc<Subscriber>,
        request_id: &serde_json::Value,
        since: Option<Cursor>,
    ) {
        // Only a replayed resume may skip events as already seen: a fresh snapshot is the window
        // as of this query's position, and every event after it is news to the client.
        let resumed = since.is_some_and(|since| since >= self.replay_from);
        let seen_up_to = since.filter(|since| resumed && *since > self.position);
        if seen_up_to != subscriber.seen_up_to {
            subscriber = Arc::new(Subscriber {
                seen_up_to,
                ..Subscriber::clone(&subscriber)
            });
        }
        let frame = match since {
            Some(since) if since >= self.replay_from => {
                let cursor = self.position.max(since);
                let frame = reply_frame(request_id, &self.sub_id, cursor, None, true);
                let _ = subscriber.send(frame);
                self.frames.extend(
                    self.replay
                        .iter()
                        .filter(|e| e.cursor > since)
                        .filter_map(|e| frame_for(e, &subscriber, self.window.spec(), &self.book)),
                );
                let _ = subscriber.send_all(&mut self.frames);
                None
            }
            Some(_) => Some(reply_frame(
                request_id,
                &self.sub_id,
                self.position,
                Some(&views(
                    &self.visible(&subscriber.caller),
                    Some(&subscriber.caller),
                )),
                true,
            )),
            None => Some(reply_frame(
                request_id,
                &self.sub_id,
                self.position,
                Some(&views(
                    &self.visible(&subscriber.caller),
                    Some(&subscriber.caller),
                )),
                false,
            )),
        };
        if let Some(frame) = frame {
            let _ = subscriber.send(frame);
        }
        self.subscribers
            .insert(subscriber.outbox.conn_id, subscriber);
    }

    /// The window as `caller` may see it.
    fn visible(&self, caller: &str) -> Vec<Document> {
        // A shared query's window holds exactly what its one caller may read.
        let own = matches!(self.window.spec().scope, Scope::Own(_) | Scope::Shared(_));
        self.window
            .docs()
            .iter()
            .filter(|d| {
                own || d.acl.allows(
                    Operation::Read,
                    Some(caller),
                    &d.owner,
                    &self.book.view(caller),
                )
            })
            .cloned()
            .collect()
    }

    fn reset_frame(&self, caller: &str, cursor: Cursor) -> Bytes {
        encode(&EventFrame {
            sub: &self.sub_id,
            event: "reset",
            cursor: cursor.to_string(),
            doc: None,
            id: None,
            docs: Some(&views(&self.visible(caller), Some(caller))),
        })
    }
}

/// How much one live query's replay buffer keeps at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimit {
    pub events: usize,
    /// As [`Encoded::bytes`] counts them: a count alone would let a few writes of large
    /// documents pin gigabytes per live query.
    pub bytes: usize,
}

/// One event, encoded at most once per kind, shared by every subscriber and the replay buffer.
#[derive(Debug)]
pub struct Encoded {
    sub_id: Arc<str>,
    cursor: Cursor,
    /// What keeping it costs, near enough: the document (as JSON) and a frame carrying it.
    bytes: usize,
    owner: String,
    doc_id: Uuid,
    /// The document after the event, if it is in the window.
    doc: Option<Document>,
    /// Who could see it before / after (None: it was not / is not in the window).
    acl_before: Option<Acl>,
    acl_after: Option<Acl>,
    /// Per kind, as the owner receives it (with the ACL) and as others do (without).
    frames: [[OnceLock<Bytes>; 2]; 3],
}

#[derive(Clone, Copy)]
enum Kind {
    Add = 0,
    Change = 1,
    Remove = 2,
}

impl Encoded {
    fn new(sub_id: Arc<str>, event: WindowEvent, cursor: Cursor) -> Self {
        let (doc, old) = match event {
            WindowEvent::Add(doc) => (Some(doc), None),
            WindowEvent::Change { doc, old } => (Some(doc), Some(*old)),
            WindowEvent::Remove(old) => (None, Some(old)),
        };
        let any = doc.as_ref().or(old.as_ref());
        // The frames are encoded when first sent; typically one view of the document.
        let bytes = EVENT_OVERHEAD + doc.as_ref().map_or(0, |d| 2 * encoded_len(d));
        Self {
            sub_id,
            cursor,
            bytes,
            owner: any.map(|d| d.owner.clone()).unwrap_or_default(),
            doc_id: any.map(|d| d.id).unwrap_or_default(),
            acl_before: old.map(|d| d.acl),
            acl_after: doc.as_ref().map(|d| d.acl.clone()),
            doc,
            frames: Default::default(),
        }
    }

    fn frame(&self, kind: Kind, for_owner: bool) -> Bytes {
        self.frames[kind as usize][usize::from(for_owner)]
            .get_or_init(|| {
                let viewer = for_owner.then_some(self.owner.as_str());
                let (event, doc, id) = match kind {
                    Kind::Add => ("add", self.doc.as_ref(), None),
                    Kind::Change => ("change", self.doc.as_ref(), None),
                    Kind::Remove => ("remove", None, Some(self.doc_id)),
                };
                encode(&EventFrame {
                    sub: &self.sub_id,
                    event,
                    cursor: self.cursor.to_string(),
                    doc: doc.map(|d| d.view(viewer)),
                    id,
                    docs: None,
                })
            })
            .clone()
    }
}

/// `change` with each version `caller` may not read (under `book`) left out.
fn readable_versions(change: &Change, caller: &str, book: &CertificateBook) -> Change {
    let keep = |image: &Option<crate::change::Image>| {
        image.clone().filter(|i| {
            i.acl.allows(
                Operation::Read,
                Some(caller),
                &change.owner,
                &book.view(caller),
            ) && !i.acl.is_public()
                && change.owner != caller
        })
    };
    Change {
        new: keep(&change.new),
        old: keep(&change.old),
        ..change.clone()
    }
}

/// `event` as `subscriber` receives it: a document they could not see and now can is an `add`,
/// one they could see and no longer can is a `remove`; `None` when it is not for them.
fn frame_for(
    event: &Encoded,
    subscriber: &Subscriber,
    spec: &QuerySpec,
    book: &CertificateBook,
) -> Option<Bytes> {
    if subscriber
        .seen_up_to
        .is_some_and(|seen| event.cursor <= seen)
    {
        return None;
    }
    let own = matches!(spec.scope, Scope::Own(_) | Scope::Shared(_));
    let can = |acl: &Option<Acl>| {
        acl.as_ref().is_some_and(|acl| {
            own || acl.allows(
                Operation::Read,
                Some(&subscriber.caller),
                &event.owner,
                &book.view(&subscriber.caller),
            )
        })
    };
    let kind = match (can(&event.acl_before), can(&event.acl_after)) {
        (false, true) => Kind::Add,
        (true, true) => Kind::Change,
        (true, false) => Kind::Remove,
        (false, false) => return None,
    };
    let for_owner = subscriber.caller == event.owner;
    Some(event.frame(kind, for_owner))
}

#[derive(Serialize)]
struct EventFrame<'a> {
    sub: &'a str,
    event: &'a str,
    cursor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    doc: Option<DocumentView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    docs: Option<&'a [DocumentView<'a>]>,
}

#[derive(Serialize)]
struct ReplyFrame<'a> {
    re: &'a serde_json::Value,
    ok: bool,
    sub: &'a str,
    cursor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    docs: Option<&'a [DocumentView<'a>]>,
    /// With `since`: true when the missed events follow, false when `docs` is a fresh snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed: Option<bool>,
}

fn reply_frame(
    request_id: &serde_json::Value,
    sub: &str,
    cursor: Cursor,
    docs: Option<&[DocumentView<'_>]>,
    with_since: bool,
) -> Bytes {
    encode(&ReplyFrame {
        re: request_id,
        ok: true,
        sub,
        cursor: cursor.to_string(),
        resumed: with_since.then_some(docs.is_none()),
        docs,
    })
}

/// Serialises a frame; our frame types hold only strings, numbers and JSON values.
fn encode(frame: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(frame).unwrap_or_default())
}
