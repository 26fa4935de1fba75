//! The index and event protocol under real concurrency: a frontend thread and a backend thread
//! share one ring and only wake each other through the notifications the ring macros ask for
//! (`RING_PUSH_*_AND_CHECK_NOTIFY`, `RING_FINAL_CHECK_FOR_*`). A lost wake-up shows up as a
//! wait that times out; a torn or misordered slot as a wrong id or status.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use rbdback::ring::abi::ring_bytes;
use rbdback::ring::front::{MockFrontend, WireRequest};
use rbdback::ring::{Abi, BackRing, Limits, Parsed, Segment, Status};
use rbdback::shm::SharedMem;

/// A stand-in for an event channel: a counter bumped by `notify`, awaited by `wait_past`.
#[derive(Default)]
struct Event {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Event {
    fn seen(&self) -> u64 {
        *self.count.lock().unwrap()
    }
    fn notify(&self) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_all();
    }
    /// Waits until a notification after `seen` arrives; panics on a lost wake-up.
    fn wait_past(&self, seen: u64, who: &str) {
        let g = self.count.lock().unwrap();
        let (_g, t) = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(20), |c| *c == seen)
            .unwrap();
        assert!(!t.timed_out(), "{who}: lost wake-up");
    }
}

fn run(abi: Abi, order: u8, total: u64) {
    let mut buf = vec![0u8; ring_bytes(order)];
    let mem = SharedMem::from_mut_slice(&mut buf);
    let mut front = MockFrontend::new(abi, order).unwrap();
    let mut back = BackRing::new(abi, order).unwrap();
    front.init_shared(&mem).unwrap();
    let to_back = Event::default();
    let to_front = Event::default();
    let limits = Limits::new(1 << 30);

    std::thread::scope(|s| {
        s.spawn(|| {
            let mut slots = Vec::new();
            let mut answered = 0u64;
            while answered < total {
                let seen = to_back.seen();
                slots.clear();
                let n = back.take_requests(&mem, &mut slots, usize::MAX).unwrap();
                for slot in &slots {
                    let rsp = match slot.parse(&limits) {
                        Ok(Parsed::Ready(r)) => r.response(Status::Okay),
                        other => panic!("unexpected {other:?}"),
                    };
                    back.push_response(&mem, &rsp).unwrap();
                }
                answered += n as u64;
                if back.publish_responses(&mem).unwrap() {
                    to_front.notify();
                }
                if n == 0 && !back.final_check_for_requests(&mem).unwrap() {
                    to_back.wait_past(seen, "backend");
                }
            }
        });
        s.spawn(|| {
            let mut next = 0u64;
            let mut expect = 0u64;
            let mut rsps = Vec::new();
            while expect < total {
                while next < total && front.free_slots() > 0 {
                    let seg = Segment {
                        gref: u32::try_from(next % 1000).unwrap(),
                        first_sect: 0,
                        last_sect: 7,
                    };
                    front
                        .queue(&mem, &WireRequest::read(next, next % 1000, vec![seg]))
                        .unwrap();
                    next += 1;
                }
                if front.push_requests(&mem).unwrap() {
                    to_back.notify();
                }
                let seen = to_front.seen();
                rsps.clear();
                front.take_responses(&mem, &mut rsps).unwrap();
                for r in &rsps {
                    assert_eq!((r.id, r.status), (expect, Status::Okay));
                    expect += 1;
                }
                if rsps.is_empty() && front.in_flight() > 0 {
                    to_front.wait_past(seen, "frontend");
                }
            }
        });
    });
}

#[test]
fn concurrent_frontend_and_backend_never_lose_a_wakeup_one_page() {
    run(Abi::X86_64, 0, 200_000);
}

#[test]
fn concurrent_frontend_and_backend_never_lose_a_wakeup_sixteen_pages_x86_32() {
    run(Abi::X86_32, 4, 200_000);
}
