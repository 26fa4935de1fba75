//! Whole ring sessions through the public API: a mock blkfront and a BackRing driven the way
//! the device layer will drive it (take, parse, fetch indirect pages, answer, publish, sleep).

use rbdback::ring::abi::{ring_bytes, MAX_RING_PAGE_ORDER, SRING_REQ_PROD};
use rbdback::ring::front::{indirect_pages, MockFrontend, WireRequest};
use rbdback::ring::request::op;
use rbdback::ring::{
    Abi, BackRing, Limits, Parsed, RequestKind, RequestSlot, RingError, Segment, Status,
};
use rbdback::shm::SharedMem;

const CAP: u64 = 1 << 24;

fn seg(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}

/// A request of kind `i % 8`, with the status a correct backend must answer.
fn request(i: u64, desc_pages: &mut Vec<(u32, Vec<u8>)>) -> (WireRequest, Status) {
    let gref = u32::try_from(i).unwrap();
    match i % 8 {
        0 => (WireRequest::read(i, i * 8, vec![seg(gref)]), Status::Okay),
        1 => (
            WireRequest::write(i, i * 8, (0..11).map(seg).collect()),
            Status::Okay,
        ),
        2 => (WireRequest::flush(i), Status::Okay),
        3 => (
            WireRequest::Discard {
                flag: 0,
                id: i,
                sector: 0,
                nr_sectors: 64,
            },
            Status::Okay,
        ),
        4 => {
            // Indirect, 300 segments: two descriptor pages named by grefs 9000+2i, 9001+2i.
            let segs: Vec<Segment> = (0..300).map(seg).collect();
            let pages = indirect_pages(&segs);
            let g0 = 9000 + 2 * gref;
            for (k, p) in pages.into_iter().enumerate() {
                desc_pages.push((g0 + u32::try_from(k).unwrap(), p));
            }
            (
                WireRequest::Indirect {
                    indirect_op: op::WRITE,
                    nr_segments: 300,
                    id: i,
                    sector: 0,
                    grefs: vec![g0, g0 + 1],
                },
                Status::Okay,
            )
        }
        5 => (WireRequest::read(i, CAP, vec![seg(gref)]), Status::Error),
        6 => (
            WireRequest::rw(op::RESERVED_1, i, 0, vec![]),
            Status::NotSupported,
        ),
        _ => (
            WireRequest::Indirect {
                indirect_op: op::DISCARD,
                nr_segments: 1,
                id: i,
                sector: 0,
                grefs: vec![1],
            },
            Status::Error,
        ),
    }
}

#[test]
fn mixed_session_over_every_abi_and_order_answers_every_request_in_order() {
    let limits = Limits {
        discard: true,
        max_indirect_segments: 512,
        ..Limits::new(CAP)
    };
    for abi in Abi::ALL {
        for order in 0..=MAX_RING_PAGE_ORDER {
            let mut buf = vec![0u8; ring_bytes(order)];
            let mem = SharedMem::from_mut_slice(&mut buf);
            let mut front = MockFrontend::new(abi, order).unwrap();
            let mut back = BackRing::new(abi, order).unwrap();
            front.init_shared(&mem).unwrap();
            let mut expected = std::collections::VecDeque::new();
            let mut desc_pages = Vec::new();
            let mut slots: Vec<RequestSlot> = Vec::new();
            let mut got = Vec::new();
            let total = u64::from(back.capacity()) * 5 / 2;
            let mut next = 0;
            let mut answered = 0;
            while answered < total {
                // The frontend fills what it can, in bursts of up to 7.
                for _ in 0..7 {
                    if next == total || front.free_slots() == 0 {
                        break;
                    }
                    let (req, status) = request(next, &mut desc_pages);
                    front.queue(&mem, &req).unwrap();
                    expected.push_back((next, status));
                    next += 1;
                }
                front.push_requests(&mem).unwrap();
                // The backend serves one wake-up.
                slots.clear();
                back.take_requests(&mem, &mut slots, usize::MAX).unwrap();
                for s in &slots {
                    let rsp = match s.parse(&limits) {
                        Ok(Parsed::Ready(r)) => r.response(Status::Okay),
                        Ok(Parsed::NeedsIndirectPages(ind)) => {
                            let pages: Vec<&[u8]> = ind
                                .page_grefs()
                                .iter()
                                .map(|g| {
                                    desc_pages
                                        .iter()
                                        .find(|(dg, _)| dg == g)
                                        .map(|(_, p)| p.as_slice())
                                        .unwrap()
                                })
                                .collect();
                            let r = ind.complete(&pages, &limits).unwrap();
                            assert!(
                                matches!(&r.kind, RequestKind::Write(t) if t.indirect && t.segments.len() == 300)
                            );
                            r.response(Status::Okay)
                        }
                        Err(rej) => rej.response(),
                    };
                    back.push_response(&mem, &rsp).unwrap();
                }
                back.publish_responses(&mem).unwrap();
                assert!(!back.final_check_for_requests(&mem).unwrap());
                got.clear();
                front.take_responses(&mem, &mut got).unwrap();
                for r in &got {
                    let (id, status) = expected.pop_front().unwrap();
                    assert_eq!((r.id, r.status), (id, status), "{abi} order {order}");
                    answered += 1;
                }
            }
            assert!(expected.is_empty());
            assert_eq!(back.outstanding(), 0);
        }
    }
}

#[test]
fn responses_may_complete_out_of_order() {
    let abi = Abi::X86_32;
    let mut buf = vec![0u8; ring_bytes(0)];
    let mem = SharedMem::from_mut_slice(&mut buf);
    let mut front = MockFrontend::new(abi, 0).unwrap();
    let mut back = BackRing::new(abi, 0).unwrap();
    front.init_shared(&mem).unwrap();
    for i in 0..4 {
        front
            .queue(&mem, &WireRequest::read(i, 0, vec![seg(1)]))
            .unwrap();
    }
    front.push_requests(&mem).unwrap();
    let mut slots = Vec::new();
    back.take_requests(&mem, &mut slots, usize::MAX).unwrap();
    let limits = Limits::new(CAP);
    for s in slots.iter().rev() {
        let Ok(Parsed::Ready(r)) = s.parse(&limits) else {
            panic!()
        };
        back.push_response(&mem, &r.response(Status::Okay)).unwrap();
    }
    assert!(back.publish_responses(&mem).unwrap());
    let mut got = Vec::new();
    front.take_responses(&mem, &mut got).unwrap();
    assert_eq!(
        got.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![3, 2, 1, 0]
    );
}

#[test]
fn backend_reports_a_broken_frontend_and_takes_nothing_more() {
    let abi = Abi::X86_64;
    let mut buf = vec![0u8; ring_bytes(2)];
    let mem = SharedMem::from_mut_slice(&mut buf);
    let mut front = MockFrontend::new(abi, 2).unwrap();
    let mut back = BackRing::new(abi, 2).unwrap();
    front.init_shared(&mem).unwrap();
    front.queue(&mem, &WireRequest::flush(1)).unwrap();
    front.push_requests(&mem).unwrap();
    let mut slots = Vec::new();
    assert_eq!(back.take_requests(&mem, &mut slots, usize::MAX).unwrap(), 1);
    // The guest jumps req_prod far ahead.
    mem.store_u32(SRING_REQ_PROD, 1_000_000).unwrap();
    let err = back
        .take_requests(&mem, &mut slots, usize::MAX)
        .unwrap_err();
    assert!(matches!(err, RingError::BogusReqProd { .. }), "{err}");
    assert!(back.final_check_for_requests(&mem).is_err());
    assert_eq!(slots.len(), 1);
}
