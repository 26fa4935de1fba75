//! Input shapes shared by the ring fuzz targets: mostly-valid requests so deep paths run.

use arbitrary::Arbitrary;
use rbdback::ring::front::WireRequest;
use rbdback::ring::request::op;
use rbdback::ring::{Abi, Limits, Segment};

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum FuzzAbi {
    Native,
    X86_32,
    X86_64,
}

impl From<FuzzAbi> for Abi {
    fn from(a: FuzzAbi) -> Abi {
        match a {
            FuzzAbi::Native => Abi::Native,
            FuzzAbi::X86_32 => Abi::X86_32,
            FuzzAbi::X86_64 => Abi::X86_64,
        }
    }
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub struct FuzzLimits {
    capacity: u32,
    huge_capacity: bool,
    read_only: bool,
    max_indirect_segments: u16,
    flush: bool,
    barrier: bool,
    discard: bool,
    discard_secure: bool,
}

impl From<FuzzLimits> for Limits {
    fn from(f: FuzzLimits) -> Limits {
        Limits {
            capacity_sectors: if f.huge_capacity {
                u64::MAX
            } else {
                u64::from(f.capacity)
            },
            read_only: f.read_only,
            max_indirect_segments: f.max_indirect_segments,
            flush: f.flush,
            barrier: f.barrier,
            discard: f.discard,
            discard_secure: f.discard_secure,
        }
    }
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub struct FuzzSegment {
    gref: u32,
    first: u8,
    last: u8,
    /// Keep most segments valid (first <= last <= 7).
    raw: bool,
}

impl From<FuzzSegment> for Segment {
    fn from(s: FuzzSegment) -> Segment {
        if s.raw {
            Segment {
                gref: s.gref,
                first_sect: s.first,
                last_sect: s.last,
            }
        } else {
            let a = s.first % 8;
            let b = s.last % 8;
            Segment {
                gref: s.gref,
                first_sect: a.min(b),
                last_sect: a.max(b),
            }
        }
    }
}

#[derive(Debug, Arbitrary, Clone)]
pub enum FuzzRequest {
    Read {
        id: u64,
        sector: u16,
        segs: Vec<FuzzSegment>,
    },
    Write {
        id: u64,
        sector: u16,
        segs: Vec<FuzzSegment>,
    },
    Flush {
        id: u64,
        sector: u16,
        segs: Vec<FuzzSegment>,
    },
    Barrier {
        id: u64,
        sector: u16,
        segs: Vec<FuzzSegment>,
    },
    Discard {
        id: u64,
        flag: u8,
        sector: u64,
        nr_sectors: u64,
    },
    Indirect {
        id: u64,
        write: bool,
        nr_segments: u16,
        sector: u16,
        grefs: [u32; 8],
    },
    Rw {
        operation: u8,
        nr_segments: u8,
        id: u64,
        sector: u64,
        segs: Vec<FuzzSegment>,
    },
    Raw(Vec<u8>),
}

pub enum Encoded {
    Wire(WireRequest),
    Raw(Vec<u8>),
}

fn segs(v: &[FuzzSegment]) -> Vec<Segment> {
    v.iter().take(11).map(|&s| s.into()).collect()
}

impl FuzzRequest {
    pub fn encode(&self) -> Encoded {
        let w = match self {
            FuzzRequest::Read {
                id,
                sector,
                segs: s,
            } => WireRequest::read(*id, u64::from(*sector), segs(s)),
            FuzzRequest::Write {
                id,
                sector,
                segs: s,
            } => WireRequest::write(*id, u64::from(*sector), segs(s)),
            FuzzRequest::Flush {
                id,
                sector,
                segs: s,
            } => WireRequest::rw(op::FLUSH_DISKCACHE, *id, u64::from(*sector), segs(s)),
            FuzzRequest::Barrier {
                id,
                sector,
                segs: s,
            } => WireRequest::rw(op::WRITE_BARRIER, *id, u64::from(*sector), segs(s)),
            FuzzRequest::Discard {
                id,
                flag,
                sector,
                nr_sectors,
            } => WireRequest::Discard {
                flag: *flag,
                id: *id,
                sector: *sector,
                nr_sectors: *nr_sectors,
            },
            FuzzRequest::Indirect {
                id,
                write,
                nr_segments,
                sector,
                grefs,
            } => WireRequest::Indirect {
                indirect_op: if *write { op::WRITE } else { op::READ },
                nr_segments: *nr_segments % 600,
                id: *id,
                sector: u64::from(*sector),
                grefs: grefs.to_vec(),
            },
            FuzzRequest::Rw {
                operation,
                nr_segments,
                id,
                sector,
                segs: s,
            } => WireRequest::Rw {
                operation: *operation,
                nr_segments: *nr_segments,
                handle: 0,
                id: *id,
                sector: *sector,
                segments: segs(s),
            },
            FuzzRequest::Raw(b) => return Encoded::Raw(b.clone()),
        };
        Encoded::Wire(w)
    }
}
