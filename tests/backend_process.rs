//! The `rbdback` binary as dom0 runs it, over the simulated Xen hosted by this test process
//! (the backend reaches it through `--sim-dir`, see `rbdback::xen::sim::remote`) and the local
//! Ceph cluster: how `serve` exits, and what a guest sees when it dies.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rbdback::device::testfront::{toolstack_attach, toolstack_detach, AttachSpec, SimBlkfront};
use rbdback::rados::testing::cluster;
use rbdback::xen::sim::SimXen;
use rbdback::xen::xenstore::Xenstore;
use rbdback::xen::Platform;

const T: Duration = Duration::from_secs(60);

fn params(image: &str) -> String {
    format!("rbd:rbd/{image}:conf={}", cluster().conf.display())
}

/// A `rbdback` child process and its log.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(xen: &SimXen, args: &[&str], name: &str) -> Proc {
        let log = std::env::temp_dir().join(format!(
            "rbdback-{name}-{}-{}.log",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rbdback"))
            .args(args)
            .arg("--sim-dir")
            .arg(xen.dir())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(xs: &Xenstore, path: &str, want: &str) {
    let deadline = Instant::now() + T;
    while xs.read(path).unwrap().as_deref() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{path} never became {want} (it is {:?})",
            xs.read(path).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// issue 18.3: `serve` exits cleanly -- status 0, no C++ exception, no signal -- when the
/// guest goes away while its disks are in every state: an open that failed (Closing), one
/// still opening against OSDs that do not answer, one connected, one whose frontend is
/// closing, and one detached before.
#[test]
fn serve_exits_cleanly_with_disks_in_every_state() {
    let c = cluster();
    let xen = SimXen::start().unwrap();
    let dom0 = xen.platform().xenstore().unwrap();
    const GUEST: u16 = 21;
    let good = c.create_image("exit", 16, None);
    let good2 = c.create_image("exit", 16, None);
    let good3 = c.create_image("exit", 16, None);
    let slow = c.create_image("exit", 16, None);
    let mut serve = Proc::spawn(
        &xen,
        &["serve", "--domid", &GUEST.to_string(), "--kind", "vbd"],
        "serve-exit",
    );
    let attach = |devid: u32, params: &str| {
        let mut spec = AttachSpec::new(params);
        spec.devid = devid;
        let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
        (spec, be, fe)
    };
    // connected
    let (spec, be, fe) = attach(51712, &params(&good));
    let mut connected =
        SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
    assert_eq!(
        connected.write_sync(0, 0, 0, &[7u8; 4096]).unwrap(),
        rbdback::ring::Status::Okay
    );
    // open failed
    let (_, bad_be, _) = attach(51728, "rbd:rbd/no-such-image-here");
    wait_for(&dom0, &format!("{bad_be}/state"), "5");
    // frontend closing
    let (spec3, be3, fe3) = attach(51744, &params(&good2));
    let closing =
        SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be3, &fe3, &spec3, T).unwrap();
    closing
        .xenstore()
        .write(&format!("{fe3}/state"), "5")
        .unwrap();
    wait_for(&dom0, &format!("{be3}/state"), "5");
    // detached
    let (spec4, be4, fe4) = attach(51760, &params(&good3));
    let mut detached =
        SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be4, &fe4, &spec4, T).unwrap();
    toolstack_detach(&dom0, &be4).unwrap();
    detached.close(T).unwrap();
    // still opening: every OSD reply held back for up to 10 minutes
    let slow_params = format!(
        "{}:ms_inject_delay_type=osd:ms_inject_delay_probability=1:ms_inject_delay_max=600",
        params(&slow)
    );
    attach(51776, &slow_params);
    // still connecting: a monitor nobody listens on (librados keeps hunting for one)
    attach(
        51792,
        "rbd:rbd/any:mon_host=127.0.0.1\\:9:id=admin:key=AQBHLcdl2Xq0JxAAwgDY1h6nD3pbkEV7mP8bGQ==",
    );
    std::thread::sleep(Duration::from_secs(2));
    // the guest powers off: libxl destroys the domain and removes every device directory
    drop((connected, closing));
    dom0.rm(&format!("/local/domain/{GUEST}/device")).unwrap();
    dom0.rm(&format!("/local/domain/0/backend/vbd/{GUEST}"))
        .unwrap();
    let status = serve.wait(T).expect("serve did not exit");
    let log = serve.log();
    assert!(
        status.success(),
        "serve exited with {status:?}; log:\n{log}"
    );
    assert!(!log.contains("terminate called"), "log:\n{log}");
    assert!(log.contains("no device left"), "log:\n{log}");
}
