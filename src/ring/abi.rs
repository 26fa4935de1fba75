//! blkif wire layouts for the three ABIs a frontend may speak, and the shared-ring geometry.
//!
//! Owns: byte offsets of every request/response field per ABI, slot sizes, the shared-ring
//! header layout and the ring capacity arithmetic (`__RING_SIZE` in Xen's `io/ring.h`).
//!
//! Trusts: nothing; this is constant data plus pure arithmetic. The offsets are checked against
//! Xen's own headers by `tests/ring_layout.rs` (a C program compiled with gcc).
//!
//! Must never: read shared memory. All multi-byte fields are little-endian (Xen runs
//! little-endian guests only, on x86 and Arm).

use std::fmt;

/// Size of a Xen page, the unit of ring pages, grants and indirect descriptor pages.
pub const PAGE_SIZE: usize = 4096;
/// blkif sectors are always 512 bytes, whatever the disk's `sector-size` (blkif.h, "sectors").
pub const SECTOR_SIZE: u64 = 512;
/// Sectors in one page: the bound for `last_sect` (blkif.h: `first_sect`/`last_sect` index
/// 512-byte sectors inside one 4 KiB frame).
pub const SECTORS_PER_PAGE: u8 = 8;
/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`: segments carried directly in a request slot.
pub const MAX_DIRECT_SEGMENTS: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`: grant refs in an indirect request slot.
pub const MAX_INDIRECT_PAGES: usize = 8;
/// Size of `struct blkif_request_segment` (gref u32, first_sect u8, last_sect u8, 2 pad).
pub const SEGMENT_SIZE: usize = 8;
/// Segments described by one indirect descriptor page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / SEGMENT_SIZE;
/// The largest segment count an indirect request can describe at all (8 pages of 512).
pub const MAX_INDIRECT_SEGMENTS_ABSOLUTE: usize = MAX_INDIRECT_PAGES * SEGMENTS_PER_INDIRECT_PAGE;
/// Largest `ring-page-order` we accept (Linux's `XENBUS_MAX_RING_GRANT_ORDER`): 16 pages.
pub const MAX_RING_PAGE_ORDER: u8 = 4;
/// Bytes of the shared-ring header before the slot array (`struct blkif_sring`: four
/// `RING_IDX`, a 4-byte private union and 44 bytes of padding).
pub const SRING_HEADER_SIZE: usize = 64;
/// Offset of `req_prod` in the shared ring header.
pub const SRING_REQ_PROD: usize = 0;
/// Offset of `req_event` in the shared ring header.
pub const SRING_REQ_EVENT: usize = 4;
/// Offset of `rsp_prod` in the shared ring header.
pub const SRING_RSP_PROD: usize = 8;
/// Offset of `rsp_event` in the shared ring header.
pub const SRING_RSP_EVENT: usize = 12;
/// The largest slot of any ABI (x86_64 / native `struct blkif_request`).
pub const MAX_SLOT_SIZE: usize = 112;

/// The request/response layout a frontend uses, from its xenstore `protocol` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abi {
    /// The host's own layout (`XEN_IO_PROTO_ABI_NATIVE`); on the 64-bit hosts rbdback supports
    /// it is byte-for-byte the x86_64 layout.
    Native,
    /// `x86_32-abi`: 64-bit fields aligned to 4 bytes, `id` at offset 4, 108-byte slots.
    X86_32,
    /// `x86_64-abi`: natural alignment, `id` at offset 8, 112-byte slots.
    X86_64,
}

/// Byte offsets of every field of the blkif structures for one ABI.
///
/// Field names follow blkif.h: `req_*` is `struct blkif_request` (read/write/flush/barrier and
/// the common `operation`/`id`), `discard_*` is `struct blkif_request_discard`, `ind_*` is
/// `struct blkif_request_indirect`, `rsp_*` is `struct blkif_response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `sizeof(union blkif_sring_entry)`: the stride of the slot array.
    pub slot_size: usize,
    /// `sizeof(struct blkif_request)`.
    pub req_size: usize,
    /// Offset of `operation` (all request kinds).
    pub req_operation: usize,
    /// Offset of `nr_segments` (u8) in a read/write request.
    pub req_nr_segments: usize,
    /// Offset of `handle` (u16).
    pub req_handle: usize,
    /// Offset of `id` (u64); the same for every request kind of an ABI.
    pub req_id: usize,
    /// Offset of `sector_number` (u64) in a read/write request.
    pub req_sector: usize,
    /// Offset of `seg[0]` in a read/write request.
    pub req_seg: usize,
    /// `sizeof(struct blkif_request_discard)`.
    pub discard_size: usize,
    /// Offset of `flag` (u8) in a discard request.
    pub discard_flag: usize,
    /// Offset of `sector_number` in a discard request.
    pub discard_sector: usize,
    /// Offset of `nr_sectors` (u64) in a discard request.
    pub discard_nr_sectors: usize,
    /// `sizeof(struct blkif_request_indirect)`.
    pub ind_size: usize,
    /// Offset of `indirect_op` (u8).
    pub ind_op: usize,
    /// Offset of `nr_segments` (u16) in an indirect request.
    pub ind_nr_segments: usize,
    /// Offset of `sector_number` in an indirect request.
    pub ind_sector: usize,
    /// Offset of `handle` in an indirect request.
    pub ind_handle: usize,
    /// Offset of `indirect_grefs[0]` (u32 each).
    pub ind_grefs: usize,
    /// `sizeof(struct blkif_response)`.
    pub rsp_size: usize,
    /// Offset of the response `id` (u64).
    pub rsp_id: usize,
    /// Offset of the response `operation` (u8).
    pub rsp_operation: usize,
    /// Offset of the response `status` (i16).
    pub rsp_status: usize,
}

const X86_64_LAYOUT: Layout = Layout {
    slot_size: 112,
    req_size: 112,
    req_operation: 0,
    req_nr_segments: 1,
    req_handle: 2,
    req_id: 8,
    req_sector: 16,
    req_seg: 24,
    discard_size: 32,
    discard_flag: 1,
    discard_sector: 16,
    discard_nr_sectors: 24,
    ind_size: 64,
    ind_op: 1,
    ind_nr_segments: 2,
    ind_sector: 16,
    ind_handle: 24,
    ind_grefs: 28,
    rsp_size: 16,
    rsp_id: 0,
    rsp_operation: 8,
    rsp_status: 10,
};

const X86_32_LAYOUT: Layout = Layout {
    slot_size: 108,
    req_size: 108,
    req_operation: 0,
    req_nr_segments: 1,
    req_handle: 2,
    req_id: 4,
    req_sector: 12,
    req_seg: 20,
    discard_size: 28,
    discard_flag: 1,
    discard_sector: 12,
    discard_nr_sectors: 20,
    ind_size: 64,
    ind_op: 1,
    ind_nr_segments: 2,
    ind_sector: 12,
    ind_handle: 20,
    ind_grefs: 24,
    rsp_size: 12,
    rsp_id: 0,
    rsp_operation: 8,
    rsp_status: 10,
};

#[cfg(not(target_pointer_width = "64"))]
compile_error!("rbdback supports 64-bit hosts only (the native blkif layout is the x86_64 one)");

impl Abi {
    /// All ABIs, for tests and fuzzers.
    pub const ALL: [Abi; 3] = [Abi::Native, Abi::X86_32, Abi::X86_64];

    /// The ABI named by the frontend's xenstore `protocol` key.
    ///
    /// No key means the frontend speaks the default, which on x86 is `x86_32-abi` (as Linux
    /// blkback's `BLKIF_PROTOCOL_DEFAULT`). Returns `None` for an unknown protocol (the device
    /// layer refuses to connect).
    pub fn from_protocol(protocol: Option<&str>) -> Option<Abi> {
        match protocol {
            None => Some(Abi::X86_32),
            Some("x86_32-abi") => Some(Abi::X86_32),
            Some("x86_64-abi") => Some(Abi::X86_64),
            // Arm (32 and 64 bit) aligns 64-bit fields to 8: the native 64-bit layout.
            Some("arm-abi") => Some(Abi::Native),
            Some(_) => None,
        }
    }

    /// The field offsets of this ABI.
    pub fn layout(self) -> &'static Layout {
        match self {
            Abi::Native | Abi::X86_64 => &X86_64_LAYOUT,
            Abi::X86_32 => &X86_32_LAYOUT,
        }
    }

    /// Stride of the ring's slot array.
    pub fn slot_size(self) -> usize {
        self.layout().slot_size
    }
}

impl fmt::Display for Abi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Abi::Native => "native",
            Abi::X86_32 => "x86_32-abi",
            Abi::X86_64 => "x86_64-abi",
        })
    }
}

/// Largest power of two `<= x` (0 for 0): Xen's `__RD32`.
pub const fn round_down_pow2(x: usize) -> usize {
    if x == 0 {
        0
    } else {
        1usize << (usize::BITS - 1 - x.leading_zeros())
    }
}

/// Bytes of a ring of `2^order` pages.
pub const fn ring_bytes(order: u8) -> usize {
    PAGE_SIZE << order
}

/// Number of slots in a ring of `2^order` pages, exactly as `__RING_SIZE`:
/// `__RD32((pages * 4096 - offsetof(sring, ring)) / sizeof(slot))`.
///
/// Returns `None` for an order above [`MAX_RING_PAGE_ORDER`].
pub fn ring_capacity(abi: Abi, order: u8) -> Option<u32> {
    if order > MAX_RING_PAGE_ORDER {
        return None;
    }
    let slots = round_down_pow2((ring_bytes(order) - SRING_HEADER_SIZE) / abi.slot_size());
    u32::try_from(slots).ok()
}

/// Reads a little-endian u16 at `off` of a host-owned copy (0 if out of range, which the
/// constant layouts never are).
pub(crate) fn get_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

/// Reads a little-endian u32 at `off` of a host-owned copy.
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

/// Reads a little-endian u64 at `off` of a host-owned copy.
pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Reads the byte at `off` of a host-owned copy.
pub(crate) fn get_u8(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

/// Writes `v` at `off` of a host-owned buffer (ignored if out of range).
pub(crate) fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_ring_holds_32_requests_for_every_abi() {
        for abi in Abi::ALL {
            assert_eq!(ring_capacity(abi, 0), Some(32), "{abi}");
        }
    }

    #[test]
    fn capacity_doubles_with_each_order_up_to_16_pages() {
        for abi in Abi::ALL {
            for order in 0..=MAX_RING_PAGE_ORDER {
                assert_eq!(
                    ring_capacity(abi, order),
                    Some(32 << order),
                    "{abi} order {order}"
                );
            }
        }
    }

    #[test]
    fn ring_order_above_four_is_rejected() {
        assert_eq!(ring_capacity(Abi::Native, 5), None);
    }

    #[test]
    fn round_down_pow2_matches_rd32() {
        assert_eq!(round_down_pow2(0), 0);
        assert_eq!(round_down_pow2(1), 1);
        assert_eq!(round_down_pow2(36), 32);
        assert_eq!(round_down_pow2(64), 64);
        assert_eq!(round_down_pow2(606), 512);
    }

    #[test]
    fn protocol_names_map_to_abis_with_x86_32_default() {
        assert_eq!(Abi::from_protocol(None), Some(Abi::X86_32));
        assert_eq!(Abi::from_protocol(Some("x86_64-abi")), Some(Abi::X86_64));
        assert_eq!(Abi::from_protocol(Some("x86_32-abi")), Some(Abi::X86_32));
        assert_eq!(Abi::from_protocol(Some("arm-abi")), Some(Abi::Native));
        assert_eq!(Abi::from_protocol(Some("native")), None);
    }
}
