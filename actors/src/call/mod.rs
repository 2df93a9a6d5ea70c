//! Calls: WebRTC rooms through a selective forwarding unit (str0m).
//!
//! - [`room`]: the sans-IO core of one room — participants' `Rtc`s, negotiation, forwarding,
//!   keyframe routing, simulcast layers, active speaker, peer-to-peer relaying. Time and
//!   datagrams are arguments, so it is tested with in-memory str0m peers and simulated time.
//! - [`actor`]: the room actor (owns a [`room::Room`] and the room's UDP socket) and the
//!   [`actor::Calls`] supervisor that locates rooms, enforces the per-node limit and tells
//!   participants to rejoin when a room crashes.
//!
//! The wire shape of signals (`{"call": room, "event": ...}`) is documented in
//! docs/protocol.md, section "Calls (WebRTC)".

pub mod actor;
pub mod room;

use std::fmt;

use serde::{Deserialize, Serialize};

/// A participant of one room: `p<n>`, unique within the room's lifetime. Forwarded tracks carry
/// it as their stream id, so a client maps incoming tracks to participants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParticipantId(pub u64);

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

impl Serialize for ParticipantId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for ParticipantId {
    type Err = CallError;

    fn from_str(s: &str) -> Result<Self, CallError> {
        s.strip_prefix('p')
            .and_then(|n| n.parse().ok())
            .map(ParticipantId)
            .ok_or(CallError::UnknownParticipant)
    }
}

/// How a room carries media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RoomMode {
    /// Every participant sends to and receives from the server.
    #[default]
    Sfu,
    /// Two participants connect directly; the server relays only signalling, and the room
    /// becomes [`RoomMode::Sfu`] when a third joins.
    P2p,
}

/// Audio or video, as the protocol names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    Audio,
    Video,
}

impl From<str0m::media::MediaKind> for TrackKind {
    fn from(kind: str0m::media::MediaKind) -> Self {
        match kind {
            str0m::media::MediaKind::Audio => TrackKind::Audio,
            str0m::media::MediaKind::Video => TrackKind::Video,
        }
    }
}

/// Which simulcast layer a participant receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    /// From the participant's bandwidth estimate.
    #[default]
    Auto,
    H,
    M,
    L,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdpKind {
    Offer,
    Answer,
}

/// Why a participant left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// It sent `call.leave`.
    Left,
    /// Its WebSocket closed.
    Disconnected,
    /// No ICE traffic from it for the ICE timeout.
    IceTimeout,
    /// Its media session failed (DTLS or SRTP error).
    MediaFailed,
    /// It may no longer read the room's document (its ACL changed, or it was deleted).
    Removed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackState {
    Published,
    Unpublished,
}

/// A participant as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParticipantInfo {
    pub participant: ParticipantId,
    pub did: String,
    pub muted: Muted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Muted {
    pub audio: bool,
    pub video: bool,
}

/// What the room tells one participant (an event frame `{"call": room, "event": ..., ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Signal {
    Sdp {
        #[serde(rename = "type")]
        kind: SdpKind,
        sdp: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<ParticipantId>,
    },
    Ice {
        from: ParticipantId,
        candidate: String,
    },
    Joined {
        participant: ParticipantId,
        did: String,
    },
    Left {
        participant: ParticipantId,
        reason: LeaveReason,
    },
    Track {
        participant: ParticipantId,
        kind: TrackKind,
        state: TrackState,
    },
    Mute {
        participant: ParticipantId,
        kind: TrackKind,
        muted: bool,
    },
    Speaker {
        participant: Option<ParticipantId>,
    },
    Peer {
        participant: ParticipantId,
        did: String,
        offerer: bool,
    },
    Mode {
        mode: RoomMode,
    },
    Ended {
        reason: &'static str,
        rejoin: bool,
    },
}

/// A refused call operation; [`CallError::code`] is the protocol's stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("the room is full ({0} participants)")]
    RoomFull(usize),
    #[error("this node runs its maximum of {0} call rooms")]
    TooManyRooms(usize),
    #[error("this connection has already joined the room")]
    AlreadyInCall,
    #[error("this connection has not joined the room")]
    NotInCall,
    #[error("invalid SDP: {0}")]
    InvalidSdp(String),
    #[error("invalid ICE candidate: {0}")]
    InvalidCandidate(String),
    #[error("a participant's session takes at most {0} remote candidates")]
    TooManyCandidates(usize),
    #[error("{0}")]
    NegotiationConflict(&'static str),
    #[error("no such participant in the room")]
    UnknownParticipant,
    #[error("`to` is only for peer-to-peer rooms")]
    NotPeerToPeer,
    #[error("this room is peer-to-peer: address descriptions and candidates to a peer with `to`")]
    PeerToPeer,
    #[error("the room is unavailable: {0}")]
    Unavailable(String),
}

impl CallError {
    pub fn code(&self) -> &'static str {
        match self {
            CallError::RoomFull(_) => "room_full",
            CallError::TooManyRooms(_) => "too_many_rooms",
            CallError::AlreadyInCall => "already_in_call",
            CallError::NotInCall => "not_in_call",
            CallError::InvalidSdp(_) => "invalid_sdp",
            CallError::InvalidCandidate(_) => "invalid_candidate",
            CallError::TooManyCandidates(_) => "too_many_candidates",
            CallError::NegotiationConflict(_) => "negotiation_conflict",
            CallError::UnknownParticipant => "unknown_participant",
            CallError::NotPeerToPeer => "not_peer_to_peer",
            CallError::PeerToPeer => "peer_to_peer",
            CallError::Unavailable(_) => "unavailable",
        }
    }
}
