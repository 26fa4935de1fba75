//! Fuzz a ring session: a mock blkfront queues mostly-valid requests, the BackRing takes,
//! parses and answers them, in any interleaving; a hostile frontend may also scribble on the
//! indices and slots. Nothing may panic; with an honest frontend every request is answered
//! once, in order, with the status validation decided, and the ring never breaks.
#![no_main]

use std::collections::VecDeque;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rbdback::ring::abi::{ring_bytes, SRING_HEADER_SIZE, SRING_REQ_PROD, SRING_RSP_EVENT};
use rbdback::ring::front::{indirect_pages, MockFrontend};
use rbdback::ring::{Abi, BackRing, Limits, Parsed, Response, Segment, Status};
use rbdback::shm::SharedMem;

#[path = "ring_common.rs"]
mod common;
use common::{Encoded, FuzzAbi, FuzzLimits, FuzzRequest};

#[derive(Debug, Arbitrary)]
enum Action {
    Queue(FuzzRequest),
    Push,
    Take(u8),
    Respond(u8),
    Publish,
    FrontTake,
    FinalCheck,
    ScribbleReqProd(u32),
    ScribbleRspEvent(u32),
    ScribbleSlot { idx: u16, bytes: Vec<u8> },
}

#[derive(Debug, Arbitrary)]
struct Input {
    abi: FuzzAbi,
    order: u8,
    limits: FuzzLimits,
    actions: Vec<Action>,
}

fuzz_target!(|input: Input| {
    let abi: Abi = input.abi.into();
    let order = input.order % 5;
    let limits: Limits = input.limits.into();
    let mut buf = vec![0u8; ring_bytes(order)];
    let mem = SharedMem::from_mut_slice(&mut buf);
    let mut front = MockFrontend::new(abi, order).expect("order <= 4");
    let mut back = BackRing::new(abi, order).expect("order <= 4");
    let cap = back.capacity();
    if front.init_shared(&mem).is_err() {
        return; // misaligned allocation: nothing to test
    }

    let mut honest = true;
    let mut back_alive = true;
    // Ids queued by the frontend and not yet answered, in order.
    let mut queued: VecDeque<u64> = VecDeque::new();
    // Responses the backend owes, in the order it took the requests.
    let mut owed: VecDeque<Response> = VecDeque::new();
    let mut expected: VecDeque<Response> = VecDeque::new();
    let mut slots = Vec::new();
    let mut got = Vec::new();
    let valid_pages = indirect_pages(
        &(0..4096u32)
            .map(|g| Segment {
                gref: g,
                first_sect: 0,
                last_sect: 7,
            })
            .collect::<Vec<_>>(),
    );
    let page_refs: Vec<&[u8]> = valid_pages.iter().map(|p| p.as_slice()).collect();

    for action in input.actions.iter().take(2000) {
        match action {
            Action::Queue(r) => {
                let res = match r.encode() {
                    Encoded::Wire(w) => front.queue(&mem, &w),
                    Encoded::Raw(b) => front.queue_raw(&mem, &b),
                };
                if res.is_ok() {
                    // The id the backend will read is whatever the slot says.
                    let enc = match r.encode() {
                        Encoded::Wire(w) => w.encode(abi).to_vec(),
                        Encoded::Raw(b) => b,
                    };
                    queued.push_back(rbdback::ring::RequestSlot::from_bytes(abi, &enc).id());
                } else if honest {
                    assert_eq!(front.free_slots(), 0);
                }
            }
            Action::Push => {
                let _ = front.push_requests(&mem);
            }
            Action::Take(n) if back_alive => {
                slots.clear();
                match back.take_requests(&mem, &mut slots, usize::from(*n)) {
                    Ok(k) => {
                        assert!(k <= usize::from(*n) && k <= cap as usize);
                        for s in &slots {
                            let rsp = match s.parse(&limits) {
                                Ok(Parsed::Ready(r)) => r.response(Status::Okay),
                                Ok(Parsed::NeedsIndirectPages(i)) => {
                                    match i.complete(&page_refs[..i.pages_needed()], &limits) {
                                        Ok(r) => r.response(Status::Okay),
                                        Err(rej) => rej.response(),
                                    }
                                }
                                Err(rej) => rej.response(),
                            };
                            if honest {
                                assert_eq!(Some(rsp.id), queued.pop_front());
                            }
                            owed.push_back(rsp);
                        }
                    }
                    Err(e) => {
                        assert!(!honest, "honest frontend broke the ring: {e}");
                        back_alive = false;
                    }
                }
                assert!(back.outstanding() <= cap);
            }
            Action::Respond(n) if back_alive => {
                for _ in 0..*n {
                    let Some(r) = owed.pop_front() else { break };
                    back.push_response(&mem, &r)
                        .expect("owed responses have slots");
                    expected.push_back(r);
                }
            }
            Action::Publish if back_alive => {
                let _ = back.publish_responses(&mem);
            }
            Action::FinalCheck if back_alive && back.final_check_for_requests(&mem).is_err() => {
                assert!(!honest);
                back_alive = false;
            }
            Action::FrontTake => {
                got.clear();
                match front.take_responses(&mem, &mut got) {
                    Ok(_) if honest => {
                        for r in &got {
                            assert_eq!(Some(*r), expected.pop_front());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => assert!(!honest, "honest ring gave bad responses: {e}"),
                }
            }
            Action::ScribbleReqProd(v) => {
                honest = false;
                let _ = mem.store_u32(SRING_REQ_PROD, *v);
            }
            Action::ScribbleRspEvent(v) => {
                honest = false;
                let _ = mem.store_u32(SRING_RSP_EVENT, *v);
            }
            Action::ScribbleSlot { idx, bytes } => {
                honest = false;
                let off = SRING_HEADER_SIZE + usize::from(*idx % cap as u16) * abi.slot_size();
                let n = bytes.len().min(abi.slot_size());
                let _ = mem.write(off, &bytes[..n]);
            }
            _ => {}
        }
    }
});
