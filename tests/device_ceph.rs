//! The whole backend over the simulated Xen against the real local Ceph cluster: a verified
//! workload whose result `rbd export` must equal, online resize, and named errors for a
//! missing image while the guest's other disk keeps working.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbdback::device::backend::{serve, ServeConfig};
use rbdback::device::testfront::{
    run_verified, toolstack_attach, toolstack_detach, AttachSpec, SimBlkfront,
};
use rbdback::device::vbd::{Options, RadosOpener};
use rbdback::rados::testing::cluster;
use rbdback::ring::Status;
use rbdback::xen::sim::SimXen;
use rbdback::xen::Platform;

const T: Duration = Duration::from_secs(60);
const GUEST: u16 = 9;

fn start(xen: &Arc<SimXen>) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let platform = Arc::new(xen.platform());
    let cfg = ServeConfig {
        kind: "vbd".into(),
        backend_domid: 0,
        domid: GUEST,
        exit_when_empty: false,
        options: Options {
            resize_poll: Duration::from_millis(300),
            ..Options::default()
        },
    };
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || serve(platform, Arc::new(RadosOpener), &cfg, &rx).unwrap());
    (tx, h)
}

fn params(image: &str) -> String {
    format!("rbd:rbd/{image}:conf={}", cluster().conf.display())
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
    server.join().unwrap();
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
    server.join().unwrap();
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
    let deadline = Instant::now() + T;
    let mut msg = None;
    while Instant::now() < deadline && msg.is_none() {
        msg = dom0.read(&err_node).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let msg = msg.expect("error node written");
    assert!(msg.contains("no-such-image does not exist"), "{msg}");
    assert_eq!(
        dom0.read(&format!("{bbe}/state")).unwrap().as_deref(),
        Some("5")
    );
    assert_eq!(f.write_sync(0, 0, 0, &[1u8; 4096]).unwrap(), Status::Okay);
    let _ = stop.send(());
    server.join().unwrap();
}
