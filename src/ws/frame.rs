//! WebSocket framing (RFC 6455) for the connection task, sans-IO: bytes read from the socket go
//! in, whole messages come out; frames to send are appended to the caller's buffer.
//!
//! It owns the read side's buffering, and that buffering is lazy on purpose: a connection spends
//! most of its life idle, so between messages the reader holds no allocation at all (a transport
//! with a fixed read buffer pays 8 KiB per idle connection). Bytes are kept only while a frame is
//! incomplete, and the buffer is released as soon as it is consumed. Header parsing is
//! tungstenite's; the message rules (masking, fragments, control frames, size) are here.

use std::io::Cursor;

use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Close codes of RFC 6455 §7.4.1 used by the transport.
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_TOO_BIG: u16 = 1009;

/// The code to answer a client's close with: its own if it may be sent on the wire (RFC 6455
/// §7.4: 1000–1003, 1007–1014, 3000–4999), 1000 when it gave none, 1002 for one it may not send.
pub fn echoed_close_code(code: Option<u16>) -> u16 {
    match code {
        None => CLOSE_NORMAL,
        Some(c @ (1000..=1003 | 1007..=1014 | 3000..=4999)) => c,
        Some(_) => CLOSE_PROTOCOL_ERROR,
    }
}

/// A control frame's payload is at most this long (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// One message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    /// To be answered with a pong carrying the same payload.
    Ping(Vec<u8>),
    /// The client closes, with its status code if it gave one (to be echoed).
    Close(Option<u16>),
}

/// The client broke the framing rules; the connection closes with `close_code()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("reserved bits or opcodes are not in use")]
    Reserved,
    #[error("control frames must be whole and at most 125 bytes")]
    BadControl,
    #[error("a continuation without a message, or a new message inside one")]
    BadFragment,
    #[error("unreadable frame header: {0}")]
    Header(String),
}

impl FrameError {
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooLarge(_) => CLOSE_TOO_BIG,
            _ => CLOSE_PROTOCOL_ERROR,
        }
    }
}

/// How much room a frame's header makes the buffer reserve ahead of its payload's bytes.
const RESERVE_AHEAD: usize = 64 * 1024;

/// The read side of one connection.
#[derive(Debug)]
pub struct Inbound {
    /// Bytes read, from `start` on not yet consumed; empty, and unallocated, between messages.
    buffered: Vec<u8>,
    /// Where the unconsumed bytes begin: frames are consumed by moving it, and the consumed
    /// prefix is dropped now and then, not after every frame (a read full of tiny control
    /// frames would otherwise move the rest of the buffer once per frame).
    start: usize,
    /// A fragmented data message being assembled: (is it text, payload so far).
    partial: Option<(bool, Vec<u8>)>,
    /// A message (its fragments together) may not be longer.
    max_message: usize,
}

impl Inbound {
    pub fn new(max_message: usize) -> Self {
        Self {
            buffered: Vec::new(),
            start: 0,
            partial: None,
            max_message,
        }
    }

    /// Takes bytes read from the socket.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffered.extend_from_slice(bytes);
    }

    /// Bytes waiting for the rest of their frame.
    pub fn buffered(&self) -> usize {
        self.buffered.len() - self.start
    }

    /// Marks `n` more bytes consumed; releases the buffer once all are, and drops the consumed
    /// prefix once it is most of the buffer (so each byte moves at most once on average).
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buffered.len() {
            // Consumed: release the buffer, an idle connection holds none.
            self.buffered = Vec::new();
            self.start = 0;
        } else if self.start * 2 >= self.buffered.len() {
            self.buffered.drain(..self.start);
            self.start = 0;
        }
    }

    /// The next whole message, or `None` until more bytes arrive. Pongs are consumed here.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        loop {
            let mut cursor = Cursor::new(&self.buffered[self.start..]);
            let (header, length) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(None),
                Err(e) => return Err(FrameError::Header(e.to_string())),
            };
            // The cursor stopped right after the header (it is at most 14 bytes long).
            let header_len = cursor.position() as usize;
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(FrameError::Reserved);
            }
            let Some(mask) = header.mask else {
                return Err(FrameError::Unmasked);
            };
            let control = matches!(header.opcode, OpCode::Control(_));
            if control && (!header.is_final || length > MAX_CONTROL_PAYLOAD) {
                return Err(FrameError::BadControl);
            }
            let so_far = self.partial.as_ref().map_or(0, |(_, p)| p.len());
            let too_large = usize::try_from(length)
                .ok()
                .and_then(|l| l.checked_add(if control { 0 } else { so_far }))
                .is_none_or(|total| total > self.max_message);
            if too_large {
                return Err(FrameError::TooLarge(self.max_message));
            }
            // Within max_message, so it fits a usize.
            let end = header_len + length as usize;
            let available = self.buffered();
            if available < end {
                // Room for the rest of this frame at once, not by repeated doubling — up to
                // RESERVE_AHEAD: the header alone must not make a peer that has not even
                // authenticated allocate a whole `max_message`; more room comes as bytes do.
                self.buffered.reserve((end - available).min(RESERVE_AHEAD));
                return Ok(None);
            }
            let mut payload = self.buffered[self.start + header_len..self.start + end].to_vec();
            unmask(&mut payload, mask);
            self.consume(end);
            match header.opcode {
                OpCode::Control(Control::Ping) => return Ok(Some(Message::Ping(payload))),
                OpCode::Control(Control::Pong) => continue,
                OpCode::Control(Control::Close) => {
                    let code = payload
                        .get(..2)
                        .map(|code| u16::from_be_bytes([code[0], code[1]]));
                    return Ok(Some(Message::Close(code)));
                }
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Err(FrameError::Reserved);
                }
                OpCode::Data(Data::Continue) => {
                    let Some((_, so_far)) = self.partial.as_mut() else {
                        return Err(FrameError::BadFragment);
                    };
                    so_far.extend_from_slice(&payload);
                }
                OpCode::Data(data) => {
                    if self.partial.is_some() {
                        return Err(FrameError::BadFragment);
                    }
                    self.partial = Some((data == Data::Text, payload));
                }
            }
            if header.is_final
                && let Some((text, payload)) = self.partial.take()
            {
                return Ok(Some(if text {
                    Message::Text(payload)
                } else {
                    Message::Binary(payload)
                }));
            }
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Appends an unmasked, unfragmented server frame (RFC 6455 §5.2).
fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(len as u8),
        len @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// The bytes a text frame of `payload_len` bytes takes on the wire.
pub fn encoded_len(payload_len: usize) -> usize {
    payload_len
        + match payload_len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        }
}

pub fn encode_text(out: &mut Vec<u8>, payload: &[u8]) {
    encode(out, 0x1, payload);
}

pub fn encode_pong(out: &mut Vec<u8>, payload: &[u8]) {
    encode(out, 0xA, payload);
}

/// A close frame; the reason is cut to fit a control frame.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &[u8]) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason[..reason.len().min(MAX_CONTROL_PAYLOAD as usize - 2)]);
    encode(out, 0x8, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked, as RFC 6455 requires.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            len @ 0..=125 => out.push(0x80 | len as u8),
            len @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let mut body = payload.to_vec();
        unmask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn a_message_split_anywhere_comes_out_whole_and_leaves_no_buffer() {
        let text = br#"{"id":1,"op":"auth","token":"x"}"#;
        let mut wire = client_frame(true, 0x1, text);
        wire.extend(client_frame(true, 0x1, b"second"));
        for split in 0..wire.len() {
            let mut inbound = Inbound::new(1024);
            inbound.extend(&wire[..split]);
            let mut got = Vec::new();
            while let Some(m) = inbound.next_message().unwrap() {
                got.push(m);
            }
            inbound.extend(&wire[split..]);
            while let Some(m) = inbound.next_message().unwrap() {
                got.push(m);
            }
            assert_eq!(
                got,
                vec![
                    Message::Text(text.to_vec()),
                    Message::Text(b"second".to_vec())
                ],
                "split at {split}"
            );
            assert_eq!(
                inbound.buffered.capacity(),
                0,
                "no buffer held between messages"
            );
        }
    }

    /// Thousands of frames in one read come out in order, whatever the read sizes, and the
    /// buffer is released once they are consumed.
    #[test]
    fn many_small_frames_in_one_read_come_out_in_order() {
        let mut wire = Vec::new();
        for i in 0..3000u32 {
            wire.extend(client_frame(true, 0xA, b""));
            if i % 1000 == 999 {
                wire.extend(client_frame(true, 0x9, &i.to_be_bytes()));
            }
        }
        wire.extend(client_frame(true, 0x1, b"last"));
        for read in [7, 8192, wire.len()] {
            let mut inbound = Inbound::new(1024);
            let mut got = Vec::new();
            for chunk in wire.chunks(read) {
                inbound.extend(chunk);
                while let Some(m) = inbound.next_message().unwrap() {
                    got.push(m);
                }
            }
            let pings: Vec<Message> = [999u32, 1999, 2999]
                .iter()
                .map(|i| Message::Ping(i.to_be_bytes().to_vec()))
                .collect();
            assert_eq!(got[..3], pings[..], "read size {read}");
            assert_eq!(
                got[3..],
                [Message::Text(b"last".to_vec())],
                "read size {read}"
            );
            assert_eq!(inbound.buffered(), 0);
            assert_eq!(inbound.buffered.capacity(), 0, "released");
        }
    }

    #[test]
    fn a_large_frame_header_reserves_room_only_as_its_payload_arrives() {
        let payload = vec![b'x'; 900_000];
        let wire = client_frame(true, 0x2, &payload);
        let mut inbound = Inbound::new(1_000_000);
        inbound.extend(&wire[..14]);
        assert_eq!(inbound.next_message().unwrap(), None);
        assert!(
            inbound.buffered.capacity() <= 14 + RESERVE_AHEAD,
            "a header alone reserved {} bytes",
            inbound.buffered.capacity()
        );
        for chunk in wire[14..].chunks(16 * 1024) {
            inbound.extend(chunk);
        }
        assert_eq!(
            inbound.next_message().unwrap(),
            Some(Message::Binary(payload))
        );
    }

    #[test]
    fn fragments_are_joined_and_control_frames_may_come_between_them() {
        let mut inbound = Inbound::new(1024);
        inbound.extend(&client_frame(false, 0x1, b"hel"));
        inbound.extend(&client_frame(true, 0x9, b"are you there"));
        inbound.extend(&client_frame(true, 0xA, b"unsolicited pong"));
        inbound.extend(&client_frame(true, 0x0, b"lo"));
        assert_eq!(
            inbound.next_message().unwrap(),
            Some(Message::Ping(b"are you there".to_vec()))
        );
        assert_eq!(
            inbound.next_message().unwrap(),
            Some(Message::Text(b"hello".to_vec()))
        );
        assert_eq!(inbound.next_message().unwrap(), None);
    }

    #[test]
    fn large_frames_use_the_extended_lengths() {
        for len in [125, 126, 65_535, 65_536] {
            let payload = vec![b'a'; len];
            let mut inbound = Inbound::new(100_000);
            inbound.extend(&client_frame(true, 0x2, &payload));
            assert_eq!(
                inbound.next_message().unwrap(),
                Some(Message::Binary(payload))
            );
            let mut out = Vec::new();
            encode_text(&mut out, &vec![b'b'; len]);
            assert_eq!(out.len(), encoded_len(len), "len {len}");
        }
    }

    #[test]
    fn broken_framing_is_refused_with_the_right_close_code() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            // Unmasked.
            (vec![0x81, 0x02, b'h', b'i'], FrameError::Unmasked),
            // RSV1 without a negotiated extension.
            (
                {
                    let mut f = client_frame(true, 0x1, b"x");
                    f[0] |= 0x40;
                    f
                },
                FrameError::Reserved,
            ),
            // Reserved opcode: refused by the header parser (its message is tungstenite's).
            (
                client_frame(true, 0x3, b"x"),
                FrameError::Header(String::new()),
            ),
            (client_frame(false, 0x9, b"x"), FrameError::BadControl),
            (client_frame(true, 0x9, &[0; 126]), FrameError::BadControl),
            (client_frame(true, 0x0, b"x"), FrameError::BadFragment),
            (
                {
                    let mut f = client_frame(false, 0x1, b"x");
                    f.extend(client_frame(true, 0x1, b"y"));
                    f
                },
                FrameError::BadFragment,
            ),
            (
                client_frame(true, 0x1, &[b'a'; 65]),
                FrameError::TooLarge(64),
            ),
            (
                {
                    let mut f = client_frame(false, 0x1, &[b'a'; 40]);
                    f.extend(client_frame(true, 0x0, &[b'a'; 40]));
                    f
                },
                FrameError::TooLarge(64),
            ),
        ];
        for (wire, expected) in cases {
            let mut inbound = Inbound::new(64);
            inbound.extend(&wire);
            let got = inbound.next_message().expect_err("refused");
            if !matches!(
                (&got, &expected),
                (FrameError::Header(_), FrameError::Header(_))
            ) {
                assert_eq!(got, expected, "{wire:?}");
            }
            let code = if matches!(expected, FrameError::TooLarge(_)) {
                CLOSE_TOO_BIG
            } else {
                CLOSE_PROTOCOL_ERROR
            };
            assert_eq!(expected.close_code(), code);
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header_alone() {
        let mut inbound = Inbound::new(64);
        // The header announces 1 MB; none of the payload has arrived.
        inbound.extend(&client_frame(true, 0x1, &vec![0; 1 << 20])[..14]);
        assert_eq!(inbound.next_message(), Err(FrameError::TooLarge(64)));
    }

    #[test]
    fn a_close_is_echoed_with_a_code_that_may_be_sent() {
        assert_eq!(echoed_close_code(None), CLOSE_NORMAL);
        assert_eq!(echoed_close_code(Some(1001)), 1001);
        assert_eq!(echoed_close_code(Some(4321)), 4321);
        // 1005 and 1006 only ever describe a close locally; 999 and 5000 are outside the ranges.
        for bad in [999, 1004, 1005, 1006, 1015, 2999, 5000] {
            assert_eq!(echoed_close_code(Some(bad)), CLOSE_PROTOCOL_ERROR, "{bad}");
        }
    }

    #[test]
    fn close_carries_the_code_and_a_cut_reason() {
        let mut inbound = Inbound::new(64);
        inbound.extend(&client_frame(true, 0x8, &[0x03, 0xe8, b'b', b'y', b'e']));
        assert_eq!(
            inbound.next_message().unwrap(),
            Some(Message::Close(Some(CLOSE_NORMAL)))
        );
        let mut out = Vec::new();
        encode_close(&mut out, 4008, &[b'r'; 200]);
        assert_eq!(out[0], 0x88);
        assert_eq!(
            usize::from(out[1]),
            125,
            "a control payload is at most 125 bytes"
        );
        assert_eq!(&out[2..4], &4008u16.to_be_bytes());
    }
}
