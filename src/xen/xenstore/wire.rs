//! The `xs_wire.h` message format: a 16-byte header (`type`, `req_id`, `tx_id`, `len`, host
//! byte order) followed by `len` payload bytes, at most [`PAYLOAD_MAX`].
//!
//! Owns: encoding requests and decoding messages from a byte stream, pure (fuzzed).
//! Trusts: nothing in the stream: lengths are bounded before anything is allocated.
//! Must never: panic or allocate more than one header's worth plus [`PAYLOAD_MAX`] per message.

use thiserror::Error;

/// `XENSTORE_PAYLOAD_MAX`.
pub const PAYLOAD_MAX: usize = 4096;
/// Size of `struct xsd_sockmsg`.
pub const HEADER_LEN: usize = 16;

/// Message types (`enum xsd_sockmsg_type`).
#[allow(missing_docs)]
pub mod ty {
    pub const CONTROL: u32 = 0;
    pub const DIRECTORY: u32 = 1;
    pub const READ: u32 = 2;
    pub const GET_PERMS: u32 = 3;
    pub const WATCH: u32 = 4;
    pub const UNWATCH: u32 = 5;
    pub const TRANSACTION_START: u32 = 6;
    pub const TRANSACTION_END: u32 = 7;
    pub const INTRODUCE: u32 = 8;
    pub const RELEASE: u32 = 9;
    pub const GET_DOMAIN_PATH: u32 = 10;
    pub const WRITE: u32 = 11;
    pub const MKDIR: u32 = 12;
    pub const RM: u32 = 13;
    pub const SET_PERMS: u32 = 14;
    pub const WATCH_EVENT: u32 = 15;
    pub const ERROR: u32 = 16;
    pub const IS_DOMAIN_INTRODUCED: u32 = 17;
    pub const RESUME: u32 = 18;
    pub const SET_TARGET: u32 = 19;
    pub const RESET_WATCHES: u32 = 21;
    pub const DIRECTORY_PART: u32 = 22;
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// `type`.
    pub ty: u32,
    /// `req_id` (echoed by the daemon).
    pub req_id: u32,
    /// `tx_id` (0 outside transactions).
    pub tx_id: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A malformed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// `len` exceeds [`PAYLOAD_MAX`].
    #[error("payload length {0} exceeds {PAYLOAD_MAX}")]
    TooLong(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_ne_bytes(w)
}

impl Msg {
    /// A request with `parts` each followed by a NUL (the usual string encoding); `raw_tail`
    /// is appended without a NUL (the value of `XS_WRITE`).
    pub fn request(
        ty: u32,
        req_id: u32,
        tx_id: u32,
        parts: &[&str],
        raw_tail: Option<&[u8]>,
    ) -> Msg {
        let mut payload = Vec::new();
        for p in parts {
            payload.extend_from_slice(p.as_bytes());
            payload.push(0);
        }
        if let Some(t) = raw_tail {
            payload.extend_from_slice(t);
        }
        Msg {
            ty,
            req_id,
            tx_id,
            payload,
        }
    }

    /// The wire bytes; `None` if the payload is too long for xenstore.
    pub fn encode(&self) -> Option<Vec<u8>> {
        if self.payload.len() > PAYLOAD_MAX {
            return None;
        }
        let len = u32::try_from(self.payload.len()).ok()?;
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.ty.to_ne_bytes());
        out.extend_from_slice(&self.req_id.to_ne_bytes());
        out.extend_from_slice(&self.tx_id.to_ne_bytes());
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&self.payload);
        Some(out)
    }

    /// Decodes one message from the front of `buf`: `Ok(Some((msg, consumed)))`, `Ok(None)`
    /// if more bytes are needed, or an error if the header is impossible.
    pub fn decode(buf: &[u8]) -> Result<Option<(Msg, usize)>, WireError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32_at(buf, 12);
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        if n > PAYLOAD_MAX {
            return Err(WireError::TooLong(len));
        }
        let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + n) else {
            return Ok(None);
        };
        Ok(Some((
            Msg {
                ty: u32_at(buf, 0),
                req_id: u32_at(buf, 4),
                tx_id: u32_at(buf, 8),
                payload: payload.to_vec(),
            },
            HEADER_LEN + n,
        )))
    }

    /// The payload split at NULs (a trailing NUL does not make an empty last part).
    pub fn strings(&self) -> Vec<String> {
        let p = self.payload.strip_suffix(&[0]).unwrap_or(&self.payload);
        if p.is_empty() {
            return Vec::new();
        }
        p.split(|&b| b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }

    /// The payload as one string, without a trailing NUL.
    pub fn text(&self) -> String {
        let p = self.payload.strip_suffix(&[0]).unwrap_or(&self.payload);
        String::from_utf8_lossy(p).into_owned()
    }
}

/// A permission entry (`n0`, `r5`, `w5`, `b5`); the first entry of a node is its owner and
/// the access of every domain not listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    /// The domain.
    pub domid: u16,
    /// May read.
    pub read: bool,
    /// May write.
    pub write: bool,
}

impl Perm {
    /// Parses `n0`/`r1`/`w1`/`b1`.
    pub fn parse(s: &str) -> Option<Perm> {
        let mut c = s.chars();
        let (read, write) = match c.next()? {
            'n' => (false, false),
            'r' => (true, false),
            'w' => (false, true),
            'b' => (true, true),
            _ => return None,
        };
        let domid = c.as_str().parse().ok()?;
        Some(Perm { domid, read, write })
    }

    /// The wire form.
    pub fn encode(&self) -> String {
        let c = match (self.read, self.write) {
            (false, false) => 'n',
            (true, false) => 'r',
            (false, true) => 'w',
            (true, true) => 'b',
        };
        format!("{c}{}", self.domid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_partial_input() {
        let m = Msg::request(ty::WRITE, 7, 3, &["/a/b"], Some(b"value"));
        let bytes = m.encode().unwrap();
        assert_eq!(Msg::decode(&bytes[..10]), Ok(None));
        assert_eq!(Msg::decode(&bytes[..bytes.len() - 1]), Ok(None));
        let (d, n) = Msg::decode(&bytes).unwrap().unwrap();
        assert_eq!((d, n), (m, bytes.len()));
    }

    #[test]
    fn oversized_length_is_an_error_not_an_allocation() {
        let mut bytes = Msg::request(ty::READ, 1, 0, &["/x"], None)
            .encode()
            .unwrap();
        bytes[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(Msg::decode(&bytes), Err(WireError::TooLong(u32::MAX)));
    }

    #[test]
    fn strings_split_on_nul() {
        let m = Msg::request(ty::DIRECTORY, 1, 0, &["a", "b", "c"], None);
        assert_eq!(m.strings(), vec!["a", "b", "c"]);
        let empty = Msg::request(ty::DIRECTORY, 1, 0, &[], None);
        assert!(empty.strings().is_empty());
    }

    #[test]
    fn perms_parse_and_encode() {
        for s in ["n0", "r5", "w7", "b65535"] {
            assert_eq!(Perm::parse(s).unwrap().encode(), s);
        }
        assert_eq!(Perm::parse("x1"), None);
        assert_eq!(Perm::parse("r"), None);
        assert_eq!(Perm::parse("r99999"), None);
    }
}
