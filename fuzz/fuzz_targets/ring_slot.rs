//! Fuzz one request slot through parse (and indirect completion): no input may panic, and
//! every accepted request must satisfy the validation rules.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rbdback::ring::front::indirect_pages;
use rbdback::ring::request::op;
use rbdback::ring::{Abi, Limits, Parsed, Request, RequestKind, RequestSlot, Status};

#[path = "ring_common.rs"]
mod common;
use common::{Encoded, FuzzAbi, FuzzLimits, FuzzRequest, FuzzSegment};

#[derive(Debug, Arbitrary)]
struct Input {
    abi: FuzzAbi,
    limits: FuzzLimits,
    request: FuzzRequest,
    /// Descriptor pages for an indirect request: structured segments or raw bytes.
    indirect_segments: Vec<FuzzSegment>,
    raw_pages: Option<Vec<Vec<u8>>>,
}

fn check(req: &Request, limits: &Limits, raw_op: u8) {
    if let Some(t) = req.transfer() {
        assert!(!t.segments.is_empty());
        assert!(t.indirect || t.segments.len() <= 11);
        for s in t.segments.iter() {
            assert!(s.first_sect <= s.last_sect && s.last_sect < 8);
            assert!(s.offset_bytes() + s.len_bytes() <= 4096);
        }
        let end = t.sector.checked_add(t.sectors()).expect("validated end");
        assert!(end <= limits.capacity_sectors);
        assert!(t.total_bytes() <= 4096 * 4096);
    }
    if limits.read_only {
        assert!(matches!(req.kind, RequestKind::Read(_)));
    }
    if let RequestKind::Discard(d) = req.kind {
        assert!(limits.discard);
        assert!(d.sector.checked_add(d.nr_sectors).expect("validated") <= limits.capacity_sectors);
        assert!(!d.secure || limits.discard_secure);
    }
    if raw_op != op::INDIRECT {
        assert_eq!(req.operation, raw_op);
    }
}

fuzz_target!(|input: Input| {
    let abi: Abi = input.abi.into();
    let limits: Limits = input.limits.into();
    let bytes = match input.request.encode() {
        Encoded::Wire(w) => w.encode(abi).to_vec(),
        Encoded::Raw(b) => b,
    };
    let slot = RequestSlot::from_bytes(abi, &bytes);
    let raw_op = slot.operation();
    match slot.parse(&limits) {
        Ok(Parsed::Ready(req)) => {
            assert_eq!(req.id, slot.id());
            check(&req, &limits, raw_op);
        }
        Ok(Parsed::NeedsIndirectPages(ind)) => {
            assert_eq!(raw_op, op::INDIRECT);
            assert!(ind.nr_segments >= 1);
            assert!(
                usize::from(ind.nr_segments) <= usize::from(limits.max_indirect_segments).min(4096)
            );
            assert_eq!(ind.page_grefs().len(), ind.pages_needed());
            let pages: Vec<Vec<u8>> = match input.raw_pages {
                Some(p) => p,
                None => {
                    let segs: Vec<_> = input
                        .indirect_segments
                        .iter()
                        .cycle()
                        .take(usize::from(ind.nr_segments))
                        .map(|&s| s.into())
                        .collect();
                    indirect_pages(&segs)
                }
            };
            let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
            match ind.complete(&refs, &limits) {
                Ok(req) => {
                    assert_eq!(
                        req.transfer().map(|t| t.segments.len()),
                        Some(usize::from(ind.nr_segments))
                    );
                    check(&req, &limits, raw_op);
                }
                Err(rej) => {
                    assert_eq!(rej.id, ind.id);
                    assert_ne!(rej.response().status, Status::Okay);
                }
            }
        }
        Err(rej) => {
            assert_eq!(rej.id, slot.id());
            assert_ne!(rej.response().status, Status::Okay);
            let encoded = rej.response().encode(abi);
            assert!(encoded[abi.layout().rsp_size..].iter().all(|&b| b == 0));
        }
    }
});
