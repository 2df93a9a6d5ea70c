//! Load peer of the SFU forwarding benchmark (`benches/sfu.sh`): one call room, `--publishers`
//! P participants sending synthetic VP8 video (and optionally Opus audio) and `--subscribers` S
//! participants that only receive, each a str0m `Rtc` with its own UDP socket on 127.0.0.1
//! (`--bind-ip`) and its own `vibe.v1` WebSocket for signalling.
//!
//! - Publishers join (`call.join`) with an offer holding a sendrecv video m-line (and audio with
//!   `--audio`), one after the other; subscribers then join with an offer holding one recvonly
//!   video m-line, so they publish nothing. Every participant answers the server's
//!   renegotiation offers (`sdp` events) that add the other publishers' tracks. Forwarded video
//!   streams: P × (P + S − 1).
//! - A publisher writes a frame of `bitrate / 8 / fps` bytes every `1 / fps` s (str0m splits it
//!   into RTP packets of ≤ 1,150 bytes: 4 packets at 1 Mbit/s and 30 fps). Its first bytes are a
//!   VP8 frame tag (a keyframe every `--keyframe-every` frames and on a keyframe request, else a
//!   delta frame), then the publisher's index and the time it was written.
//! - Subscribers run str0m in RTP mode (no depacketizing: each RTP packet is an event; a frame
//!   is counted at the packet with the VP8 descriptor's start bit), publishers in frame mode.
//! - All peers are tasks on one tokio runtime (`--threads` worker threads; 1: a current-thread
//!   runtime), each owning its `Rtc` and socket: woken by the socket, its next str0m timeout, its
//!   next frame, or a signalling command.
//!
//! Measurement: once every participant receives video from every publisher and the start-up
//! transient has passed (the server paces each subscriber at 1.1× its bandwidth estimate, which
//! starts at 1 Mbit/s: settled means two consecutive seconds in which no subscriber's frame took
//! longer than `--settle-ms` end to end; if that never happens within `--ready-timeout`, the
//! run is measured anyway and marked `settled: false`), `--warmup` s, then a window of
//! `--duration` s. Frames are attributed to the window by the send time they carry, so
//! delivery is exact: received frames sent in the window / (frames the publishers wrote in it ×
//! their P + S − 1 receivers), after `--drain` s for the last ones. Over the window: the
//! server's CPU (utime + stime of `--server-pid` from /proc), this process's, the kernel's UDP
//! buffer drops (/proc/net/snmp), and the server's /metrics: `vibe_call_forwarded_frames_total`
//! and `vibe_call_forward_latency_seconds` (socket read to forwarded copies sent, a histogram:
//! quantiles interpolated within the buckets of the window's counts). End to end: publisher
//! write to the subscriber's receipt of the frame's first packet (HDR histogram; this client's
//! own queueing included).
//!
//! `--target janus --janus-url http://127.0.0.1:PORT/janus` drives Janus's videoroom plugin with
//! the same load over its HTTP REST API (long-poll GET for events, keepalives): one room created
//! here (`publishers` P, `bitrate` 0, no periodic FIR, no recording, VP8); each publisher a session
//! whose handle joins as a publisher and publishes (a sendonly offer, Janus's answer); then each
//! participant a subscription handle (`join` as a subscriber with one stream per other
//! publisher's feed: Janus offers, the peer answers, `start`), publishers from their own session
//! with a second `Rtc`, so the forwarded streams are the same P × (P + S − 1). Janus puts its
//! candidates in its SDP (half trickle); trickled ones are taken too. It gathers no loopback
//! candidates, so its runs bind the peers to one of the host's own addresses (`--bind-ip`; the
//! kernel still delivers locally). Janus has no forwarding
//! metrics: forwarded frames are those the receivers got, and the SFU's added latency is not known
//! (end to end is). Sessions and the room are destroyed at the end.
//!
//! A progress line goes to stderr every second (subscribers' frames/s, mean and worst end-to-end
//! latency). Prints a table and, as its last stdout line, the results as one JSON object (also to `--json`).

#![allow(clippy::print_stdout)] // a command-line tool: its report goes to stdout
#![recursion_limit = "256"] // the results object is one large json! literal

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// SFU forwarding load peer.
#[derive(Debug, Parser)]
#[command(name = "sfu_load")]
struct Cli {
    /// The SFU to drive: `vibe` (its `vibe.v1` WebSocket: --url, --token, --room) or `janus`
    /// (the videoroom plugin over Janus's HTTP REST API: --janus-url; the room is created here).
    #[arg(long, value_enum, default_value_t = Target::Vibe)]
    target: Target,
    /// Base URL of the Vibe server; loopback only, e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: Option<String>,
    /// Token with `read:call` (and the room document readable by its subject).
    #[arg(long, env = "VIBE_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The room: the id of a `call` document.
    #[arg(long)]
    room: Option<String>,
    /// Janus's REST API endpoint; loopback only, e.g. http://127.0.0.1:8088/janus
    #[arg(long)]
    janus_url: Option<String>,
    /// Participants that publish video (and receive every other publisher).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Participants that only receive.
    #[arg(long, default_value_t = 76)]
    subscribers: usize,
    /// Video bitrate of each publisher, kbit/s.
    #[arg(long, default_value_t = 1000)]
    bitrate_kbps: u64,
    /// Video frames per second of each publisher.
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// A keyframe every this many frames (and on each keyframe request).
    #[arg(long, default_value_t = 60)]
    keyframe_every: u64,
    /// Publishers also send Opus-sized audio: 50 frames/s of 80 bytes.
    #[arg(long)]
    audio: bool,
    /// Measured seconds.
    #[arg(long, default_value_t = 15.0)]
    duration: f64,
    /// Seconds between everyone receiving media and the measured window.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Seconds after the window for its last frames to arrive.
    #[arg(long, default_value_t = 1.0)]
    drain: f64,
    /// Seconds allowed for joining, media reaching everyone and latency settling.
    #[arg(long, default_value_t = 90.0)]
    ready_timeout: f64,
    /// Settled: two consecutive seconds in which no subscriber's frame took longer end to end
    /// (ms); the window starts --warmup s later.
    #[arg(long, default_value_t = 100.0)]
    settle_ms: f64,
    /// Participants joining at once (after the publishers, who join one by one).
    #[arg(long, default_value_t = 8)]
    join_concurrency: usize,
    /// The address the peers' UDP sockets bind to (and offer as their host candidate). Janus
    /// gathers no loopback candidates, so its runs use one of this host's own addresses (still
    /// the kernel's loopback path).
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: std::net::IpAddr,
    /// Runtime worker threads of this client (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The server's process id: its CPU time over the window (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also write the JSON results to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    Vibe,
    Janus,
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`).
const USER_HZ: f64 = 100.0;

/// Bytes of the frame header this tool writes: VP8 frame tag (3), publisher (2), sent µs (8).
const FRAME_HEADER: usize = 13;

/// Audio: 20 ms frames.
const AUDIO_FPS: u32 = 50;
const AUDIO_BYTES: usize = 80;

/// Counters of one participant, shared with the coordinator.
#[derive(Debug, Default)]
struct PeerStats {
    connected: AtomicBool,
    /// Distinct publishers whose video arrived.
    heard: AtomicUsize,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    /// Video frames received whose send time is in the window.
    rx_window_frames: AtomicU64,
    rx_audio_packets: AtomicU64,
    tx_frames: AtomicU64,
    tx_window_frames: AtomicU64,
    tx_bytes: AtomicU64,
    /// Datagrams the socket refused (its send buffer full).
    tx_drops: AtomicU64,
    keyframe_requests: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    base: Instant,
    /// The window, in µs since `base`; u64::MAX until set.
    window_start: AtomicU64,
    window_end: AtomicU64,
    peers: Vec<PeerStats>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// End-to-end latency of subscribers' frames since the last progress line: sum, count, max.
    progress_sum_us: AtomicU64,
    progress_count: AtomicU64,
    progress_max_us: AtomicU64,
    /// The max of the last complete second, and how many seconds were reported.
    last_second_max_us: AtomicU64,
    seconds: AtomicU64,
}

impl Shared {
    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }

    fn in_window(&self, sent_us: u64) -> bool {
        sent_us >= self.window_start.load(Ordering::Relaxed)
            && sent_us < self.window_end.load(Ordering::Relaxed)
    }

    fn error(&self, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// Signalling → media task.
#[derive(Debug)]
enum Cmd {
    /// The server's answer to the join offer.
    Answer(String),
    /// A server offer; the peer's answer goes back.
    Offer(String, oneshot::Sender<Result<String, String>>),
    /// A trickled remote ICE candidate (`candidate:…`).
    Candidate(String),
}

/// What one `Rtc` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Vibe publisher: offers a sendrecv video m-line (frame mode), receives the others on it.
    Publisher,
    /// Vibe subscriber: offers one recvonly video m-line (RTP mode).
    Subscriber,
    /// Janus publisher: offers a sendonly video m-line (frame mode), receives nothing.
    SendOnly,
    /// Janus subscription: no offer of its own, answers Janus's (RTP mode).
    Receiver,
}

/// One participant's media side.
struct Peer {
    index: usize,
    /// The participant publishes (its latency counts as a publisher's).
    publisher: bool,
    /// This `Rtc` writes the participant's frames.
    sends: bool,
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    pending: Option<SdpPendingOffer>,
    video: Option<Mid>,
    audio: Option<Mid>,
    vp8: Option<Pt>,
    opus: Option<Pt>,
    frame_bytes: usize,
    keyframe_every: u64,
    frames: u64,
    force_keyframe: bool,
    /// Publishers heard from (video), by index.
    heard: Vec<bool>,
    latency: Histogram<u64>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// The peer and its offer (None for a `Receiver`, which answers instead). `publisher`:
    /// the participant publishes (`index` < P), whatever this `Rtc`'s role.
    async fn new(
        index: usize,
        role: Role,
        publisher: bool,
        cli: &Cli,
        publishers: usize,
    ) -> anyhow::Result<(Self, Option<String>)> {
        let socket = UdpSocket::bind(SocketAddr::new(cli.bind_ip, 0))
            .await
            .context("cannot bind a UDP socket")?;
        let local = socket.local_addr()?;
        let now = Instant::now();
        let sends = matches!(role, Role::Publisher | Role::SendOnly);
        // Receivers take RTP packets as they come (no depacketizing); senders write frames.
        let mut rtc = Rtc::builder().set_rtp_mode(!sends).build(now);
        rtc.add_local_candidate(Candidate::host(local, "udp").context("host candidate")?);
        let mut api = rtc.sdp_api();
        let (video, audio) = match role {
            Role::Publisher | Role::SendOnly => {
                let direction = if role == Role::Publisher {
                    Direction::SendRecv
                } else {
                    Direction::SendOnly
                };
                let video = api.add_media(MediaKind::Video, direction, None, None, None);
                let audio = cli
                    .audio
                    .then(|| api.add_media(MediaKind::Audio, direction, None, None, None));
                (Some(video), audio)
            }
            Role::Subscriber => {
                api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
                (None, None)
            }
            Role::Receiver => (None, None),
        };
        let (offer, pending) = if role == Role::Receiver {
            (None, None)
        } else {
            let (offer, pending) = api.apply().context("no offer to make")?;
            (Some(offer.to_sdp_string()), Some(pending))
        };
        let pt = |codec: Codec| {
            rtc.codec_config()
                .find(|p| p.spec().codec == codec)
                .map(|p| p.pt())
        };
        let (vp8, opus) = (pt(Codec::Vp8), pt(Codec::Opus));
        if vp8.is_none() {
            bail!("str0m's codec config has no VP8");
        }
        let frame_bytes = usize::try_from(cli.bitrate_kbps * 1000 / 8 / u64::from(cli.fps.max(1)))?
            .max(FRAME_HEADER + 1);
        Ok((
            Peer {
                index,
                publisher,
                sends,
                rtc,
                socket,
                local,
                pending,
                video,
                audio,
                vp8,
                opus,
                frame_bytes,
                keyframe_every: cli.keyframe_every.max(1),
                frames: 0,
                force_keyframe: true,
                heard: vec![false; publishers],
                latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            },
            offer,
        ))
    }

    /// Drives the session: datagrams, timers, frames to write and signalling, until `stop`.
    async fn run(
        mut self,
        shared: Arc<Shared>,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        mut stop: watch::Receiver<bool>,
        fps: u32,
    ) -> Histogram<u64> {
        let mut buf = vec![0u8; 2048];
        let frame_interval = Duration::from_secs_f64(1.0 / f64::from(fps.max(1)));
        let audio_interval = Duration::from_secs_f64(1.0 / f64::from(AUDIO_FPS));
        // Spread the publishers' frames over the interval.
        let start = Instant::now() + frame_interval.mul_f64((self.index % 16) as f64 / 16.0);
        let mut next_frame = start;
        let mut next_audio = start;
        let mut next_timeout = Instant::now();
        loop {
            let mut wake = next_timeout;
            if self.sends && self.rtc.is_connected() {
                wake = wake.min(next_frame);
                if self.audio.is_some() {
                    wake = wake.min(next_audio);
                }
            }
            let mut inputs: u32 = 0;
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd, &shared),
                    None => break,
                },
                received = self.socket.recv_from(&mut buf) => {
                    if let Ok((n, source)) = received {
                        self.receive(&buf[..n], source, &shared);
                        inputs += 1;
                    }
                    // Take what else is waiting, a bounded batch.
                    while inputs < 64 {
                        match self.socket.try_recv_from(&mut buf) {
                            Ok((n, source)) => {
                                self.receive(&buf[..n], source, &shared);
                                inputs += 1;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            // ICMP errors surface as receive errors on Linux: keep reading.
                            Err(_) => {}
                        }
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            if self.sends && self.rtc.is_connected() {
                if now >= next_frame {
                    self.write_video(now, &shared);
                    next_frame += frame_interval;
                    if next_frame < now {
                        // Fell behind by more than a frame: skip, as a live encoder would.
                        next_frame = now + frame_interval;
                    }
                }
                if self.audio.is_some() && now >= next_audio {
                    self.write_audio(now, &shared);
                    next_audio += audio_interval;
                    if next_audio < now {
                        next_audio = now + audio_interval;
                    }
                }
            } else {
                next_frame = now;
                next_audio = now;
            }
            if now >= next_timeout
                && let Err(e) = self.rtc.handle_input(Input::Timeout(now))
            {
                shared.error(format!("peer {}: timeout: {e}", self.index));
            }
            match self.drain(&shared) {
                Some(t) => next_timeout = t,
                None => break,
            }
        }
        self.latency
    }

    fn receive(&mut self, contents: &[u8], source: SocketAddr, shared: &Shared) {
        let Ok(contents) = contents.try_into() else {
            return;
        };
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        );
        if let Err(e) = self.rtc.handle_input(input) {
            shared.error(format!("peer {}: receive: {e}", self.index));
        }
        // str0m wants its output drained after every input.
        let _ = self.drain(shared);
    }

    /// Polls the session until its next timeout (None: it ended).
    fn drain(&mut self, shared: &Shared) -> Option<Instant> {
        loop {
            let output = match self.rtc.poll_output() {
                Ok(output) => output,
                Err(e) => {
                    shared.error(format!("peer {}: {e}", self.index));
                    return None;
                }
            };
            match output {
                Output::Timeout(t) => return Some(t),
                Output::Transmit(t) => {
                    if self.socket.try_send_to(&t.contents, t.destination).is_err() {
                        shared.peers[self.index]
                            .tx_drops
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Output::Event(event) => self.event(event, shared),
            }
        }
    }

    fn event(&mut self, event: Event, shared: &Shared) {
        let stats = &shared.peers[self.index];
        match event {
            Event::Connected => stats.connected.store(true, Ordering::Relaxed),
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                shared.error(format!("peer {}: ICE disconnected", self.index));
            }
            Event::KeyframeRequest(_) => {
                self.force_keyframe = true;
                stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
            }
            // Frame mode (publishers): the whole frame.
            Event::MediaData(data) => {
                stats
                    .rx_bytes
                    .fetch_add(data.data.len() as u64, Ordering::Relaxed);
                if Some(data.pt) == self.opus || data.params.spec().codec == Codec::Opus {
                    stats.rx_audio_packets.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.video_frame(&data.data, shared);
                }
            }
            // RTP mode (subscribers): one packet.
            Event::RtpPacket(packet) => {
                stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                stats
                    .rx_bytes
                    .fetch_add(packet.payload.len() as u64, Ordering::Relaxed);
                if Some(packet.header.payload_type) == self.vp8 {
                    if let Some(frame) = vp8_frame_start(&packet.payload) {
                        self.video_frame(frame, shared);
                    }
                } else {
                    stats.rx_audio_packets.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }

    /// The start of a video frame this tool wrote: count it, time it.
    fn video_frame(&mut self, frame: &[u8], shared: &Shared) {
        let (Some(publisher), Some(sent)) = (
            frame
                .get(3..5)
                .and_then(|b| b.try_into().ok())
                .map(u16::from_le_bytes),
            frame
                .get(5..13)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes),
        ) else {
            return;
        };
        let stats = &shared.peers[self.index];
        stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        if let Some(heard) = self.heard.get_mut(usize::from(publisher))
            && !*heard
        {
            *heard = true;
            stats.heard.fetch_add(1, Ordering::Relaxed);
        }
        let latency = shared.micros(Instant::now()).saturating_sub(sent).max(1);
        if !self.publisher {
            shared.progress_sum_us.fetch_add(latency, Ordering::Relaxed);
            shared.progress_count.fetch_add(1, Ordering::Relaxed);
            shared.progress_max_us.fetch_max(latency, Ordering::Relaxed);
        }
        if shared.in_window(sent) {
            stats.rx_window_frames.fetch_add(1, Ordering::Relaxed);
            let _ = self.latency.record(latency);
        }
    }

    fn write_video(&mut self, now: Instant, shared: &Shared) {
        let (Some(mid), Some(pt)) = (self.video, self.vp8) else {
            return;
        };
        let keyframe = self.force_keyframe || self.frames.is_multiple_of(self.keyframe_every);
        self.force_keyframe = false;
        let sent = shared.micros(now);
        let mut data = vec![0x5a_u8; self.frame_bytes];
        // VP8 frame tag: bit 0 of the first byte clear for a keyframe.
        data[0] = if keyframe { 0x10 } else { 0x11 };
        data[1] = 0;
        data[2] = 0;
        data[3..5].copy_from_slice(&u16::try_from(self.index).unwrap_or(u16::MAX).to_le_bytes());
        data[5..13].copy_from_slice(&sent.to_le_bytes());
        let Some(writer) = self.rtc.writer(mid) else {
            return;
        };
        let media_time = MediaTime::from(now.saturating_duration_since(shared.base));
        if let Err(e) = writer.write(pt, now, media_time, data) {
            shared.error(format!("peer {}: write: {e}", self.index));
            return;
        }
        self.frames += 1;
        let stats = &shared.peers[self.index];
        stats.tx_frames.fetch_add(1, Ordering::Relaxed);
        stats
            .tx_bytes
            .fetch_add(self.frame_bytes as u64, Ordering::Relaxed);
        if shared.in_window(sent) {
            stats.tx_window_frames.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.drain(shared);
    }

    fn write_audio(&mut self, now: Instant, shared: &Shared) {
        let (Some(mid), Some(pt)) = (self.audio, self.opus) else {
            return;
        };
        let Some(writer) = self.rtc.writer(mid) else {
            return;
        };
        let media_time = MediaTime::from(now.saturating_duration_since(shared.base));
        if let Err(e) = writer.write(pt, now, media_time, vec![0xfc_u8; AUDIO_BYTES]) {
            shared.error(format!("peer {}: audio write: {e}", self.index));
        }
        let _ = self.drain(shared);
    }

    fn command(&mut self, cmd: Cmd, shared: &Shared) {
        match cmd {
            Cmd::Answer(sdp) => {
                let result = SdpAnswer::from_sdp_string(&sdp)
                    .map_err(|e| e.to_string())
                    .and_then(|answer| {
                        let pending = self.pending.take().ok_or("no offer outstanding")?;
                        self.rtc
                            .sdp_api()
                            .accept_answer(pending, answer)
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = result {
                    shared.error(format!("peer {}: the join answer: {e}", self.index));
                }
            }
            Cmd::Candidate(line) => match Candidate::from_sdp_string(&line) {
                Ok(candidate) => self.rtc.add_remote_candidate(candidate),
                Err(e) => shared.error(format!("peer {}: candidate {line:?}: {e}", self.index)),
            },
            Cmd::Offer(sdp, reply) => {
                // A receiver sorts packets by payload type: take the offer's (Janus offers the
                // publishers' payload types, whatever this side's defaults are).
                if !self.sends {
                    if let Some(pt) = rtpmap_pt(&sdp, "VP8") {
                        self.vp8 = Some(pt);
                    }
                    if let Some(pt) = rtpmap_pt(&sdp, "opus") {
                        self.opus = Some(pt);
                    }
                }
                let answer = SdpOffer::from_sdp_string(&sdp)
                    .map_err(|e| e.to_string())
                    .and_then(|offer| {
                        self.rtc
                            .sdp_api()
                            .accept_offer(offer)
                            .map(|a| a.to_sdp_string())
                            .map_err(|e| e.to_string())
                    });
                let _ = reply.send(answer);
            }
        }
    }
}

/// The first payload type an SDP maps to `codec` (`a=rtpmap:<pt> <codec>/…`, case-insensitive).
fn rtpmap_pt(sdp: &str, codec: &str) -> Option<Pt> {
    sdp.lines().find_map(|line| {
        let (pt, rest) = line.trim().strip_prefix("a=rtpmap:")?.split_once(' ')?;
        let name = rest.split('/').next()?;
        if name.eq_ignore_ascii_case(codec) {
            pt.parse::<u8>().ok().map(Pt::from)
        } else {
            None
        }
    })
}

/// The VP8 payload of an RTP packet that starts a frame (S = 1, partition 0), after the payload
/// descriptor (RFC 7741 §4.2); None for the frame's other packets.
fn vp8_frame_start(payload: &[u8]) -> Option<&[u8]> {
    let b0 = *payload.first()?;
    if b0 & 0x10 == 0 || b0 & 0x07 != 0 {
        return None;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let x = *payload.get(i)?;
        i += 1;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits (M).
            i += if *payload.get(i)? & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1;
        }
        if x & 0x30 != 0 {
            i += 1;
        }
    }
    payload.get(i..)
}

/// One participant's signalling: joins with `offer`, forwards the server's answer and offers to
/// the media task, answers back, until `stop`. `joined` gets the participant id or the error.
#[allow(clippy::too_many_arguments)]
async fn signalling(
    index: usize,
    ws_url: String,
    token: String,
    room: String,
    offer: String,
    cmds: mpsc::UnboundedSender<Cmd>,
    joined: oneshot::Sender<Result<String, String>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut joined = Some(joined);
    let result = async {
        let mut request = ws_url.into_client_request()?;
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "vibe.v1".parse()?);
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {}", token.trim()).parse()?);
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .context("WebSocket connect")?;
        ws.send(Message::text(
            json!({"id": 1, "op": "call.join", "room": room, "sdp": offer}).to_string(),
        ))
        .await?;
        let mut next_id = 2_u64;
        loop {
            let message = tokio::select! {
                _ = stop.changed() => {
                    let _ = ws.close(None).await;
                    return Ok(());
                }
                m = ws.next() => m,
            };
            let Some(message) = message else {
                bail!("the WebSocket closed");
            };
            let text = match message.context("WebSocket read")? {
                Message::Text(text) => text,
                Message::Close(frame) => bail!("the server closed the WebSocket: {frame:?}"),
                _ => continue,
            };
            let v: Value = serde_json::from_str(&text).context("a frame that is not JSON")?;
            if let Some(re) = v.get("re") {
                let ok = v.get("ok").and_then(Value::as_bool) == Some(true);
                if re == 1 {
                    if !ok {
                        bail!("call.join failed: {v}");
                    }
                    let sdp = v.get("sdp").and_then(Value::as_str).context("no answer in the join reply")?;
                    let _ = cmds.send(Cmd::Answer(sdp.to_owned()));
                    let participant = v.get("participant").and_then(Value::as_str).unwrap_or("?").to_owned();
                    if let Some(joined) = joined.take() {
                        let _ = joined.send(Ok(participant));
                    }
                } else if !ok {
                    shared.error(format!("peer {index}: request failed: {v}"));
                }
                continue;
            }
            if v.get("event").and_then(Value::as_str) == Some("sdp")
                && v.get("type").and_then(Value::as_str) == Some("offer")
            {
                let sdp = v.get("sdp").and_then(Value::as_str).context("an offer without sdp")?;
                let (tx, rx) = oneshot::channel();
                if cmds.send(Cmd::Offer(sdp.to_owned(), tx)).is_err() {
                    return Ok(());
                }
                let answer = match rx.await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(e)) => bail!("cannot answer the server's offer: {e}"),
                    Err(_) => return Ok(()),
                };
                ws.send(Message::text(
                    json!({"id": next_id, "op": "call.sdp", "room": room, "type": "answer", "sdp": answer})
                        .to_string(),
                ))
                .await?;
                next_id += 1;
            }
        }
    }
    .await;
    if let Err(e) = result {
        let message = format!("peer {index}: {e:#}");
        match joined.take() {
            Some(joined) => {
                let _ = joined.send(Err(message));
            }
            None => shared.error(message),
        }
    }
}

/// What joining left running: the media tasks (with whether each is a subscriber's), the
/// signalling tasks (Vibe) and the Janus sessions and room to tear down.
struct Joined {
    media: Vec<(bool, tokio::task::JoinHandle<Histogram<u64>>)>,
    signals: Vec<tokio::task::JoinHandle<()>>,
    janus: Option<JanusRoom>,
}

/// Vibe: every participant joins the room over its own WebSocket, publishers one by one first.
async fn join_vibe(
    cli: &Cli,
    shared: &Arc<Shared>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<Joined> {
    let p = cli.publishers;
    let n = p + cli.subscribers;
    let url = cli.url.clone().context("--url is needed")?;
    let token = cli
        .token
        .clone()
        .context("--token (or VIBE_BENCH_TOKEN) is needed")?;
    let room = cli.room.clone().context("--room is needed")?;
    let ws_url = format!("{}/v1/ws", url.replacen("http://", "ws://", 1));
    let mut media = Vec::with_capacity(n);
    let mut signals = Vec::with_capacity(n);
    let semaphore = Arc::new(Semaphore::new(cli.join_concurrency.max(1)));
    let mut pending_joins = Vec::new();
    for index in 0..n {
        let publisher = index < p;
        let role = if publisher {
            Role::Publisher
        } else {
            Role::Subscriber
        };
        let (peer, offer) = Peer::new(index, role, publisher, cli, p).await?;
        let offer = offer.context("no offer")?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        media.push((
            !publisher,
            tokio::spawn(peer.run(shared.clone(), cmd_rx, stop_rx.clone(), cli.fps)),
        ));
        let (joined_tx, joined_rx) = oneshot::channel();
        signals.push(tokio::spawn(signalling(
            index,
            ws_url.clone(),
            token.clone(),
            room.clone(),
            offer,
            cmd_tx,
            joined_tx,
            shared.clone(),
            stop_rx.clone(),
        )));
        if publisher {
            // Publishers join one after another, before anyone else.
            joined_rx
                .await
                .context("a signalling task ended")?
                .map_err(|e| anyhow::anyhow!(e))?;
        } else {
            let permit = semaphore.clone().acquire_owned().await?;
            pending_joins.push(tokio::spawn(async move {
                let result = joined_rx.await;
                drop(permit);
                result
            }));
        }
    }
    for join in pending_joins {
        join.await?
            .context("a signalling task ended")?
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(Joined {
        media,
        signals,
        janus: None,
    })
}

// --- Janus: the videoroom plugin over the HTTP REST API ----------------------------------------

/// How long a Janus request may take to be answered (its asynchronous event included).
const JANUS_TIMEOUT: Duration = Duration::from_secs(30);

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// POSTs a Janus API request; a `"janus": "error"` reply is an error.
async fn janus_post(http: &reqwest::Client, url: &str, body: Value) -> anyhow::Result<Value> {
    let reply: Value = http
        .post(url)
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    if reply.get("janus").and_then(Value::as_str) == Some("error") {
        bail!("Janus error: {}", reply["error"]);
    }
    Ok(reply)
}

/// One Janus session: a long-poll task takes its events (asynchronous replies by transaction,
/// trickled candidates by handle) and a keepalive goes every 25 s.
struct JanusSession {
    http: reqwest::Client,
    /// `<janus url>/<session id>`
    url: String,
    label: String,
    next_transaction: AtomicU64,
    /// Transactions waiting for their asynchronous event.
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>,
    /// The media task of each handle (for trickled candidates).
    handles: Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Cmd>>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl JanusSession {
    async fn create(
        http: &reqwest::Client,
        base: &str,
        label: String,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Arc<Self>> {
        let reply = janus_post(
            http,
            base,
            json!({"janus": "create", "transaction": "create"}),
        )
        .await
        .with_context(|| format!("{label}: create a Janus session"))?;
        let id = reply["data"]["id"].as_u64().context("no session id")?;
        let session = Arc::new(JanusSession {
            http: http.clone(),
            url: format!("{}/{id}", base.trim_end_matches('/')),
            label,
            next_transaction: AtomicU64::new(1),
            pending: Arc::default(),
            handles: Arc::default(),
            tasks: Mutex::default(),
        });
        let poller = tokio::spawn(janus_poll(
            http.clone(),
            session.url.clone(),
            session.label.clone(),
            session.pending.clone(),
            session.handles.clone(),
            shared,
        ));
        let keepalive = {
            let (http, url) = (http.clone(), session.url.clone());
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_secs(25));
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    let _ = janus_post(
                        &http,
                        &url,
                        json!({"janus": "keepalive", "transaction": "keepalive"}),
                    )
                    .await;
                }
            })
        };
        locked(&session.tasks).extend([poller, keepalive]);
        Ok(session)
    }

    fn transaction(&self) -> String {
        format!("t{}", self.next_transaction.fetch_add(1, Ordering::Relaxed))
    }

    /// Attaches a videoroom handle; `media` gets the candidates Janus trickles for it.
    async fn attach(&self, media: Option<mpsc::UnboundedSender<Cmd>>) -> anyhow::Result<u64> {
        let reply = janus_post(
            &self.http,
            &self.url,
            json!({"janus": "attach", "plugin": "janus.plugin.videoroom", "transaction": self.transaction()}),
        )
        .await
        .with_context(|| format!("{}: attach", self.label))?;
        let handle = reply["data"]["id"].as_u64().context("no handle id")?;
        if let Some(media) = media {
            locked(&self.handles).insert(handle, media);
        }
        Ok(handle)
    }

    /// A videoroom request: the plugin's reply (an error reply is an error) and its JSEP.
    async fn message(
        &self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> anyhow::Result<(Value, Option<Value>)> {
        let what = body["request"].as_str().unwrap_or("?").to_owned();
        let transaction = self.transaction();
        let (tx, rx) = oneshot::channel();
        locked(&self.pending).insert(transaction.clone(), tx);
        let mut request = json!({"janus": "message", "transaction": transaction, "body": body});
        if let Some(jsep) = jsep {
            request["jsep"] = jsep;
        }
        let reply = match janus_post(&self.http, &format!("{}/{handle}", self.url), request).await {
            Ok(ack) if ack["janus"] == "ack" => match tokio::time::timeout(JANUS_TIMEOUT, rx).await
            {
                Ok(Ok(event)) => event,
                Ok(Err(_)) => bail!("{}: {what}: the session's poller ended", self.label),
                Err(_) => {
                    locked(&self.pending).remove(&transaction);
                    bail!("{}: {what}: no reply in {JANUS_TIMEOUT:?}", self.label);
                }
            },
            Ok(reply) => {
                locked(&self.pending).remove(&transaction);
                reply
            }
            Err(e) => {
                locked(&self.pending).remove(&transaction);
                return Err(e.context(format!("{}: {what}", self.label)));
            }
        };
        let data = reply["plugindata"]["data"].clone();
        if data.get("error").is_some() {
            bail!(
                "{}: {what}: {} (error {})",
                self.label,
                data["error"],
                data["error_code"]
            );
        }
        Ok((data, reply.get("jsep").cloned()))
    }

    /// Tells Janus this handle's candidates are all known (they are in our SDP).
    async fn trickle_completed(&self, handle: u64) -> anyhow::Result<()> {
        janus_post(
            &self.http,
            &format!("{}/{handle}", self.url),
            json!({"janus": "trickle", "transaction": self.transaction(), "candidate": {"completed": true}}),
        )
        .await
        .with_context(|| format!("{}: trickle", self.label))?;
        Ok(())
    }

    /// Stops the poller and keepalives and destroys the session (and so its handles).
    async fn destroy(&self) {
        for task in locked(&self.tasks).drain(..) {
            task.abort();
        }
        let _ = janus_post(
            &self.http,
            &self.url,
            json!({"janus": "destroy", "transaction": "destroy"}),
        )
        .await;
    }
}

/// A session's event long poll (`GET <session>?maxev=16`) until aborted.
async fn janus_poll(
    http: reqwest::Client,
    url: String,
    label: String,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>,
    handles: Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Cmd>>>>,
    shared: Arc<Shared>,
) {
    let poll_url = format!("{url}?maxev=16");
    let mut failures = 0_u32;
    loop {
        let events = async {
            anyhow::Ok(
                http.get(&poll_url)
                    .send()
                    .await?
                    .error_for_status()?
                    .json::<Value>()
                    .await?,
            )
        }
        .await;
        let events = match events {
            Ok(Value::Array(events)) => events,
            Ok(event) => vec![event],
            Err(e) => {
                failures += 1;
                if failures == 5 {
                    shared.error(format!("{label}: Janus long poll: {e:#}"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        failures = 0;
        for event in events {
            match event["janus"].as_str() {
                Some("trickle") => {
                    let media = event["sender"]
                        .as_u64()
                        .and_then(|h| locked(&handles).get(&h).cloned());
                    if let (Some(media), Some(line)) =
                        (media, event["candidate"]["candidate"].as_str())
                    {
                        let _ = media.send(Cmd::Candidate(line.to_owned()));
                    }
                }
                Some("hangup") => {
                    shared.error(format!("{label}: Janus hung up: {}", event["reason"]));
                }
                _ => {
                    let waiting = event["transaction"]
                        .as_str()
                        .and_then(|t| locked(&pending).remove(t));
                    if let Some(waiting) = waiting {
                        let _ = waiting.send(event);
                    }
                }
            }
        }
    }
}

/// The Janus room of a run and every session in it, torn down at the end.
struct JanusRoom {
    admin: Arc<JanusSession>,
    admin_handle: u64,
    room: u64,
    sessions: Vec<Arc<JanusSession>>,
}

impl JanusRoom {
    async fn destroy(self) {
        futures_util::future::join_all(self.sessions.iter().map(|s| s.destroy())).await;
        let _ = self
            .admin
            .message(
                self.admin_handle,
                json!({"request": "destroy", "room": self.room}),
                None,
            )
            .await;
        self.admin.destroy().await;
    }
}

/// Janus: a fresh videoroom; each publisher a session whose handle publishes (one after another),
/// then, once they are all connected, a subscription per participant to every publisher but
/// itself (one handle with a stream per feed; publishers subscribe from their own session), as
/// many at once as --join-concurrency.
async fn join_janus(
    cli: &Cli,
    shared: &Arc<Shared>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<Joined> {
    let p = cli.publishers;
    let n = p + cli.subscribers;
    let base = cli.janus_url.clone().context("--janus-url is needed")?;
    let http = reqwest::Client::new();
    let admin = JanusSession::create(&http, &base, "admin".into(), shared.clone()).await?;
    let admin_handle = admin.attach(None).await?;
    // No bitrate cap (0: Janus sends publishers no REMB limit), no periodic keyframe requests,
    // no recording; VP8 (and Opus) only.
    let (created, _) = admin
        .message(
            admin_handle,
            json!({
                "request": "create", "description": "sfu bench", "publishers": p,
                "bitrate": 0, "fir_freq": 0, "record": false,
                "videocodec": "vp8", "audiocodec": "opus", "notify_joining": false,
            }),
            None,
        )
        .await?;
    let room = created["room"].as_u64().context("no room id")?;
    let feed = |i: usize| i as u64 + 1;
    let mut media = Vec::with_capacity(n + p);
    let mut sessions = Vec::with_capacity(n);
    for index in 0..p {
        let (peer, offer) = Peer::new(index, Role::SendOnly, true, cli, p).await?;
        let offer = offer.context("no offer")?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        media.push((
            false,
            tokio::spawn(peer.run(shared.clone(), cmd_rx, stop_rx.clone(), cli.fps)),
        ));
        let session =
            JanusSession::create(&http, &base, format!("publisher {index}"), shared.clone())
                .await?;
        sessions.push(session.clone());
        let handle = session.attach(Some(cmd_tx.clone())).await?;
        session
            .message(
                handle,
                json!({
                    "request": "join", "ptype": "publisher", "room": room,
                    "id": feed(index), "display": format!("publisher {index}"),
                }),
                None,
            )
            .await?;
        let (_, jsep) = session
            .message(
                handle,
                json!({"request": "publish"}),
                Some(json!({"type": "offer", "sdp": offer})),
            )
            .await?;
        let answer = jsep
            .as_ref()
            .and_then(|j| j["sdp"].as_str())
            .context("Janus's publish reply has no answer")?;
        let _ = cmd_tx.send(Cmd::Answer(answer.to_owned()));
        session.trickle_completed(handle).await?;
    }
    // Janus takes subscriptions to a feed once its PeerConnection is up.
    let deadline = Instant::now() + Duration::from_secs_f64(cli.ready_timeout);
    while !(0..p).all(|i| shared.peers[i].connected.load(Ordering::Relaxed)) {
        if Instant::now() > deadline {
            bail!("the publishers did not all connect to Janus");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let semaphore = Arc::new(Semaphore::new(cli.join_concurrency.max(1)));
    let mut joins = Vec::new();
    for index in 0..n {
        let publisher = index < p;
        let streams: Vec<Value> = (0..p)
            .filter(|&f| f != index)
            .map(|f| json!({"feed": feed(f)}))
            .collect();
        if streams.is_empty() {
            continue;
        }
        let (peer, _) = Peer::new(index, Role::Receiver, publisher, cli, p).await?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        media.push((
            !publisher,
            tokio::spawn(peer.run(shared.clone(), cmd_rx, stop_rx.clone(), cli.fps)),
        ));
        // Publishers subscribe from their own session (the first P of `sessions`).
        let existing = if publisher {
            sessions.get(index).cloned()
        } else {
            None
        };
        let (http, base, shared) = (http.clone(), base.clone(), shared.clone());
        let permit = semaphore.clone().acquire_owned().await?;
        joins.push(tokio::spawn(async move {
            let _permit = permit;
            let session = match existing {
                Some(session) => session,
                None => {
                    JanusSession::create(&http, &base, format!("subscriber {index}"), shared)
                        .await?
                }
            };
            janus_subscribe(&session, room, streams, cmd_tx).await?;
            anyhow::Ok((!publisher).then_some(session))
        }));
    }
    for join in joins {
        if let Some(session) = join.await?? {
            sessions.push(session);
        }
    }
    Ok(Joined {
        media,
        signals: Vec::new(),
        janus: Some(JanusRoom {
            admin,
            admin_handle,
            room,
            sessions,
        }),
    })
}

/// One subscription handle: join as a subscriber to `streams`, answer Janus's offer, start.
async fn janus_subscribe(
    session: &JanusSession,
    room: u64,
    streams: Vec<Value>,
    media: mpsc::UnboundedSender<Cmd>,
) -> anyhow::Result<()> {
    let handle = session.attach(Some(media.clone())).await?;
    let join = json!({"request": "join", "ptype": "subscriber", "room": room, "streams": streams});
    let mut attempts = 0;
    let offer = loop {
        match session.message(handle, join.clone(), None).await {
            Ok((_, Some(jsep))) => break jsep,
            Ok((reply, None)) => bail!("{}: subscribe: no offer in {reply}", session.label),
            // A feed whose PeerConnection is not quite up yet.
            Err(_) if attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let offer = offer["sdp"]
        .as_str()
        .context("Janus's offer has no sdp")?
        .to_owned();
    let (tx, rx) = oneshot::channel();
    media
        .send(Cmd::Offer(offer, tx))
        .map_err(|_| anyhow::anyhow!("the media task ended"))?;
    let answer = rx
        .await
        .context("the media task ended")?
        .map_err(|e| anyhow::anyhow!("{}: cannot answer Janus's offer: {e}", session.label))?;
    session
        .message(
            handle,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": answer})),
        )
        .await?;
    session.trickle_completed(handle).await
}

/// CPU time of a process (utime + stime, clock ticks).
fn cpu_ticks(pid: &str) -> anyhow::Result<u64> {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

fn stat_ticks(path: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3; utime 14, stime 15.
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no field {n} in {path}"))
    };
    Ok(field(14)? + field(15)?)
}

/// Ticks per thread (by thread id, with its name).
fn thread_ticks(pid: &str) -> HashMap<String, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let tid = entry.file_name().to_string_lossy().into_owned();
        let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        if let Ok(ticks) = stat_ticks(&format!("/proc/{pid}/task/{tid}/stat")) {
            out.insert(tid, (name, ticks));
        }
    }
    out
}

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The kernel's UDP counters (/proc/net/snmp), by name.
fn udp_counters() -> HashMap<String, u64> {
    let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") else {
        return HashMap::new();
    };
    let lines: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (Some(names), Some(values)) = (lines.first(), lines.get(1)) else {
        return HashMap::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

/// The server's /metrics samples: name with labels → value.
async fn scrape(
    client: &reqwest::Client,
    url: Option<&str>,
) -> anyhow::Result<HashMap<String, f64>> {
    let Some(url) = url else {
        return Ok(HashMap::new());
    };
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect())
}

const LATENCY_METRIC: &str = "vibe_call_forward_latency_seconds";

/// The forwarding latency over the window from the histogram's buckets: (quantile → seconds,
/// share ≤ 1 ms, mean seconds, count); or, if the server exports a summary, its quantiles as of
/// the end (its own rolling window).
fn forward_latency(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Value {
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let count = delta(&format!("{LATENCY_METRIC}_count"));
    let sum = delta(&format!("{LATENCY_METRIC}_sum"));
    let prefix = format!("{LATENCY_METRIC}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = after
        .keys()
        .filter_map(|k| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, delta(k)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out = json!({
        "count": count,
        "mean_ms": if count > 0.0 { sum / count * 1000.0 } else { 0.0 },
    });
    if !buckets.is_empty() && count > 0.0 {
        let quantile = |q: f64| -> f64 {
            let rank = q * count;
            let mut lower = 0.0;
            let mut below = 0.0;
            for &(bound, cumulative) in &buckets {
                if cumulative >= rank {
                    if bound.is_infinite() {
                        return lower;
                    }
                    let inside = cumulative - below;
                    let frac = if inside > 0.0 {
                        (rank - below) / inside
                    } else {
                        1.0
                    };
                    return lower + (bound - lower) * frac;
                }
                lower = bound;
                below = cumulative;
            }
            lower
        };
        let within_1ms = buckets
            .iter()
            .find(|(b, _)| (*b - 0.001).abs() < 1e-12)
            .map(|(_, c)| c / count);
        out["source"] = json!("histogram buckets, window delta");
        out["p50_ms"] = json!(quantile(0.5) * 1000.0);
        out["p90_ms"] = json!(quantile(0.9) * 1000.0);
        out["p99_ms"] = json!(quantile(0.99) * 1000.0);
        out["share_le_1ms"] = json!(within_1ms);
        out["buckets"] = json!(
            buckets
                .iter()
                .map(|(b, c)| json!([
                    if b.is_infinite() {
                        "+Inf".to_owned()
                    } else {
                        b.to_string()
                    },
                    c
                ]))
                .collect::<Vec<_>>()
        );
    } else {
        for q in ["0.5", "0.9", "0.99"] {
            if let Some(v) = after.get(&format!("{LATENCY_METRIC}{{quantile=\"{q}\"}}")) {
                out["source"] = json!("summary at the end");
                let key = match q {
                    "0.5" => "p50_ms",
                    "0.9" => "p90_ms",
                    _ => "p99_ms",
                };
                out[key] = json!(v * 1000.0);
            }
        }
    }
    out
}

/// Every second on stderr: subscribers' received frames/s and their end-to-end latency (mean,
/// max) over that second.
async fn progress_line(shared: Arc<Shared>, subscribers: usize) {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let count = shared.progress_count.swap(0, Ordering::Relaxed);
        let sum = shared.progress_sum_us.swap(0, Ordering::Relaxed);
        let max = shared.progress_max_us.swap(0, Ordering::Relaxed);
        shared
            .last_second_max_us
            .store(if count > 0 { max } else { u64::MAX }, Ordering::Relaxed);
        shared.seconds.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "[sfu_load] {:>4.0}s subscribers: {:.0} frames/s each, end to end mean {:.2} ms, max {:.2} ms",
            started.elapsed().as_secs_f64(),
            count as f64 / subscribers.max(1) as f64,
            if count > 0 {
                sum as f64 / count as f64 / 1000.0
            } else {
                0.0
            },
            max as f64 / 1000.0,
        );
    }
}

fn quantiles_ms(h: &Histogram<u64>) -> Value {
    let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
    json!({"count": h.len(), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": h.max() as f64 / 1000.0})
}

fn sum(
    shared: &Shared,
    range: std::ops::Range<usize>,
    f: impl Fn(&PeerStats) -> &AtomicU64,
) -> u64 {
    shared.peers[range]
        .iter()
        .map(|p| f(p).load(Ordering::Relaxed))
        .sum()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let loopback =
        |url: &str| url.starts_with("http://127.") || url.starts_with("http://localhost");
    match cli.target {
        Target::Vibe => {
            if !cli.url.as_deref().is_some_and(loopback) {
                bail!("--url must be a loopback http:// URL");
            }
            if cli.token.is_none() {
                bail!("--token (or VIBE_BENCH_TOKEN) is needed");
            }
        }
        Target::Janus => {
            if !cli.janus_url.as_deref().is_some_and(loopback) {
                bail!("--janus-url must be a loopback http:// URL");
            }
        }
    }
    if cli.publishers == 0 {
        bail!("--publishers must be at least 1");
    }
    vibe_actors::call::actor::install_crypto();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let p = cli.publishers;
    let n = p + cli.subscribers;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        window_start: AtomicU64::new(u64::MAX),
        window_end: AtomicU64::new(u64::MAX),
        peers: (0..n).map(|_| PeerStats::default()).collect(),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        progress_sum_us: AtomicU64::new(0),
        progress_count: AtomicU64::new(0),
        progress_max_us: AtomicU64::new(0),
        last_second_max_us: AtomicU64::new(u64::MAX),
        seconds: AtomicU64::new(0),
    });
    let http = reqwest::Client::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let join_started = Instant::now();
    let joined = match cli.target {
        Target::Vibe => join_vibe(&cli, &shared, &stop_rx).await?,
        Target::Janus => join_janus(&cli, &shared, &stop_rx).await?,
    };
    let Joined {
        media,
        signals,
        mut janus,
    } = joined;
    // Vibe's /metrics (Janus has no counterpart: forwarded frames are counted at the receivers).
    let metrics_url = match cli.target {
        Target::Vibe => cli.url.clone(),
        Target::Janus => None,
    };
    let joined_in = join_started.elapsed();
    let progress = tokio::spawn(progress_line(shared.clone(), cli.subscribers));
    eprintln!(
        "[sfu_load] {n} participants joined in {:.1}s; waiting for media",
        joined_in.as_secs_f64()
    );

    // Everyone receives video from every publisher (but itself).
    let ready_deadline = Instant::now() + Duration::from_secs_f64(cli.ready_timeout);
    let expected = |i: usize| if i < p { p - 1 } else { p };
    loop {
        let missing: usize = (0..n)
            .filter(|&i| shared.peers[i].heard.load(Ordering::Relaxed) < expected(i))
            .count();
        if missing == 0 {
            break;
        }
        if Instant::now() > ready_deadline {
            let connected = shared
                .peers
                .iter()
                .filter(|s| s.connected.load(Ordering::Relaxed))
                .count();
            let first = shared.first_error.lock().ok().and_then(|e| e.clone());
            let _ = stop_tx.send(true);
            if let Some(janus) = janus.take() {
                janus.destroy().await;
            }
            bail!(
                "after {:.0}s, {missing} of {n} participants still miss a publisher's video \
                 ({connected} connected; errors: {}, first: {first:?})",
                cli.ready_timeout,
                shared.errors.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready_in = join_started.elapsed();
    eprintln!(
        "[sfu_load] media reaches everyone after {:.1}s",
        ready_in.as_secs_f64()
    );
    // Then the start-up transient passes: the server paces each subscriber at 1.1× its bandwidth
    // estimate (from 1 Mbit/s) until the estimate grows, queueing what exceeds it. Settled: two
    // consecutive seconds whose worst end-to-end latency is below --settle-ms.
    let mut calm = 0;
    let mut seen = shared.seconds.load(Ordering::Relaxed);
    let settled = loop {
        if Instant::now() > ready_deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now_seen = shared.seconds.load(Ordering::Relaxed);
        if now_seen == seen {
            continue;
        }
        seen = now_seen;
        let max = shared.last_second_max_us.load(Ordering::Relaxed);
        calm = if (max as f64) < cli.settle_ms * 1000.0 {
            calm + 1
        } else {
            0
        };
        if calm >= 2 {
            break true;
        }
    };
    let settled_in = join_started.elapsed();
    eprintln!(
        "[sfu_load] {} after {:.1}s; warmup {}s",
        if settled {
            "end-to-end latency settled"
        } else {
            "latency did NOT settle (measuring anyway)"
        },
        settled_in.as_secs_f64(),
        cli.warmup
    );
    tokio::time::sleep(Duration::from_secs_f64(cli.warmup)).await;

    // The window.
    let server_pid = cli.server_pid.map(|p| p.to_string());
    let metrics_before = scrape(&http, metrics_url.as_deref())
        .await
        .unwrap_or_default();
    let udp_before = udp_counters();
    let server_before = server_pid.as_deref().map(cpu_ticks).transpose()?;
    let threads_before = server_pid.as_deref().map(thread_ticks).unwrap_or_default();
    let client_before = cpu_ticks("self")?;
    let t0 = Instant::now();
    shared
        .window_start
        .store(shared.micros(t0), Ordering::Relaxed);
    let rx_bytes_before = sum(&shared, p..n, |s| &s.rx_bytes);
    let rx_packets_before = sum(&shared, p..n, |s| &s.rx_packets);
    tokio::time::sleep(Duration::from_secs_f64(cli.duration)).await;
    let t1 = Instant::now();
    shared
        .window_end
        .store(shared.micros(t1), Ordering::Relaxed);
    let client_after = cpu_ticks("self")?;
    let server_after = server_pid.as_deref().map(cpu_ticks).transpose()?;
    let threads_after = server_pid.as_deref().map(thread_ticks).unwrap_or_default();
    let udp_after = udp_counters();
    let metrics_after = scrape(&http, metrics_url.as_deref())
        .await
        .unwrap_or_default();
    let rx_bytes_after = sum(&shared, p..n, |s| &s.rx_bytes);
    let rx_packets_after = sum(&shared, p..n, |s| &s.rx_packets);
    let secs = (t1 - t0).as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(cli.drain)).await;
    let _ = stop_tx.send(true);
    progress.abort();
    // End to end, by receiver: subscribers (RTP mode: the frame's first packet) and publishers
    // (frame mode: the whole frame, depacketized).
    let mut latency_subscribers = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut latency_publishers = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for (subscriber, task) in media {
        let h = task.await?;
        if subscriber {
            latency_subscribers.add(&h)?;
        } else {
            latency_publishers.add(&h)?;
        }
    }
    for task in signals {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    if let Some(janus) = janus.take() {
        janus.destroy().await;
    }

    // Results.
    let streams = p * (n - 1);
    let tx_window: u64 = sum(&shared, 0..p, |s| &s.tx_window_frames);
    let expected_frames = tx_window * (n as u64 - 1);
    let received_frames = sum(&shared, 0..n, |s| &s.rx_window_frames);
    let delivery = if expected_frames > 0 {
        received_frames as f64 / expected_frames as f64
    } else {
        0.0
    };
    let cores = |before: u64, after: u64| after.saturating_sub(before) as f64 / USER_HZ / secs;
    let server_cores = match (server_before, server_after) {
        (Some(b), Some(a)) => Some(cores(b, a)),
        _ => None,
    };
    let client_cores = cores(client_before, client_after);
    let mut hot_threads: Vec<(String, f64)> = threads_after
        .iter()
        .map(|(tid, (name, after))| {
            let before = threads_before.get(tid).map_or(0, |(_, t)| *t);
            (format!("{name}/{tid}"), cores(before, *after))
        })
        .collect();
    hot_threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    hot_threads.truncate(4);
    let m = |k: &str| {
        metrics_after.get(k).copied().unwrap_or(0.0) - metrics_before.get(k).copied().unwrap_or(0.0)
    };
    // Vibe counts what it forwarded; for Janus, the frames the receivers got (sent in the window).
    let vibe = cli.target == Target::Vibe;
    let forwarded_per_sec = if vibe {
        m("vibe_call_forwarded_frames_total") / secs
    } else {
        received_frames as f64 / secs
    };
    let metric = |k: &str| if vibe { json!(m(k)) } else { Value::Null };
    let udp = |k: &str| {
        udp_after
            .get(k)
            .copied()
            .unwrap_or(0)
            .saturating_sub(udp_before.get(k).copied().unwrap_or(0))
    };
    let sub_count = cli.subscribers.max(1) as f64;
    let sub_mbps = (rx_bytes_after - rx_bytes_before) as f64 * 8.0 / secs / 1e6 / sub_count;
    let sub_pps = (rx_packets_after - rx_packets_before) as f64 / secs / sub_count;
    let q = |x: f64| latency_subscribers.value_at_quantile(x) as f64 / 1000.0;
    let result = json!({
        "target": if vibe { "vibe" } else { "janus" },
        "publishers": p,
        "subscribers": cli.subscribers,
        "participants": n,
        "forwarded_video_streams": streams,
        "bitrate_kbps": cli.bitrate_kbps,
        "fps": cli.fps,
        "frame_bytes": cli.bitrate_kbps * 1000 / 8 / u64::from(cli.fps.max(1)),
        "audio": cli.audio,
        "window_s": secs,
        "joined_s": joined_in.as_secs_f64(),
        "ready_s": ready_in.as_secs_f64(),
        "settled": settled,
        "settled_s": settled_in.as_secs_f64(),
        "frames_sent_in_window": tx_window,
        "frames_expected": expected_frames,
        "frames_received": received_frames,
        "delivery": delivery,
        "loss_percent": (1.0 - delivery) * 100.0,
        "subscriber_mbps": sub_mbps,
        "subscriber_packets_per_s": sub_pps,
        "server_forwarded_frames_per_s": forwarded_per_sec,
        "forwarded_frames_source": if vibe { "server metric" } else { "frames the receivers got" },
        "server_cpu_cores": server_cores,
        "server_cpu_percent": server_cores.map(|c| c * 100.0),
        "server_rss_mib": server_pid.as_deref().map(|p| rss_kib(p) as f64 / 1024.0),
        "streams_per_server_core": server_cores.map(|c| if c > 0.0 { streams as f64 / c } else { 0.0 }),
        "server_cpu_us_per_forwarded_frame": server_cores.map(|c| if forwarded_per_sec > 0.0 { c * 1e6 / forwarded_per_sec } else { 0.0 }),
        "server_hot_threads": hot_threads.iter().map(|(t, c)| json!({"thread": t, "cpu_percent": c * 100.0})).collect::<Vec<_>>(),
        "client_cpu_cores": client_cores,
        "client_cpu_percent": client_cores * 100.0,
        "client_threads": cli.threads,
        "forward_latency": forward_latency(&metrics_before, &metrics_after),
        "end_to_end_ms": {
            "subscribers": quantiles_ms(&latency_subscribers),
            "publishers": quantiles_ms(&latency_publishers),
        },
        "server_send_drops": metric("vibe_call_send_drops_total"),
        "server_receive_drops": metric("vibe_call_receive_drops_total"),
        "server_unrouted": metric("vibe_call_unrouted_datagrams_total"),
        "server_keyframe_requests": metric("vibe_call_keyframe_requests_total"),
        "client_send_drops": sum(&shared, 0..n, |s| &s.tx_drops),
        "client_keyframe_requests_seen": sum(&shared, 0..p, |s| &s.keyframe_requests),
        "kernel_udp_rcvbuf_errors": udp("RcvbufErrors"),
        "kernel_udp_sndbuf_errors": udp("SndbufErrors"),
        "errors": shared.errors.load(Ordering::Relaxed),
        "first_error": shared.first_error.lock().ok().and_then(|e| e.clone()),
    });

    let fl = &result["forward_latency"];
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.3}"));
    println!(
        "SFU forwarding ({}): {p} publishers × {} subscribers, {} kbit/s × {} fps video{}",
        result["target"].as_str().unwrap_or("?"),
        cli.subscribers,
        cli.bitrate_kbps,
        cli.fps,
        if cli.audio { " + audio" } else { "" }
    );
    println!(
        "| forwarded video streams | delivered | loss | per subscriber | server CPU | streams per server core | client CPU | SFU added p50 / p99 (≤ 1 ms) | subscribers' end to end p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {streams} | {received_frames} / {expected_frames} frames | {:.3}% | {:.2} Mbit/s, {:.0} pkt/s | {} | {} | {:.0}% | {} / {} ms ({}) | {:.2} / {:.2} ms |",
        (1.0 - delivery) * 100.0,
        sub_mbps,
        sub_pps,
        server_cores.map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
        server_cores.map_or("-".into(), |c| format!(
            "{:.0}",
            streams as f64 / c.max(1e-9)
        )),
        client_cores * 100.0,
        f(&fl["p50_ms"]),
        f(&fl["p99_ms"]),
        fl["share_le_1ms"]
            .as_f64()
            .map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
        q(0.5),
        q(0.99),
    );
    println!(
        "server: {forwarded_per_sec:.0} forwarded frames/s, {} µs CPU each; hottest threads: {}",
        server_cores.map_or("-".into(), |c| format!(
            "{:.1}",
            c * 1e6 / forwarded_per_sec.max(1e-9)
        )),
        hot_threads
            .iter()
            .map(|(t, c)| format!("{t} {:.0}%", c * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "drops: server send {} receive {}; client send {}; kernel UDP rcvbuf {} sndbuf {}; errors {} (first: {})",
        result["server_send_drops"],
        result["server_receive_drops"],
        result["client_send_drops"],
        result["kernel_udp_rcvbuf_errors"],
        result["kernel_udp_sndbuf_errors"],
        result["errors"],
        result["first_error"]
    );
    if let Some(path) = &cli.json {
        std::fs::write(path, format!("{result}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("{result}");
    Ok(())
}
