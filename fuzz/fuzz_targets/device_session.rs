//! Fuzz a device-layer session: a frontend feeds arbitrary (mostly valid) requests through the
//! ring into the production `Dataplane` (validation, indirect descriptor fetch, barriers, the
//! in-flight table, grant copies) backed by the in-memory engine, while it revokes grants,
//! scribbles on indices. No input may panic or touch memory outside what it was given; a
//! broken ring is reported as an error, never a crash.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rbdback::device::dataplane::testing::MemGrants;
use rbdback::device::dataplane::{Dataplane, QueueConfig};
use rbdback::rados::Image;
use rbdback::ring::abi::{ring_bytes, SRING_REQ_PROD};
use rbdback::ring::front::MockFrontend;
use rbdback::ring::{BackRing, Limits, Response};
use rbdback::shm::SharedMem;

#[path = "ring_common.rs"]
mod common;
use common::{Encoded, FuzzAbi, FuzzRequest};

#[derive(Debug, Arbitrary)]
enum Action {
    Submit(Vec<FuzzRequest>),
    Service,
    Revoke(u8),
    ScribbleReqProd(u32),
}

#[derive(Debug, Arbitrary)]
struct Input {
    abi: FuzzAbi,
    order: u8,
    discard: bool,
    read_only: bool,
    fill: u8,
    actions: Vec<Action>,
}

fuzz_target!(|input: Input| {
    let abi = input.abi.into();
    let order = input.order % 3;
    let mut mem = vec![0u8; ring_bytes(order)];
    let shared = SharedMem::from_mut_slice(&mut mem);
    let Ok(mut front) = MockFrontend::new(abi, order) else {
        return;
    };
    front.init_shared(&shared).unwrap();
    let mut limits = Limits::new(2048);
    limits.discard = input.discard;
    limits.read_only = input.read_only;
    let Ok(back) = BackRing::new(abi, order) else {
        return;
    };
    let mut dp = Dataplane::new(
        back,
        limits,
        QueueConfig {
            max_inflight_bytes: 1 << 20,
            ..QueueConfig::default()
        },
    );
    let image = Image::memory(2048 * 512);
    let mut engine = image.queue().unwrap();
    let mut pages = MemGrants {
        pages: (0..64u32).map(|g| (g, vec![input.fill; 4096])).collect(),
        ..MemGrants::default()
    };
    let mut broken = false;
    for action in input.actions.iter().take(64) {
        match action {
            Action::Submit(reqs) => {
                for r in reqs.iter().take(40) {
                    let res = match r.encode() {
                        Encoded::Wire(w) => front.queue(&shared, &w),
                        Encoded::Raw(b) => front.queue_raw(&shared, &b),
                    };
                    if res.is_err() {
                        break;
                    }
                }
                let _ = front.push_requests(&shared);
            }
            Action::Service => {}
            Action::Revoke(g) => {
                pages.revoked.insert(u32::from(*g % 64));
            }
            Action::ScribbleReqProd(v) => {
                let _ = shared.store_u32_release(SRING_REQ_PROD, *v);
            }
        }
        if broken {
            continue;
        }
        match dp.service(&shared, &mut pages, &mut engine) {
            Ok(_) => {}
            Err(_) => broken = true, // reported: the device layer closes the VBD
        }
        // The frontend's own view may be scribbled on too: its errors are not the backend's.
        let mut out: Vec<Response> = Vec::new();
        let _ = front.take_responses(&shared, &mut out);
    }
    // Drain: everything taken gets answered once the engine is idle.
    for _ in 0..4 {
        if broken || dp.service(&shared, &mut pages, &mut engine).is_err() {
            break;
        }
    }
});
