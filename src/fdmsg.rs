//! Messages with descriptors over a unix stream socket: the framing the simulated Xen's
//! hypercall socket ([`crate::xen::sim::remote`]) and the sandbox's broker
//! ([`crate::sandbox::broker`]) speak.
//!
//! Owns: one length-prefixed message (an operation byte, integers, bytes) per call, with
//! descriptors attached by `SCM_RIGHTS` to its first byte.
//! Trusts: nothing it receives: lengths are bounded ([`MAX_MSG`], [`MAX_FDS`]) and a short or
//! malformed message is an error, never a panic.
//! Must never: leak a received descriptor (each becomes an [`OwnedFd`] at once, close-on-exec).

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// At most this many descriptors travel in one message (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 250;
/// A message larger than this is a protocol error.
pub const MAX_MSG: usize = 4 << 20;

/// One message: an operation, some integers and bytes.
#[derive(Debug, Default)]
pub struct Msg {
    /// What the message asks or answers.
    pub op: u8,
    /// Its integer arguments.
    pub ints: Vec<u64>,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl Msg {
    /// A message without bytes.
    pub fn new(op: u8, ints: Vec<u64>) -> Msg {
        Msg {
            op,
            ints,
            data: Vec::new(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let len = 1 + 4 + 8 * self.ints.len() + self.data.len();
        let mut b = Vec::with_capacity(4 + len);
        b.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        b.push(self.op);
        b.extend_from_slice(
            &u32::try_from(self.ints.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for i in &self.ints {
            b.extend_from_slice(&i.to_le_bytes());
        }
        b.extend_from_slice(&self.data);
        b
    }

    fn decode(b: &[u8]) -> std::io::Result<Msg> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed message");
        let (&op, rest) = b.split_first().ok_or_else(bad)?;
        let n = rest
            .get(..4)
            .and_then(|x| x.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(bad)? as usize;
        let ints_end = 4 + n.checked_mul(8).ok_or_else(bad)?;
        let ints = rest
            .get(4..ints_end)
            .ok_or_else(bad)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Ok(Msg {
            op,
            ints,
            data: rest.get(ints_end..).unwrap_or(&[]).to_vec(),
        })
    }

    /// Integer `i`, or `u64::MAX` when the message has fewer.
    pub fn int(&self, i: usize) -> u64 {
        self.ints.get(i).copied().unwrap_or(u64::MAX)
    }
}

/// Sends `msg` with `fds` attached, in one `sendmsg`.
pub fn send(stream: &UnixStream, msg: &Msg, fds: &[RawFd]) -> std::io::Result<()> {
    let bytes = msg.encode();
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(std::io::Error::from)?;
    let mut w: &UnixStream = stream;
    w.write_all(bytes.get(sent..).unwrap_or(&[]))
}

/// Receives one message and the descriptors sent with it; `None` at end of stream.
pub fn recv(stream: &UnixStream) -> std::io::Result<Option<(Msg, Vec<OwnedFd>)>> {
    let mut hdr = [0u8; 4];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < hdr.len() {
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(hdr.get_mut(got..).unwrap_or(&mut []))];
        let r = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        for c in r.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed this descriptor in our table for us
                    // (SCM_RIGHTS); nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if r.bytes == 0 {
            return Ok(None);
        }
        got += r.bytes;
    }
    let len = u32::from_le_bytes(hdr) as usize;
    if len > MAX_MSG {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "message too large",
        ));
    }
    let mut body = vec![0u8; len];
    let mut r: &UnixStream = stream;
    r.read_exact(&mut body)?;
    Ok(Some((Msg::decode(&body)?, fds)))
}
