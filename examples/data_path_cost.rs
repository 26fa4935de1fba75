//! A fixed number of 4 KiB reads at queue depth 32 through the whole device path (simulated
//! guest -> ring -> dataplane -> persistent grants -> in-memory engine and back), for counting
//! what the data path executes per request with a deterministic tool:
//!
//! ```sh
//! cargo build --release --features test-utils --example data_path_cost
//! valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
//!     target/release/examples/data_path_cost 20000
//! ```
//!
//! Two request counts give the instructions per request (the difference over the difference),
//! free of the set-up's; docs/performance.md compares builds with and without the metrics.
//! A second argument `journal` keeps the crash-recovery journal of each ring as `serve` does
//! (in a fresh directory under the system's temporary directory), to count what it costs.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rbdback::device::backend::{serve, ServeConfig};
use rbdback::device::testfront::{run_workload, toolstack_attach, AttachSpec, SimBlkfront};
use rbdback::device::vbd::{ImageOpener, Options};
use rbdback::rados::{Image, ImageSpec, RadosError};
use rbdback::xen::sim::SimXen;
use rbdback::xen::Platform;

struct Mem;
impl ImageOpener for Mem {
    fn open(&self, _: &ImageSpec) -> Result<Arc<Image>, RadosError> {
        Ok(Image::memory(64 << 20))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args().nth(1).map_or(Ok(10_000), |a| a.parse())?;
    let state = match std::env::args().nth(2).as_deref() {
        None => None,
        Some("journal") => {
            let d = std::env::temp_dir().join(format!("rbdback-cost-{}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            Some(d)
        }
        Some(other) => return Err(format!("unknown argument {other} (journal or nothing)").into()),
    };
    let xen = SimXen::start()?;
    let platform = Arc::new(xen.platform());
    let dom0 = platform.xenstore()?;
    let cfg = ServeConfig {
        kind: "vbd".into(),
        backend_domid: 0,
        domid: 4,
        exit_when_empty: false,
        options: Options {
            state_dir: state.clone(),
            ..Options::default()
        },
    };
    let (stop, rx) = mpsc::channel();
    let server = std::thread::spawn(move || serve(platform, Arc::new(Mem), &cfg, &rx));
    let mut spec = AttachSpec::new("rbd:mem/64");
    spec.data_pages = 128;
    let (be, fe) = toolstack_attach(&dom0, 0, 4, &spec)?;
    let mut front =
        SimBlkfront::connect(xen.frontend(4)?, &be, &fe, &spec, Duration::from_secs(60))?;
    let r = run_workload(&mut front, n, 32, 0, 64 << 11, 1, false, |_, _| {})?;
    println!("{} requests, {} errors", r.completed, r.errors);
    let _ = stop.send(());
    let _ = server.join();
    if let Some(d) = state {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}
