"""A scripted WebRTC participant for the call integration tests.

The Rust tests spawn one of these per participant:

    python3 tests/calls/peer.py --ws ws://127.0.0.1:PORT/v1/ws --token TOKEN \
        --room ROOM_ID --name alice --expect-peers 2 --timeout 30 [--p2p]

It speaks the call signalling of docs/protocol.md ("Calls (WebRTC)") over the WebSocket, publishes
a synthetic audio track (a 440 Hz tone, 20 ms Opus frames) and a synthetic video track (320x240, a
moving bar at 15 fps), and counts the frames it decodes from every other participant. Once each of
`--expect-peers` participants delivered `--min-frames` audio and video frames it prints one JSON line
on stdout:

    {"ok": true, "name": "alice", "participant": "p1", "received": {"p2": {"video": 31, "audio": 58}}}

and keeps sending media (the others still need it) until stdin reaches EOF or `--linger` seconds
pass, so the test must hand it a piped stdin and close it at the end. On timeout it prints
`{"ok": false, "error": ..., "received": ...}` and exits 1. Diagnostics go to stderr only.

Modes: SFU (default: `call.join` with an offer, then answer the server's renegotiation offers);
`--p2p` (`call.join` without an offer, connect directly on `peer`, switch to the SFU on `mode`);
`--join-only [--expect-error CODE]` (check the reply of `call.join`, for negative tests).

Forwarded tracks carry the publisher's participant id as their stream id (`a=msid:<stream> <track>`);
aiortc does not expose streams on its track event, so the m-sections of each remote description
are parsed into mid -> stream id, and a track is attributed via its transceiver's mid. In P2P mode
the peer connection itself names the participant.
"""

import argparse
import array
import asyncio
import fractions
import json
import logging
import math
import os
import re
import sys
import threading
import time

import aioice.ice
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.sdp import candidate_from_sdp
from av import AudioFrame, VideoFrame
from websockets.asyncio.client import connect

log = logging.getLogger("peer")

# --- ICE on loopback -------------------------------------------------------------------------------
# aioice skips 127.0.0.1 when gathering host candidates; the test server only listens there.
_host_addresses = aioice.ice.get_host_addresses
ALL_INTERFACES = False


def _host_addresses_with_loopback(use_ipv4, use_ipv6):
    others = _host_addresses(use_ipv4, use_ipv6) if ALL_INTERFACES else []
    return (["127.0.0.1"] if use_ipv4 else []) + [a for a in others if a != "127.0.0.1"]


aioice.ice.get_host_addresses = _host_addresses_with_loopback


# --- synthetic media -------------------------------------------------------------------------------
class Pacer:
    """Sleeps so that frames leave in real time; returns each frame's pts."""

    def __init__(self, step, rate):
        self.step, self.rate, self.start, self.pts = step, rate, None, 0

    async def next(self):
        if self.start is None:
            self.start = time.time()
        else:
            self.pts += self.step
            await asyncio.sleep(self.start + self.pts / self.rate - time.time())
        return self.pts


class ToneTrack(MediaStreamTrack):
    kind = "audio"
    RATE, SAMPLES = 48000, 960  # 20 ms frames
    # one second of a 440 Hz tone: a whole number of periods, so it loops seamlessly
    TONE = array.array(
        "h", (int(8000 * math.sin(2 * math.pi * 440 * i / 48000)) for i in range(48000))
    ).tobytes()

    def __init__(self):
        super().__init__()
        self.pacer = Pacer(self.SAMPLES, self.RATE)

    async def recv(self):
        pts = await self.pacer.next()
        frame = AudioFrame(format="s16", layout="mono", samples=self.SAMPLES)
        start = (pts % self.RATE) * 2
        frame.planes[0].update(self.TONE[start : start + self.SAMPLES * 2])
        frame.pts, frame.sample_rate = pts, self.RATE
        frame.time_base = fractions.Fraction(1, self.RATE)
        return frame


class BarTrack(MediaStreamTrack):
    kind = "video"
    WIDTH, HEIGHT, FPS, CLOCK = 320, 240, 15, 90000

    def __init__(self):
        super().__init__()
        self.pacer = Pacer(self.CLOCK // self.FPS, self.CLOCK)
        self.n = 0

    async def recv(self):
        pts = await self.pacer.next()
        self.n += 1
        frame = VideoFrame(width=self.WIDTH, height=self.HEIGHT, format="yuv420p")
        luma, bar = frame.planes[0], 32
        x = (self.n * 8) % (self.WIDTH - bar)
        background = bytes([16 + (self.n * 3) % 160])
        row = background * x + b"\xeb" * bar + background * (luma.line_size - x - bar)
        luma.update(row * (luma.buffer_size // luma.line_size))
        for chroma in frame.planes[1:]:
            chroma.update(b"\x80" * chroma.buffer_size)
        frame.pts, frame.time_base = pts, fractions.Fraction(1, self.CLOCK)
        return frame


def stream_ids_by_mid(sdp):
    """mid -> stream id of each m-section (from `a=msid:` or the `a=ssrc:N msid:` form)."""
    out = {}
    for section in re.split(r"\r?\n(?=m=)", sdp)[1:]:
        mid = re.search(r"^a=mid:(\S+)", section, re.M)
        msid = re.search(r"^a=msid:(\S+)", section, re.M) or re.search(
            r"^a=ssrc:\d+ msid:(\S+)", section, re.M
        )
        if mid and msid and msid.group(1) != "-":
            out[mid.group(1)] = msid.group(1)
    return out


# --- signalling ------------------------------------------------------------------------------------
class ServerError(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code


class Signalling:
    """Requests with ids; a read loop resolves replies by `re` and queues events in order."""

    def __init__(self, ws):
        self.ws, self.next_id, self.pending, self.seq = ws, 0, {}, 0
        self.events = asyncio.Queue()

    async def request(self, op, **fields):
        self.next_id += 1
        rid = self.next_id
        fut = self.pending[rid] = asyncio.get_running_loop().create_future()
        log.info("-> %s #%d %s", op, rid, {k: v for k, v in fields.items() if k != "sdp"})
        await self.ws.send(json.dumps({"id": rid, "op": op, **fields}))
        reply = await fut
        if "error" in reply:
            raise ServerError(reply["error"].get("code"), reply["error"].get("message"))
        return reply

    async def read_loop(self):
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                # Arrival order of replies and events: a server offer that arrived before the
                # reply to our own offer was withdrawn by the server (it yields on glare).
                self.seq += 1
                msg["_seq"] = self.seq
                if "re" in msg:
                    fut = self.pending.pop(msg["re"], None)
                    if fut is None:
                        log.warning("unmatched reply %s", msg)
                    elif not fut.done():
                        fut.set_result(msg)
                elif "event" in msg:
                    self.events.put_nowait(msg)
                else:
                    log.warning("unexpected message %s", msg)
        finally:
            closed = ConnectionError(f"websocket closed ({self.ws.close_code})")
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(closed)
            self.events.put_nowait(None)


# --- the participant -------------------------------------------------------------------------------
class Peer:
    def __init__(self, args, sig):
        self.args, self.sig, self.room = args, sig, args.room
        self.me = None
        self.sfu = None  # the RTCPeerConnection to the server
        self.publishing = False  # our tracks are negotiated on self.sfu
        self.p2p = {}  # participant -> RTCPeerConnection
        self.early_ice = {}  # participant -> candidates that came before its description
        self.stream_of_mid = {}
        self.offer_answered_at = 0  # arrival index of the reply to our latest offer to the SFU
        self.received = {}  # participant -> {"audio": n, "video": m}
        self.tasks = set()

    # peer connections -----------------------------------------------------------------------------
    def new_pc(self, peer=None):
        pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )
        label = peer or "sfu"

        @pc.on("track")
        def on_track(track):
            mid = next((t.mid for t in pc.getTransceivers() if t.receiver.track is track), None)
            source = peer or self.stream_of_mid.get(mid) or f"mid:{mid}"
            log.info("[%s] remote %s track mid=%s id=%s -> %s", label, track.kind, mid, track.id, source)
            self.spawn(self.consume(track, source))

        @pc.on("connectionstatechange")
        def on_state():
            log.info("[%s] connection %s", label, pc.connectionState)

        return pc

    @staticmethod
    def publish(pc, direction="sendrecv"):
        for track in (ToneTrack(), BarTrack()):
            pc.addTransceiver(track, direction=direction)

    async def consume(self, track, source):
        counts = self.received.setdefault(source, {"video": 0, "audio": 0})
        try:
            while True:
                await track.recv()
                counts[track.kind] += 1
        except Exception as e:  # MediaStreamError when the track ends
            log.info("track %s of %s ended (%r)", track.kind, source, e)

    def spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(
            lambda t: t.cancelled()
            or t.exception() is None
            or log.error("task failed: %r", t.exception(), exc_info=t.exception())
        )
        return task

    async def set_remote(self, pc, sdp, kind):
        if pc is self.sfu:
            self.stream_of_mid.update(stream_ids_by_mid(sdp))
            log.info("streams by mid: %s", self.stream_of_mid)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))

    async def local(self, pc, create):
        # aiortc gathers every candidate in setLocalDescription: no trickling needed
        await pc.setLocalDescription(await create())
        return pc.localDescription.sdp

    # SFU ------------------------------------------------------------------------------------------
    async def offer_to_sfu(self, op, direction=None, **fields):
        """Publish our tracks to the server: `call.join` or `call.sdp` carrying an offer."""
        if self.sfu is None:
            self.sfu = self.new_pc()
        self.publish(self.sfu, direction or ("sendrecv" if op == "call.join" else "sendonly"))
        offer = await self.local(self.sfu, self.sfu.createOffer)
        try:
            reply = await self.sig.request(op, room=self.room, sdp=offer, **fields)
        except ServerError as e:
            if e.code != "negotiation_conflict":
                raise
            # aiortc cannot roll back: drop this pc, answer the server's offer, publish after
            log.info("negotiation conflict: publishing after the server's offer")
            await self.close_sfu()
            return None
        await self.set_remote(self.sfu, reply["sdp"], "answer")
        self.offer_answered_at = reply["_seq"]
        self.publishing = True
        return reply

    async def on_server_offer(self, sdp):
        if self.sfu is None:
            self.sfu = self.new_pc()
        await self.set_remote(self.sfu, sdp, "offer")
        answer = await self.local(self.sfu, self.sfu.createAnswer)
        await self.sig.request("call.sdp", room=self.room, type="answer", sdp=answer)
        if not self.publishing:
            await self.offer_to_sfu("call.sdp", type="offer")

    async def close_sfu(self):
        if self.sfu is not None:
            await self.sfu.close()
        self.sfu, self.publishing = None, False
        self.stream_of_mid.clear()

    # P2P ------------------------------------------------------------------------------------------
    def p2p_pc(self, peer):
        if peer not in self.p2p:
            self.p2p[peer] = pc = self.new_pc(peer)
            self.publish(pc)
        return self.p2p[peer]

    async def on_peer(self, peer, offerer):
        pc = self.p2p_pc(peer)
        if offerer:
            offer = await self.local(pc, pc.createOffer)
            await self.sig.request("call.sdp", room=self.room, to=peer, type="offer", sdp=offer)

    async def on_peer_sdp(self, peer, kind, sdp):
        pc = self.p2p_pc(peer)
        await self.set_remote(pc, sdp, kind)
        for candidate in self.early_ice.pop(peer, []):
            await self.on_peer_ice(peer, candidate)
        if kind == "offer":
            answer = await self.local(pc, pc.createAnswer)
            await self.sig.request("call.sdp", room=self.room, to=peer, type="answer", sdp=answer)

    async def on_peer_ice(self, peer, candidate):
        line = candidate.strip()
        if line.startswith("a="):
            line = line[2:]
        if line.startswith("candidate:"):
            line = line[len("candidate:") :]
        if not line:
            return
        pc = self.p2p.get(peer)
        if pc is None or pc.remoteDescription is None:
            self.early_ice.setdefault(peer, []).append(candidate)
            return
        ice = candidate_from_sdp(line)
        ice.sdpMLineIndex = 0  # everything is bundled on the first m-section
        await pc.addIceCandidate(ice)

    async def close_p2p(self):
        for pc in self.p2p.values():
            await pc.close()
        self.p2p.clear()

    # flow -----------------------------------------------------------------------------------------
    async def join(self):
        if self.args.p2p:
            reply = await self.sig.request("call.join", room=self.room)
        else:
            reply = await self.offer_to_sfu("call.join")
        self.me = reply["participant"]
        log.info("joined as %s, mode %s, with %s", self.me, reply.get("mode"), reply.get("participants"))
        if self.args.p2p and reply.get("mode") == "sfu":
            # Joined without an offer a room that is already past two: publish through the SFU.
            await self.offer_to_sfu("call.sdp", direction="sendrecv", type="offer")
        return reply

    async def handle(self, ev):
        kind = ev["event"]
        if ev.get("call") != self.room:
            log.info("event of another room: %s", ev)
        elif kind == "sdp" and ev.get("from"):
            await self.on_peer_sdp(ev["from"], ev["type"], ev["sdp"])
        elif kind == "sdp" and ev["type"] == "offer" and ev["_seq"] < self.offer_answered_at:
            log.info("server offer superseded by our own: ignored")
        elif kind == "sdp" and ev["type"] == "offer":
            await self.on_server_offer(ev["sdp"])
        elif kind == "ice" and ev.get("from"):
            await self.on_peer_ice(ev["from"], ev.get("candidate") or "")
        elif kind == "peer":
            await self.on_peer(ev["participant"], ev.get("offerer"))
        elif kind == "mode" and ev.get("mode") == "sfu":
            await self.close_p2p()
            self.received.clear()  # count what comes through the SFU only
            await self.offer_to_sfu("call.sdp", type="offer")
        elif kind == "left" and ev.get("participant") in self.p2p:
            await self.p2p.pop(ev["participant"]).close()
        elif kind == "ended" and ev.get("rejoin", True):
            log.info("room ended (%s): joining again", ev.get("reason"))
            await self.close_p2p()
            await self.close_sfu()
            self.received.clear()
            await self.join()
        else:
            log.info("event %s", {k: v for k, v in ev.items() if k != "sdp"})

    async def events(self):
        while (ev := await self.sig.events.get()) is not None:
            await self.handle(ev)
        raise ConnectionError("websocket closed")

    def satisfied(self):
        full = [
            p
            for p, c in self.received.items()
            if p != self.me and c["video"] >= self.args.min_frames and c["audio"] >= self.args.min_frames
        ]
        return len(full) >= self.args.expect_peers

    async def until_satisfied(self):
        while not self.satisfied():
            await asyncio.sleep(0.2)

    async def close(self):
        for task in list(self.tasks):
            task.cancel()
        await self.close_p2p()
        await self.close_sfu()


# --- main ------------------------------------------------------------------------------------------
def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stdin_closed():
    """A future resolved when stdin reaches EOF (read in a daemon thread: never blocks exit)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def reader():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

    threading.Thread(target=reader, daemon=True).start()
    return fut


async def run(args):
    ws = await connect(
        args.ws,
        subprotocols=["vibe.v1"],
        additional_headers={"Authorization": f"Bearer {args.token}"},
        compression=None,
        proxy=None,
        max_size=None,
    )
    sig = Signalling(ws)
    reader = asyncio.ensure_future(sig.read_loop())
    peer = Peer(args, sig)
    try:
        if args.join_only:
            try:
                reply = await peer.join()
            except ServerError as e:
                ok = e.code == args.expect_error
                emit({"ok": ok, "name": args.name, "error": e.code, **({} if ok else {"message": str(e)})})
                return 0 if ok else 1
            if args.expect_error:
                emit({"ok": False, "name": args.name, "error": f"joined, expected {args.expect_error}"})
                return 1
            emit({"ok": True, "name": args.name, "participant": peer.me, "mode": reply.get("mode")})
        else:

            async def session():
                await peer.join()
                events = peer.spawn(peer.events())  # runs on while lingering: renegotiations
                done = peer.spawn(peer.until_satisfied())
                await asyncio.wait([events, done], return_when=asyncio.FIRST_COMPLETED)
                if events.done():
                    events.result()  # raises why the events stopped

            try:
                await asyncio.wait_for(session(), args.timeout)
            except Exception as e:
                error = "timeout" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}"
                log.error("failed: %s", error)
                emit({"ok": False, "name": args.name, "participant": peer.me, "error": error, "received": peer.received})
                return 1
            emit({"ok": True, "name": args.name, "participant": peer.me, "received": peer.received})
        waits = [stdin_closed(), reader]
        if args.linger is not None:
            waits.append(asyncio.ensure_future(asyncio.sleep(args.linger)))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        log.info("done; received %s", peer.received)
        return 0
    finally:
        try:
            await asyncio.wait_for(peer.close(), 5)
            await asyncio.wait_for(ws.close(), 2)
        except Exception as e:
            log.info("closing: %r", e)
        reader.cancel()


def main():
    global ALL_INTERFACES
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ws", required=True, help="ws://host:port/v1/ws")
    p.add_argument("--token", required=True)
    p.add_argument("--room", required=True)
    p.add_argument("--name", default="peer", help="a label for logs and the result line")
    p.add_argument("--expect-peers", type=int, default=1, help="other participants to receive from")
    p.add_argument("--min-frames", type=int, default=10, help="frames of each kind per participant")
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--p2p", action="store_true", help="join without an offer (peer-to-peer room)")
    p.add_argument("--linger", type=float, help="after success, exit after this many seconds at most")
    p.add_argument("--join-only", action="store_true", help="only check the reply of call.join")
    p.add_argument("--expect-error", metavar="CODE", help="call.join must fail with CODE (implies --join-only)")
    p.add_argument("--all-interfaces", action="store_true", help="ICE on every interface, not only 127.0.0.1")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs of aiortc/aioice too")
    args = p.parse_args()
    args.join_only = args.join_only or args.expect_error is not None
    ALL_INTERFACES = args.all_interfaces
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format=f"%(asctime)s {args.name} %(name)s %(levelname)s %(message)s",
    )
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        code = asyncio.run(run(args))
    except Exception as e:  # could not connect, bad reply, ...
        log.exception("peer failed")
        emit({"ok": False, "name": args.name, "error": f"{type(e).__name__}: {e}"})
        code = 1
    # os._exit: the stdin reader thread may still be blocked in read(), which would abort a
    # regular interpreter shutdown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
