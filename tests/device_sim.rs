//! Whole sessions over the simulated Xen against the in-memory engine: the production
//! backend (`serve` → per-VBD control thread → per-queue dataplane) and a blkfront-like guest.
#![allow(clippy::cast_possible_truncation)] // test patterns truncate on purpose

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rbdback::device::backend::{serve, ServeConfig};
use rbdback::device::testfront::{
    run_verified, toolstack_attach, toolstack_detach, AttachSpec, BackendStates, SimBlkfront,
};
use rbdback::device::vbd::{ImageOpener, Options};
use rbdback::rados::{Image, ImageSpec, MemoryHold, RadosError};
use rbdback::ring::front::WireRequest;
use rbdback::ring::request::op;
use rbdback::ring::{Abi, Status};
use rbdback::xen::sim::SimXen;
use rbdback::xen::xenstore::Xenstore;
use rbdback::xen::Platform;

const T: Duration = Duration::from_secs(20);
const GUEST: u16 = 5;

/// Opens an in-memory image for `rbd:mem/<MiB>`, and keeps the handle that holds back its
/// completions.
#[derive(Default)]
struct MemOpener {
    holds: Mutex<Vec<MemoryHold>>,
}

impl ImageOpener for MemOpener {
    fn open(&self, spec: &ImageSpec) -> Result<Arc<Image>, RadosError> {
        let mib: u64 = spec.image.parse().unwrap_or(16);
        let _ = &spec.pool;
        let (img, hold) = Image::memory_with_hold(mib << 20);
        self.holds.lock().unwrap().push(hold);
        Ok(img)
    }
}

struct Rig {
    xen: Arc<SimXen>,
    dom0: Xenstore,
    opener: Arc<MemOpener>,
    stop: mpsc::Sender<()>,
    server: Option<JoinHandle<()>>,
}

impl Rig {
    fn start() -> Rig {
        Rig::start_with(None)
    }

    /// With `state`: the rings keep journals there, as `serve` keeps them.
    fn start_with(state: Option<std::path::PathBuf>) -> Rig {
        let xen = SimXen::start().unwrap();
        let platform = Arc::new(xen.platform());
        let dom0 = platform.xenstore().unwrap();
        let cfg = ServeConfig {
            kind: "vbd".into(),
            backend_domid: 0,
            domid: GUEST,
            exit_when_empty: false,
            options: Options {
                max_queues: 4,
                state_dir: state,
                ..Options::default()
            },
        };
        let (stop, rx) = mpsc::channel();
        let opener = Arc::new(MemOpener::default());
        let o = Arc::clone(&opener);
        let server = std::thread::spawn(move || {
            serve(platform, o, &cfg, &rx).unwrap();
        });
        Rig {
            xen,
            dom0,
            opener,
            stop,
            server: Some(server),
        }
    }

    fn attach(&self, spec: &AttachSpec) -> SimBlkfront {
        let (be, fe) = toolstack_attach(&self.dom0, 0, GUEST, spec).unwrap();
        let guest = self.xen.frontend(GUEST).unwrap();
        SimBlkfront::connect(guest, &be, &fe, spec, T).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn handshake_advertises_and_connects() {
    let rig = Rig::start();
    let mut spec = AttachSpec::new("rbd:mem/16");
    spec.ring_order = 2;
    let front = rig.attach(&spec);
    assert_eq!(front.sectors, 16 << 11);
    assert_eq!(front.max_indirect, 256);
    let be = &front.be;
    let read = |n: &str| rig.dom0.read(&format!("{be}/{n}")).unwrap();
    assert_eq!(read("state").as_deref(), Some("4"));
    assert_eq!(read("max-ring-page-order").as_deref(), Some("4"));
    assert_eq!(read("feature-flush-cache").as_deref(), Some("1"));
    assert_eq!(read("sector-size").as_deref(), Some("512"));
    assert_eq!(read("info").as_deref(), Some("0"));
}

#[test]
fn every_abi_and_order_moves_data() {
    let rig = Rig::start();
    for (i, (abi, order)) in [(Abi::X86_64, 0), (Abi::X86_32, 1), (Abi::Native, 4)]
        .into_iter()
        .enumerate()
    {
        let mut spec = AttachSpec::new("rbd:mem/8");
        spec.devid = 51712 + 16 * i as u32;
        spec.abi = abi;
        spec.ring_order = order;
        spec.persistent = i % 2 == 0; // grant copy on the middle disk
        let mut f = rig.attach(&spec);
        let data = pattern(8192, i as u8);
        assert_eq!(f.write_sync(0, 64, 0, &data).unwrap(), Status::Okay);
        let (st, back) = f.read_sync(0, 64, 4, 8192).unwrap();
        assert_eq!(st, Status::Okay);
        assert_eq!(back, data, "{abi:?} order {order}");
    }
}

#[test]
fn indirect_requests_move_a_megabyte() {
    let rig = Rig::start();
    let mut spec = AttachSpec::new("rbd:mem/16");
    spec.data_pages = 264; // 256 data pages + room for the descriptor pages at the end
    let mut f = rig.attach(&spec);
    let data = pattern(256 * 4096, 3);
    assert_eq!(f.write_sync(0, 0, 0, &data).unwrap(), Status::Okay);
    let (st, back) = f.read_sync(0, 0, 0, data.len()).unwrap();
    assert_eq!(st, Status::Okay);
    assert!(back == data, "1 MiB indirect round trip differs");
}

#[test]
fn multi_queue_verified_workload() {
    let rig = Rig::start();
    let mut spec = AttachSpec::new("rbd:mem/32");
    spec.queues = 3;
    spec.ring_order = 1;
    spec.data_pages = 512;
    let mut f = rig.attach(&spec);
    assert_eq!(f.queue_count(), 3);
    let r = run_verified(&mut f, 3000, 16, 50, 32 << 11, 7, |_, _| {}).unwrap();
    assert_eq!(r.completed, 3000);
    assert_eq!((r.errors, r.mismatches), (0, 0));
}

#[test]
fn flush_barrier_and_discard() {
    let rig = Rig::start();
    let mut f = rig.attach(&AttachSpec::new("rbd:mem/8"));
    assert!(f.discard);
    let data = pattern(4096, 9);
    assert_eq!(f.write_sync(0, 8, 0, &data).unwrap(), Status::Okay);
    let id = f.next_id();
    assert_eq!(f.one(0, WireRequest::flush(id)).unwrap(), Status::Okay);
    let id = f.next_id();
    let segs = f.segments(0, 1, 4096);
    assert_eq!(
        f.one(0, WireRequest::rw(op::WRITE_BARRIER, id, 16, segs))
            .unwrap(),
        Status::Okay
    );
    let id = f.next_id();
    let st = f
        .one(
            0,
            WireRequest::Discard {
                flag: 0,
                id,
                sector: 8,
                nr_sectors: 8,
            },
        )
        .unwrap();
    assert_eq!(st, Status::Okay);
    let (_, back) = f.read_sync(0, 8, 1, 4096).unwrap();
    assert!(back.iter().all(|&b| b == 0), "discarded range reads zeros");
}

#[test]
fn read_only_disk_refuses_writes() {
    let rig = Rig::start();
    let mut spec = AttachSpec::new("rbd:mem/8");
    spec.mode = "r".into();
    let mut f = rig.attach(&spec);
    assert_eq!(f.info & 4, 4, "VDISK_READONLY");
    assert_eq!(
        f.write_sync(0, 0, 0, &pattern(4096, 1)).unwrap(),
        Status::Error
    );
    let (st, _) = f.read_sync(0, 0, 0, 4096).unwrap();
    assert_eq!(st, Status::Okay);
}

#[test]
fn malformed_requests_get_errors_and_the_ring_goes_on() {
    let rig = Rig::start();
    let mut f = rig.attach(&AttachSpec::new("rbd:mem/8"));
    let id = f.next_id();
    let bad = WireRequest::read(
        id,
        0,
        vec![rbdback::ring::Segment {
            gref: f.data_ref(0),
            first_sect: 6,
            last_sect: 2,
        }],
    );
    assert_eq!(f.one(0, bad).unwrap(), Status::Error);
    let id = f.next_id();
    assert_eq!(
        f.one(0, WireRequest::rw(42, id, 0, Vec::new())).unwrap(),
        Status::NotSupported
    );
    let id = f.next_id();
    let beyond = WireRequest::read(id, 16 << 11, f.segments(0, 1, 4096));
    assert_eq!(f.one(0, beyond).unwrap(), Status::Error);
    // a revoked grant fails only its request
    let gref = f.data_ref(3);
    f.domain().revoke(gref).unwrap();
    let id = f.next_id();
    assert_eq!(
        f.one(0, WireRequest::read(id, 0, f.segments(3, 1, 4096)))
            .unwrap(),
        Status::Error
    );
    assert_eq!(
        f.write_sync(0, 0, 0, &pattern(4096, 2)).unwrap(),
        Status::Okay
    );
}

#[test]
fn reconnect_after_close_serves_again() {
    let rig = Rig::start();
    let spec = AttachSpec::new("rbd:mem/8");
    let mut f = rig.attach(&spec);
    let data = pattern(4096, 5);
    assert_eq!(f.write_sync(0, 0, 0, &data).unwrap(), Status::Okay);
    f.close(T).unwrap();
    // The guest reboots: its frontend starts over on the same device.
    let fe = f.fe.clone();
    let be = f.be.clone();
    drop(f);
    let guest = rig.xen.frontend(GUEST).unwrap();
    guest
        .xenstore()
        .unwrap()
        .write(&format!("{fe}/state"), "1")
        .unwrap();
    let mut f = SimBlkfront::connect(guest, &be, &fe, &spec, T).unwrap();
    let (st, back) = f.read_sync(0, 0, 0, 4096).unwrap();
    assert_eq!(st, Status::Okay);
    assert_eq!(back, data, "data survives the reconnect");
}

#[test]
fn bad_params_are_reported_and_other_disks_keep_working() {
    let rig = Rig::start();
    let mut good = rig.attach(&AttachSpec::new("rbd:mem/8"));
    let mut bad = AttachSpec::new("rbd:onlypool");
    bad.devid = 51728;
    let (be, _fe) = toolstack_attach(&rig.dom0, 0, GUEST, &bad).unwrap();
    let err = format!("/local/domain/0/error/backend/vbd/{GUEST}/51728/error");
    let mut msg = None;
    for _ in 0..100 {
        msg = rig.dom0.read(&err).unwrap();
        if msg.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let msg = msg.expect("error node written");
    assert!(
        msg.contains("pool/image") || msg.contains("params"),
        "{msg}"
    );
    // InitWait, for the toolstack's hotplug script to report it (tests/failed_attach.rs)
    assert_eq!(
        rig.dom0.read(&format!("{be}/state")).unwrap().as_deref(),
        Some("2")
    );
    assert_eq!(
        good.write_sync(0, 0, 0, &pattern(4096, 8)).unwrap(),
        Status::Okay
    );
}

#[test]
fn broken_frontend_gets_its_vbd_closed() {
    let rig = Rig::start();
    let f = rig.attach(&AttachSpec::new("rbd:mem/8"));
    // Publish a req_prod far beyond the ring: a broken (or hostile) frontend.
    let ring = f.ring_mem(0);
    ring.store_u32_release(0, 1_000_000).unwrap();
    f.domain().notify(f.port(0)).unwrap();
    let be = f.be.clone();
    let mut state = None;
    for _ in 0..100 {
        state = rig.dom0.read(&format!("{be}/state")).unwrap();
        if state.as_deref() == Some("5") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(state.as_deref(), Some("5"), "backend closing");
    let err = rig
        .dom0
        .read(&format!(
            "/local/domain/0/error/backend/vbd/{GUEST}/51712/error"
        ))
        .unwrap()
        .unwrap_or_default();
    assert!(
        err.contains("ring protocol") || err.contains("queue"),
        "{err}"
    );
}

/// issue 18: a frontend breaks its ring while requests are in flight. The backend answers
/// every one of them with an error (the guest fails the I/O instead of hanging), closes the
/// VBD once, and never reconnects while the frontend's state still says Connected (the
/// sequence that drove Linux blkfront into BUG()); later completions answer nothing twice;
/// only a frontend that starts over gets InitWait again.
#[test]
fn a_broken_ring_answers_its_requests_and_is_closed_once() {
    let state = std::env::temp_dir().join(format!("rbdback-broken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let rig = Rig::start_with(Some(state.clone()));
    let mut f = rig.attach(&AttachSpec::new("rbd:mem/8"));
    assert_eq!(journals(&state), 1, "the ring keeps a journal");
    let hold = rig.opener.holds.lock().unwrap().last().cloned().unwrap();
    let states = BackendStates::watch(f.domain(), &f.be, &f.fe).unwrap();
    hold.hold();
    let ids: Vec<u64> = (0..4).map(|_| f.next_id()).collect();
    let reqs: Vec<WireRequest> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| WireRequest::read(id, i as u64 * 8, f.segments(i, 1, 4096)))
        .collect();
    f.submit(0, &reqs).unwrap();
    let deadline = std::time::Instant::now() + T;
    while hold.held() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "requests never reached the engine"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Publish a req_prod far beyond the ring: a broken (or hostile) frontend.
    let ring = f.ring_mem(0);
    let rsp_prod = ring.load_u32(4).unwrap();
    ring.store_u32_release(0, rsp_prod + 1000).unwrap();
    f.domain().notify(f.port(0)).unwrap();
    let mut got = Vec::new();
    while got.len() < 4 && std::time::Instant::now() < deadline {
        got.extend(f.responses(0, Duration::from_millis(100)).unwrap());
    }
    let mut answered: Vec<(u64, Status)> = got.iter().map(|r| (r.id, r.status)).collect();
    answered.sort_unstable_by_key(|a| a.0);
    assert_eq!(
        answered,
        ids.iter().map(|&i| (i, Status::Error)).collect::<Vec<_>>(),
        "every request in flight is answered, with an error"
    );
    let be_path = format!("{}/state", f.be);
    let be_state = |rig: &Rig| rig.dom0.read(&be_path).unwrap();
    while be_state(&rig).as_deref() != Some("5") {
        assert!(std::time::Instant::now() < deadline, "backend never closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // every request is answered: its journal is gone, while the engine still holds them
    // (the next connection's journal at the same path is never the old ring's)
    assert_eq!(journals(&state), 0, "the broken ring's journal");
    // the frontend has not reacted yet: its state still says Connected
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(be_state(&rig).as_deref(), Some("5"), "{:?}", states.seen());
    // the engine finishes late: nothing more is answered
    hold.release();
    assert!(f
        .responses(0, Duration::from_millis(500))
        .unwrap()
        .is_empty());
    // Linux blkfront closes (blkfront_closing), and later starts over
    let fe_state = format!("{}/state", f.fe);
    let xs = f.xenstore();
    xs.write(&fe_state, "6").unwrap();
    while be_state(&rig).as_deref() != Some("6") {
        assert!(
            std::time::Instant::now() < deadline,
            "backend never followed to Closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    xs.write(&fe_state, "1").unwrap();
    while be_state(&rig).as_deref() != Some("2") {
        assert!(
            std::time::Instant::now() < deadline,
            "no InitWait after the frontend started over"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let seen: Vec<u32> = states.seen().iter().map(|(b, _)| b.as_u32()).collect();
    assert_eq!(seen, vec![4, 5, 6, 2], "backend states from the watch on");
    assert_eq!(states.violations(), Vec::<String>::new());
    drop(rig);
    let _ = std::fs::remove_dir_all(&state);
}

/// Ring journals (`q<N>` files) under a state directory.
fn journals(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                journals(&p)
            } else {
                usize::from(e.file_name().to_string_lossy().starts_with('q'))
            }
        })
        .sum()
}

#[test]
fn detach_removes_the_device() {
    let rig = Rig::start();
    let mut f = rig.attach(&AttachSpec::new("rbd:mem/8"));
    toolstack_detach(&rig.dom0, &f.be).unwrap();
    f.close(T).unwrap();
    assert_eq!(
        rig.dom0
            .read(&format!("{}/state", f.be))
            .unwrap()
            .as_deref(),
        Some("6")
    );
}

/// A frontend that asks for more than was advertised, or names grants it never gave.
fn connect_raw(rig: &Rig, devid: u32, nodes: &[(&str, &str)]) -> (String, String) {
    let mut spec = AttachSpec::new("rbd:mem/8");
    spec.devid = devid;
    let (be, fe) = toolstack_attach(&rig.dom0, 0, GUEST, &spec).unwrap();
    let guest = rig.xen.frontend(GUEST).unwrap();
    let xs = guest.xenstore().unwrap();
    let deadline = std::time::Instant::now() + T;
    while rig.dom0.read(&format!("{be}/state")).unwrap().as_deref() != Some("2") {
        assert!(
            std::time::Instant::now() < deadline,
            "backend never reached InitWait"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let port = guest.alloc_unbound(0).unwrap();
    for (k, v) in nodes {
        let v = v.replace("PORT", &port.to_string());
        xs.write(&format!("{fe}/{k}"), &v).unwrap();
    }
    xs.write(&format!("{fe}/state"), "3").unwrap();
    let mut err = None;
    while std::time::Instant::now() < deadline {
        err = rig
            .dom0
            .read(&format!(
                "/local/domain/0/error/backend/vbd/{GUEST}/{devid}/error"
            ))
            .unwrap();
        if err.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let state = rig
        .dom0
        .read(&format!("{be}/state"))
        .unwrap()
        .unwrap_or_default();
    (err.expect("error node written"), state)
}

#[test]
fn absurd_ring_order_queue_count_or_ring_refs_close_only_that_vbd() {
    let rig = Rig::start();
    let mut good = rig.attach(&AttachSpec::new("rbd:mem/8"));
    let (e, st) = connect_raw(
        &rig,
        51728,
        &[
            ("ring-page-order", "9"),
            ("ring-ref0", "1"),
            ("event-channel", "PORT"),
        ],
    );
    assert!(e.contains("ring-page-order 9"), "{e}");
    assert_eq!(st, "5");
    let (e, st) = connect_raw(&rig, 51744, &[("multi-queue-num-queues", "64")]);
    assert!(e.contains("multi-queue-num-queues 64"), "{e}");
    assert_eq!(st, "5");
    // queue 0 fine, queue 1 names a grant that does not exist: nothing stays half-connected
    let (e, st) = connect_raw(
        &rig,
        51760,
        &[
            ("multi-queue-num-queues", "2"),
            ("queue-0/ring-ref", "4000"),
            ("queue-0/event-channel", "PORT"),
            ("queue-1/ring-ref", "4001"),
            ("queue-1/event-channel", "PORT"),
        ],
    );
    assert!(
        e.contains("grant 4000") || e.contains("connect the rings"),
        "{e}"
    );
    assert_eq!(st, "5");
    assert_eq!(
        good.write_sync(0, 0, 0, &pattern(4096, 3)).unwrap(),
        Status::Okay,
        "the guest's other disk keeps working"
    );
}

/// A frontend that floods its event channel with notifications that carry no request (XSA-332)
/// is rate limited, not served at full spin, and its disk keeps working.
#[test]
fn an_event_channel_flood_is_survived() {
    let rig = Rig::start();
    let mut f = rig.attach(&AttachSpec::new("rbd:mem/8"));
    let port = f.port(0);
    let t = std::time::Instant::now();
    let mut sent = 0u32;
    while t.elapsed() < std::time::Duration::from_millis(1500) {
        f.domain().notify(port).unwrap();
        sent += 1;
    }
    assert!(sent > 10_000, "the flood was a flood: {sent}");
    let data = pattern(4096, 9);
    assert_eq!(f.write_sync(0, 8, 0, &data).unwrap(), Status::Okay);
    let (st, back) = f.read_sync(0, 8, 0, 4096).unwrap();
    assert_eq!((st, back == data), (Status::Okay, true));
}
