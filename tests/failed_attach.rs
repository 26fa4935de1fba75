//! What an operator can get wrong when attaching a disk (issue 12), over the simulated Xen and
//! the local Ceph cluster: every bad configuration ends, within 10 s, in a backend that says
//! why (`error` node, `rbdback-image = failed`) and stays in InitWait -- what libxl waits for
//! before it runs the hotplug script, which reports the reason --, the toolstack's removal
//! takes it to Closed so libxl can delete both directories, the device number can be used
//! again at once, and the guest's other disk runs a verified workload throughout without an
//! error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbdback::device::testfront::{
    spawn_serve, toolstack_attach, AttachSpec, BackendStates, SimBlkfront, Workload,
};
use rbdback::device::vbd::{Options, IMAGE_NODE};
use rbdback::device::xenbus::XenbusState;
use rbdback::rados::testing::cluster;
use rbdback::xen::sim::SimXen;
use rbdback::xen::xenstore::Xenstore;
use rbdback::xen::Platform;

const GUEST: u16 = 41;
const T: Duration = Duration::from_secs(60);
/// Every bad configuration must be named within this long.
const NAMED_WITHIN: Duration = Duration::from_secs(10);

fn conf() -> String {
    cluster().conf.display().to_string()
}

fn read(xs: &Xenstore, p: &str) -> Option<String> {
    xs.read(p).unwrap()
}

/// libxl's removal of a device that failed: `online = 0`, backend `state = 5` unless it is
/// Closed, then it waits (10 s) for the backend to reach Closed and removes both directories.
fn libxl_remove(xs: &Xenstore, be: &str, fe: &str) -> Duration {
    let t0 = Instant::now();
    // one transaction, as libxl__initiate_device_generic_remove does
    xs.transaction(|tx| {
        tx.write(&format!("{be}/online"), "0")?;
        if tx.read(&format!("{be}/state"))?.as_deref() != Some("6") {
            tx.write(&format!("{be}/state"), "5")?;
        }
        Ok(())
    })
    .unwrap();
    while read(xs, &format!("{be}/state")).as_deref() != Some("6") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{be}: the backend never reached Closed after online=0 (libxl gives up after 10 s)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    xs.rm(be).unwrap();
    xs.rm(fe).unwrap();
    took
}

#[test]
fn twenty_bad_configurations_are_named_removed_and_leave_the_other_disk_alone() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let c = cluster();
    let conf = conf();
    let good = c.create_image("good", 64, None);
    let journaling = c.create_image("journal", 8, Some("exclusive-lock,journaling"));
    let plain = c.create_image("plain", 8, None);
    c.rbd(&["snap", "create", &format!("rbd/{plain}@s1")]);
    let pool_id = c.ceph(&["osd", "pool", "ls", "detail", "--format", "json"]);
    assert!(pool_id.contains("\"rbd\""), "{pool_id}");
    let xen = SimXen::start().unwrap();
    let dom0 = xen.platform().xenstore().unwrap();
    let (stop_serve, server) = spawn_serve(&xen, GUEST, false, Options::default());
    let on = |p: &str| format!("{p}:conf={conf}");
    // (params, mode, what the error must name)
    let cases: Vec<(String, &str, &str)> = vec![
        (on("rbd:rbd/no-such-image"), "w", "no-such-image"),
        (on("rbd:no-such-pool/img"), "w", "no-such-pool"),
        (on(&format!("rbd:rbd/{good}:id=nobody")), "w", "nobody"),
        (on("rbd:just-an-image"), "w", "<pool>/<image>"),
        (
            on(&format!("rbd:rbd/{good}:keyring=/nonexistent/keyring")),
            "w",
            "found no keyring (keyring = /nonexistent/keyring)",
        ),
        (on(&format!("rbd:rbd/{good}:bogus_option=1")), "w", "bogus_option"),
        (on(&format!("rbd:rbd/{plain}@no-such-snap")), "r", "no-such-snap"),
        (
            on(&format!("rbd:rbd/{journaling}:engine=direct")),
            "w",
            "journaling",
        ),
        (on(&format!("rbd:rbd/{plain}@s1")), "w", "read-only"),
        (
            on(&format!("rbd:rbd/{good}:mon_host=127.0.0.1\\:9")),
            "w",
            "rados_connect",
        ),
        (
            on(&format!("rbd:rbd/{good}:mon_host=192.0.2.1\\:6789")),
            "w",
            "rados_connect",
        ),
        (
            on("csi:0001-0004-abcd-000000000000fff0-5c1a3c7e-7a29-4e51-9ab1-5a2d1c0b4e11"),
            "w",
            "pool",
        ),
        (on("csi:not-a-volume-handle"), "w", "volume handle"),
        (
            on(&format!(
                "rbd:rbd/{good}:id=admin:key=AQBHLcdl2Xq0JxAAwgDY1h6nD3pbkEV7mP8bGQ=="
            )),
            "w",
            "rados_connect",
        ),
        (
            format!("rbd:rbd/{good}:conf=/nonexistent/ceph.conf"),
            "w",
            "/nonexistent/ceph.conf",
        ),
        (on("rbd:rbd/"), "w", "image"),
        (on("rbd:a/b/c/d"), "w", "more than"),
        (on(&format!("rbd:rbd/{good}:engine=turbo")), "w", "engine"),
        (on(&format!("rbd:rbd/{good}:io_timeout=soon")), "w", "io_timeout"),
        (
            on(&format!(
                "rbd:rbd/{good}:encryption_format=luks2:encryption_passphrase_file=/nonexistent/pass"
            )),
            "w",
            "/nonexistent/pass",
        ),
        (on(&format!("rbd:rbd/no-such-ns/{good}")), "w", "no-such-ns"),
        (on(&format!("rbd:rbd/{good}@")), "w", "snapshot"),
        ("rbd:rbd/img\\".to_owned(), "w", "lone"),
    ];
    assert!(cases.len() >= 20);

    // the guest's good disk, with a verified workload running the whole time
    let mut spec = AttachSpec::new(&on(&format!("rbd:rbd/{good}")));
    spec.devid = 51712;
    let (gbe, gfe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
    let mut front =
        SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &gbe, &gfe, &spec, T).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let worker = std::thread::spawn(move || {
        let w = Workload {
            qd: 4,
            write_pct: 50,
            span_sectors: 16 << 11,
            seed: 12,
            verify: true,
            indirect_every: 0,
            flush_every: 0,
            latencies: false,
        };
        let r = w.run(&mut front, |_| !s2.load(Ordering::Relaxed), |_, _| {});
        (r, front)
    });

    // all the bad disks at once, each with its own device number
    let guest_dom = xen.frontend(GUEST).unwrap();
    let mut attached = Vec::new();
    for (i, (params, mode, _)) in cases.iter().enumerate() {
        let mut s = AttachSpec::new(params);
        s.devid = 51728 + 16 * u32::try_from(i).unwrap();
        s.mode = (*mode).to_owned();
        let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &s).unwrap();
        let states = BackendStates::watch(&guest_dom, &be, &fe).unwrap();
        attached.push((be, fe, s.devid, Instant::now(), states));
    }
    // when each was first seen failed (and still in InitWait), all watched at once
    let mut failed_at: Vec<Option<Duration>> = vec![None; attached.len()];
    let start = Instant::now();
    while failed_at.iter().any(Option::is_none) && start.elapsed() < T {
        for (i, (be, _, _, t0, _)) in attached.iter().enumerate() {
            if failed_at[i].is_none()
                && read(&dom0, &format!("{be}/{IMAGE_NODE}")).as_deref() == Some("failed")
                && read(&dom0, &format!("{be}/state")).as_deref() == Some("2")
            {
                failed_at[i] = Some(t0.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut report = Vec::new();
    for (((params, _, want), (be, fe, devid, _, states)), took) in
        cases.iter().zip(&attached).zip(&failed_at)
    {
        let err_path = format!("/local/domain/0/error/backend/vbd/{GUEST}/{devid}/error");
        let took = took.unwrap_or_else(|| {
            panic!(
                "{params}: never failed (state {:?}, {IMAGE_NODE} {:?})",
                read(&dom0, &format!("{be}/state")),
                read(&dom0, &format!("{be}/{IMAGE_NODE}"))
            )
        });
        assert!(took < NAMED_WITHIN, "{params}: named only after {took:?}");
        let msg = read(&dom0, &err_path).unwrap_or_default();
        assert!(
            msg.contains(want),
            "{params}: the error does not name {want:?}: {msg}"
        );
        // InitWait, and nothing else, until the toolstack acts (libxl runs the hotplug
        // script on InitWait, and would wait for it in vain had the backend moved on)
        std::thread::sleep(Duration::from_millis(100));
        let seen: Vec<XenbusState> = states.seen().iter().map(|(b, _)| *b).collect();
        assert_eq!(
            seen.last(),
            Some(&XenbusState::InitWait),
            "{params}: {seen:?}"
        );
        // returns once it read Closed (6), then removes the directories: the watcher may
        // find them gone (Unknown) before it reads Closed itself
        let removal = libxl_remove(&dom0, be, fe);
        assert_eq!(states.violations(), Vec::<String>::new());
        report.push(format!(
            "{:>6.0} ms named, {:>4.0} ms to Closed: {msg}",
            took.as_secs_f64() * 1000.0,
            removal.as_secs_f64() * 1000.0
        ));
    }
    for r in &report {
        println!("{r}");
    }
    // a device number freed by a failed attach is used again at once, by a good disk
    let mut again = AttachSpec::new(&on(&format!("rbd:rbd/{plain}")));
    again.devid = 51728;
    let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &again).unwrap();
    let mut second = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &again, T)
        .expect("the freed device number serves a good disk");
    assert_eq!(
        second.write_sync(0, 0, 0, &[5u8; 4096]).unwrap(),
        rbdback::ring::Status::Okay
    );
    stop.store(true, Ordering::Relaxed);
    let (r, _front) = worker.join().unwrap();
    let r = r.unwrap();
    assert_eq!(
        (r.errors, r.mismatches),
        (0, 0),
        "the good disk was affected"
    );
    assert!(r.completed > 100);
    let _ = stop_serve.send(());
    drop(second);
    let _ = server.join();
}

/// Runs `tools/hotplug/block-rbdback <cmd>` for the VBD at `be` as libxl does (relative
/// `XENBUS_PATH`), with Debian's xenstore tools talking to the simulated xenstored.
fn hotplug(xen: &SimXen, be: &str, cmd: &str) -> (std::process::ExitStatus, Duration) {
    let rel = be.trim_start_matches("/local/domain/0/");
    let t0 = Instant::now();
    let st = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/hotplug/block-rbdback"
    ))
    .arg(cmd)
    .env("XENBUS_PATH", rel)
    .env("XENSTORED_PATH", xen.dir().join("xenstored.sock"))
    .env("RBDBACK_HOTPLUG_WAIT", "20")
    .status()
    .expect("run block-rbdback (xenstore-utils installed?)");
    (st, t0.elapsed())
}

/// issue 12: the hotplug script, run by libxl once the backend is in InitWait, fails the
/// attach of a disk rbdback cannot serve within 5 s with rbdback's reason in hotplug-error
/// (what `xl block-attach` prints), and succeeds for a good disk.
#[test]
fn the_hotplug_script_reports_rbdbacks_reason() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let c = cluster();
    let good = c.create_image("hp", 8, None);
    let xen = SimXen::start().unwrap();
    let dom0 = xen.platform().xenstore().unwrap();
    let _guest = xen.frontend(GUEST).unwrap();
    let (stop_serve, server) = spawn_serve(&xen, GUEST, false, Options::default());
    for (devid, params, ok, why) in [
        (
            51728u32,
            format!("rbd:rbd/missing-image:conf={}", conf()),
            false,
            "missing-image",
        ),
        (
            51744,
            format!("rbd:rbd/{good}:id=nobody:conf={}", conf()),
            false,
            "client.nobody",
        ),
        (51760, format!("rbd:rbd/{good}:conf={}", conf()), true, ""),
    ] {
        let mut s = AttachSpec::new(&params);
        s.devid = devid;
        let t0 = Instant::now();
        let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &s).unwrap();
        // libxl waits for InitWait (10 s), then runs the script
        while read(&dom0, &format!("{be}/state")).as_deref() != Some("2") {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no InitWait for {params}: state {:?}",
                read(&dom0, &format!("{be}/state"))
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (st, took) = hotplug(&xen, &be, "add");
        let total = t0.elapsed();
        let status = read(&dom0, &format!("{be}/hotplug-status"));
        let err = read(&dom0, &format!("{be}/hotplug-error")).unwrap_or_default();
        println!(
            "{params}: script rc {:?} after {:.0} ms ({:.0} ms from the attach): hotplug-status {status:?}, hotplug-error {err:?}",
            st.code(),
            took.as_secs_f64() * 1000.0,
            total.as_secs_f64() * 1000.0
        );
        assert_eq!(st.success(), ok, "{params}: {err}");
        assert!(total < Duration::from_secs(5), "{params}: {total:?}");
        if ok {
            assert_eq!(status.as_deref(), Some("connected"));
        } else {
            assert_eq!(status.as_deref(), Some("error"));
            assert!(err.contains(why), "{err}");
            assert!(err.contains("rbdback cannot serve"), "{err}");
            // libxl then removes it; the script's remove cleans its nodes
            libxl_remove(&dom0, &be, &fe);
        }
        let (st, _) = hotplug(&xen, &be, "remove");
        assert!(st.success());
    }
    let _ = stop_serve.send(());
    let _ = server.join();
}
