//! The device layer's data path over the simulated Xen with the in-memory engine: 4 KiB reads
//! and writes at queue depth 32 through ring → dataplane → grant copy or persistent grants →
//! engine and back, so the two ways of reaching guest data can be compared.
//!
//! `cargo bench --bench device --features test-utils`

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
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

fn rig(persistent: bool) -> (Arc<SimXen>, SimBlkfront, mpsc::Sender<()>) {
    let xen = SimXen::start().expect("sim xen");
    let platform = Arc::new(xen.platform());
    let dom0 = platform.xenstore().expect("xenstore");
    let cfg = ServeConfig {
        kind: "vbd".into(),
        backend_domid: 0,
        domid: 4,
        exit_when_empty: false,
        options: Options::default(),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || serve(platform, Arc::new(Mem), &cfg, &rx));
    let mut spec = AttachSpec::new("rbd:mem/64");
    spec.persistent = persistent;
    spec.data_pages = 128;
    let (be, fe) = toolstack_attach(&dom0, 0, 4, &spec).expect("attach");
    let front = SimBlkfront::connect(
        xen.frontend(4).expect("guest"),
        &be,
        &fe,
        &spec,
        Duration::from_secs(20),
    )
    .expect("connect");
    (xen, front, tx)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("device_4k_qd32");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    for (name, persistent) in [("grant_copy", false), ("persistent", true)] {
        let (_xen, mut front, _stop) = rig(persistent);
        for (op, writes) in [("read", 0), ("write", 100)] {
            g.bench_function(format!("{name}/{op}"), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    let r = run_workload(
                        &mut front,
                        iters.max(64),
                        32,
                        writes,
                        64 << 11,
                        1,
                        false,
                        |_, _| {},
                    )
                    .expect("workload");
                    assert_eq!(r.errors, 0);
                    t.elapsed()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
