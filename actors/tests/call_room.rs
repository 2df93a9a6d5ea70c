//! The SFU core (`vibe_actors::call::room::Room`) driven by real str0m peers over a simulated
//! network with simulated time: media from each participant reaches every other one (a burst
//! too, without ending anyone's session),
//! keyframe requests reach the source (throttled), a leaving peer's tracks end, an ICE timeout
//! removes a participant, peer-to-peer rooms relay and switch to the SFU, bad input is refused
//! without disturbing the others, and the active speaker follows audio levels.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{
    Direction, KeyframeRequestKind, MediaKind, Mid, Rid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use vibe_actors::call::room::{Room, RoomConfig};
use vibe_actors::call::{
    CallError, LeaveReason, ParticipantId, RoomMode, SdpKind, Signal, TrackKind, TrackState,
};

const ROOM_ADDR: &str = "10.0.0.1:5000";
const LAYERS: [&str; 3] = ["h", "m", "l"];

fn room_addr() -> SocketAddr {
    ROOM_ADDR.parse().unwrap()
}

fn init_crypto() {
    vibe_actors::call::actor::install_crypto();
}

/// A client: a str0m peer publishing one audio and one video track.
struct Peer {
    name: u8,
    addr: SocketAddr,
    rtc: Rtc,
    id: Option<ParticipantId>,
    pending: Option<SdpPendingOffer>,
    /// Own publishing mids.
    audio: Option<Mid>,
    video: Option<Mid>,
    /// Received media: first payload byte (the sender's name) → (audio frames, video frames).
    received: HashMap<u8, (usize, usize)>,
    keyframe_requests: Vec<(Instant, Mid)>,
    /// Every m-line negotiated so far.
    mids: Vec<Mid>,
    signals: Vec<Signal>,
    /// Whether its packets reach the network (false: it went silent).
    online: bool,
    next_timeout: Instant,
    loud: bool,
    /// Publishes its video as three simulcast layers (h, m, l) instead of one.
    simulcast: bool,
    /// Server offers left unanswered (a peer busy with its own offer: glare).
    held_offers: Option<Vec<String>>,
    /// Layers (`h`/`m`/`l`) of the simulcast video frames received, in order.
    layers_received: Vec<u8>,
    /// Layers whose next frame is a keyframe (one was requested, or none was sent yet).
    keyframe_due: Vec<Rid>,
}

impl Peer {
    fn new(name: u8, now: Instant) -> Self {
        let addr: SocketAddr = format!("10.0.1.{name}:6000").parse().unwrap();
        let mut rtc = Rtc::builder().build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        Peer {
            name,
            addr,
            rtc,
            id: None,
            pending: None,
            audio: None,
            video: None,
            received: HashMap::new(),
            keyframe_requests: Vec::new(),
            mids: Vec::new(),
            signals: Vec::new(),
            online: true,
            next_timeout: now,
            loud: false,
            simulcast: false,
            held_offers: None,
            layers_received: Vec::new(),
            keyframe_due: LAYERS.iter().map(|l| Rid::from(*l)).collect(),
        }
    }

    /// An offer publishing audio and video.
    fn publish_offer(&mut self) -> String {
        let mut api = self.rtc.sdp_api();
        self.audio = Some(api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None));
        let simulcast = self.simulcast.then(|| {
            let mut s = Simulcast::new();
            for layer in LAYERS {
                s.add_send_layer(SimulcastLayer::new(layer));
            }
            s
        });
        self.video =
            Some(api.add_media(MediaKind::Video, Direction::SendRecv, None, None, simulcast));
        let (offer, pending) = api.apply().unwrap();
        self.pending = Some(pending);
        offer.to_sdp_string()
    }

    fn accept_answer(&mut self, sdp: &str) {
        let answer = SdpAnswer::from_sdp_string(sdp).unwrap();
        let pending = self.pending.take().unwrap();
        self.rtc.sdp_api().accept_answer(pending, answer).unwrap();
    }

    fn received_from(&self, other: u8) -> (usize, usize) {
        self.received.get(&other).copied().unwrap_or_default()
    }

    fn send_media(&mut self, now: Instant, start: Instant, frame: u64) {
        if !self.rtc.is_connected() {
            return;
        }
        let elapsed = now - start;
        if let (Some(mid), true) = (self.video, self.simulcast) {
            let pt = self.pt(Codec::Vp8);
            for layer in LAYERS {
                let rid = Rid::from(layer);
                let key = self.keyframe_due.contains(&rid);
                self.keyframe_due.retain(|r| *r != rid);
                // Bit 0 of a VP8 payload's first byte is clear on keyframes.
                let first = if key { self.name & 0xfe } else { self.name };
                let data = vec![first, b'S', layer.as_bytes()[0], frame as u8];
                if let Some(writer) = self.rtc.writer(mid) {
                    let _ = writer.rid(rid).write(pt, now, elapsed.into(), data);
                }
            }
        } else if let Some(mid) = self.video {
            let pt = self.pt(Codec::Vp8);
            if let Some(writer) = self.rtc.writer(mid) {
                // VP8 payloads whose first byte names the sender (bit 0 clear: a keyframe).
                let data = vec![self.name & 0xfe, 0x00, 0x00, frame as u8];
                let _ = writer.write(pt, now, elapsed.into(), data);
            }
        }
        if let Some(mid) = self.audio {
            let pt = self.pt(Codec::Opus);
            let level = if self.loud { -10 } else { -120 };
            if let Some(writer) = self.rtc.writer(mid) {
                let data = vec![self.name, 0xfc, frame as u8];
                let _ = writer
                    .audio_level(level, self.loud)
                    .write(pt, now, elapsed.into(), data);
            }
        }
    }

    fn pt(&self, codec: Codec) -> str0m::media::Pt {
        self.rtc
            .codec_config()
            .find(|p| p.spec().codec == codec)
            .unwrap()
            .pt()
    }
}

struct Packet {
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

/// The room, its peers and the network between them, on a simulated clock.
struct Sim {
    start: Instant,
    now: Instant,
    room: Room,
    room_deadline: Option<Instant>,
    peers: Vec<Peer>,
    net: VecDeque<Packet>,
    frame: u64,
    next_media: Instant,
    media: bool,
}

impl Sim {
    fn new(mode: RoomMode, max_participants: usize) -> Self {
        Self::with_estimation(mode, max_participants, false)
    }

    /// An SFU room where `names` joined and everyone already receives everyone.
    fn call(names: &[u8]) -> Self {
        let mut sim = Sim::new(RoomMode::Sfu, 8);
        for name in names {
            sim.join(*name).unwrap();
        }
        sim.run_until(Duration::from_secs(10), |s| s.all_receive(5));
        sim
    }

    fn with_estimation(mode: RoomMode, max_participants: usize, estimation: bool) -> Self {
        Self::with_config(RoomConfig {
            mode,
            max_participants,
            bandwidth_estimation: estimation,
            ..RoomConfig::default()
        })
    }

    /// A room of `config` (its candidate and intervals set as every test has them).
    fn with_config(config: RoomConfig) -> Self {
        init_crypto();
        let now = Instant::now();
        let room = Room::new(RoomConfig {
            candidates: vec![room_addr()],
            keyframe_request_interval: Duration::from_millis(500),
            speaker_interval: Duration::from_millis(300),
            ..config
        });
        Sim {
            start: now,
            now,
            room,
            room_deadline: None,
            peers: Vec::new(),
            net: VecDeque::new(),
            frame: 0,
            next_media: now,
            media: true,
        }
    }

    fn peer(&mut self, name: u8) -> &mut Peer {
        self.peers.iter_mut().find(|p| p.name == name).unwrap()
    }

    fn id(&self, name: u8) -> ParticipantId {
        self.peers
            .iter()
            .find(|p| p.name == name)
            .unwrap()
            .id
            .unwrap()
    }

    /// A new peer joins with an offer publishing audio and video.
    fn join(&mut self, name: u8) -> Result<(), CallError> {
        self.join_with(name, false)
    }

    fn join_with(&mut self, name: u8, simulcast: bool) -> Result<(), CallError> {
        let mut peer = Peer::new(name, self.now);
        peer.simulcast = simulcast;
        let offer = peer.publish_offer();
        let joined = self
            .room
            .join(self.now, format!("did:key:z{name}"), Some(&offer))?;
        peer.accept_answer(&joined.answer.unwrap());
        peer.id = Some(joined.participant);
        self.peers.push(peer);
        self.drive_room();
        Ok(())
    }

    /// Peer `name` offers the server the change `edit` makes to its session, and applies the
    /// answer.
    fn offer_change(&mut self, name: u8, edit: impl FnOnce(&mut str0m::change::SdpApi<'_>)) {
        let id = self.id(name);
        let peer = self.peer(name);
        let mut api = peer.rtc.sdp_api();
        edit(&mut api);
        let (offer, pending) = api.apply().unwrap();
        peer.pending = Some(pending);
        let answer = self
            .room
            .sdp(self.now, id, None, SdpKind::Offer, &offer.to_sdp_string())
            .unwrap()
            .expect("an answer");
        self.peer(name).accept_answer(&answer);
    }

    fn drive_room(&mut self) {
        let net = &mut self.net;
        let from = room_addr();
        self.room_deadline = self.room.drive(self.now, &mut |to, bytes| {
            net.push_back(Packet {
                from,
                to,
                data: bytes.to_vec(),
            });
        });
        self.deliver_signals();
    }

    /// Hands the room's signals to the peers; a peer answers every server offer.
    fn deliver_signals(&mut self) {
        let signals: Vec<_> = self.room.take_signals().collect();
        let mut answers = Vec::new();
        for (to, signal) in signals {
            let Some(peer) = self.peers.iter_mut().find(|p| p.id == Some(to)) else {
                continue;
            };
            if let Signal::Sdp {
                kind: SdpKind::Offer,
                sdp,
                from: None,
            } = &signal
            {
                if let Some(held) = peer.held_offers.as_mut() {
                    held.push(sdp.clone());
                } else {
                    let offer = SdpOffer::from_sdp_string(sdp).unwrap();
                    let answer = peer.rtc.sdp_api().accept_offer(offer).unwrap();
                    answers.push((to, answer.to_sdp_string()));
                }
            }
            peer.signals.push(signal);
        }
        for (id, answer) in answers {
            self.room
                .sdp(self.now, id, None, SdpKind::Answer, &answer)
                .unwrap();
        }
        if !self.room.take_signals().collect::<Vec<_>>().is_empty() {
            unreachable!("answering produces no signals");
        }
    }

    /// One millisecond of simulated time.
    fn step(&mut self) {
        self.now += Duration::from_millis(1);
        // Peers' timers and media.
        if self.media && self.now >= self.next_media {
            self.frame += 1;
            let (now, start, frame) = (self.now, self.start, self.frame);
            for peer in &mut self.peers {
                peer.send_media(now, start, frame);
            }
            self.next_media = self.now + Duration::from_millis(20);
        }
        for peer in &mut self.peers {
            if self.now >= peer.next_timeout {
                peer.rtc.handle_input(Input::Timeout(self.now)).unwrap();
            }
            poll_peer(peer, self.now, &mut self.net);
        }
        // The network delivers everything sent so far.
        while let Some(packet) = self.net.pop_front() {
            if packet.to == room_addr() {
                let online = self
                    .peers
                    .iter()
                    .find(|p| p.addr == packet.from)
                    .is_none_or(|p| p.online);
                if online {
                    self.room
                        .handle_datagram(self.now, packet.from, packet.to, &packet.data);
                    self.drive_room();
                }
            } else if let Some(peer) = self.peers.iter_mut().find(|p| p.addr == packet.to) {
                if !peer.online {
                    continue;
                }
                let input = Input::Receive(
                    self.now,
                    Receive {
                        proto: Protocol::Udp,
                        source: packet.from,
                        destination: packet.to,
                        contents: packet.data.as_slice().try_into().unwrap(),
                    },
                );
                peer.rtc.handle_input(input).unwrap();
                poll_peer(peer, self.now, &mut self.net);
            }
        }
        if self.room_deadline.is_some_and(|d| self.now >= d) {
            self.room.handle_timeout(self.now);
            self.drive_room();
        }
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) {
        let until = self.now + limit;
        while !done(self) {
            assert!(
                self.now < until,
                "condition not reached in {limit:?} of simulated time"
            );
            self.step();
        }
    }

    fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        while self.now < until {
            self.step();
        }
    }

    /// Every peer has received at least `n` audio and video frames from every other peer.
    fn all_receive(&self, n: usize) -> bool {
        self.peers.iter().all(|p| {
            self.peers.iter().filter(|o| o.name != p.name).all(|o| {
                let (a, v) = p.received_from(o.name);
                a >= n && v >= n
            })
        })
    }
}

fn poll_peer(peer: &mut Peer, now: Instant, net: &mut VecDeque<Packet>) {
    loop {
        match peer.rtc.poll_output().unwrap() {
            Output::Timeout(t) => {
                peer.next_timeout = t.max(now);
                return;
            }
            Output::Transmit(t) => {
                if peer.online {
                    net.push_back(Packet {
                        from: peer.addr,
                        to: t.destination,
                        data: t.contents.to_vec(),
                    });
                }
            }
            Output::Event(Event::MediaData(data)) => {
                let Some(&sender) = data.data.first() else {
                    continue;
                };
                if data.data.get(1) == Some(&b'S') {
                    peer.layers_received.push(data.data[2]);
                }
                let entry = peer.received.entry(sender | 1).or_default();
                match peer.rtc.media(data.mid).map(|m| m.kind()) {
                    Some(MediaKind::Audio) => entry.0 += 1,
                    Some(MediaKind::Video) => entry.1 += 1,
                    None => {}
                }
            }
            Output::Event(Event::MediaAdded(added)) => peer.mids.push(added.mid),
            Output::Event(Event::KeyframeRequest(req)) => {
                if let Some(rid) = req.rid {
                    peer.keyframe_due.push(rid);
                }
                peer.keyframe_requests.push((now, req.mid));
            }
            Output::Event(_) => {}
        }
    }
}

// Peer names are odd so that `name & 0xfe` (a VP8 keyframe's first byte) maps back with `| 1`.
const A: u8 = 1;
const B: u8 = 3;
const C: u8 = 5;

#[test]
fn media_from_each_participant_reaches_every_other() {
    let mut sim = Sim::new(RoomMode::Sfu, 8);
    sim.join(A).unwrap();
    sim.join(B).unwrap();
    sim.join(C).unwrap();
    sim.run_until(Duration::from_secs(10), |s| s.all_receive(20));
    for peer in &sim.peers {
        assert_eq!(
            peer.received_from(peer.name),
            (0, 0),
            "a participant never receives its own media"
        );
    }
    // Everyone was told who joined and which tracks were published.
    let a = &sim.peers[0];
    let published: Vec<_> = a
        .signals
        .iter()
        .filter_map(|s| match s {
            Signal::Track {
                participant,
                kind,
                state: TrackState::Published,
            } => Some((*participant, *kind)),
            _ => None,
        })
        .collect();
    for name in [B, C] {
        let id = sim.id(name);
        assert!(published.contains(&(id, TrackKind::Audio)), "{published:?}");
        assert!(published.contains(&(id, TrackKind::Video)), "{published:?}");
    }
    assert!(sim.room.stats().forwarded > 0);
}

#[test]
fn media_flows_with_bandwidth_estimation_on() {
    let mut sim = Sim::with_estimation(RoomMode::Sfu, 8, true);
    sim.join(A).unwrap();
    sim.join(B).unwrap();
    sim.join(C).unwrap();
    sim.run_until(Duration::from_secs(10), |s| s.all_receive(20));
}

#[test]
fn keyframe_requests_reach_the_source_and_are_throttled() {
    let mut sim = Sim::call(&[A, B]);
    let a_video = sim.peer(A).video.unwrap();
    // B's receiving mid for A's video: the video mid on B that is not B's own.
    let b = sim.peer(B);
    let own = [b.audio, b.video];
    let mids: Vec<Mid> = b
        .mids
        .iter()
        .copied()
        .filter(|m| !own.contains(&Some(*m)))
        .collect();
    let b_in = mids
        .into_iter()
        .find(|m| b.rtc.media(*m).map(|x| x.kind()) == Some(MediaKind::Video))
        .expect("B receives A's video");
    let before = sim.peer(A).keyframe_requests.len();
    for _ in 0..3 {
        let b = sim.peer(B);
        b.rtc
            .writer(b_in)
            .unwrap()
            .request_keyframe(None, KeyframeRequestKind::Pli)
            .unwrap();
        sim.run_for(Duration::from_millis(50));
    }
    sim.run_for(Duration::from_millis(100));
    let requests: Vec<_> = sim.peer(A).keyframe_requests[before..]
        .iter()
        .filter(|(_, mid)| *mid == a_video)
        .cloned()
        .collect();
    assert_eq!(
        requests.len(),
        1,
        "three requests within the interval reach the source once"
    );
    // After the interval, a new request goes through.
    sim.run_for(Duration::from_millis(500));
    let b = sim.peer(B);
    b.rtc
        .writer(b_in)
        .unwrap()
        .request_keyframe(None, KeyframeRequestKind::Pli)
        .unwrap();
    sim.run_until(Duration::from_secs(2), |s| {
        s.peers[0].keyframe_requests[before..]
            .iter()
            .filter(|(_, mid)| *mid == a_video)
            .count()
            == 2
    });
}

#[test]
fn a_leaving_participants_tracks_end_for_the_others() {
    let mut sim = Sim::call(&[A, B, C]);
    let c = sim.id(C);
    sim.room.leave(c, LeaveReason::Left);
    sim.drive_room();
    sim.peers.retain(|p| p.name != C);
    for peer in &sim.peers {
        assert!(
            peer.signals.contains(&Signal::Left {
                participant: c,
                reason: LeaveReason::Left
            }),
            "{:?}",
            peer.signals
        );
        assert!(peer.signals.contains(&Signal::Track {
            participant: c,
            kind: TrackKind::Video,
            state: TrackState::Unpublished
        }));
    }
    // The renegotiation stopped C's m-lines on A and B: of the m-lines the server added (the
    // peers' own are not in `mids`), only the other's two remain active.
    sim.run_for(Duration::from_millis(200));
    for peer in &sim.peers {
        let active = peer
            .mids
            .iter()
            .filter(|m| {
                peer.rtc
                    .media(**m)
                    .is_some_and(|x| x.direction() != Direction::Inactive)
            })
            .count();
        assert_eq!(peer.mids.len(), 4, "peer {}", peer.name);
        assert_eq!(active, 2, "peer {}", peer.name);
    }
    let (a_from_c, _) = sim.peer(A).received_from(C);
    sim.run_for(Duration::from_millis(500));
    assert_eq!(
        sim.peer(A).received_from(C).0,
        a_from_c,
        "nothing more from C"
    );
    assert!(sim.all_receive(5));
    assert_eq!(sim.room.len(), 2);
}

#[test]
fn an_ice_timeout_removes_the_participant_and_tells_everyone() {
    let mut sim = Sim::call(&[A, B]);
    let b = sim.id(B);
    sim.peer(B).online = false;
    sim.run_until(Duration::from_secs(60), |s| s.room.len() == 1);
    let expected = Signal::Left {
        participant: b,
        reason: LeaveReason::IceTimeout,
    };
    assert!(sim.peer(A).signals.contains(&expected));
    assert!(
        sim.peer(B).signals.contains(&expected),
        "the timed-out participant is told why"
    );
}

/// A publisher's burst — here 600 video frames arriving back to back, with no timer turn of the
/// room between them (as datagrams queued ahead of the room's timer message) — reaches every
/// subscriber whole, and nobody leaves: each subscriber's session packetizes what it is given
/// as it goes, instead of piling up frames until str0m refuses them (at 512), which ended the
/// subscriber's session.
#[test]
fn a_burst_of_frames_reaches_every_subscriber_and_nobody_leaves() {
    const BURST: usize = 600;
    let mut sim = Sim::call(&[A, B, C]);
    sim.media = false;
    sim.run_for(Duration::from_millis(200));
    let before: Vec<usize> = [B, C].map(|n| sim.peer(n).received_from(A).1).to_vec();
    let (now, start) = (sim.now, sim.start);
    let Sim { peers, net, .. } = &mut sim;
    let a = peers.iter_mut().find(|p| p.name == A).unwrap();
    let (mid, pt) = (a.video.unwrap(), a.pt(Codec::Vp8));
    for n in 0..BURST {
        // Inter frames (bit 0 set), each its own time.
        let time = (now - start) + Duration::from_millis(n as u64);
        a.rtc
            .writer(mid)
            .unwrap()
            .write(pt, now, time.into(), vec![A, 0x00, 0x00, n as u8])
            .unwrap();
        a.rtc.handle_input(Input::Timeout(now)).unwrap();
        poll_peer(a, now, net);
    }
    sim.run_until(Duration::from_secs(2), |s| {
        [B, C].iter().zip(&before).all(|(n, was)| {
            s.peers
                .iter()
                .any(|p| p.name == *n && p.received_from(A).1 >= was + BURST)
        })
    });
    assert_eq!(sim.room.len(), 3, "nobody left");
    assert_eq!(sim.room.stats().dropped, 0);
}

/// A participant publishes at most `max_tracks` tracks and its session takes at most
/// `max_candidates` remote candidates (its offers' and trickled ones together): an offer of
/// thousands of m-lines or a stream of candidates cannot grow the room without bound, nor flood
/// the others with `track` events.
#[test]
fn tracks_and_candidates_are_bounded_per_participant() {
    let mut sim = Sim::with_config(RoomConfig {
        max_participants: 4,
        max_tracks: 2,
        max_candidates: 3,
        ..RoomConfig::default()
    });
    // Three audio tracks: one too many.
    let mut greedy = Peer::new(7, sim.now);
    let mut api = greedy.rtc.sdp_api();
    for _ in 0..3 {
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    }
    let (offer, _) = api.apply().unwrap();
    let refused = sim
        .room
        .join(sim.now, "did:key:z7".into(), Some(&offer.to_sdp_string()));
    assert!(
        matches!(&refused, Err(CallError::InvalidSdp(m)) if m.contains("at most 2 tracks")),
        "{refused:?}"
    );
    assert_eq!(sim.room.len(), 0);

    // Audio and video (two tracks, one candidate in the offer) are fine; two more trickled
    // candidates fill the session's three.
    sim.join(A).unwrap();
    sim.join(B).unwrap();
    sim.run_until(Duration::from_secs(10), |s| s.all_receive(5));
    let a = sim.id(A);
    for n in 1..=2 {
        let line = format!("candidate:{n} 1 udp 2122260223 192.0.2.{n} 5000 typ host");
        sim.room.ice(a, None, &line).unwrap();
    }
    let refused = sim.room.ice(
        a,
        None,
        "candidate:9 1 udp 2122260223 192.0.2.9 5000 typ host",
    );
    assert_eq!(refused, Err(CallError::TooManyCandidates(3)));
    // The session goes on.
    let before = sim.peer(B).received_from(A).1;
    sim.run_until(Duration::from_secs(5), |s| {
        s.peers[1].received_from(A).1 > before
    });
}

/// Participants that connected stay, however their renegotiations fall against their
/// connection's set-up: an answer exchanged after ICE connected but before DTLS finished set
/// the connect deadline again, with nothing left to clear it (a whole benchmark room was
/// removed 15 s after joining).
#[test]
fn connected_participants_outlive_the_connect_deadline() {
    // The second joiner's tracks are offered to the first at each moment of its set-up.
    for gap in 0..12 {
        let mut sim = Sim::with_config(RoomConfig {
            connect_timeout: Duration::from_millis(500),
            ..RoomConfig::default()
        });
        sim.join(A).unwrap();
        sim.run_for(Duration::from_millis(gap));
        sim.join(B).unwrap();
        sim.run_until(Duration::from_secs(10), |s| s.all_receive(5));
        sim.run_for(Duration::from_secs(1));
        assert_eq!(sim.room.len(), 2, "nobody was removed (gap {gap} ms)");
    }
}

/// A participant whose ICE never connects — its offer carries no candidate and none is
/// trickled, so str0m's own ICE timeout never starts — is removed `connect_timeout` after its
/// offer, instead of holding its place for as long as its WebSocket stays open.
#[test]
fn a_participant_whose_ice_never_connects_is_removed() {
    let mut sim = Sim::with_config(RoomConfig {
        connect_timeout: Duration::from_secs(5),
        ..RoomConfig::default()
    });
    sim.join(A).unwrap();
    sim.run_until(Duration::from_secs(5), |s| s.peers[0].rtc.is_connected());
    let mut silent = Rtc::builder().build(sim.now);
    let mut api = silent.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, _) = api.apply().unwrap();
    let offer = offer.to_sdp_string();
    assert!(!offer.contains("a=candidate"), "{offer}");
    let joined = sim
        .room
        .join(sim.now, "did:key:zS".into(), Some(&offer))
        .unwrap();
    sim.drive_room();
    let joined_at = sim.now;
    sim.run_until(Duration::from_secs(10), |s| s.room.len() == 1);
    assert!(
        sim.now >= joined_at + Duration::from_secs(5),
        "not before its time"
    );
    assert!(sim.peer(A).signals.contains(&Signal::Left {
        participant: joined.participant,
        reason: LeaveReason::IceTimeout,
    }));
    assert!(sim.peer(A).rtc.is_connected(), "the connected one stays");
}

#[test]
fn bad_input_is_refused_and_the_room_keeps_working() {
    let mut sim = Sim::new(RoomMode::Sfu, 3);
    sim.join(A).unwrap();
    sim.join(B).unwrap();
    sim.run_until(Duration::from_secs(10), |s| s.all_receive(5));

    let err = sim
        .room
        .join(sim.now, "did:key:zX".into(), Some("v=0\r\nnonsense"));
    assert!(matches!(err, Err(CallError::InvalidSdp(_))), "{err:?}");
    let a = sim.id(A);
    let err = sim.room.sdp(sim.now, a, None, SdpKind::Offer, "garbage");
    assert!(matches!(err, Err(CallError::InvalidSdp(_))), "{err:?}");
    let err = sim.room.sdp(sim.now, a, None, SdpKind::Answer, "v=0\r\n");
    assert!(err.is_err(), "{err:?}");
    let err = sim.room.ice(
        ParticipantId(99),
        None,
        "candidate:1 1 udp 1 1.2.3.4 5 typ host",
    );
    assert_eq!(err, Err(CallError::NotInCall));
    let err = sim.room.ice(a, None, "candidate:bogus");
    assert!(
        matches!(err, Err(CallError::InvalidCandidate(_))),
        "{err:?}"
    );
    let err = sim
        .room
        .sdp(sim.now, a, Some(sim.id(B)), SdpKind::Offer, "v=0");
    assert_eq!(err, Err(CallError::NotPeerToPeer));
    // Garbage on the socket is not routed.
    assert!(!sim.room.handle_datagram(
        sim.now,
        "10.9.9.9:1".parse().unwrap(),
        room_addr(),
        &[0xff; 40]
    ));
    sim.join(C).unwrap();
    assert_eq!(sim.join(7), Err(CallError::RoomFull(3)));

    // Media still flows between everyone.
    let before: Vec<_> = sim.peers.iter().map(|p| p.received_from(A).1).collect();
    sim.run_until(Duration::from_secs(10), |s| s.all_receive(5));
    sim.run_for(Duration::from_millis(300));
    assert!(sim.peer(B).received_from(A).1 > before[1]);
}

#[test]
fn peer_to_peer_rooms_relay_signalling_and_switch_to_the_sfu_for_a_third() {
    init_crypto();
    let now = Instant::now();
    let mut room = Room::new(RoomConfig {
        mode: RoomMode::P2p,
        candidates: vec![room_addr()],
        ..RoomConfig::default()
    });
    let a = room.join(now, "did:key:zA".into(), None).unwrap();
    assert_eq!(a.mode, RoomMode::P2p);
    assert!(a.answer.is_none());
    let b = room.join(now, "did:key:zB".into(), None).unwrap();
    let (a, b) = (a.participant, b.participant);
    let signals: Vec<_> = room.take_signals().collect();
    assert!(signals.contains(&(
        b,
        Signal::Peer {
            participant: a,
            did: "did:key:zA".into(),
            offerer: true
        }
    )));
    assert!(signals.contains(&(
        a,
        Signal::Peer {
            participant: b,
            did: "did:key:zB".into(),
            offerer: false
        }
    )));
    // Offers, answers and candidates are relayed verbatim.
    assert_eq!(
        room.sdp(now, b, Some(a), SdpKind::Offer, "v=0 offer"),
        Ok(None)
    );
    room.ice(
        a,
        Some(b),
        "candidate:1 1 udp 2122260223 192.0.2.1 5000 typ host",
    )
    .unwrap();
    let signals: Vec<_> = room.take_signals().collect();
    assert_eq!(
        signals,
        vec![
            (
                a,
                Signal::Sdp {
                    kind: SdpKind::Offer,
                    sdp: "v=0 offer".into(),
                    from: Some(b)
                }
            ),
            (
                b,
                Signal::Ice {
                    from: a,
                    candidate: "candidate:1 1 udp 2122260223 192.0.2.1 5000 typ host".into()
                }
            ),
        ]
    );
    assert_eq!(
        room.sdp(now, a, Some(ParticipantId(42)), SdpKind::Answer, "x"),
        Err(CallError::UnknownParticipant)
    );
    assert_eq!(
        room.sdp(now, a, None, SdpKind::Offer, "x"),
        Err(CallError::PeerToPeer),
        "no server session in a peer-to-peer room"
    );

    // A third joiner whose offer the server's session refuses (it has no media) is refused,
    // and the room stays peer-to-peer: nobody is told to move.
    let mut refused_peer = Peer::new(7, now);
    let offer = refused_peer.publish_offer();
    let no_media = &offer[..offer.find("m=").unwrap()];
    let refused = room.join(now, "did:key:zX".into(), Some(no_media));
    assert!(
        matches!(refused, Err(CallError::InvalidSdp(_))),
        "{refused:?}"
    );
    assert_eq!(room.take_signals().count(), 0);
    assert_eq!(room.len(), 2);

    // A third participant: everyone moves to the SFU.
    let mut c_peer = Peer::new(C, now);
    let offer = c_peer.publish_offer();
    let c = room.join(now, "did:key:zC".into(), Some(&offer)).unwrap();
    assert_eq!(c.mode, RoomMode::Sfu);
    assert!(c.answer.is_some());
    let signals: Vec<_> = room.take_signals().collect();
    for who in [a, b] {
        assert!(signals.contains(&(
            who,
            Signal::Mode {
                mode: RoomMode::Sfu
            }
        )));
    }
    let mut a_peer = Peer::new(A, now);
    let offer = a_peer.publish_offer();
    let answer = room.sdp(now, a, None, SdpKind::Offer, &offer).unwrap();
    a_peer.accept_answer(&answer.expect("the server answers a former peer's offer"));
}

#[test]
fn the_active_speaker_follows_audio_levels() {
    let mut sim = Sim::call(&[A, B]);
    assert_eq!(sim.room.speaker(), None, "silence has no speaker");
    sim.peer(B).loud = true;
    let b = sim.id(B);
    sim.run_until(Duration::from_secs(5), |s| s.room.speaker() == Some(b));
    assert!(sim.peer(A).signals.contains(&Signal::Speaker {
        participant: Some(b)
    }));
    // Muted audio is neither forwarded nor a speaker.
    sim.room.mute(b, TrackKind::Audio, true).unwrap();
    sim.drive_room();
    assert!(sim.peer(A).signals.contains(&Signal::Mute {
        participant: b,
        kind: TrackKind::Audio,
        muted: true
    }));
    sim.run_until(Duration::from_secs(5), |s| s.room.speaker().is_none());
    let audio_before = sim.peer(A).received_from(B).0;
    sim.run_for(Duration::from_millis(500));
    assert_eq!(sim.peer(A).received_from(B).0, audio_before);
    assert!(sim.peer(A).received_from(B).1 > 0, "video still flows");
}

#[test]
fn a_receiver_gets_one_simulcast_layer_and_switches_on_a_keyframe_of_the_one_it_asks_for() {
    let mut sim = Sim::new(RoomMode::Sfu, 8);
    sim.join_with(A, true).unwrap();
    sim.join(B).unwrap();
    sim.run_until(Duration::from_secs(10), |s| {
        s.peers[1].layers_received.len() >= 10
    });
    let b = sim.peer(B);
    assert!(
        b.layers_received.iter().all(|l| *l == b'h'),
        "without an estimate the best layer only: {:?}",
        String::from_utf8_lossy(&b.layers_received)
    );
    // B asks for the lowest layer: the SFU requests a keyframe of it and switches on that.
    let b_id = sim.id(B);
    sim.room
        .set_quality(b_id, vibe_actors::call::Quality::L)
        .unwrap();
    let before = sim.peer(B).layers_received.len();
    sim.run_until(Duration::from_secs(5), |s| {
        s.peers[1].layers_received[before..].contains(&b'l')
    });
    sim.run_for(Duration::from_millis(500));
    let after: Vec<u8> = sim.peer(B).layers_received[before..].to_vec();
    let switch = after.iter().position(|l| *l == b'l').unwrap();
    assert!(
        after[..switch].iter().all(|l| *l == b'h'),
        "h until the switch"
    );
    assert!(after[switch..].iter().all(|l| *l == b'l'), "then only l");
    assert!(after.len() - switch >= 10, "l keeps flowing");
}

/// A publisher that stops sending on an m-line (it makes it `recvonly`) unpublishes that track:
/// the others are told, and its other track still flows.
#[test]
fn a_track_that_stops_sending_is_unpublished_for_the_others() {
    let mut sim = Sim::call(&[A, B]);
    let a = sim.id(A);
    let video = sim.peer(A).video.unwrap();
    sim.offer_change(A, |api| api.set_direction(video, Direction::RecvOnly));
    sim.drive_room();
    let unpublished = Signal::Track {
        participant: a,
        kind: TrackKind::Video,
        state: TrackState::Unpublished,
    };
    assert!(
        sim.peer(B).signals.contains(&unpublished),
        "{:?}",
        sim.peer(B).signals
    );
    let before = sim.peer(B).received_from(A).0;
    sim.run_until(Duration::from_secs(5), |s| {
        s.peers[1].received_from(A).0 >= before + 5
    });
}

/// An answer the server's session refuses (here: one without the offer's m-lines) spends the
/// offer; its track changes are offered again, and once answered the media flows — they were
/// left half-negotiated, never offered again, and the participant never received those tracks.
#[test]
fn a_refused_answer_gets_the_changes_offered_again() {
    let mut sim = call_with_an_offer_held_by_a();
    let held = sim.peer(A).held_offers.take().unwrap();
    let mut elsewhere = Rtc::builder().build(sim.now);
    let answer = elsewhere
        .sdp_api()
        .accept_offer(SdpOffer::from_sdp_string(&held[0]).unwrap())
        .unwrap()
        .to_sdp_string();
    let no_media = &answer[..answer.find("m=").unwrap()];
    let a = sim.id(A);
    let refused = sim.room.sdp(sim.now, a, None, SdpKind::Answer, no_media);
    assert!(
        matches!(refused, Err(CallError::InvalidSdp(_))),
        "{refused:?}"
    );
    // A new offer of C's tracks comes, A answers it, and everyone receives everyone.
    sim.drive_room();
    sim.run_until(Duration::from_secs(10), |s| s.all_receive(5));
}

/// A and B in a call that C joins, A holding the server's offer of C's tracks unanswered (as a
/// client busy with its own offer would).
fn call_with_an_offer_held_by_a() -> Sim {
    let mut sim = Sim::call(&[A, B]);
    sim.peer(A).held_offers = Some(Vec::new());
    sim.join(C).unwrap();
    sim.run_until(Duration::from_secs(5), |s| {
        s.peers[0]
            .held_offers
            .as_ref()
            .is_some_and(|h| !h.is_empty())
    });
    sim
}

#[test]
fn on_glare_the_server_yields_and_offers_its_changes_again() {
    let mut sim = call_with_an_offer_held_by_a();
    // A's own offer (a new audio track) crosses the server's: the server answers it...
    let a = sim.id(A);
    sim.offer_change(A, |api| {
        api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    });
    // ...and A drops the withdrawn offer; answering it now is refused, not applied.
    let stale = sim.peer(A).held_offers.take().unwrap();
    assert_eq!(stale.len(), 1);
    let err = sim.room.sdp(sim.now, a, None, SdpKind::Answer, "v=0\r\n");
    assert!(
        matches!(err, Err(CallError::NegotiationConflict(_))),
        "{err:?}"
    );
    // The server offers C's tracks again, A answers, and everyone receives everyone.
    sim.drive_room();
    sim.run_until(Duration::from_secs(10), |s| s.all_receive(5));
}
