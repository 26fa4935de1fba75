//! The whole backend over the simulated Xen against the real local Ceph cluster: a verified
//! workload whose result `rbd export` must equal, online resize, and named errors for a
//! missing image while the guest's other disk keeps working.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbdback::device::testfront::{
    run_verified, spawn_serve, toolstack_attach, toolstack_detach, AttachSpec, SimBlkfront,
};
use rbdback::device::vbd::Options;
use rbdback::rados::testing::cluster;
use rbdback::ring::Status;
use rbdback::xen::sim::SimXen;
use rbdback::xen::Platform;

const T: Duration = Duration::from_secs(60);
const GUEST: u16 = 9;

fn start(
    xen: &Arc<SimXen>,
) -> (
    mpsc::Sender<()>,
    std::thread::JoinHandle<Result<rbdback::device::backend::ServeEnd, rbdback::xen::XenError>>,
) {
    start_with(xen, false)
}

fn start_with(
    xen: &Arc<SimXen>,
    exit_when_empty: bool,
) -> (
    mpsc::Sender<()>,
    std::thread::JoinHandle<Result<rbdback::device::backend::ServeEnd, rbdback::xen::XenError>>,
) {
    let options = Options {
        resize_poll: Duration::from_millis(300),
        open_report_after: Duration::from_secs(1),
        ..Options::default()
    };
    spawn_serve(xen, GUEST, exit_when_empty, options)
}

fn params(image: &str) -> String {
    format!("rbd:rbd/{image}:conf={}", cluster().conf.display())
}

/// A disk whose client receives every OSD message up to `max_s` seconds late: Ceph's own
/// fault injection (`ms_inject_delay_*`, passed through `params` to librados), standing in
/// for OSDs that answer late or not at all (inactive placement groups) without touching the
/// cluster the other tests share.
fn slow_params(image: &str, max_s: u32) -> String {
    format!(
        "{}:ms_inject_delay_type=osd:ms_inject_delay_probability=1:ms_inject_delay_max={max_s}",
        params(image)
    )
}

fn wait_node(xs: &rbdback::xen::xenstore::Xenstore, path: &str, what: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        if let Some(v) = xs.read(path).unwrap() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} ({path}) never written");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn slow_open_is_reported_then_cleared_when_the_disk_connects() {
    let c = cluster();
    let image = c.create_image("dev-slowopen", 8, None);
    let xen = SimXen::start().unwrap();
    let (stop, server) = start(&xen);
    let dom0 = xen.platform().xenstore().unwrap();
    let spec = AttachSpec::new(&slow_params(&image, 1));
    let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
    let err_node = format!(
        "/local/domain/0/error/backend/vbd/{GUEST}/{}/error",
        spec.devid
    );
    // opening takes a dozen OSD round trips, each up to 1 s late: reported after 1 s
    let msg = wait_node(&dom0, &err_node, "the waiting report");
    assert!(
        msg.contains("no answer from the cluster") && msg.contains("still trying"),
        "{msg}"
    );
    assert!(msg.contains(&format!("rbd/{image}")), "{msg}");
    assert_ne!(
        dom0.read(&format!("{be}/state")).unwrap().as_deref(),
        Some("4")
    );
    // ... and the disk connects once the open is through, the report gone
    let mut f = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
    assert_eq!(dom0.read(&err_node).unwrap(), None);
    assert_eq!(f.write_sync(0, 8, 0, &[7u8; 4096]).unwrap(), Status::Okay);
    f.close(T).unwrap();
    let _ = stop.send(());
    server.join().unwrap().unwrap();
}

#[test]
fn disk_stuck_opening_can_be_detached_while_the_other_works() {
    let c = cluster();
    let stuck = c.create_image("dev-stuck", 8, None);
    let good = c.create_image("dev-good", 8, None);
    let xen = SimXen::start().unwrap();
    // serve ends by itself once no disk is left: only if the stuck one lets go too
    let (_stop, server) = start_with(&xen, true);
    let dom0 = xen.platform().xenstore().unwrap();
    let gspec = AttachSpec::new(&params(&good));
    let (gbe, gfe) = toolstack_attach(&dom0, 0, GUEST, &gspec).unwrap();
    let mut f = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &gbe, &gfe, &gspec, T).unwrap();
    let mut sspec = AttachSpec::new(&slow_params(&stuck, 600));
    sspec.devid = 51728;
    let (sbe, _) = toolstack_attach(&dom0, 0, GUEST, &sspec).unwrap();
    let err_node = format!("/local/domain/0/error/backend/vbd/{GUEST}/51728/error");
    let msg = wait_node(&dom0, &err_node, "the waiting report");
    assert!(msg.contains("still trying"), "{msg}");
    // the guest's other disk is unaffected
    assert_eq!(f.write_sync(0, 0, 0, &[1u8; 4096]).unwrap(), Status::Okay);
    let (st, back) = f.read_sync(0, 0, 1, 4096).unwrap();
    assert_eq!((st, back), (Status::Okay, vec![1u8; 4096]));
    // the toolstack gives up on the stuck disk: the VBD lets go without waiting for the open
    toolstack_detach(&dom0, &sbe).unwrap();
    let deadline = Instant::now() + T;
    while dom0.read(&err_node).unwrap().is_some() {
        assert!(Instant::now() < deadline, "the stuck VBD never let go");
        std::thread::sleep(Duration::from_millis(50));
    }
    f.close(T).unwrap();
    toolstack_detach(&dom0, &gbe).unwrap();
    let deadline = Instant::now() + T;
    while !server.is_finished() {
        assert!(Instant::now() < deadline, "serve still has a VBD running");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.join().unwrap().unwrap();
}

#[test]
fn verified_workload_lands_in_ceph() {
    let c = cluster();
    let image = c.create_image("dev-verify", 32, None);
    let xen = SimXen::start().unwrap();
    let (stop, server) = start(&xen);
    let dom0 = xen.platform().xenstore().unwrap();
    let mut spec = AttachSpec::new(&params(&image));
    spec.queues = 2;
    spec.ring_order = 1;
    spec.data_pages = 512;
    let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
    let mut f = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
    assert_eq!(f.sectors, 32 << 11);
    let span = 16 << 11; // first 16 MiB
    let r = run_verified(&mut f, 3000, 16, 60, span, 42, |_, _| {}).unwrap();
    assert_eq!((r.errors, r.mismatches), (0, 0));
    assert!(r.reads_checked > 0);
    f.close(T).unwrap();
    toolstack_detach(&dom0, &be).unwrap();
    let _ = stop.send(());
    server.join().unwrap().unwrap();
    let export = c.export(&image);
    let bad = r.diff_image(&export, span / 8);
    assert!(
        bad.is_empty(),
        "{} blocks differ from what the guest wrote, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

#[test]
fn online_resize_reaches_the_frontend() {
    let c = cluster();
    let image = c.create_image("dev-resize", 8, None);
    let xen = SimXen::start().unwrap();
    let (stop, server) = start(&xen);
    let dom0 = xen.platform().xenstore().unwrap();
    let spec = AttachSpec::new(&params(&image));
    let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
    let mut f = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
    assert_eq!(f.sectors, 8 << 11);
    c.rbd(&[
        "resize",
        "--no-progress",
        "--size",
        "16M",
        &format!("rbd/{image}"),
    ]);
    let deadline = Instant::now() + T;
    let mut sectors = 0u64;
    while Instant::now() < deadline {
        sectors = dom0
            .read(&format!("{be}/sectors"))
            .unwrap()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if sectors == 16 << 11 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sectors, 16 << 11, "backend published the new size");
    // the new space is usable
    let data = vec![0x5a; 4096];
    assert_eq!(
        f.write_sync(0, (12 << 11) as u64, 0, &data).unwrap(),
        Status::Okay
    );
    let (st, back) = f.read_sync(0, (12 << 11) as u64, 1, 4096).unwrap();
    assert_eq!(st, Status::Okay);
    assert_eq!(back, data);
    f.close(T).unwrap();
    let _ = stop.send(());
    server.join().unwrap().unwrap();
}

#[test]
fn missing_image_is_reported_and_the_other_disk_works() {
    let c = cluster();
    let image = c.create_image("dev-ok", 8, None);
    let xen = SimXen::start().unwrap();
    let (stop, server) = start(&xen);
    let dom0 = xen.platform().xenstore().unwrap();
    let good = AttachSpec::new(&params(&image));
    let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &good).unwrap();
    let mut f = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &good, T).unwrap();
    let mut bad = AttachSpec::new(&params("no-such-image"));
    bad.devid = 51728;
    let (bbe, _) = toolstack_attach(&dom0, 0, GUEST, &bad).unwrap();
    let err_node = format!("/local/domain/0/error/backend/vbd/{GUEST}/51728/error");
    let msg = wait_node(&dom0, &err_node, "the error node");
    assert!(msg.contains("no-such-image does not exist"), "{msg}");
    // InitWait, for the toolstack's hotplug script to report it (tests/failed_attach.rs)
    assert_eq!(
        dom0.read(&format!("{bbe}/state")).unwrap().as_deref(),
        Some("2")
    );
    assert_eq!(
        dom0.read(&format!("{bbe}/rbdback-image"))
            .unwrap()
            .as_deref(),
        Some("failed")
    );
    assert_eq!(f.write_sync(0, 0, 0, &[1u8; 4096]).unwrap(), Status::Okay);
    let _ = stop.send(());
    server.join().unwrap().unwrap();
}
