//! The behavioural suite of the Xen traits, run against the simulated Xen (and, with
//! `RBDBACK_REAL_XEN=1` on a dom0 with a cooperating guest, meant for the real one through the
//! same generic functions). A frontend and a backend share granted pages and exchange events.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use rbdback::xen::sim::remote::RemotePlatform;
use rbdback::xen::sim::{SimFrontend, SimXen};
use rbdback::xen::{
    CopyDir, CopySeg, EventChannels, GrantMapping, GrantTable, Platform, XenError,
    GNTST_BAD_GNTREF, GNTST_OKAY, GNTST_PERMISSION_DENIED,
};

const GUEST: u16 = 3;

fn setup() -> (Arc<SimXen>, SimFrontend) {
    let xen = SimXen::start().unwrap();
    let guest = xen.frontend(GUEST).unwrap();
    (xen, guest)
}

fn readable<F: AsFd>(f: &F, ms: u16) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        f.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap_or(0) > 0
}

/// Generic over the platform: map what the guest granted and see the guest's writes and ours.
fn shared_page_roundtrip<P: Platform>(p: &P, guest: &SimFrontend) {
    let pages = guest.alloc_pages(2).unwrap();
    pages.page(1).write(100, b"from the guest").unwrap();
    let r0 = guest.grant(&pages, 0, 0, false).unwrap();
    let r1 = guest.grant(&pages, 1, 0, false).unwrap();
    let gnt = p.gnttab().unwrap();
    let m = gnt.map(GUEST, &[r0, r1], true).unwrap();
    assert_eq!(m.refs(), &[r0, r1]);
    let mut buf = [0u8; 14];
    m.mem().read(4096 + 100, &mut buf).unwrap();
    assert_eq!(&buf, b"from the guest");
    m.mem().write(8, b"from dom0").unwrap();
    let mut back = [0u8; 9];
    pages.page(0).read(8, &mut back).unwrap();
    assert_eq!(&back, b"from dom0");
}

fn grant_errors<P: Platform>(p: &P, guest: &SimFrontend) {
    let pages = guest.alloc_pages(1).unwrap();
    let ro = guest.grant(&pages, 0, 0, true).unwrap();
    let gnt = p.gnttab().unwrap();
    // read-only grant mapped for writing
    match gnt.map(GUEST, &[ro], true) {
        Err(XenError::GrantStatus { gref, status, .. }) => {
            assert_eq!((gref, status), (ro, GNTST_PERMISSION_DENIED));
        }
        other => panic!("expected permission denied, got {other:?}"),
    }
    assert!(gnt.map(GUEST, &[ro], false).is_ok(), "read-only map works");
    // unknown and revoked references
    assert!(matches!(
        gnt.map(GUEST, &[4242], false),
        Err(XenError::GrantStatus {
            status: GNTST_BAD_GNTREF,
            ..
        })
    ));
    let rw = guest.grant(&pages, 0, 0, false).unwrap();
    guest.revoke(rw).unwrap();
    assert!(matches!(
        gnt.map(GUEST, &[rw], false),
        Err(XenError::GrantStatus {
            status: GNTST_BAD_GNTREF,
            ..
        })
    ));
}

fn grant_copy_per_segment_status<P: Platform>(p: &P, guest: &SimFrontend) {
    let pages = guest.alloc_pages(2).unwrap();
    pages.page(0).write(0, &[7u8; 512]).unwrap();
    let a = guest.grant(&pages, 0, 0, false).unwrap();
    let ro = guest.grant(&pages, 1, 0, true).unwrap();
    let gnt = p.gnttab().unwrap();
    let mut into = [0u8; 512];
    let out = [9u8; 256];
    let out2 = [1u8; 16];
    let mut segs = vec![
        CopySeg {
            domid: GUEST,
            gref: a,
            offset: 0,
            dir: CopyDir::FromGuest { dst: &mut into },
            status: 1,
        },
        CopySeg {
            domid: GUEST,
            gref: a,
            offset: 1024,
            dir: CopyDir::ToGuest { src: &out },
            status: 1,
        },
        CopySeg {
            domid: GUEST,
            gref: ro,
            offset: 0,
            dir: CopyDir::ToGuest { src: &out2 },
            status: 1,
        },
        CopySeg {
            domid: GUEST,
            gref: 999,
            offset: 0,
            dir: CopyDir::ToGuest { src: &out2 },
            status: 1,
        },
    ];
    gnt.copy(&mut segs).unwrap();
    let st: Vec<i16> = segs.iter().map(|s| s.status).collect();
    assert_eq!(
        st,
        vec![
            GNTST_OKAY,
            GNTST_OKAY,
            GNTST_PERMISSION_DENIED,
            GNTST_BAD_GNTREF
        ]
    );
    drop(segs);
    assert_eq!(into, [7u8; 512]);
    let mut chk = [0u8; 256];
    pages.page(0).read(1024, &mut chk).unwrap();
    assert_eq!(chk, [9u8; 256]);
    let mut chk = [0u8; 16];
    pages.page(1).read(0, &mut chk).unwrap();
    assert_eq!(chk, [0u8; 16], "the read-only page was not written");
}

fn events_both_ways_with_mask_semantics<P: Platform>(p: &P, guest: &SimFrontend) {
    let gport = guest.alloc_unbound(0).unwrap();
    let mut ev = p.evtchn().unwrap();
    assert!(
        ev.bind_interdomain(GUEST, gport + 100).is_err(),
        "unknown port"
    );
    let local = ev.bind_interdomain(GUEST, gport).unwrap();
    assert!(ev.pending().unwrap().is_none());
    // guest -> backend
    guest.notify(gport).unwrap();
    assert!(readable(&ev, 1000));
    assert_eq!(ev.pending().unwrap(), Some(local));
    // masked until unmasked: a second notify only stays pending
    guest.notify(gport).unwrap();
    assert!(ev.pending().unwrap().is_none());
    ev.unmask(local).unwrap();
    assert_eq!(ev.pending().unwrap(), Some(local), "unmask redelivers");
    ev.unmask(local).unwrap();
    // backend -> guest
    ev.notify(local).unwrap();
    assert!(guest.wait(gport, Duration::from_secs(1)).unwrap());
    assert!(!guest.wait(gport, Duration::from_millis(50)).unwrap());
    // closing our end turns the guest's port back into an unbound one: its notifications are
    // dropped (Xen's evtchn_send on ECS_UNBOUND), and dom0 may bind it again
    ev.unbind(local).unwrap();
    guest.notify(gport).unwrap();
    assert!(!readable(&ev, 50));
    let again = ev.bind_interdomain(GUEST, gport).unwrap();
    guest.notify(gport).unwrap();
    assert!(readable(&ev, 1000));
    assert_eq!(ev.pending().unwrap(), Some(again));
}

#[test]
fn frontend_and_backend_share_a_granted_page() {
    let (xen, guest) = setup();
    shared_page_roundtrip(&xen.platform(), &guest);
}

#[test]
fn grant_failures_match_xen_statuses() {
    let (xen, guest) = setup();
    grant_errors(&xen.platform(), &guest);
}

#[test]
fn grant_copy_reports_each_segment() {
    let (xen, guest) = setup();
    grant_copy_per_segment_status(&xen.platform(), &guest);
}

#[test]
fn event_channels_notify_mask_and_unmask() {
    let (xen, guest) = setup();
    events_both_ways_with_mask_semantics(&xen.platform(), &guest);
}

/// The same behaviour through the hypercall socket a backend in another process uses.
#[test]
fn a_backend_in_another_process_sees_the_same_xen() {
    let (xen, guest) = setup();
    let remote = RemotePlatform::new(xen.dir());
    shared_page_roundtrip(&remote, &guest);
    grant_errors(&remote, &guest);
    grant_copy_per_segment_status(&remote, &guest);
    events_both_ways_with_mask_semantics(&remote, &guest);
}

/// A backend process that dies (its hypercall connection closes) leaves the guest's port
/// unbound, so the next backend binds the same port from xenstore, and the guest's grants can
/// be mapped again.
#[test]
fn a_dead_backends_ports_can_be_bound_by_the_next_one() {
    let (xen, guest) = setup();
    let gport = guest.alloc_unbound(0).unwrap();
    let pages = guest.alloc_pages(1).unwrap();
    let r = guest.grant(&pages, 0, 0, false).unwrap();
    let first = RemotePlatform::new(xen.dir());
    let mut ev = first.evtchn().unwrap();
    let gnt = first.gnttab().unwrap();
    let m = gnt.map(GUEST, &[r], true).unwrap();
    m.mem().write(0, b"before").unwrap();
    let _local = ev.bind_interdomain(GUEST, gport).unwrap();
    // a second bind of a bound port is refused, as Xen refuses it
    let mut other = RemotePlatform::new(xen.dir()).evtchn().unwrap();
    assert!(other.bind_interdomain(GUEST, gport).is_err());
    drop((ev, m, gnt)); // the process is gone
    guest.notify(gport).unwrap(); // dropped, not an error
    let next = RemotePlatform::new(xen.dir());
    let mut ev = next.evtchn().unwrap();
    let local = {
        let mut tries = 0;
        loop {
            // the hypervisor notices the closed connection asynchronously
            match ev.bind_interdomain(GUEST, gport) {
                Ok(p) => break p,
                Err(_) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("rebind failed: {e}"),
            }
        }
    };
    guest.notify(gport).unwrap();
    assert!(readable(&ev, 1000));
    assert_eq!(ev.pending().unwrap(), Some(local));
    let m = next.gnttab().unwrap().map(GUEST, &[r], true).unwrap();
    let mut b = [0u8; 6];
    m.mem().read(0, &mut b).unwrap();
    assert_eq!(&b, b"before");
}

/// issue 15: an event channel handle a privileged process opened for a sandboxed backend,
/// restricted to the backend's guest (`IOCTL_EVTCHN_RESTRICT_DOMID`), passed as descriptors:
/// it binds and delivers that guest's ports like any handle, and cannot bind another guest's.
#[test]
fn an_exported_handle_reaches_only_its_guest() {
    let (xen, guest) = setup();
    let other = xen.frontend(GUEST + 1).unwrap();
    let broker = RemotePlatform::new(xen.dir());
    let backend = RemotePlatform::new(xen.dir());
    let fds = broker.evtchn_export(GUEST).unwrap();
    let mut ev = backend.evtchn_import(fds).unwrap();
    let theirs = other.alloc_unbound(0).unwrap();
    match ev.bind_interdomain(GUEST + 1, theirs) {
        Err(XenError::Evtchn { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EACCES))
        }
        r => panic!("bound another guest's port: {r:?}"),
    }
    let gport = guest.alloc_unbound(0).unwrap();
    let local = ev.bind_interdomain(GUEST, gport).unwrap();
    guest.notify(gport).unwrap();
    assert!(readable(&ev, 1000));
    assert_eq!(ev.pending().unwrap(), Some(local));
    ev.unmask(local).unwrap();
    ev.notify(local).unwrap();
    assert!(guest.wait(gport, Duration::from_secs(1)).unwrap());
    // a handle is restricted once, and never to dom0
    assert!(broker.evtchn_export(0).is_err());
    assert!(backend.evtchn_import(Vec::new()).is_err());
}

/// issue 15: a sandboxed backend's xenstore connection goes through a filtering proxy: what
/// the policy allows works as on a direct connection (reads, writes in a transaction,
/// watches), everything else is answered EACCES and never reaches xenstored.
#[test]
fn the_xenstore_proxy_lets_through_only_what_its_policy_allows() {
    use rbdback::xen::xenstore::proxy::{self, Access};
    use rbdback::xen::xenstore::Xenstore;
    let (xen, _guest) = setup();
    let dom0 = xen.platform().xenstore().unwrap();
    dom0.write("/local/domain/0/backend/vbd/3/1/params", "rbd:p/mine")
        .unwrap();
    dom0.write(
        "/local/domain/0/backend/vbd/4/1/params",
        "rbd:p/theirs:key=SECRET",
    )
    .unwrap();
    let mine = std::os::unix::net::UnixStream::pair().unwrap();
    let policy: proxy::Policy = Arc::new(|a, p: &str| {
        let under = |pre: &str| p == pre || p.starts_with(&format!("{pre}/"));
        under("/local/domain/0/backend/vbd/3") && (a == Access::Read || p.ends_with("/state"))
    });
    proxy::spawn(mine.1, xen.xenstore_path(), "/local/domain/0", policy).unwrap();
    let xs = Xenstore::from_stream(mine.0, std::path::Path::new("proxy")).unwrap();
    assert_eq!(
        xs.read("/local/domain/0/backend/vbd/3/1/params")
            .unwrap()
            .as_deref(),
        Some("rbd:p/mine")
    );
    let denied = |r: Result<_, rbdback::xen::xenstore::XsError>| {
        assert_eq!(
            r.err()
                .and_then(|e| e.errno().map(str::to_owned))
                .as_deref(),
            Some("EACCES")
        )
    };
    denied(xs.read("/local/domain/0/backend/vbd/4/1/params").map(drop));
    denied(xs.read("backend/vbd/4/1/params").map(drop));
    denied(xs.directory("/local/domain/0/backend/vbd").map(drop));
    denied(
        xs.write("/local/domain/0/backend/vbd/3/1/params", "rbd:p/theirs")
            .map(drop),
    );
    denied(xs.watch("/local/domain/0/backend/vbd/4").map(drop));
    let w = xs.watch("/local/domain/0/backend/vbd/3/1").unwrap();
    while w.recv_timeout(Duration::from_millis(100)).is_some() {}
    xs.transaction(|tx| tx.write("/local/domain/0/backend/vbd/3/1/state", "2"))
        .unwrap();
    assert!(
        w.recv_timeout(Duration::from_secs(2)).is_some(),
        "watch event"
    );
    assert_eq!(
        dom0.read("/local/domain/0/backend/vbd/3/1/state")
            .unwrap()
            .as_deref(),
        Some("2")
    );
    assert_eq!(
        dom0.read("/local/domain/0/backend/vbd/3/1/params")
            .unwrap()
            .as_deref(),
        Some("rbd:p/mine"),
        "a refused write changed nothing"
    );
}

#[test]
fn xenstore_read_write_directory_perms_watch_transaction() {
    let (xen, guest) = setup();
    let dom0 = xen.platform().xenstore().unwrap();
    let g = guest.xenstore().unwrap();
    let be = "/local/domain/0/backend/vbd/3/51712";
    assert_eq!(dom0.read(be).unwrap(), None);
    dom0.write(&format!("{be}/params"), "rbd:a/b").unwrap();
    assert_eq!(
        dom0.read(&format!("{be}/params")).unwrap().as_deref(),
        Some("rbd:a/b")
    );
    assert_eq!(dom0.directory(be).unwrap(), vec!["params"]);
    assert!(dom0.directory("/nope").unwrap().is_empty());
    // the guest may not read dom0's nodes until permitted
    let e = g.read(&format!("{be}/params")).unwrap_err();
    assert_eq!(e.errno(), Some("EACCES"));
    use rbdback::xen::xenstore::Perm;
    dom0.set_perms(
        be,
        &[
            Perm {
                domid: 0,
                read: false,
                write: false,
            },
            Perm {
                domid: 3,
                read: true,
                write: false,
            },
        ],
    )
    .unwrap();
    dom0.write(&format!("{be}/state"), "2").unwrap();
    assert_eq!(
        g.read(&format!("{be}/state")).unwrap().as_deref(),
        Some("2")
    );
    assert_eq!(
        g.write(&format!("{be}/state"), "9").unwrap_err().errno(),
        Some("EACCES")
    );
    // watches: registration event, then changes below the path, then removal
    let w = dom0.watch(be).unwrap();
    assert_eq!(w.recv_timeout(Duration::from_secs(1)).unwrap().path, be);
    dom0.write(&format!("{be}/state"), "4").unwrap();
    assert_eq!(
        w.recv_timeout(Duration::from_secs(1)).unwrap().path,
        format!("{be}/state")
    );
    assert!(readable(&w, 0) || w.try_recv().is_none());
    dom0.rm(be).unwrap();
    assert!(w.recv_timeout(Duration::from_secs(1)).is_some());
    assert_eq!(dom0.read(&format!("{be}/state")).unwrap(), None);
    dom0.rm(be).unwrap(); // removing a missing node is fine
                          // transactions: a conflicting write makes the commit retry, and the retry sees it
    let mut tries = 0;
    let v = dom0
        .transaction(|tx| {
            tries += 1;
            let cur = tx.read("/local/domain/0/counter")?.unwrap_or_default();
            if tries == 1 {
                // another writer changes the node in the middle of our transaction
                xen.platform()
                    .xenstore()
                    .unwrap()
                    .write("/local/domain/0/counter", "5")
                    .unwrap();
            }
            tx.write("/local/domain/0/counter", &format!("{cur}+1"))?;
            Ok(cur)
        })
        .unwrap();
    assert_eq!(tries, 2, "EAGAIN made the transaction run again");
    assert_eq!(v, "5");
    assert_eq!(
        dom0.read("/local/domain/0/counter").unwrap().as_deref(),
        Some("5+1")
    );
}

#[test]
fn real_bindings_link_and_name_missing_nodes() {
    use rbdback::xen::real::RealPlatform;
    if std::path::Path::new("/dev/xen/gntdev").exists() {
        return; // a real dom0
    }
    let p = RealPlatform::new();
    let e = p.gnttab().unwrap_err().to_string();
    assert!(e.contains("/dev/xen/gntdev"), "{e}");
    let e = p.evtchn().unwrap_err().to_string();
    assert!(e.contains("/dev/xen/evtchn"), "{e}");
}

/// A path written in a loop (a guest flooding its nodes, XSA-349) queues at most
/// `WATCH_QUEUE_MAX` events on a watch that is not drained, and the watch still works after.
#[test]
fn a_watch_flood_is_bounded() {
    use rbdback::xen::xenstore::WATCH_QUEUE_MAX;
    let (xen, _guest) = setup();
    let dom0 = xen.platform().xenstore().unwrap();
    let path = "/local/domain/0/flood";
    dom0.write(path, "0").unwrap();
    let w = dom0.watch(path).unwrap();
    for i in 0..5000 {
        dom0.write(path, &i.to_string()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut queued = 0;
    while w.try_recv().is_some() {
        queued += 1;
    }
    assert!(
        queued > 0 && queued <= WATCH_QUEUE_MAX,
        "{queued} events queued"
    );
    assert!(!readable(&w, 0), "the eventfd matches the queue");
    dom0.write(path, "after").unwrap();
    assert_eq!(w.recv_timeout(Duration::from_secs(1)).unwrap().path, path);
}

/// A simulated Xen starts in a directory left by a dead process with the same pid (pids are
/// reused): the stale sockets there are cleared instead of failing the bind (AddrInUse).
#[test]
fn a_stale_directory_of_a_reused_pid_does_not_stop_the_sim() {
    let first = SimXen::start().unwrap();
    let name = first
        .dir()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let (prefix, n) = name.rsplit_once('-').unwrap();
    let n: u64 = n.parse().unwrap();
    for next in n + 1..n + 5 {
        let stale = first.dir().with_file_name(format!("{prefix}-{next}"));
        std::fs::create_dir_all(&stale).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(stale.join("xenstored.sock"));
        std::fs::write(stale.join("leftover"), b"x").unwrap();
    }
    let second = SimXen::start().unwrap();
    assert!(!second.dir().join("leftover").exists());
    let xs = second.platform().xenstore().unwrap();
    xs.write("/local/domain/0/probe", "1").unwrap();
    assert_eq!(
        xs.read("/local/domain/0/probe").unwrap().as_deref(),
        Some("1")
    );
}
