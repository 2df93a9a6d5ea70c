//! The call actors: [`Calls`] (one per node) locates rooms by id, starts them on first join,
//! enforces the node's room limit, stops a room when its last member leaves, and tells members
//! to rejoin when a room crashes; [`CallRoom`] (one per room) owns a [`Room`] core and the
//! room's UDP socket, and answers its members' signalling.
//!
//! Invariants: the room actor is the only writer of its core and its socket; replies to a
//! member's requests are queued on the member's outbox by the room itself, before any event the
//! request caused, so a client never sees the server's offer ahead of the answer to its own;
//! every queue fed from the network is bounded (the socket reader drops datagrams beyond
//! `max_queued_datagrams`, as a congested link would).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::room::{Room, RoomConfig, RoomStats};
use super::{CallError, LeaveReason, ParticipantId, Quality, RoomMode, SdpKind, Signal, TrackKind};
use crate::outbox::Outbox;

/// Node-wide call settings.
#[derive(Debug, Clone)]
pub struct CallsConfig {
    /// Address the rooms' UDP sockets bind.
    pub bind: IpAddr,
    /// Addresses put in ICE candidates (with each room's port); empty: the bind address.
    pub advertise: Vec<IpAddr>,
    /// Port range for room sockets; `(0, 0)`: any free port.
    pub ports: (u16, u16),
    pub max_rooms: usize,
    pub max_participants: usize,
    pub keyframe_request_interval: Duration,
    pub bandwidth_estimation: bool,
    /// Datagrams read from a room's socket and not yet handled, beyond which more are dropped.
    pub max_queued_datagrams: usize,
    /// Sent video packets kept per forwarded stream for retransmissions.
    pub resend_buffer_packets: usize,
    /// Tracks one participant may publish.
    pub max_tracks: usize,
    /// Remote ICE candidates one participant's session takes, in all.
    pub max_candidates: usize,
    /// How long after an SDP exchange a participant's ICE must connect.
    pub connect_timeout: Duration,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            bind: IpAddr::from([127, 0, 0, 1]),
            advertise: Vec::new(),
            ports: (0, 0),
            max_rooms: 1000,
            max_participants: 16,
            keyframe_request_interval: Duration::from_millis(500),
            bandwidth_estimation: false,
            max_queued_datagrams: 4096,
            resend_buffer_packets: 500,
            max_tracks: 8,
            max_candidates: 64,
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// Whether a DID may still be in a room: read access to the room's document under its ACL,
/// certificates included. Asked for every member when the document changes.
pub trait RoomAccess: Send + Sync + std::fmt::Debug + 'static {
    fn may_join(&self, did: String, room: String) -> crate::live_query::BoxFuture<bool>;
}

/// A connection as a room member.
#[derive(Debug, Clone)]
pub struct Member {
    pub did: String,
    pub outbox: Outbox,
}

/// Per-room settings from the room's document.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoomSettings {
    pub mode: RoomMode,
    /// None: the node's `max_participants`; larger values are capped to it.
    pub max_participants: Option<usize>,
}

/// A member's signalling request.
#[derive(Debug)]
pub enum CallOp {
    Sdp {
        kind: SdpKind,
        sdp: String,
        to: Option<ParticipantId>,
    },
    Ice {
        candidate: String,
        to: Option<ParticipantId>,
    },
    Mute {
        kind: TrackKind,
        muted: bool,
    },
    Quality(Quality),
    Leave,
}

/// The outcome of a request to a room: `Ok` means the room queued the reply on the member's
/// outbox itself.
pub type CallReply = RpcReplyPort<Result<(), CallError>>;

#[derive(Debug)]
pub enum CallsMsg {
    /// Join `room`, starting it if needed; replies with the room's actor (for later ops).
    Join {
        room: String,
        settings: RoomSettings,
        member: Member,
        offer: Option<String>,
        request: Value,
        reply: RpcReplyPort<Result<ActorRef<CallRoomMsg>, CallError>>,
    },
    /// A room reports that a connection is no longer its member.
    Departed { room: String, conn_id: u64 },
    /// The rooms the connection is a member of (joined or joining): a connection's own list
    /// also holds rooms that removed it (ICE timeout, lost access, a failed session).
    Memberships {
        conn_id: u64,
        reply: RpcReplyPort<Vec<String>>,
    },
    /// The room's document changed or was deleted: members who lost read access are removed.
    DocumentChanged { room: String, deleted: bool },
    /// Rooms and members, for metrics and tests.
    Stats(RpcReplyPort<(usize, usize)>),
    /// Fault injection for tests: make the room panic.
    CrashRoom(String),
}

impl ractor::Message for CallsMsg {}

#[derive(Debug)]
pub enum CallRoomMsg {
    Join {
        member: Member,
        offer: Option<String>,
        request: Value,
        reply: CallReply,
    },
    Op {
        conn_id: u64,
        op: CallOp,
        request: Value,
        reply: CallReply,
    },
    /// The member's connection closed.
    Disconnected {
        conn_id: u64,
    },
    /// The member lost access to the room.
    Removed {
        conn_id: u64,
    },
    Datagram(Datagram),
    Tick,
    Crash,
}

impl ractor::Message for CallRoomMsg {}

#[derive(Debug)]
pub struct Datagram {
    source: SocketAddr,
    contents: Vec<u8>,
    /// When the reader took it off the socket.
    received: Instant,
}

/// The node's call supervisor.
#[derive(Debug)]
pub struct Calls;

#[derive(Debug)]
pub struct CallsState {
    config: Arc<CallsConfig>,
    access: Arc<dyn RoomAccess>,
    rooms: HashMap<String, RoomEntry>,
}

#[derive(Debug)]
struct RoomEntry {
    actor: ActorRef<CallRoomMsg>,
    /// Members (joined or joining) by connection.
    members: HashMap<u64, Member>,
}

impl Actor for Calls {
    type Msg = CallsMsg;
    type State = CallsState;
    type Arguments = (CallsConfig, Arc<dyn RoomAccess>);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (config, access): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        install_crypto();
        Ok(CallsState {
            config: Arc::new(config),
            access,
            rooms: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CallsMsg::Join {
                room,
                settings,
                member,
                offer,
                request,
                reply,
            } => {
                let actor = match state.rooms.get(&room) {
                    Some(entry) => entry.actor.clone(),
                    None => {
                        if state.rooms.len() >= state.config.max_rooms {
                            let _ =
                                reply.send(Err(CallError::TooManyRooms(state.config.max_rooms)));
                            return Ok(());
                        }
                        let args = RoomArgs {
                            id: room.clone(),
                            settings,
                            config: state.config.clone(),
                            calls: myself.clone(),
                        };
                        match Actor::spawn_linked(None, CallRoom, args, myself.get_cell()).await {
                            Ok((actor, _)) => {
                                state.rooms.insert(
                                    room.clone(),
                                    RoomEntry {
                                        actor: actor.clone(),
                                        members: HashMap::new(),
                                    },
                                );
                                metrics::gauge!("vibe_call_rooms").increment(1);
                                actor
                            }
                            Err(e) => {
                                let _ = reply.send(Err(CallError::Unavailable(e.to_string())));
                                return Ok(());
                            }
                        }
                    }
                };
                if let Some(entry) = state.rooms.get_mut(&room) {
                    entry.members.insert(member.outbox.conn_id, member.clone());
                }
                let (conn_id, did) = (member.outbox.conn_id, member.did.clone());
                let (tx, rx) = tokio::sync::oneshot::channel();
                let sent = actor.cast(CallRoomMsg::Join {
                    member,
                    offer,
                    request,
                    reply: tx.into(),
                });
                if sent.is_err() {
                    let _ = reply.send(Err(CallError::Unavailable("the room stopped".into())));
                    return Ok(());
                }
                // The connection checked access before asking, but a change of the room's
                // document handled before this member was listed re-checked everyone else only:
                // check once more now that it is listed (later changes re-check it anyway).
                let check = state.access.may_join(did, room.clone());
                let room_actor = actor.clone();
                tokio::spawn(async move {
                    if !check.await {
                        let _ = room_actor.cast(CallRoomMsg::Removed { conn_id });
                    }
                });
                // The room answers without waiting on us; relay its verdict off this actor.
                tokio::spawn(async move {
                    let verdict = match rx.await {
                        Ok(Ok(())) => Ok(actor),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(CallError::Unavailable("the room stopped".into())),
                    };
                    let _ = reply.send(verdict);
                });
            }
            CallsMsg::Departed { room, conn_id } => {
                let empty = match state.rooms.get_mut(&room) {
                    Some(entry) => {
                        entry.members.remove(&conn_id);
                        entry.members.is_empty()
                    }
                    None => false,
                };
                if empty && let Some(entry) = state.rooms.remove(&room) {
                    entry.actor.stop(Some("empty".into()));
                    metrics::gauge!("vibe_call_rooms").decrement(1);
                }
            }
            CallsMsg::Memberships { conn_id, reply } => {
                let rooms = state
                    .rooms
                    .iter()
                    .filter(|(_, entry)| entry.members.contains_key(&conn_id))
                    .map(|(room, _)| room.clone())
                    .collect();
                let _ = reply.send(rooms);
            }
            CallsMsg::DocumentChanged { room, deleted } => {
                let Some(entry) = state.rooms.get(&room) else {
                    return Ok(());
                };
                for (conn_id, member) in &entry.members {
                    let (actor, conn_id) = (entry.actor.clone(), *conn_id);
                    if deleted {
                        let _ = actor.cast(CallRoomMsg::Removed { conn_id });
                        continue;
                    }
                    // One read per member, off this actor; a room's document rarely changes.
                    let check = state.access.may_join(member.did.clone(), room.clone());
                    tokio::spawn(async move {
                        if !check.await {
                            let _ = actor.cast(CallRoomMsg::Removed { conn_id });
                        }
                    });
                }
            }
            CallsMsg::Stats(reply) => {
                let members = state.rooms.values().map(|r| r.members.len()).sum();
                let _ = reply.send((state.rooms.len(), members));
            }
            CallsMsg::CrashRoom(room) => {
                if let Some(entry) = state.rooms.get(&room) {
                    let _ = entry.actor.cast(CallRoomMsg::Crash);
                }
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
        if let SupervisionEvent::ActorFailed(cell, error) = &event {
            let Some(room) = state
                .rooms
                .iter()
                .find(|(_, e)| e.actor.get_id() == cell.get_id())
                .map(|(id, _)| id.clone())
            else {
                return Ok(());
            };
            tracing::error!(%room, %error, "call room crashed; members are told to rejoin");
            metrics::counter!("vibe_call_room_crashes_total").increment(1);
            if let Some(entry) = state.rooms.remove(&room) {
                metrics::gauge!("vibe_call_rooms").decrement(1);
                // The room's sessions died with it; the next join starts it afresh.
                let frame = signal_frame(
                    &room,
                    &Signal::Ended {
                        reason: "restart",
                        rejoin: true,
                    },
                );
                for member in entry.members.values() {
                    let _ = member.outbox.send(frame.clone());
                }
            }
        }
        Ok(())
    }
}

/// str0m's DTLS and SRTP use the process-wide provider; installing it twice would panic.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| str0m::crypto::from_feature_flags().install_process_default());
}

/// `{"call": room, "event": ..., ...}`
pub fn signal_frame(room: &str, signal: &Signal) -> Bytes {
    let mut value = serde_json::to_value(signal).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("call".into(), Value::String(room.to_owned()));
    }
    Bytes::from(value.to_string())
}

fn reply_frame(request: &Value, body: Value) -> Bytes {
    let mut body = match body {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    body.insert("re".into(), request.clone());
    body.insert("ok".into(), Value::Bool(true));
    Bytes::from(Value::Object(body).to_string())
}

/// One call room.
#[derive(Debug)]
pub struct CallRoom;

#[derive(Debug)]
pub struct RoomArgs {
    id: String,
    settings: RoomSettings,
    config: Arc<CallsConfig>,
    calls: ActorRef<CallsMsg>,
}

#[derive(Debug)]
pub struct CallRoomState {
    id: String,
    room: Room,
    calls: ActorRef<CallsMsg>,
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    /// Connection → participant, and participant → its member.
    by_conn: HashMap<u64, ParticipantId>,
    members: HashMap<ParticipantId, (u64, Member)>,
    queued: Arc<AtomicUsize>,
    /// The core's counters as last reported to metrics.
    reported: RoomStats,
    outgoing: Outgoing,
    deadline: watch::Sender<Option<Instant>>,
    reader: tokio::task::JoinHandle<()>,
    timer: tokio::task::JoinHandle<()>,
}

/// Whether the room stopped or crashed (a panic skips `post_stop`, so this is not there): the
/// socket reader notices a dead room only when a datagram comes, and meanwhile would keep the
/// room's port — a quiet room's for good; and the participants gauge would keep counting the
/// crashed room's members.
impl Drop for CallRoomState {
    fn drop(&mut self) {
        self.reader.abort();
        self.timer.abort();
        metrics::gauge!("vibe_call_participants").decrement(self.members.len() as f64);
    }
}

impl Actor for CallRoom {
    type Msg = CallRoomMsg;
    type State = CallRoomState;
    type Arguments = RoomArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RoomArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let socket = Arc::new(bind_socket(&args.config).await?);
        let local = socket.local_addr()?;
        let candidates = if args.config.advertise.is_empty() {
            vec![local]
        } else {
            args.config
                .advertise
                .iter()
                .map(|ip| SocketAddr::new(*ip, local.port()))
                .collect()
        };
        let max_participants = args
            .settings
            .max_participants
            .unwrap_or(args.config.max_participants)
            .clamp(1, args.config.max_participants);
        let room = Room::new(RoomConfig {
            mode: args.settings.mode,
            max_participants,
            candidates,
            keyframe_request_interval: args.config.keyframe_request_interval,
            bandwidth_estimation: args.config.bandwidth_estimation,
            resend_buffer_packets: args.config.resend_buffer_packets,
            max_tracks: args.config.max_tracks,
            max_candidates: args.config.max_candidates,
            connect_timeout: args.config.connect_timeout,
            ..RoomConfig::default()
        });
        let queued = Arc::new(AtomicUsize::new(0));
        let reader = tokio::spawn(read_datagrams(
            socket.clone(),
            myself.clone(),
            queued.clone(),
            args.config.max_queued_datagrams,
        ));
        let (deadline, deadline_rx) = watch::channel(None);
        let timer = tokio::spawn(run_timer(deadline_rx, myself.clone()));
        tracing::debug!(room = %args.id, %local, "call room started");
        Ok(CallRoomState {
            id: args.id,
            room,
            calls: args.calls,
            socket,
            local,
            by_conn: HashMap::new(),
            members: HashMap::new(),
            queued,
            reported: RoomStats::default(),
            outgoing: Outgoing::default(),
            deadline,
            reader,
            timer,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        // The timer waits for a fresh deadline after each tick, even an unchanged one.
        let ticked = matches!(msg, CallRoomMsg::Tick);
        let mut received = None;
        match msg {
            CallRoomMsg::Datagram(datagram) => {
                state.queued.fetch_sub(1, Ordering::Relaxed);
                received = Some(datagram.received);
                let routed = state.room.handle_datagram(
                    now,
                    datagram.source,
                    state.local,
                    &datagram.contents,
                );
                if !routed {
                    metrics::counter!("vibe_call_unrouted_datagrams_total").increment(1);
                }
            }
            CallRoomMsg::Tick => {
                state.room.handle_timeout(now);
            }
            CallRoomMsg::Join {
                member,
                offer,
                request,
                reply,
            } => {
                let conn_id = member.outbox.conn_id;
                let result = if state.by_conn.contains_key(&conn_id) {
                    Err(CallError::AlreadyInCall)
                } else {
                    state
                        .room
                        .join(now, member.did.clone(), offer.as_deref())
                        .map(|joined| {
                            let mut body = json!({
                                "participant": joined.participant,
                                "mode": joined.mode,
                                "participants": joined.others,
                            });
                            if let Some(answer) = joined.answer {
                                body["sdp"] = Value::String(answer);
                            }
                            let _ = member.outbox.send(reply_frame(&request, body));
                            state.by_conn.insert(conn_id, joined.participant);
                            state
                                .members
                                .insert(joined.participant, (conn_id, member.clone()));
                            metrics::gauge!("vibe_call_participants").increment(1);
                        })
                };
                if result.is_err() && !state.by_conn.contains_key(&conn_id) {
                    let _ = state.calls.cast(CallsMsg::Departed {
                        room: state.id.clone(),
                        conn_id,
                    });
                }
                let _ = reply.send(result);
            }
            CallRoomMsg::Op {
                conn_id,
                op,
                request,
                reply,
            } => {
                let result = state.op(now, conn_id, op, &request);
                let _ = reply.send(result);
            }
            CallRoomMsg::Disconnected { conn_id } => {
                if let Some(id) = state.by_conn.get(&conn_id).copied() {
                    state.room.leave(id, LeaveReason::Disconnected);
                }
            }
            CallRoomMsg::Removed { conn_id } => {
                if let Some(id) = state.by_conn.get(&conn_id).copied() {
                    state.room.leave(id, LeaveReason::Removed);
                }
            }
            CallRoomMsg::Crash => panic!("call room crash requested (fault injection)"),
        }
        let forwarded = state.room.stats().forwarded;
        state.after_input(now, ticked);
        if let Some(received) = received
            && state.room.stats().forwarded > forwarded
        {
            // Socket read to forwarded copies sent: the delay the SFU adds (queueing included).
            metrics::histogram!("vibe_call_forward_latency_seconds")
                .record(received.elapsed().as_secs_f64());
        }
        Ok(())
    }
}

impl CallRoomState {
    fn op(
        &mut self,
        now: Instant,
        conn_id: u64,
        op: CallOp,
        request: &Value,
    ) -> Result<(), CallError> {
        let Some(id) = self.by_conn.get(&conn_id).copied() else {
            return Err(CallError::NotInCall);
        };
        let body = match op {
            CallOp::Sdp { kind, sdp, to } => match self.room.sdp(now, id, to, kind, &sdp)? {
                Some(answer) => json!({ "sdp": answer }),
                None => json!({}),
            },
            CallOp::Ice { candidate, to } => {
                self.room.ice(id, to, &candidate)?;
                json!({})
            }
            CallOp::Mute { kind, muted } => {
                self.room.mute(id, kind, muted)?;
                json!({})
            }
            CallOp::Quality(quality) => {
                self.room.set_quality(id, quality)?;
                json!({})
            }
            CallOp::Leave => {
                self.room.leave(id, LeaveReason::Left);
                json!({})
            }
        };
        if let Some((_, member)) = self.members.get(&id) {
            let _ = member.outbox.send(reply_frame(request, body));
        }
        Ok(())
    }

    /// Drives the core, sends what it produced, delivers its signals, forgets members who left,
    /// re-arms the timer.
    fn after_input(&mut self, now: Instant, notify_timer: bool) {
        let outgoing = &mut self.outgoing;
        let next = self
            .room
            .drive(now, &mut |to, bytes| outgoing.push(to, bytes));
        self.outgoing.flush(&self.socket);
        let signals: Vec<_> = self.room.take_signals().collect();
        for (to, signal) in signals {
            if let Some((_, member)) = self.members.get(&to) {
                let _ = member.outbox.send(signal_frame(&self.id, &signal));
            }
        }
        // Members the core no longer holds have left (asked, disconnected, ICE timeout).
        if self.members.len() > self.room.len() {
            let present: Vec<ParticipantId> = self.room.participant_ids().collect();
            let departed: Vec<ParticipantId> = self
                .members
                .keys()
                .filter(|id| !present.contains(id))
                .copied()
                .collect();
            for id in departed {
                if let Some((conn_id, _)) = self.members.remove(&id) {
                    self.by_conn.remove(&conn_id);
                    metrics::gauge!("vibe_call_participants").decrement(1);
                    let _ = self.calls.cast(CallsMsg::Departed {
                        room: self.id.clone(),
                        conn_id,
                    });
                }
            }
        }
        let stats = self.room.stats();
        if stats != self.reported {
            metrics::counter!("vibe_call_forwarded_frames_total")
                .increment(stats.forwarded - self.reported.forwarded);
            metrics::counter!("vibe_call_keyframe_requests_total")
                .increment(stats.keyframe_requests - self.reported.keyframe_requests);
            metrics::counter!("vibe_call_dropped_frames_total")
                .increment(stats.dropped - self.reported.dropped);
            self.reported = stats;
        }
        self.deadline.send_if_modified(|d| {
            let changed = *d != next;
            *d = next;
            changed || notify_timer
        });
    }
}

/// Datagrams a drive of the core produced, sent together after it.
#[derive(Debug, Default)]
struct Outgoing {
    bytes: Vec<u8>,
    /// Destination and range in `bytes` of each datagram.
    datagrams: Vec<(SocketAddr, std::ops::Range<usize>)>,
}

/// At most this many datagrams per `sendmmsg` call.
const SEND_BATCH: usize = 64;

impl Outgoing {
    fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.datagrams.push((to, start..self.bytes.len()));
    }

    /// Sends everything without waiting, many datagrams per system call: a full socket buffer
    /// drops the rest, as a congested link would (str0m's retransmissions and keyframe requests
    /// recover).
    fn flush(&mut self, socket: &UdpSocket) {
        use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;

        let mut sent = 0;
        while sent < self.datagrams.len() {
            let batch = &self.datagrams[sent..(sent + SEND_BATCH).min(self.datagrams.len())];
            let slices: Vec<[IoSlice<'_>; 1]> = batch
                .iter()
                .map(|(_, range)| [IoSlice::new(&self.bytes[range.clone()])])
                .collect();
            let addrs: Vec<Option<SockaddrStorage>> = batch
                .iter()
                .map(|(to, _)| Some(SockaddrStorage::from(*to)))
                .collect();
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(batch.len(), None);
            match sendmmsg(
                socket.as_raw_fd(),
                &mut headers,
                &slices,
                &addrs,
                [],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(results) => {
                    let n = results.count();
                    if n == 0 {
                        break;
                    }
                    sent += n;
                }
                // A refused destination (ICMP port unreachable from an earlier send) fails
                // the call: skip that datagram and go on.
                Err(nix::errno::Errno::ECONNREFUSED) => sent += 1,
                Err(_) => break,
            }
        }
        let dropped = self.datagrams.len() - sent;
        if dropped > 0 {
            metrics::counter!("vibe_call_send_drops_total").increment(dropped as u64);
        }
        self.bytes.clear();
        self.datagrams.clear();
    }
}

async fn bind_socket(config: &CallsConfig) -> std::io::Result<UdpSocket> {
    let (low, high) = config.ports;
    if low == 0 {
        return UdpSocket::bind(SocketAddr::new(config.bind, 0)).await;
    }
    let mut last = None;
    for port in low..=high {
        match UdpSocket::bind(SocketAddr::new(config.bind, port)).await {
            Ok(socket) => return Ok(socket),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("empty port range")))
}

/// Reads the room's socket into its mailbox, dropping datagrams while too many wait.
async fn read_datagrams(
    socket: Arc<UdpSocket>,
    room: ActorRef<CallRoomMsg>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, source) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            // ICMP errors (a peer's port closed) surface as recv errors on Linux: keep reading.
            Err(_) => continue,
        };
        if queued.load(Ordering::Relaxed) >= max_queued {
            metrics::counter!("vibe_call_receive_drops_total").increment(1);
            continue;
        }
        queued.fetch_add(1, Ordering::Relaxed);
        let datagram = Datagram {
            source,
            contents: buf[..n].to_vec(),
            received: Instant::now(),
        };
        if room.cast(CallRoomMsg::Datagram(datagram)).is_err() {
            return;
        }
    }
}

/// Casts `Tick` to the room when its core's next deadline passes.
async fn run_timer(mut deadline: watch::Receiver<Option<Instant>>, room: ActorRef<CallRoomMsg>) {
    loop {
        let next = *deadline.borrow_and_update();
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {
                        if room.cast(CallRoomMsg::Tick).is_err() {
                            return;
                        }
                        // Wait for the room to set its next deadline.
                        if deadline.changed().await.is_err() {
                            return;
                        }
                    }
                    changed = deadline.changed() => if changed.is_err() { return },
                }
            }
            None => {
                if deadline.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
