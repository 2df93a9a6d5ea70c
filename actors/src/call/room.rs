//! The sans-IO core of one call room: who is in it, one str0m `Rtc` per participant (in SFU
//! mode), which tracks each publishes and receives, SDP negotiation, media forwarding, keyframe
//! requests, simulcast layer choice, the active speaker, and relaying in peer-to-peer mode.
//!
//! Time is an argument of every call; datagrams to send go to a callback; what participants must
//! be told is queued as [`Signal`]s for the caller to deliver ([`Room::take_signals`]). Nothing
//! here touches a socket or a clock, so tests drive it with in-memory peers and simulated time.
//!
//! Invariants: after every input the room drains every `Rtc` until each reports its next timeout
//! (str0m requires it); a participant receives only other participants' media; the server never
//! has its own offer outstanding when it accepts a participant's offer (str0m rolls its pending
//! changes back, and they are offered again afterwards).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcError};

use super::{
    CallError, LeaveReason, Muted, ParticipantId, ParticipantInfo, Quality, RoomMode, SdpKind,
    Signal, TrackKind, TrackState,
};

/// Settings of one room.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    pub mode: RoomMode,
    pub max_participants: usize,
    /// Host candidates offered to every participant: the addresses of the room's socket.
    pub candidates: Vec<SocketAddr>,
    /// At most one keyframe request per source track (and layer) per interval.
    pub keyframe_request_interval: Duration,
    /// How often the active speaker is re-evaluated.
    pub speaker_interval: Duration,
    /// Run send-side bandwidth estimation for each participant (`Quality::Auto` uses it).
    pub bandwidth_estimation: bool,
    /// Sent video packets kept per stream for retransmission (NACK) and probing.
    pub resend_buffer_packets: usize,
    /// Tracks one participant may publish: an offer with more sending m-lines is refused (and
    /// one with more m-lines than the room could ever send it and this, or more candidates
    /// than `max_candidates`).
    pub max_tracks: usize,
    /// Remote ICE candidates one participant's session takes (in offers and trickled), in all.
    pub max_candidates: usize,
    /// A participant with a server session must reach ICE connectivity this long after an
    /// offer or answer of its session was exchanged, or it is removed (`ice_timeout`): one
    /// whose candidates never come would otherwise hold its place for as long as its WebSocket
    /// stays open.
    pub connect_timeout: Duration,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            mode: RoomMode::Sfu,
            max_participants: 16,
            candidates: Vec::new(),
            keyframe_request_interval: Duration::from_millis(500),
            speaker_interval: Duration::from_millis(300),
            bandwidth_estimation: false,
            resend_buffer_packets: 500,
            max_tracks: 8,
            max_candidates: 64,
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// The result of a successful join.
#[derive(Debug, Clone)]
pub struct Joined {
    pub participant: ParticipantId,
    pub mode: RoomMode,
    /// The answer to the joiner's offer.
    pub answer: Option<String>,
    pub others: Vec<ParticipantInfo>,
}

/// Counters a room keeps for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomStats {
    /// Media frames written to a subscriber.
    pub forwarded: u64,
    /// Keyframe requests sent to a source.
    pub keyframe_requests: u64,
    /// Datagrams no participant accepted.
    pub unrouted: u64,
    /// Media frames a subscriber's session could not take ([`frame_lost`]): the frame is lost,
    /// the subscriber stays.
    pub dropped: u64,
}

/// Whether a media session's error costs one frame only, not the session: the frame could not
/// be packetized (the publisher sent what the codec's packetizer refuses) or the subscriber's
/// frames waiting to be packetized passed str0m's bound. A publisher's bad or bursty frames
/// must not end every subscriber's session.
fn frame_lost(error: &RtcError) -> bool {
    matches!(
        error,
        RtcError::Packet(..) | RtcError::WriteWithoutPoll | RtcError::NoSenderSource
    )
}

/// How many already-due timeouts one poll of a session handles at once (each packetizes up to
/// one frame per m-line); past it, the room's timer takes over. Bounds a session whose timeout
/// would not move.
const MAX_DUE_TIMEOUTS: usize = 64;

/// Frames forwarded to a session and not yet packetized past which its poll packetizes them
/// itself, rather than leaving them to the room's timer (str0m refuses a write past 512 waiting
/// on one m-line). Below it the timer does it, as before: the copies of one frame reach the
/// socket sooner when the room first hands every subscriber its copy.
const INLINE_BACKLOG: usize = 64;

pub struct Room {
    config: RoomConfig,
    mode: RoomMode,
    participants: Vec<Participant>,
    next_id: u64,
    signals: VecDeque<(ParticipantId, Signal)>,
    speaker: Option<ParticipantId>,
    next_speaker_check: Option<Instant>,
    stats: RoomStats,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room")
            .field("mode", &self.mode)
            .field("participants", &self.participants.len())
            .finish_non_exhaustive()
    }
}

struct Participant {
    id: ParticipantId,
    did: String,
    /// None in peer-to-peer mode, until the participant sends the server an offer.
    rtc: Option<Rtc>,
    /// The server's offer awaiting this participant's answer.
    pending: Option<SdpPendingOffer>,
    tracks_in: Vec<TrackIn>,
    tracks_out: Vec<TrackOut>,
    muted: Muted,
    quality: Quality,
    /// The latest send-side bandwidth estimate towards this participant.
    estimate: Option<Bitrate>,
    /// Smoothed loudness of its audio, 0 (silent) to 127 (0 dBov).
    loudness: f32,
    /// Set when its session ended; removed after the current drive.
    gone: Option<LeaveReason>,
    /// When its session next needs `Input::Timeout` (from its last poll).
    deadline: Option<Instant>,
    /// Until its ICE connects: when it must have (see [`RoomConfig::connect_timeout`]).
    connect_by: Option<Instant>,
    /// Frames written to its session since it last had none waiting to be packetized (as far as
    /// counted here: each timeout handled is taken to packetize one).
    unpacketized: usize,
    /// Its ICE is connected (the last state change said so). The deadline is set and cleared
    /// on this alone: `Rtc::is_connected` also waits for DTLS, and an exchange between the two
    /// set a deadline nothing cleared.
    ice_connected: bool,
    /// Remote candidates its session took.
    candidates: usize,
}

/// A track the participant publishes.
struct TrackIn {
    mid: Mid,
    kind: MediaKind,
    /// Simulcast layers seen on it, best first once sorted (`h`, `m`, `l`).
    rids: Vec<Rid>,
    /// Last keyframe request per layer.
    keyframe_requested: Vec<(Option<Rid>, Instant)>,
}

/// A track the participant receives: another participant's [`TrackIn`].
struct TrackOut {
    source: ParticipantId,
    source_mid: Mid,
    kind: MediaKind,
    state: OutState,
    /// The simulcast layer being forwarded (None: not simulcast, or not started).
    rid: Option<Rid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    ToOpen,
    Negotiating(Mid),
    Open(Mid),
    ToStop(Mid),
    NegotiatingStop(Mid),
}

impl TrackOut {
    fn mid(&self) -> Option<Mid> {
        match self.state {
            OutState::ToOpen => None,
            OutState::Negotiating(m)
            | OutState::Open(m)
            | OutState::ToStop(m)
            | OutState::NegotiatingStop(m) => Some(m),
        }
    }
}

/// What one participant's output means for the others.
// Media frames dominate this short-lived queue; boxing them would allocate once more per frame.
#[allow(clippy::large_enum_variant)]
enum Propagated {
    TrackOpen(ParticipantId, Mid, MediaKind),
    /// The source stopped sending on the m-line (it became `recvonly` or `inactive`).
    TrackClose(ParticipantId, Mid, MediaKind),
    Media(ParticipantId, MediaData),
    /// A subscriber asks for a keyframe of (source, source mid, layer).
    Keyframe(ParticipantId, Mid, Option<Rid>, KeyframeRequestKind),
}

const LAYERS: [&str; 3] = ["h", "m", "l"];

/// The rate the estimator probes for per forwarded video track: a top simulcast layer or a
/// single-layer 720p stream.
const VIDEO_DESIRED_KBPS: u64 = 2_500;

impl Room {
    pub fn new(config: RoomConfig) -> Self {
        Self {
            mode: config.mode,
            config,
            participants: Vec::new(),
            next_id: 1,
            signals: VecDeque::new(),
            speaker: None,
            next_speaker_check: None,
            stats: RoomStats::default(),
        }
    }

    pub fn mode(&self) -> RoomMode {
        self.mode
    }

    pub fn len(&self) -> usize {
        self.participants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.participants.is_empty()
    }

    pub fn stats(&self) -> RoomStats {
        self.stats
    }

    /// Signals queued since the last call, in order.
    pub fn take_signals(&mut self) -> impl Iterator<Item = (ParticipantId, Signal)> + '_ {
        self.signals.drain(..)
    }

    fn signal_others(&mut self, except: ParticipantId, signal: &Signal) {
        for p in &self.participants {
            if p.id != except {
                self.signals.push_back((p.id, signal.clone()));
            }
        }
    }

    fn index(&self, id: ParticipantId) -> Result<usize, CallError> {
        self.participants
            .iter()
            .position(|p| p.id == id)
            .ok_or(CallError::NotInCall)
    }

    /// Adds a participant. In SFU mode `offer` (the joiner's SDP offer) is answered; without
    /// one, the server offers once there is media to receive. In peer-to-peer mode the joiner
    /// gets no server session; with a third joiner the room switches to SFU.
    pub fn join(
        &mut self,
        now: Instant,
        did: String,
        offer: Option<&str>,
    ) -> Result<Joined, CallError> {
        if self.participants.len() >= self.config.max_participants {
            return Err(CallError::RoomFull(self.config.max_participants));
        }
        let id = ParticipantId(self.next_id);
        // A third joiner moves a peer-to-peer room to the SFU — once its own session is set up:
        // a join refused below leaves the room as it was.
        let to_sfu = self.mode == RoomMode::P2p && self.participants.len() >= 2;
        let mode = if to_sfu { RoomMode::Sfu } else { self.mode };
        // In a peer-to-peer room the server holds no session to offer to, whatever the offer.
        if mode == RoomMode::P2p && offer.is_some() {
            return Err(CallError::PeerToPeer);
        }
        let offer = offer.map(|sdp| self.parse_offer(sdp, 0)).transpose()?;
        let mut participant = Participant {
            id,
            did: did.clone(),
            rtc: None,
            pending: None,
            tracks_in: Vec::new(),
            tracks_out: Vec::new(),
            muted: Muted::default(),
            quality: Quality::Auto,
            estimate: None,
            loudness: 0.0,
            gone: None,
            deadline: None,
            connect_by: None,
            ice_connected: false,
            unpacketized: 0,
            candidates: 0,
        };
        let mut answer = None;
        match mode {
            RoomMode::Sfu => {
                let mut rtc = self.new_rtc(now)?;
                if let Some((offer, candidates)) = offer {
                    let sdp = rtc
                        .sdp_api()
                        .accept_offer(offer)
                        .map_err(|e| CallError::InvalidSdp(e.to_string()))?;
                    answer = Some(spread_candidates(&sdp.to_sdp_string()));
                    participant.candidates = candidates;
                    participant.connect_by = Some(now + self.config.connect_timeout);
                }
                participant.rtc = Some(rtc);
                for other in &self.participants {
                    for track in &other.tracks_in {
                        participant.tracks_out.push(TrackOut {
                            source: other.id,
                            source_mid: track.mid,
                            kind: track.kind,
                            state: OutState::ToOpen,
                            rid: None,
                        });
                    }
                }
            }
            RoomMode::P2p => {
                if let Some(first) = self.participants.first() {
                    self.signals.push_back((
                        id,
                        Signal::Peer {
                            participant: first.id,
                            did: first.did.clone(),
                            offerer: true,
                        },
                    ));
                    self.signals.push_back((
                        first.id,
                        Signal::Peer {
                            participant: id,
                            did: did.clone(),
                            offerer: false,
                        },
                    ));
                }
            }
        }
        if to_sfu {
            self.mode = RoomMode::Sfu;
            for p in &self.participants {
                self.signals.push_back((
                    p.id,
                    Signal::Mode {
                        mode: RoomMode::Sfu,
                    },
                ));
            }
        }
        self.next_id += 1;
        let others = self
            .participants
            .iter()
            .map(|p| ParticipantInfo {
                participant: p.id,
                did: p.did.clone(),
                muted: p.muted,
            })
            .collect();
        self.signal_others(
            id,
            &Signal::Joined {
                participant: id,
                did,
            },
        );
        self.participants.push(participant);
        Ok(Joined {
            participant: id,
            mode: self.mode,
            answer,
            others,
        })
    }

    fn new_rtc(&self, now: Instant) -> Result<Rtc, CallError> {
        let mut builder = Rtc::builder()
            .set_ice_lite(true)
            .set_send_buffer_video(self.config.resend_buffer_packets.max(1));
        if self.config.bandwidth_estimation {
            builder = builder.enable_bwe(Some(Bitrate::kbps(1_000)));
        }
        let mut rtc = builder.build(now);
        for addr in &self.config.candidates {
            let candidate = Candidate::host(*addr, "udp")
                .map_err(|e| CallError::Unavailable(format!("host candidate {addr}: {e}")))?;
            rtc.add_local_candidate(candidate);
        }
        Ok(rtc)
    }

    /// A participant's session description. With `to` (peer-to-peer mode) it is relayed;
    /// otherwise an offer is answered (the returned SDP) and an answer completes the server's
    /// outstanding offer.
    pub fn sdp(
        &mut self,
        now: Instant,
        from: ParticipantId,
        to: Option<ParticipantId>,
        kind: SdpKind,
        sdp: &str,
    ) -> Result<Option<String>, CallError> {
        let index = self.index(from)?;
        if let Some(to) = to {
            self.relay_target(to, from)?;
            self.signals.push_back((
                to,
                Signal::Sdp {
                    kind,
                    sdp: sdp.to_owned(),
                    from: Some(from),
                },
            ));
            return Ok(None);
        }
        if self.mode == RoomMode::P2p {
            return Err(CallError::PeerToPeer);
        }
        match kind {
            SdpKind::Offer => {
                let (offer, candidates) =
                    self.parse_offer(sdp, self.participants[index].candidates)?;
                if self.participants[index].rtc.is_none() {
                    // A former peer-to-peer participant moving to the SFU.
                    let rtc = self.new_rtc(now)?;
                    let others: Vec<TrackOut> = self
                        .participants
                        .iter()
                        .filter(|p| p.id != from)
                        .flat_map(|p| {
                            p.tracks_in.iter().map(|t| TrackOut {
                                source: p.id,
                                source_mid: t.mid,
                                kind: t.kind,
                                state: OutState::ToOpen,
                                rid: None,
                            })
                        })
                        .collect();
                    let p = &mut self.participants[index];
                    p.rtc = Some(rtc);
                    p.tracks_out = others;
                }
                let p = &mut self.participants[index];
                let Some(rtc) = p.rtc.as_mut() else {
                    return Err(CallError::NotInCall);
                };
                let accepted = rtc.sdp_api().accept_offer(offer);
                // accept_offer rolled back the server's own outstanding offer (also when it
                // refused this one): offer its changes again after this exchange.
                p.void_server_offer();
                let answer = accepted.map_err(|e| CallError::InvalidSdp(e.to_string()))?;
                p.candidates = candidates;
                if !p.ice_connected {
                    p.connect_by = Some(now + self.config.connect_timeout);
                }
                Ok(Some(spread_candidates(&answer.to_sdp_string())))
            }
            SdpKind::Answer => {
                if self.participants[index].pending.is_none() {
                    return Err(CallError::NegotiationConflict(
                        "no offer of the server is awaiting an answer",
                    ));
                }
                let answer =
                    SdpAnswer::from_sdp_string(sdp).map_err(|e| unreadable_sdp("answer", &e))?;
                let p = &mut self.participants[index];
                let (Some(rtc), Some(pending)) = (p.rtc.as_mut(), p.pending.take()) else {
                    return Err(CallError::NegotiationConflict(
                        "no offer of the server is awaiting an answer",
                    ));
                };
                if let Err(e) = rtc.sdp_api().accept_answer(pending, answer) {
                    // The offer is spent: its changes are offered again.
                    p.void_server_offer();
                    return Err(CallError::InvalidSdp(e.to_string()));
                }
                if !p.ice_connected {
                    p.connect_by = Some(now + self.config.connect_timeout);
                }
                for track in &mut p.tracks_out {
                    if let OutState::Negotiating(m) = track.state {
                        track.state = OutState::Open(m);
                    }
                }
                p.tracks_out
                    .retain(|t| !matches!(t.state, OutState::NegotiatingStop(_)));
                Ok(None)
            }
        }
    }

    fn relay_target(&self, to: ParticipantId, from: ParticipantId) -> Result<(), CallError> {
        if self.mode != RoomMode::P2p {
            return Err(CallError::NotPeerToPeer);
        }
        if to == from || !self.participants.iter().any(|p| p.id == to) {
            return Err(CallError::UnknownParticipant);
        }
        Ok(())
    }

    /// A trickled candidate: relayed with `to`, else given to the participant's session (an
    /// empty candidate ends the trickle and is accepted as such).
    pub fn ice(
        &mut self,
        from: ParticipantId,
        to: Option<ParticipantId>,
        candidate: &str,
    ) -> Result<(), CallError> {
        let index = self.index(from)?;
        if let Some(to) = to {
            self.relay_target(to, from)?;
            self.signals.push_back((
                to,
                Signal::Ice {
                    from,
                    candidate: candidate.to_owned(),
                },
            ));
            return Ok(());
        }
        let line = candidate.trim();
        let line = line.strip_prefix("a=").unwrap_or(line);
        if line.is_empty() {
            return Ok(());
        }
        let parsed = Candidate::from_sdp_string(line)
            .map_err(|e| CallError::InvalidCandidate(e.to_string()))?;
        let max = self.config.max_candidates;
        let p = &mut self.participants[index];
        match p.rtc.as_mut() {
            Some(_) if p.candidates >= max => Err(CallError::TooManyCandidates(max)),
            Some(rtc) => {
                rtc.add_remote_candidate(parsed);
                p.candidates += 1;
                Ok(())
            }
            None if self.mode == RoomMode::P2p => Err(CallError::PeerToPeer),
            None => Err(CallError::NegotiationConflict(
                "send the server an offer before candidates",
            )),
        }
    }

    /// Mutes or unmutes the participant's tracks of `kind`: nothing of that kind is forwarded
    /// while muted.
    pub fn mute(
        &mut self,
        from: ParticipantId,
        kind: TrackKind,
        muted: bool,
    ) -> Result<(), CallError> {
        let index = self.index(from)?;
        let p = &mut self.participants[index];
        let flag = match kind {
            TrackKind::Audio => &mut p.muted.audio,
            TrackKind::Video => &mut p.muted.video,
        };
        if *flag != muted {
            *flag = muted;
            self.signal_others(
                from,
                &Signal::Mute {
                    participant: from,
                    kind,
                    muted,
                },
            );
        }
        Ok(())
    }

    /// Which simulcast layer the participant receives.
    pub fn set_quality(&mut self, from: ParticipantId, quality: Quality) -> Result<(), CallError> {
        let index = self.index(from)?;
        self.participants[index].quality = quality;
        Ok(())
    }

    /// Removes a participant; the others are told and their copies of its tracks stop (at the
    /// next [`Room::drive`]).
    pub fn leave(&mut self, id: ParticipantId, reason: LeaveReason) {
        let Ok(index) = self.index(id) else {
            return;
        };
        let mut gone = self.participants.remove(index);
        if let Some(rtc) = gone.rtc.as_mut() {
            rtc.disconnect();
        }
        for track in &gone.tracks_in {
            self.signal_others(
                id,
                &Signal::Track {
                    participant: id,
                    kind: track.kind.into(),
                    state: TrackState::Unpublished,
                },
            );
        }
        self.signal_others(
            id,
            &Signal::Left {
                participant: id,
                reason,
            },
        );
        if reason != LeaveReason::Left && reason != LeaveReason::Disconnected {
            // It may still be connected over the WebSocket: tell it why its media stopped.
            self.signals.push_back((
                id,
                Signal::Left {
                    participant: id,
                    reason,
                },
            ));
        }
        self.stop_forwarding(id, None);
        if self.speaker == Some(id) {
            self.speaker = None;
            for p in &self.participants {
                self.signals
                    .push_back((p.id, Signal::Speaker { participant: None }));
            }
        }
    }

    /// The others stop receiving `source`'s track `mid` (None: all its tracks): their m-lines
    /// for it are stopped at their next negotiation, or never opened.
    fn stop_forwarding(&mut self, source: ParticipantId, mid: Option<Mid>) {
        let stopped = |t: &TrackOut| t.source == source && mid.is_none_or(|m| t.source_mid == m);
        for p in &mut self.participants {
            for track in &mut p.tracks_out {
                if !stopped(track) {
                    continue;
                }
                track.state = match track.state {
                    OutState::Open(m) | OutState::Negotiating(m) => OutState::ToStop(m),
                    other => other,
                };
            }
            p.tracks_out
                .retain(|t| !(stopped(t) && t.state == OutState::ToOpen));
        }
    }

    /// A datagram arrived on the room's socket; false when no participant took it. Like every
    /// input, follow it with [`Room::drive`].
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
    ) -> bool {
        let Ok(contents) = contents.try_into() else {
            self.stats.unrouted += 1;
            return false;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination,
                contents,
            },
        );
        let Some(p) = self
            .participants
            .iter_mut()
            .find(|p| p.rtc.as_ref().is_some_and(|rtc| rtc.accepts(&input)))
        else {
            self.stats.unrouted += 1;
            return false;
        };
        if let Some(rtc) = p.rtc.as_mut()
            && let Err(e) = rtc.handle_input(input)
        {
            tracing::debug!(participant = %p.id, error = %e, "media session failed");
            p.gone = Some(LeaveReason::MediaFailed);
        }
        true
    }

    /// Time passed: the sessions whose deadline has come handle their timers (waking every
    /// session on every tick would cost each tick the whole room). Follow it with
    /// [`Room::drive`].
    pub fn handle_timeout(&mut self, now: Instant) {
        for p in &mut self.participants {
            if p.connect_by.is_some_and(|d| d <= now) {
                p.gone = Some(LeaveReason::IceTimeout);
                continue;
            }
            if p.deadline.is_some_and(|d| d > now) {
                continue;
            }
            p.unpacketized = p.unpacketized.saturating_sub(1);
            if let Some(rtc) = p.rtc.as_mut()
                && let Err(e) = rtc.handle_input(Input::Timeout(now))
            {
                if frame_lost(&e) {
                    self.stats.dropped += 1;
                    continue;
                }
                tracing::debug!(participant = %p.id, error = %e, "media session failed");
                p.gone = Some(LeaveReason::MediaFailed);
            }
        }
    }

    /// The participants, in join order.
    pub fn participant_ids(&self) -> impl Iterator<Item = ParticipantId> + '_ {
        self.participants.iter().map(|p| p.id)
    }

    /// Drains every session until each reports its next timeout, forwarding what they produce,
    /// then offers pending track changes and removes participants whose session ended. Call it
    /// after every input (str0m requires it). Returns when the room next needs
    /// [`Room::handle_timeout`].
    pub fn drive(
        &mut self,
        now: Instant,
        send: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Option<Instant> {
        let mut queue = VecDeque::new();
        loop {
            let mut next: Option<Instant> = None;
            for p in &mut self.participants {
                let max_tracks = self.config.max_tracks;
                if let Some(t) = p.poll(now, send, &mut queue, &mut self.stats, max_tracks) {
                    next = Some(next.map_or(t, |n: Instant| n.min(t)));
                }
            }
            if queue.is_empty() {
                self.negotiate();
                if self.participants.iter().any(|p| p.gone.is_some()) {
                    let gone: Vec<_> = self
                        .participants
                        .iter()
                        .filter_map(|p| p.gone.map(|r| (p.id, r)))
                        .collect();
                    for (id, reason) in gone {
                        self.leave(id, reason);
                    }
                    continue;
                }
                let speaker = self.check_speaker(now);
                return match (next, speaker) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            while let Some(item) = queue.pop_front() {
                self.propagate(now, item);
            }
        }
    }

    fn propagate(&mut self, now: Instant, item: Propagated) {
        match item {
            Propagated::TrackOpen(source, mid, kind) => {
                for p in &mut self.participants {
                    if p.id != source && p.rtc.is_some() {
                        p.tracks_out.push(TrackOut {
                            source,
                            source_mid: mid,
                            kind,
                            state: OutState::ToOpen,
                            rid: None,
                        });
                    }
                }
                self.signal_others(
                    source,
                    &Signal::Track {
                        participant: source,
                        kind: kind.into(),
                        state: TrackState::Published,
                    },
                );
            }
            Propagated::TrackClose(source, mid, kind) => {
                self.signal_others(
                    source,
                    &Signal::Track {
                        participant: source,
                        kind: kind.into(),
                        state: TrackState::Unpublished,
                    },
                );
                self.stop_forwarding(source, Some(mid));
            }
            Propagated::Media(source, data) => self.forward(now, source, data),
            Propagated::Keyframe(source, mid, rid, kind) => {
                self.request_keyframe(now, source, mid, rid, kind);
            }
        }
    }

    fn forward(&mut self, now: Instant, source: ParticipantId, data: MediaData) {
        let Some(src) = self.participants.iter_mut().find(|p| p.id == source) else {
            return;
        };
        let Some(track) = src.tracks_in.iter_mut().find(|t| t.mid == data.mid) else {
            return;
        };
        let kind = track.kind;
        if let Some(rid) = data.rid
            && !track.rids.contains(&rid)
        {
            track.rids.push(rid);
            track.rids.sort_by_key(layer_rank);
        }
        // Only simulcast media needs the layers (cloning allocates; most frames have no rid).
        let layers = if data.rid.is_some() {
            track.rids.clone()
        } else {
            Vec::new()
        };
        let muted = match kind {
            MediaKind::Audio => src.muted.audio,
            MediaKind::Video => src.muted.video,
        };
        if kind == MediaKind::Audio
            && !muted
            && let Some(level) = data.ext_vals.audio_level
        {
            let loudness = 127.0 - f32::from(level.unsigned_abs().min(127));
            src.loudness = src.loudness * 0.8 + loudness * 0.2;
        }
        if muted {
            return;
        }
        if !data.contiguous && kind == MediaKind::Video {
            self.request_keyframe(now, source, data.mid, data.rid, KeyframeRequestKind::Pli);
        }
        let mut wanted: Vec<Rid> = Vec::new();
        for p in &mut self.participants {
            if p.id == source {
                continue;
            }
            let quality = p.quality;
            let estimate = p.estimate;
            let Some(rtc) = p.rtc.as_mut() else {
                continue;
            };
            let Some(out) = p
                .tracks_out
                .iter_mut()
                .find(|t| t.source == source && t.source_mid == data.mid)
            else {
                continue;
            };
            let Some(mid) = out.mid() else {
                continue;
            };
            if let Some(rid) = data.rid {
                let desired = choose_layer(quality, estimate, &layers);
                if out.rid != Some(desired) {
                    if rid == desired && data.is_keyframe() {
                        // Switch layers on a keyframe of the new one.
                        out.rid = Some(desired);
                    } else if !wanted.contains(&desired) {
                        wanted.push(desired);
                    }
                }
                if out.rid != Some(rid) {
                    continue;
                }
            }
            let Some(writer) = rtc.writer(mid) else {
                continue;
            };
            let Some(pt) = writer.match_params(data.params) else {
                continue;
            };
            if let Err(e) = writer.write(pt, data.network_time, data.time, data.data.clone()) {
                if frame_lost(&e) {
                    self.stats.dropped += 1;
                    continue;
                }
                tracing::debug!(participant = %p.id, error = %e, "forwarding failed");
                p.gone = Some(LeaveReason::MediaFailed);
                continue;
            }
            p.unpacketized += 1;
            self.stats.forwarded += 1;
        }
        for rid in wanted {
            self.request_keyframe(now, source, data.mid, Some(rid), KeyframeRequestKind::Pli);
        }
    }

    fn request_keyframe(
        &mut self,
        now: Instant,
        source: ParticipantId,
        mid: Mid,
        rid: Option<Rid>,
        kind: KeyframeRequestKind,
    ) {
        let interval = self.config.keyframe_request_interval;
        let Some(src) = self.participants.iter_mut().find(|p| p.id == source) else {
            return;
        };
        let Some(track) = src.tracks_in.iter_mut().find(|t| t.mid == mid) else {
            return;
        };
        match track.keyframe_requested.iter_mut().find(|(r, _)| *r == rid) {
            Some((_, at)) if now.saturating_duration_since(*at) < interval => return,
            Some((_, at)) => *at = now,
            None => track.keyframe_requested.push((rid, now)),
        }
        let Some(mut writer) = src.rtc.as_mut().and_then(|rtc| rtc.writer(mid)) else {
            return;
        };
        if writer.is_request_keyframe_possible(kind) && writer.request_keyframe(rid, kind).is_ok() {
            self.stats.keyframe_requests += 1;
        }
    }

    /// Offers each participant the track changes it has not negotiated yet (one offer
    /// outstanding at a time).
    fn negotiate(&mut self) {
        for p in &mut self.participants {
            if p.pending.is_some() || p.gone.is_some() {
                continue;
            }
            let Some(rtc) = p.rtc.as_mut() else {
                continue;
            };
            if !p
                .tracks_out
                .iter()
                .any(|t| matches!(t.state, OutState::ToOpen | OutState::ToStop(_)))
            {
                continue;
            }
            let mut change = rtc.sdp_api();
            for track in &mut p.tracks_out {
                match track.state {
                    OutState::ToOpen => {
                        let mid = change.add_media(
                            track.kind,
                            Direction::SendOnly,
                            Some(track.source.to_string()),
                            None,
                            None,
                        );
                        track.state = OutState::Negotiating(mid);
                    }
                    OutState::ToStop(mid) => {
                        change.stop_media(mid);
                        track.state = OutState::NegotiatingStop(mid);
                    }
                    _ => {}
                }
            }
            if let Some((offer, pending)) = change.apply() {
                p.pending = Some(pending);
                if self.config.bandwidth_estimation {
                    // Ask the estimator to probe for what this participant is sent; without a
                    // desired rate it never grows past what was acknowledged so far, and its
                    // pacer holds forwarded video back to that.
                    let (audio, video) =
                        p.tracks_out
                            .iter()
                            .fold((0, 0), |(a, v), t| match (t.kind, t.state) {
                                (_, OutState::NegotiatingStop(_)) => (a, v),
                                (MediaKind::Audio, _) => (a + 1, v),
                                (MediaKind::Video, _) => (a, v + 1),
                            });
                    let desired = Bitrate::kbps(audio * 64 + video * VIDEO_DESIRED_KBPS);
                    if let Some(rtc) = p.rtc.as_mut() {
                        rtc.bwe().set_bitrate(Bitrate::kbps(300), desired);
                    }
                }
                self.signals.push_back((
                    p.id,
                    Signal::Sdp {
                        kind: SdpKind::Offer,
                        sdp: spread_candidates(&offer.to_sdp_string()),
                        from: None,
                    },
                ));
            }
        }
    }

    /// Re-evaluates the active speaker at most once per `speaker_interval`; returns when to
    /// check next (None: no one sends audio).
    fn check_speaker(&mut self, now: Instant) -> Option<Instant> {
        let has_audio = self
            .participants
            .iter()
            .any(|p| p.tracks_in.iter().any(|t| t.kind == MediaKind::Audio));
        if !has_audio {
            self.next_speaker_check = None;
            return None;
        }
        let due = *self.next_speaker_check.get_or_insert(now);
        if now < due {
            return Some(due);
        }
        // Louder than about -50 dBov counts as speaking; a new speaker must be clearly louder
        // than the current one, so the choice does not flap between two similar voices.
        const SPEAKING: f32 = 77.0;
        const MARGIN: f32 = 3.0;
        let loudest = self
            .participants
            .iter()
            .filter(|p| !p.muted.audio && p.loudness >= SPEAKING)
            .max_by(|a, b| a.loudness.total_cmp(&b.loudness))
            .map(|p| (p.id, p.loudness));
        let current = self
            .speaker
            .and_then(|id| self.participants.iter().find(|p| p.id == id))
            .filter(|p| !p.muted.audio && p.loudness >= SPEAKING)
            .map(|p| p.loudness);
        let next_speaker = match (loudest, current) {
            (Some((id, level)), Some(cur)) if level > cur + MARGIN => Some(id),
            (Some(_), Some(_)) => self.speaker,
            (Some((id, _)), None) => Some(id),
            (None, _) => None,
        };
        if next_speaker != self.speaker {
            self.speaker = next_speaker;
            for p in &self.participants {
                self.signals.push_back((
                    p.id,
                    Signal::Speaker {
                        participant: next_speaker,
                    },
                ));
            }
        }
        let next = now + self.config.speaker_interval;
        self.next_speaker_check = Some(next);
        Some(next)
    }

    /// The participant currently reported as the active speaker.
    pub fn speaker(&self) -> Option<ParticipantId> {
        self.speaker
    }
}

impl Participant {
    /// Drains this participant's session until its next timeout. Transmits go to `send`;
    /// what concerns others goes to `queue`.
    fn poll(
        &mut self,
        now: Instant,
        send: &mut dyn FnMut(SocketAddr, &[u8]),
        queue: &mut VecDeque<Propagated>,
        stats: &mut RoomStats,
        max_tracks: usize,
    ) -> Option<Instant> {
        let mut due = 0;
        loop {
            let rtc = self.rtc.as_mut()?;
            if self.gone.is_some() || !rtc.is_alive() {
                self.gone.get_or_insert(LeaveReason::MediaFailed);
                return None;
            }
            let output = match rtc.poll_output() {
                Ok(output) => output,
                Err(e) => {
                    tracing::debug!(participant = %self.id, error = %e, "media session failed");
                    self.gone = Some(LeaveReason::MediaFailed);
                    return None;
                }
            };
            match output {
                // Frames forwarded to this session are packetized on its timeout, which is then
                // already due. The room's timer message handles it, but waits behind every
                // datagram already queued: once a burst has piled up frames, they are
                // packetized here.
                Output::Timeout(t)
                    if t <= now
                        && self.unpacketized >= INLINE_BACKLOG
                        && due < MAX_DUE_TIMEOUTS =>
                {
                    due += 1;
                    self.unpacketized -= 1;
                    if let Err(e) = rtc.handle_input(Input::Timeout(now)) {
                        if !frame_lost(&e) {
                            tracing::debug!(participant = %self.id, error = %e,
                                "media session failed");
                            self.gone = Some(LeaveReason::MediaFailed);
                            return None;
                        }
                        stats.dropped += 1;
                    }
                }
                Output::Timeout(t) => {
                    if t > now {
                        // Nothing waits to be packetized.
                        self.unpacketized = 0;
                    }
                    self.deadline = Some(t);
                    return Some(self.connect_by.map_or(t, |c| c.min(t)));
                }
                Output::Transmit(t) => send(t.destination, &t.contents),
                Output::Event(event) => self.handle_event(event, queue, max_tracks),
            }
        }
    }

    /// Publishes the m-line `mid` to the others if the participant sends on it and it is
    /// neither the server's nor published already.
    fn publish(
        &mut self,
        mid: Mid,
        kind: MediaKind,
        direction: Direction,
        queue: &mut VecDeque<Propagated>,
        max_tracks: usize,
    ) {
        let ours = self.tracks_out.iter().any(|t| t.mid() == Some(mid));
        if !ours
            && direction.is_receiving()
            && !self.tracks_in.iter().any(|t| t.mid == mid)
            // Offers are checked; this bounds what renegotiations add up to.
            && self.tracks_in.len() < max_tracks
        {
            self.tracks_in.push(TrackIn {
                mid,
                kind,
                rids: Vec::new(),
                keyframe_requested: Vec::new(),
            });
            queue.push_back(Propagated::TrackOpen(self.id, mid, kind));
        }
    }

    /// The server's outstanding offer is void (the participant's own offer rolled it back, or
    /// an exchange failed): the track changes it carried are offered again.
    fn void_server_offer(&mut self) {
        self.pending = None;
        for track in &mut self.tracks_out {
            match track.state {
                OutState::Negotiating(_) => track.state = OutState::ToOpen,
                OutState::NegotiatingStop(m) => track.state = OutState::ToStop(m),
                _ => {}
            }
        }
    }

    fn handle_event(&mut self, event: Event, queue: &mut VecDeque<Propagated>, max_tracks: usize) {
        match event {
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.gone = Some(LeaveReason::IceTimeout);
            }
            Event::IceConnectionStateChange(state) => {
                self.ice_connected = state.is_connected();
                if self.ice_connected {
                    self.connect_by = None;
                }
            }
            Event::MediaAdded(added) => {
                self.publish(added.mid, added.kind, added.direction, queue, max_tracks);
            }
            // A published m-line that stops sending is unpublished; one that starts (again) is
            // published.
            Event::MediaChanged(changed) => {
                match self.tracks_in.iter().position(|t| t.mid == changed.mid) {
                    Some(i) if !changed.direction.is_receiving() => {
                        let track = self.tracks_in.remove(i);
                        queue.push_back(Propagated::TrackClose(self.id, track.mid, track.kind));
                    }
                    Some(_) => {}
                    None => {
                        let kind = self.rtc.as_ref().and_then(|rtc| rtc.media(changed.mid));
                        if let Some(kind) = kind.map(|m| m.kind()) {
                            self.publish(changed.mid, kind, changed.direction, queue, max_tracks);
                        }
                    }
                }
            }
            Event::MediaData(data) if self.tracks_in.iter().any(|t| t.mid == data.mid) => {
                queue.push_back(Propagated::Media(self.id, data));
            }
            Event::KeyframeRequest(req) => {
                if let Some(out) = self.tracks_out.iter().find(|t| t.mid() == Some(req.mid)) {
                    queue.push_back(Propagated::Keyframe(
                        out.source,
                        out.source_mid,
                        out.rid,
                        req.kind,
                    ));
                }
            }
            Event::EgressBitrateEstimate(
                BweKind::Twcc {
                    estimate: bitrate, ..
                }
                | BweKind::Remb {
                    estimate: bitrate, ..
                },
            ) => {
                self.estimate = Some(bitrate);
            }
            _ => {}
        }
    }
}

/// Repeats the first m-section's candidates in every other active m-section. str0m, bundling,
/// lists them once (RFC 8843 allows it); aiortc takes the candidates of a bundled transport
/// from its last m-section only, and would find none.
fn spread_candidates(sdp: &str) -> String {
    let candidates: Vec<&str> = sdp
        .split("\r\n")
        .skip_while(|l| !l.starts_with("m="))
        .take_while({
            let mut sections = 0;
            move |l| {
                if l.starts_with("m=") {
                    sections += 1;
                }
                sections <= 1
            }
        })
        .filter(|l| l.starts_with("a=candidate:"))
        .collect();
    if candidates.is_empty() {
        return sdp.to_owned();
    }
    let mut out = String::with_capacity(sdp.len() + 256);
    let mut section = 0;
    let mut active = false;
    for line in sdp.split_terminator("\r\n") {
        out.push_str(line);
        out.push_str("\r\n");
        if line.starts_with("m=") {
            section += 1;
            // A rejected or stopped m-section has port 0.
            active = line.split(' ').nth(1) != Some("0");
        } else if line.starts_with("c=") && section > 1 && active {
            for candidate in &candidates {
                out.push_str(candidate);
                out.push_str("\r\n");
            }
        }
    }
    out
}

impl Room {
    /// A participant's offer, checked against the room's bounds before str0m sees it, and the
    /// participant's candidates with those it carries (`had` before it).
    fn parse_offer(&self, sdp: &str, had: usize) -> Result<(SdpOffer, usize), CallError> {
        let shape = OfferShape::of(sdp);
        let max_tracks = self.config.max_tracks;
        if shape.publishing > max_tracks {
            return Err(CallError::InvalidSdp(format!(
                "an offer publishes at most {max_tracks} tracks, this one {}",
                shape.publishing
            )));
        }
        // Its own tracks and one m-line per track of every other participant.
        let max_sections = max_tracks.saturating_mul(self.config.max_participants.max(1));
        if shape.sections > max_sections {
            return Err(CallError::InvalidSdp(format!(
                "an offer in this room has at most {max_sections} m-lines, this one {}",
                shape.sections
            )));
        }
        let candidates = had.saturating_add(shape.candidates);
        if candidates > self.config.max_candidates {
            return Err(CallError::TooManyCandidates(self.config.max_candidates));
        }
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| unreadable_sdp("offer", &e))?;
        Ok((offer, candidates))
    }
}

/// An offer or answer the SDP parser could not read. The parser's own message dumps its internal
/// state (a pointer offset among it): the client is told what failed, the detail goes to the log.
/// (A description that parses but str0m refuses keeps str0m's reason, which names the fault.)
fn unreadable_sdp(kind: &str, error: &dyn std::fmt::Display) -> CallError {
    tracing::debug!(%error, "an {kind}'s SDP did not parse");
    CallError::InvalidSdp(format!("the {kind} is not an SDP session description"))
}

/// What an offer's text asks of the room, counted from its lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct OfferShape {
    /// m-lines.
    sections: usize,
    /// m-lines the offerer sends on (`sendrecv`, `sendonly`, or no direction: sendrecv) with a
    /// port other than 0 (0: rejected or stopped).
    publishing: usize,
    /// `a=candidate` lines.
    candidates: usize,
}

impl OfferShape {
    fn of(sdp: &str) -> Self {
        let mut shape = Self::default();
        // The current m-section: whether it is live and sends.
        let mut section: Option<(bool, bool)> = None;
        let close = |section: Option<(bool, bool)>, shape: &mut Self| {
            if let Some((live, sends)) = section {
                shape.publishing += usize::from(live && sends);
            }
        };
        for line in sdp.lines().map(str::trim) {
            if let Some(media) = line.strip_prefix("m=") {
                close(section, &mut shape);
                shape.sections += 1;
                let live = media
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|port| port != "0");
                section = Some((live, true));
            } else if let Some((_, sends)) = section.as_mut() {
                match line {
                    "a=recvonly" | "a=inactive" => *sends = false,
                    "a=sendrecv" | "a=sendonly" => *sends = true,
                    _ => {}
                }
            }
            if line.starts_with("a=candidate:") {
                shape.candidates += 1;
            }
        }
        close(section, &mut shape);
        shape
    }
}

fn layer_rank(rid: &Rid) -> usize {
    LAYERS
        .iter()
        .position(|l| **l == **rid)
        .unwrap_or(LAYERS.len())
}

/// The layer a subscriber should receive of a source offering `layers` (best first).
fn choose_layer(quality: Quality, estimate: Option<Bitrate>, layers: &[Rid]) -> Rid {
    let wanted = match quality {
        Quality::H => 0,
        Quality::M => 1,
        Quality::L => 2,
        Quality::Auto => match estimate.map(|b| b.as_u64()) {
            None => 0,
            Some(bps) if bps >= 1_500_000 => 0,
            Some(bps) if bps >= 500_000 => 1,
            Some(_) => 2,
        },
    };
    // The wanted layer, or the nearest lower one the source sends, or its lowest.
    layers
        .iter()
        .find(|r| layer_rank(r) >= wanted)
        .or(layers.last())
        .copied()
        .unwrap_or_else(|| Rid::from(LAYERS[wanted]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_to_a_peer_to_peer_room_is_refused_as_such_whatever_its_text() {
        let mut room = Room::new(RoomConfig {
            mode: RoomMode::P2p,
            ..RoomConfig::default()
        });
        for offer in ["v=0\r\n", "not sdp at all"] {
            let refused = room.join(Instant::now(), "did:key:zA".to_owned(), Some(offer));
            assert_eq!(refused.err(), Some(CallError::PeerToPeer), "{offer:?}");
        }
        assert!(room.participants.is_empty());
    }

    #[test]
    fn an_unreadable_offer_is_refused_without_the_parsers_internals() {
        let mut room = Room::new(RoomConfig::default());
        let refused = room
            .join(Instant::now(), "did:key:zA".to_owned(), Some("v=0\r\n"))
            .err();
        let Some(error) = refused else {
            panic!("an offer of one line was accepted")
        };
        assert_eq!(error.code(), "invalid_sdp");
        assert_eq!(
            error.to_string(),
            "invalid SDP: the offer is not an SDP session description"
        );
        assert!(room.participants.is_empty());
    }

    #[test]
    fn an_offers_shape_counts_live_sending_sections_and_candidates() {
        let sdp = "v=0\r\na=sendrecv\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=candidate:1 1 udp 1 10.0.0.1 5 typ host\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=inactive\r\n\
                   m=audio 0 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=candidate:2 1 udp 1 10.0.0.2 5 typ host\r\n";
        assert_eq!(
            OfferShape::of(sdp),
            OfferShape {
                sections: 6,
                // The first (no direction: sendrecv), the sendonly one and the last.
                publishing: 3,
                candidates: 2,
            }
        );
    }

    #[test]
    fn candidates_are_repeated_in_every_active_section() {
        let sdp = "v=0\r\na=group:BUNDLE 0 1 2\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n\
                   c=IN IP4 0.0.0.0\r\na=candidate:1 1 udp 5 127.0.0.1 4000 typ host\r\n\
                   a=mid:0\r\nm=video 9 UDP/TLS/RTP/SAVPF 97\r\nc=IN IP4 0.0.0.0\r\n\
                   a=mid:1\r\nm=video 0 UDP/TLS/RTP/SAVPF 97\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n";
        let out = spread_candidates(sdp);
        let sections: Vec<&str> = out.split("m=").collect();
        assert_eq!(sections.len(), 4);
        assert!(sections[1].contains("a=candidate:1 1 udp 5 127.0.0.1 4000 typ host"));
        assert!(sections[2].contains("a=candidate:1 1 udp 5 127.0.0.1 4000 typ host"));
        assert!(
            !sections[3].contains("a=candidate"),
            "not in a stopped section"
        );
        assert_eq!(out.matches("a=candidate").count(), 2);
        assert!(out.ends_with("a=mid:2\r\n"));
        assert_eq!(spread_candidates("v=0\r\n"), "v=0\r\n");
    }

    #[test]
    fn layers_follow_quality_and_estimate() {
        let all: Vec<Rid> = LAYERS.iter().map(|l| Rid::from(*l)).collect();
        assert_eq!(&*choose_layer(Quality::L, None, &all), "l");
        assert_eq!(&*choose_layer(Quality::M, None, &all), "m");
        assert_eq!(&*choose_layer(Quality::Auto, None, &all), "h");
        let est = |kbps| Some(Bitrate::kbps(kbps));
        assert_eq!(&*choose_layer(Quality::Auto, est(3_000), &all), "h");
        assert_eq!(&*choose_layer(Quality::Auto, est(800), &all), "m");
        assert_eq!(&*choose_layer(Quality::Auto, est(200), &all), "l");
        // Only the layers the source sends: the nearest lower one, or its lowest.
        let hl = vec![Rid::from("h"), Rid::from("l")];
        assert_eq!(&*choose_layer(Quality::M, None, &hl), "l");
        let h = vec![Rid::from("h")];
        assert_eq!(&*choose_layer(Quality::L, None, &h), "h");
    }
}
