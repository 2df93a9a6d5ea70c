//! One live query: the actor that owns a query's result window, applies each change of its type
//! once, encodes each resulting event once, and fans the frames out to its subscribers' outboxes
//! (per-subscriber ACL checks in memory, no database round trip).
//!
//! Guarantees: changes are applied in feed order, each at most once (a cursor at or behind the
//! actor's position, or a change the loaded snapshot already saw, is skipped); a subscriber's
//! first frame is its reply (snapshot or resume), queued before any event for it; events carry
//! the cursor of the change that caused them. A restarted actor loads a fresh snapshot and sends
//! every subscriber a `reset`. Recent events stay in a bounded replay buffer, so a client that
//! reconnects with a cursor inside it gets exactly the events it missed; older cursors get a
//! `reset`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use uuid::Uuid;

use crate::acl::{Acl, Operation};
use crate::change::{Change, Cursor, SnapshotView};
use crate::outbox::Outbox;
use crate::query::{QuerySpec, Scope};
use crate::window::{Window, WindowEvent};
use crate::wire::Document;

/// A future the snapshot source returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A query's first `limit + 1` documents and the database snapshot they were read in.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub docs: Vec<Document>,
    pub view: SnapshotView,
    /// A feed position by which every change this snapshot saw has been cut into a batch: a
    /// client resuming from before it may have missed a change the snapshot absorbed.
    pub settled: Cursor,
}

/// Where live queries load their windows from (the server's store implements it).
pub trait SnapshotSource: Send + Sync + std::fmt::Debug + 'static {
    fn load(&self, spec: QuerySpec) -> BoxFuture<Result<Snapshot, String>>;
}

/// A connection subscribed to a live query.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub outbox: Outbox,
    /// The DID whose read access decides what this subscriber sees.
    pub caller: String,
    /// Events at or before this cursor are not sent: a client resuming from a cursor this node
    /// has not reached yet (it came from a node further ahead) already has them.
    pub seen_up_to: Option<Cursor>,
}

#[derive(Debug)]
pub struct LiveQuery;

#[derive(Debug)]
pub struct LiveQueryArgs {
    pub spec: QuerySpec,
    /// The id events carry; stays the same across restarts.
    pub sub_id: Arc<str>,
    /// The feed position the window must be consistent with.
    pub start: Cursor,
    /// On a restart: the subscribers to re-sync with a `reset`.
    pub resync: Vec<Subscriber>,
    pub source: Arc<dyn SnapshotSource>,
    pub replay_capacity: usize,
}

pub enum LiveQueryMsg {
    /// A page of changes of this query's type in feed order, the indexes of those that concern
    /// this query, and the position after the page.
    Changes(Arc<[Change]>, Vec<u32>, Cursor, crate::realtime::InFlight),
    /// Adds a subscriber (or re-sends its snapshot), queueing the reply frame for `request_id`.
    Subscribe {
        subscriber: Subscriber,
        request_id: serde_json::Value,
        since: Option<Cursor>,
        /// The type actor's position: no change of this type lies between it and ours.
        position: Cursor,
        reply: RpcReplyPort<Arc<str>>,
    },
    Unsubscribe {
        conn_id: u64,
    },
    /// Fault injection for tests: the handler fails, as a bug would.
    /// Changes before this position were lost to this node: reload, and reset every subscriber.
    Resync(Cursor),
    Crash,
}

impl ractor::Message for LiveQueryMsg {}

impl std::fmt::Debug for LiveQueryMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiveQueryMsg::Changes(_, only, p, _) => {
                write!(f, "Changes({} up to {p})", only.len())
            }
            LiveQueryMsg::Subscribe { since, .. } => write!(f, "Subscribe(since {since:?})"),
            LiveQueryMsg::Unsubscribe { conn_id } => write!(f, "Unsubscribe({conn_id})"),
            LiveQueryMsg::Resync(p) => write!(f, "Resync({p})"),
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
    subscribers: HashMap<u64, Subscriber>,
    /// Recent events, oldest first; together they cover every event after `replay_from`.
    replay: VecDeque<Arc<Encoded>>,
    replay_from: Cursor,
    replay_capacity: usize,
    source: Arc<dyn SnapshotSource>,
}

impl Actor for LiveQuery {
    type Msg = LiveQueryMsg;
    type State = LiveQueryState;
    type Arguments = LiveQueryArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: LiveQueryArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let snapshot = args.source.load(args.spec.clone()).await?;
        let mut state = LiveQueryState {
            sub_id: args.sub_id,
            window: Window::new(args.spec, snapshot.docs),
            position: args.start,
            snapshot: snapshot.view,
            subscribers: HashMap::new(),
            replay: VecDeque::new(),
            replay_from: args.start.max(snapshot.settled),
            replay_capacity: args.replay_capacity,
            source: args.source,
        };
        for subscriber in args.resync {
            let frame = state.reset_frame(&subscriber.caller, args.start);
            let _ = subscriber.outbox.send(frame);
            state
                .subscribers
                .insert(subscriber.outbox.conn_id, subscriber);
        }
        metrics::gauge!("vibe_live_queries").increment(1.0);
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        metrics::gauge!("vibe_live_queries").decrement(1.0);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            LiveQueryMsg::Changes(changes, only, position, _in_flight) => {
                for i in only {
                    if let Some(change) = changes.get(i as usize) {
                        state.apply(change).await?;
                    }
                }
                state.position = state.position.max(position);
            }
            LiveQueryMsg::Subscribe {
                subscriber,
                request_id,
                since,
                position,
                reply,
            } => {
                state.position = state.position.max(position);
                state.subscribe(subscriber, &request_id, since);
                let _ = reply.send(state.sub_id.clone());
            }
            LiveQueryMsg::Unsubscribe { conn_id } => {
                state.subscribers.remove(&conn_id);
            }
            LiveQueryMsg::Resync(position) => {
                let snapshot = state.source.load(state.window.spec().clone()).await?;
                state.window = Window::new(state.window.spec().clone(), snapshot.docs);
                state.snapshot = snapshot.view;
                state.position = position;
                state.replay.clear();
                state.replay_from = position.max(snapshot.settled);
                for subscriber in state.subscribers.values() {
                    let frame = state.reset_frame(&subscriber.caller, position);
                    let _ = subscriber.outbox.send(frame);
                }
            }
            LiveQueryMsg::Crash => return Err("live query crash requested".into()),
        }
        Ok(())
    }
}

impl LiveQueryState {
    async fn apply(&mut self, change: &Change) -> Result<(), ActorProcessingErr> {
        if change.cursor <= self.position || self.snapshot.sees(change.xid) {
            return Ok(());
        }
        let applied = self.window.apply(change);
        // Each event of this change gets its own position, so a client that received only the
        // first ones resumes right after them.
        let mut sub = 0;
        for event in applied.events {
            self.emit(event, change.cursor.event(sub));
            sub += 1;
        }
        if applied.needs_refill {
            let snapshot = self.source.load(self.window.spec().clone()).await?;
            self.snapshot = snapshot.view;
            // Changes this load absorbed produce no events: resumes from before it are not exact.
            self.replay_from = self.replay_from.max(snapshot.settled);
            for event in self.window.refill(snapshot.docs) {
                self.emit(event, change.cursor.event(sub));
                sub += 1;
            }
        }
        self.position = change.cursor;
        Ok(())
    }

    fn emit(&mut self, event: WindowEvent, cursor: Cursor) {
        let encoded = Arc::new(Encoded::new(self.sub_id.clone(), event, cursor));
        let mut delivered = 0;
        self.subscribers.retain(|_, s| {
            delivered += u64::from(deliver(&encoded, s, self.window.spec()));
            !s.outbox.is_closed()
        });
        // Once per event, not per subscriber: a metrics update is a registry lookup.
        metrics::counter!("vibe_ws_events_total").increment(delivered);
        if self.replay.len() >= self.replay_capacity
            && let Some(evicted) = self.replay.pop_front()
        {
            self.replay_from = evicted.cursor;
        }
        if self.replay_capacity > 0 {
            self.replay.push_back(encoded);
        } else {
            self.replay_from = cursor;
        }
    }

    fn subscribe(
        &mut self,
        mut subscriber: Subscriber,
        request_id: &serde_json::Value,
        since: Option<Cursor>,
    ) {
        subscriber.seen_up_to = since.filter(|s| *s > self.position);
        let frame = match since {
            Some(since) if since >= self.replay_from => {
                let cursor = self.position.max(since);
                let frame = reply_frame(request_id, &self.sub_id, cursor, None, true);
                let _ = subscriber.outbox.send(frame);
                for event in self.replay.iter().filter(|e| e.cursor > since) {
                    let _ = deliver(event, &subscriber, self.window.spec());
                }
                None
            }
            Some(_) => Some(reply_frame(
                request_id,
                &self.sub_id,
                self.position,
                Some(&self.visible(&subscriber.caller)),
                true,
            )),
            None => Some(reply_frame(
                request_id,
                &self.sub_id,
                self.position,
                Some(&self.visible(&subscriber.caller)),
                false,
            )),
        };
        if let Some(frame) = frame {
            let _ = subscriber.outbox.send(frame);
        }
        self.subscribers
            .insert(subscriber.outbox.conn_id, subscriber);
    }

    /// The window as `caller` may see it.
    fn visible(&self, caller: &str) -> Vec<Document> {
        let own = matches!(self.window.spec().scope, Scope::Own(_));
        self.window
            .docs()
            .iter()
            .filter(|d| own || d.acl.allows(Operation::Read, Some(caller), &d.owner))
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
            docs: Some(&self.visible(caller)),
        })
    }
}

/// One event, encoded at most once per kind, shared by every subscriber and the replay buffer.
#[derive(Debug)]
pub struct Encoded {
    sub_id: Arc<str>,
    cursor: Cursor,
    owner: String,
    doc_id: Uuid,
    /// The document after the event, if it is in the window.
    doc: Option<Document>,
    /// Who could see it before / after (None: it was not / is not in the window).
    acl_before: Option<Acl>,
    acl_after: Option<Acl>,
    frames: [OnceLock<Bytes>; 3],
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
        Self {
            sub_id,
            cursor,
            owner: any.map(|d| d.owner.clone()).unwrap_or_default(),
            doc_id: any.map(|d| d.id).unwrap_or_default(),
            acl_before: old.map(|d| d.acl),
            acl_after: doc.as_ref().map(|d| d.acl.clone()),
            doc,
            frames: Default::default(),
        }
    }

    fn frame(&self, kind: Kind) -> Bytes {
        self.frames[kind as usize]
            .get_or_init(|| {
                let (event, doc, id) = match kind {
                    Kind::Add => ("add", self.doc.as_ref(), None),
                    Kind::Change => ("change", self.doc.as_ref(), None),
                    Kind::Remove => ("remove", None, Some(self.doc_id)),
                };
                encode(&EventFrame {
                    sub: &self.sub_id,
                    event,
                    cursor: self.cursor.to_string(),
                    doc,
                    id,
                    docs: None,
                })
            })
            .clone()
    }
}

/// Sends `event` to `subscriber` as what it is from their point of view: a document they could
/// not see and now can is an `add`, one they could see and no longer can is a `remove`. True if
/// a frame was queued.
fn deliver(event: &Encoded, subscriber: &Subscriber, spec: &QuerySpec) -> bool {
    if subscriber
        .seen_up_to
        .is_some_and(|seen| event.cursor <= seen)
    {
        return false;
    }
    let own = matches!(spec.scope, Scope::Own(_));
    let can = |acl: &Option<Acl>| {
        acl.as_ref().is_some_and(|acl| {
            own || acl.allows(Operation::Read, Some(&subscriber.caller), &event.owner)
        })
    };
    let kind = match (can(&event.acl_before), can(&event.acl_after)) {
        (false, true) => Kind::Add,
        (true, true) => Kind::Change,
        (true, false) => Kind::Remove,
        (false, false) => return false,
    };
    subscriber.outbox.send(event.frame(kind)).is_ok()
}

#[derive(Serialize)]
struct EventFrame<'a> {
    sub: &'a str,
    event: &'a str,
    cursor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    doc: Option<&'a Document>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    docs: Option<&'a [Document]>,
}

#[derive(Serialize)]
struct ReplyFrame<'a> {
    re: &'a serde_json::Value,
    ok: bool,
    sub: &'a str,
    cursor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    docs: Option<&'a [Document]>,
    /// With `since`: true when the missed events follow, false when `docs` is a fresh snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed: Option<bool>,
}

fn reply_frame(
    request_id: &serde_json::Value,
    sub: &str,
    cursor: Cursor,
    docs: Option<&[Document]>,
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
