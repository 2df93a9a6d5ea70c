//! A connection's session — the state of the connection actor (see ws/mod.rs): who is
//! connected, which subscriptions it has and which call rooms it joined; it answers each request
//! in order and queues every reply on the connection's bounded outbox (a call room queues the
//! replies to `call.*` ops itself, ahead of the events they cause). Live-query and call events
//! reach the outbox directly.
//!
//! Guarantees: requests of one connection are handled one at a time, in arrival order; a bad
//! request gets an error frame naming its id (or `null` when it had none) and the session goes
//! on; when the connection ends every subscription is released.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ractor::ActorRef;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;
use vibe_actors::acl::Acl;
use vibe_actors::call::actor::{CallOp, CallRoomMsg, CallsMsg, Member, RoomSettings};
use vibe_actors::call::{CallError, ParticipantId, Quality, RoomMode, SdpKind, TrackKind};
use vibe_actors::change::Cursor;
use vibe_actors::live_query::Subscriber;
use vibe_actors::outbox::{Gate, Outbox};
use vibe_actors::query::{QueryRequest, QuerySpec};
use vibe_actors::realtime::{RealtimeMsg, SubscribeError, SubscribeRequest};

use crate::app::App;
use crate::auth::{Access, AuthError, Claims};
use crate::http::ApiError;
use crate::identity::revocation::RevocationWatch;
use crate::store::StoreError;

/// Who a connection acts as.
#[derive(Debug)]
pub struct Identity {
    pub subject: String,
    /// Kept to re-check scopes and attenuations per request.
    token: String,
    /// The token's expiry: the connection closes then (a fresh `auth` of the same DID extends).
    pub expires_at: std::time::SystemTime,
    /// The token is attenuated: its checks (a time limit, say) may stop passing before its
    /// expiry, so held subscriptions are checked again every `ws.attenuation_recheck`.
    pub attenuated: bool,
    /// Rings the connection's outbox alarm when a revocation names this token or its grant (and
    /// only then). Held for its registration, which ends when it is dropped.
    _revocation: RevocationWatch,
}

/// Checks a token's signature and expiry (its attenuations are checked per request), and
/// starts watching for its revocation: one rings the alarm of `outbox` (the connection's).
pub fn identify(app: &App, token: &str, outbox: &Outbox) -> Result<Identity, ApiError> {
    let claims = app.tokens.identify(token)?;
    let revocations = app.tokens.revocations();
    let revocation = revocations.watch(claims.grant, &claims.token_id, outbox.alarm());
    // A revocation applied between the check above and the watch notified nobody.
    if revocations.is_revoked(claims.grant, &claims.token_id) {
        return Err(AuthError::Revoked.into());
    }
    Ok(Identity {
        subject: claims.subject.clone(),
        token: token.to_owned(),
        expires_at: claims.expires_at,
        attenuated: app.tokens.is_attenuated(token),
        _revocation: revocation,
    })
}

/// A connection's session: who is connected and which subscriptions it holds. Owned by the
/// connection's task, which hands it one request at a time.
#[derive(Debug)]
pub struct Session {
    app: Arc<App>,
    outbox: Outbox,
    identity: Option<Identity>,
    /// The subscriptions this connection holds, by id.
    subs: HashMap<Arc<str>, Held>,
    /// Call rooms this connection joined (room id → the room's actor).
    calls: HashMap<String, ActorRef<CallRoomMsg>>,
}

/// One subscription a connection holds: its query, how many `read`s of it, and the gate of the
/// subscriber the first read made (the tree hands every later read of the query on this
/// connection that subscriber). It closes when the last read is released, before its reply or
/// `error` event is queued: no event of it follows.
#[derive(Debug)]
struct Held {
    spec: Arc<QuerySpec>,
    refs: usize,
    gate: Gate,
}

impl Held {
    /// Its live query failed for good (the client got `subscription_failed`): it no longer
    /// counts against `ws.max_subscriptions`, though `unsub` still answers for it.
    fn failed(&self) -> bool {
        self.gate.failed()
    }
}

impl Session {
    pub fn new(app: Arc<App>, outbox: Outbox, identity: Option<Identity>) -> Self {
        Self {
            app,
            outbox,
            identity,
            subs: HashMap::new(),
            calls: HashMap::new(),
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.identity.is_some()
    }

    /// Was the identity's token revoked (its verification now fails with `Revoked`)?
    pub fn token_revoked(&self) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|i| matches!(self.app.tokens.identify(&i.token), Err(AuthError::Revoked)))
    }

    /// Whether the identity's token is attenuated (see [`Identity::attenuated`]).
    pub fn attenuated(&self) -> bool {
        self.identity.as_ref().is_some_and(|i| i.attenuated)
    }

    /// When the identity's token expires (None before `auth`).
    pub fn expires_at(&self) -> Option<std::time::SystemTime> {
        self.identity.as_ref().map(|i| i.expires_at)
    }

    /// The connection ended: releases every subscription and leaves every call.
    pub fn close(&mut self) {
        for (_, room) in self.calls.drain() {
            let _ = room.cast(CallRoomMsg::Disconnected {
                conn_id: self.outbox.conn_id,
            });
        }
        let subs: Vec<Arc<str>> = self.subs.keys().cloned().collect();
        for sub in subs {
            // Its live queries linger for the client's reconnection and resume.
            self.release_all(&sub, true);
        }
    }

    /// Releases every `read` this connection holds of `sub`; see
    /// [`RealtimeMsg::Unsubscribe`] for `linger`.
    fn release_all(&mut self, sub: &Arc<str>, linger: bool) {
        let Some(Held { spec, refs, gate }) = self.subs.remove(sub) else {
            return;
        };
        self.outbox.close_gate(&gate);
        metrics::gauge!("vibe_ws_subscriptions").decrement(refs as f64);
        for _ in 0..refs {
            let _ = self.app.realtime.cast(RealtimeMsg::Unsubscribe {
                spec: spec.clone(),
                sub: sub.clone(),
                conn_id: self.outbox.conn_id,
                linger,
            });
        }
    }
}

/// An error frame: `{"re": id, "error": {"code", "message"}}`.
pub fn error_frame(id: &Value, code: &str, message: &str) -> Bytes {
    Bytes::from(json!({"re": id, "error": {"code": code, "message": message}}).to_string())
}

fn ok_frame(id: &Value, mut body: serde_json::Map<String, Value>) -> Bytes {
    body.insert("re".into(), id.clone());
    body.insert("ok".into(), Value::Bool(true));
    Bytes::from(Value::Object(body).to_string())
}

/// A failed request: the code and message sent back.
struct Failure(&'static str, String);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e.code, e.message)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<crate::oneshot::OneShotError> for Failure {
    fn from(e: crate::oneshot::OneShotError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        ApiError::from(e).into()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthArgs {
    token: String,
}

struct ReadArgs {
    query: QueryRequest,
    since: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    #[serde(rename = "type")]
    doc_type: String,
    doc: WriteDoc,
    #[serde(default)]
    rev: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteDoc {
    #[serde(default)]
    id: Option<Uuid>,
    /// Only for a create; the owner's write to an existing document may repeat its parent (a
    /// retried create), nothing may change it.
    #[serde(default)]
    parent: Option<Uuid>,
    #[serde(default)]
    acl: Option<Acl>,
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveArgs {
    #[serde(rename = "type")]
    doc_type: String,
    /// Not `id`: that is the request's own id.
    #[serde(rename = "docId")]
    doc_id: Uuid,
    #[serde(default)]
    rev: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubArgs {
    sub: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallJoinArgs {
    room: Uuid,
    #[serde(default)]
    sdp: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallSdpArgs {
    room: Uuid,
    #[serde(rename = "type")]
    kind: SdpKind,
    sdp: String,
    #[serde(default)]
    to: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallIceArgs {
    room: Uuid,
    candidate: String,
    #[serde(default)]
    to: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallMuteArgs {
    room: Uuid,
    kind: TrackKind,
    muted: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallQualityArgs {
    room: Uuid,
    layer: Quality,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallRoomArgs {
    room: Uuid,
}

/// The type of documents that are call rooms.
pub const CALL_TYPE: &str = "call";

fn participant(to: Option<String>) -> Result<Option<ParticipantId>, Failure> {
    to.map(|to| {
        to.parse()
            .map_err(|e: CallError| Failure(e.code(), e.to_string()))
    })
    .transpose()
}

/// Parses a signalling op (all but `call.join`) into its room and operation.
fn call_op(op: &str, request: serde_json::Map<String, Value>) -> Result<(Uuid, CallOp), Failure> {
    Ok(match op {
        "call.sdp" => {
            let a: CallSdpArgs = args(request)?;
            let to = participant(a.to)?;
            (
                a.room,
                CallOp::Sdp {
                    kind: a.kind,
                    sdp: a.sdp,
                    to,
                },
            )
        }
        "call.ice" => {
            let a: CallIceArgs = args(request)?;
            let to = participant(a.to)?;
            (
                a.room,
                CallOp::Ice {
                    candidate: a.candidate,
                    to,
                },
            )
        }
        "call.mute" => {
            let a: CallMuteArgs = args(request)?;
            (
                a.room,
                CallOp::Mute {
                    kind: a.kind,
                    muted: a.muted,
                },
            )
        }
        "call.quality" => {
            let a: CallQualityArgs = args(request)?;
            (a.room, CallOp::Quality(a.layer))
        }
        _ => {
            let a: CallRoomArgs = args(request)?;
            (a.room, CallOp::Leave)
        }
    })
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        Failure(e.code(), e.to_string())
    }
}

fn args<T: DeserializeOwned>(rest: serde_json::Map<String, Value>) -> Result<T, Failure> {
    serde_path_to_error::deserialize(Value::Object(rest))
        .map_err(|e| Failure("invalid_request", crate::http::at_path(&e)))
}

impl Session {
    /// Handles one text frame; every answer goes to the outbox.
    pub async fn request(&mut self, text: &[u8]) {
        let mut request = match serde_json::from_slice::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return self.fail(
                    &Value::Null,
                    Failure("invalid_request", "a request is a JSON object".into()),
                );
            }
            Err(e) => {
                return self.fail(&Value::Null, Failure("bad_json", format!("not JSON: {e}")));
            }
        };
        let id = match request.remove("id") {
            Some(id @ (Value::String(_) | Value::Number(_))) => id,
            Some(_) => {
                return self.fail(
                    &Value::Null,
                    Failure("invalid_request", "`id` is a string or a number".into()),
                );
            }
            None => {
                return self.fail(
                    &Value::Null,
                    Failure("missing_id", "every request carries an `id`".into()),
                );
            }
        };
        let op = match request.remove("op") {
            Some(Value::String(op)) => op,
            None | Some(Value::Null) => {
                return self.fail(
                    &id,
                    Failure("missing_op", "every request names an `op`".into()),
                );
            }
            Some(_) => {
                return self.fail(&id, Failure("unknown_op", "`op` is a string".into()));
            }
        };
        let result = match op.as_str() {
            "auth" => match args::<AuthArgs>(request) {
                Ok(a) => self.auth(&a.token),
                Err(e) => Err(e),
            },
            "ping" => args::<NoArgs>(request).map(|_| Some(json!({"pong": true}))),
            "read" => {
                let since = match request.remove("since") {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s)),
                    Some(_) => Err(Failure(
                        "invalid_cursor",
                        "`since` is a cursor string".into(),
                    )),
                };
                match (since, args::<QueryRequest>(request)) {
                    (Ok(since), Ok(query)) => self.read(&id, ReadArgs { query, since }).await,
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
            "readOnce" => match args::<QueryRequest>(request) {
                Ok(q) => self.read_once(q).await,
                Err(e) => Err(e),
            },
            "write" => match args::<WriteArgs>(request) {
                Ok(a) => self.write(a).await,
                Err(e) => Err(e),
            },
            "remove" => match args::<RemoveArgs>(request) {
                Ok(a) => self.remove(a).await,
                Err(e) => Err(e),
            },
            "unsub" => match args::<UnsubArgs>(request) {
                Ok(a) => self.unsub(&a.sub),
                Err(e) => Err(e),
            },
            "call.join" => match args::<CallJoinArgs>(request) {
                Ok(a) => self.call_join(&id, a).await,
                Err(e) => Err(e),
            },
            "call.sdp" | "call.ice" | "call.mute" | "call.quality" | "call.leave" => {
                match call_op(&op, request) {
                    Ok((room, call_op)) => self.call_op(&id, room, call_op).await,
                    Err(e) => Err(e),
                }
            }
            other => Err(Failure(
                "unknown_op",
                format!(
                    "unknown op {other:?}: auth, read, readOnce, write, remove, unsub, ping, \
                     call.join, call.sdp, call.ice, call.mute, call.quality, call.leave"
                ),
            )),
        };
        match result {
            // `read` queues its own reply, ahead of the subscription's first event.
            Ok(None) => {}
            Ok(Some(Value::Object(body))) => {
                let _ = self.outbox.send(ok_frame(&id, body));
            }
            Ok(Some(_)) => {
                let _ = self.outbox.send(ok_frame(&id, Default::default()));
            }
            Err(failure) => self.fail(&id, failure),
        }
    }

    fn fail(&self, id: &Value, Failure(code, message): Failure) {
        let _ = self.outbox.send(error_frame(id, code, &message));
    }

    fn auth(&mut self, token: &str) -> Result<Option<Value>, Failure> {
        let identity = identify(&self.app, token, &self.outbox)?;
        if let Some(current) = &self.identity
            && current.subject != identity.subject
        {
            return Err(Failure(
                "already_authenticated",
                "this connection acts for another DID; open a new one".into(),
            ));
        }
        let did = identity.subject.clone();
        self.identity = Some(identity);
        self.end_unpermitted();
        Ok(Some(json!({"did": did})))
    }

    /// Ends each subscription the connection's token no longer lets the caller read, and leaves
    /// the calls once it no longer lets the caller read `call` documents: after `auth` with
    /// another token (fewer scopes, an attenuation), and as time passes for an attenuated one (a
    /// time limit). A subscription or a call lives under the token the connection holds now, not
    /// the one it was made with. A subscriber gets an `error` event; a call's member is removed
    /// (`left` with `removed`, sent to it as well).
    pub fn end_unpermitted(&mut self) {
        if !self.calls.is_empty() && self.claims(Access::Read, CALL_TYPE).is_err() {
            for (_, room) in self.calls.drain() {
                let _ = room.cast(CallRoomMsg::Removed {
                    conn_id: self.outbox.conn_id,
                });
            }
        }
        let ended: Vec<(Arc<str>, Failure)> = self
            .subs
            .iter()
            // One that failed already sent its last event (its `unsub` still answers).
            .filter(|(_, held)| !held.failed())
            .filter_map(|(sub, held)| {
                let refused = self.claims(Access::Read, &held.spec.doc_type).err()?;
                Some((sub.clone(), refused))
            })
            .collect();
        for (sub, Failure(code, message)) in ended {
            // Its gate closes first: the `error` event is the subscription's last.
            self.release_all(&sub, false);
            let frame = vibe_actors::wire::subscription_error(&sub, code, &message);
            let _ = self.outbox.send(Bytes::from(frame));
        }
    }

    /// The caller, allowed `access` to `doc_type` by its token.
    fn permit(&self, access: Access, doc_type: &str) -> Result<String, Failure> {
        Ok(self.claims(access, doc_type)?.subject.clone())
    }

    /// The caller's verified claims, which allow `access` to `doc_type`.
    /// A refused create under a parent, as this connection's token may know of the parent
    /// ([`StoreError::hiding_parent_unless`]).
    fn hiding_parent(&self, error: StoreError) -> StoreError {
        error.hiding_parent_unless(|t| self.claims(Access::Read, t).is_ok())
    }

    fn claims(&self, access: Access, doc_type: &str) -> Result<Arc<Claims>, Failure> {
        let Some(identity) = &self.identity else {
            return Err(Failure(
                "unauthenticated",
                "send `auth` with a token first".into(),
            ));
        };
        if !crate::doc_type::is_valid(doc_type) {
            return Err(Failure(
                "invalid_type",
                "a type name matches ^[a-z][a-z0-9_.-]{0,63}$".into(),
            ));
        }
        if access == Access::Write && crate::doc_type::is_reserved(doc_type) {
            return Err(Failure(
                "reserved_type",
                format!("documents of type {doc_type} are written by the server only"),
            ));
        }
        let claims = self
            .app
            .tokens
            .verify(&identity.token, access, Some(doc_type))?;
        if !claims.permits(access, doc_type) {
            let verb = if access == Access::Read {
                "read"
            } else {
                "write"
            };
            return Err(Failure(
                "missing_scope",
                format!("the token lacks the scope {verb}:{doc_type}"),
            ));
        }
        Ok(claims)
    }

    fn spec(&self, caller: &str, query: &QueryRequest) -> Result<QuerySpec, Failure> {
        if query.cursor.is_some() || !query.expand.is_empty() {
            return Err(Failure(
                "invalid_query",
                "`cursor` and `expand` apply to one-shot queries (`readOnce`); a live query \
                 resumes with `since`"
                    .into(),
            ));
        }
        QuerySpec::parse(query, caller, self.app.config.query.limits())
            .map_err(|e| Failure("invalid_query", format!("{}: {}", e.part, e.message)))
    }

    async fn read(&mut self, id: &Value, args: ReadArgs) -> Result<Option<Value>, Failure> {
        let caller = self.permit(Access::Read, &args.query.doc_type)?;
        let spec = Arc::new(self.spec(&caller, &args.query)?);
        let since = args
            .since
            .as_deref()
            .map(|s| {
                s.parse::<Cursor>()
                    .map_err(|e| Failure("invalid_cursor", e.to_string()))
            })
            .transpose()?;
        if let Some(since) = since {
            let ahead = self.app.is_ahead_of_feed(since).await.map_err(|e| {
                tracing::warn!(error = %e, "reading the feed's head failed");
                Failure(
                    "unavailable",
                    "the live query could not start; retry".into(),
                )
            })?;
            if ahead {
                return Err(Failure(
                    "invalid_cursor",
                    format!("cursor {since} is ahead of the feed"),
                ));
            }
        }
        let max = self.app.config.ws.max_subscriptions;
        // Failed subscriptions stay for their `unsub`, but not without bound.
        if self.subs.values().filter(|held| held.failed()).count() >= max {
            let failed: Vec<Arc<str>> = self
                .subs
                .iter()
                .filter(|(_, held)| held.failed())
                .map(|(sub, _)| sub.clone())
                .collect();
            // As an `unsub` would: the gauge counts them until then.
            for sub in failed {
                self.release_all(&sub, false);
            }
        }
        let held: usize = self
            .subs
            .values()
            .filter(|held| !held.failed())
            .map(|held| held.refs)
            .sum();
        if held >= self.app.config.ws.max_subscriptions {
            return Err(Failure(
                "too_many_subscriptions",
                format!(
                    "at most {} subscriptions per connection",
                    self.app.config.ws.max_subscriptions
                ),
            ));
        }
        let gate = Gate::default();
        let subscriber = Subscriber {
            outbox: self.outbox.clone(),
            gate: gate.clone(),
            caller,
            seen_up_to: None,
        };
        let reply = ractor::call!(self.app.realtime, |port| RealtimeMsg::Subscribe(
            SubscribeRequest {
                spec: spec.clone(),
                subscriber,
                request_id: id.clone(),
                since,
                reply: port,
            }
        ));
        match reply {
            Ok(Ok(sub)) => {
                // A later read's gate goes unused: the tree hands it the first read's subscriber.
                let held = self.subs.entry(sub).or_insert_with(|| Held {
                    spec,
                    refs: 0,
                    gate,
                });
                held.refs += 1;
                metrics::gauge!("vibe_ws_subscriptions").increment(1.0);
                Ok(None)
            }
            Ok(Err(SubscribeError::TooManyLiveQueries(max))) => Err(Failure(
                "too_many_live_queries",
                format!("this node runs its maximum of {max} distinct live queries"),
            )),
            Ok(Err(SubscribeError::LiveQueryBytes(max))) => Err(Failure(
                "too_many_live_queries",
                format!(
                    "this node's live queries keep their maximum of {max} bytes of documents; \
                     subscribe to queries others run, or with a smaller limit"
                ),
            )),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "subscription failed");
                Err(Failure(
                    "unavailable",
                    "the live query could not start; retry".into(),
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "realtime tree unreachable");
                Err(Failure(
                    "unavailable",
                    "the live query could not start; retry".into(),
                ))
            }
        }
    }

    async fn read_once(&self, query: QueryRequest) -> Result<Option<Value>, Failure> {
        let claims = self.claims(Access::Read, &query.doc_type)?;
        let token = self.identity.as_ref().map_or("", |i| i.token.as_str());
        let page = crate::oneshot::query_page(&self.app, token, &claims, &query).await?;
        Ok(Some(json!(page)))
    }

    async fn write(&self, args: WriteArgs) -> Result<Option<Value>, Failure> {
        let caller = self.permit(Access::Write, &args.doc_type)?;
        if !args.doc.data.is_object() {
            return Err(Failure(
                "invalid_request",
                "`doc.data` must be a JSON object".into(),
            ));
        }
        let store = &self.app.store;
        let WriteDoc {
            id,
            parent,
            acl,
            data,
        } = args.doc;
        let doc = match id {
            Some(id) => {
                let replaced = store
                    .modify(
                        &caller,
                        &args.doc_type,
                        id,
                        args.rev.as_ref().map(std::slice::from_ref),
                        |current| {
                            // Only the owner (who may read the document) may repeat its parent: a
                            // writer who cannot read it must not learn it by trying candidates.
                            if parent.is_some()
                                && (current.owner != caller || parent != current.parent)
                            {
                                return Err(Failure(
                                    "read_only_field",
                                    "a document's `parent` is set when it is created".into(),
                                ));
                            }
                            Ok((data.clone(), acl.clone()))
                        },
                    )
                    .await;
                match replaced {
                    Ok(result) => result?,
                    Err(StoreError::NotFound) if args.rev.is_none() => store
                        .create(
                            &caller,
                            &args.doc_type,
                            Some(id),
                            parent,
                            acl.unwrap_or_default(),
                            data,
                        )
                        .await
                        .map_err(|e| self.hiding_parent(e))?,
                    Err(e) => return Err(e.into()),
                }
            }
            None => store
                .create(
                    &caller,
                    &args.doc_type,
                    None,
                    parent,
                    acl.unwrap_or_default(),
                    data,
                )
                .await
                .map_err(|e| self.hiding_parent(e))?,
        };
        // Write access does not reveal content the token (its scopes and attenuations) or the ACL
        // does not let the caller read.
        if self.claims(Access::Read, &args.doc_type).is_ok()
            && self.app.store.may_read_written(&caller, &doc).await
        {
            Ok(Some(json!({"doc": doc.view(Some(&caller))})))
        } else {
            Ok(Some(json!({"id": doc.id, "rev": doc.rev})))
        }
    }

    async fn remove(&self, args: RemoveArgs) -> Result<Option<Value>, Failure> {
        let caller = self.permit(Access::Write, &args.doc_type)?;
        self.app
            .store
            .delete(
                &caller,
                &args.doc_type,
                args.doc_id,
                args.rev.as_ref().map(std::slice::from_ref),
            )
            .await?;
        Ok(Some(json!({})))
    }

    /// Joins the call room of the `call` document `room` (read access to it admits); the room
    /// queues the reply itself.
    async fn call_join(
        &mut self,
        id: &Value,
        args: CallJoinArgs,
    ) -> Result<Option<Value>, Failure> {
        let caller = self.permit(Access::Read, CALL_TYPE)?;
        let max_calls = self.app.config.ws.max_calls;
        let room = args.room.to_string();
        if self.calls.len() >= max_calls && !self.calls.contains_key(&room) {
            // Rooms that removed this connection (an ICE timeout, lost access) are still listed
            // here: they count no more.
            let conn_id = self.outbox.conn_id;
            if let Ok(live) = ractor::call!(self.app.calls, |reply| CallsMsg::Memberships {
                conn_id,
                reply
            }) {
                self.calls.retain(|room, _| live.contains(room));
            }
            if self.calls.len() >= max_calls {
                return Err(Failure(
                    "too_many_calls",
                    format!("a connection is in at most {max_calls} calls at once"),
                ));
            }
        }
        let doc = self.app.store.get(&caller, CALL_TYPE, args.room).await?;
        let settings = RoomSettings {
            mode: match doc.data.get("mode").and_then(Value::as_str) {
                Some("p2p") => RoomMode::P2p,
                _ => RoomMode::Sfu,
            },
            max_participants: doc
                .data
                .get("maxParticipants")
                .and_then(Value::as_u64)
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let joined = ractor::call!(self.app.calls, |reply| CallsMsg::Join {
            room: room.clone(),
            settings,
            member: Member {
                did: caller,
                outbox: self.outbox.clone(),
            },
            offer: args.sdp,
            request: id.clone(),
            reply,
        });
        match joined {
            Ok(Ok(actor)) => {
                self.calls.insert(room, actor);
                Ok(None)
            }
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(Failure("unavailable", e.to_string())),
        }
    }

    /// A signalling op for a room this connection joined; the room queues the reply itself.
    async fn call_op(
        &mut self,
        id: &Value,
        room: Uuid,
        op: CallOp,
    ) -> Result<Option<Value>, Failure> {
        let room = room.to_string();
        let Some(actor) = self.calls.get(&room) else {
            return Err(CallError::NotInCall.into());
        };
        let leaving = matches!(op, CallOp::Leave);
        // The token is checked on every op, not only at the join: an attenuation's time limit
        // may lapse between the connection's periodic re-checks. Leaving needs no permission.
        if !leaving {
            self.claims(Access::Read, CALL_TYPE)?;
        }
        let result = ractor::call!(actor, |reply| CallRoomMsg::Op {
            conn_id: self.outbox.conn_id,
            op,
            request: id.clone(),
            reply,
        });
        match result {
            Ok(Ok(())) => {
                if leaving {
                    self.calls.remove(&room);
                }
                Ok(None)
            }
            Ok(Err(e)) => {
                if e == CallError::NotInCall {
                    // Removed meanwhile (ICE timeout): forget the room.
                    self.calls.remove(&room);
                }
                Err(e.into())
            }
            Err(_) => {
                // The room stopped (crashed: the member got `ended`).
                self.calls.remove(&room);
                Err(CallError::NotInCall.into())
            }
        }
    }

    fn unsub(&mut self, sub: &str) -> Result<Option<Value>, Failure> {
        let Some(held) = self.subs.get_mut(sub) else {
            return Err(Failure(
                "unknown_subscription",
                format!("no subscription {sub:?} on this connection"),
            ));
        };
        held.refs -= 1;
        metrics::gauge!("vibe_ws_subscriptions").decrement(1.0);
        let spec = held.spec.clone();
        if held.refs == 0
            && let Some(ended) = self.subs.remove(sub)
        {
            // Before the reply is queued: no event of the subscription comes after it.
            self.outbox.close_gate(&ended.gate);
        }
        let _ = self.app.realtime.cast(RealtimeMsg::Unsubscribe {
            spec,
            sub: Arc::from(sub),
            conn_id: self.outbox.conn_id,
            linger: false,
        });
        Ok(Some(json!({})))
    }
}
