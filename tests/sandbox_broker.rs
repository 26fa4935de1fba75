//! issue 15: the sandbox's broker, as a sandboxed backend meets it (over a socket pair, in this
//! process, on the simulated Xen): it hands over its own guest's disks' Ceph files, found as
//! librados finds them, and nothing of another guest's; event channel handles that reach its
//! guest only; a xenstore connection that reads and writes only what a backend may.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use rbdback::rados::testing::cluster;
use rbdback::sandbox::broker::{self, Broker, BrokerConfig, Role};
use rbdback::xen::sim::remote::RemotePlatform;
use rbdback::xen::sim::SimXen;
use rbdback::xen::xenstore::Xenstore;
use rbdback::xen::{EventChannels, Platform, XenError};

const GUEST: u16 = 5;
const OTHER: u16 = 6;

fn read(fd: std::os::fd::OwnedFd) -> String {
    std::io::read_to_string(std::fs::File::from(fd)).unwrap()
}

#[test]
fn the_broker_hands_over_only_its_own_guests_files_handles_and_nodes() {
    let c = cluster();
    let xen = SimXen::start().unwrap();
    let dom0 = xen.platform().xenstore().unwrap();
    let be = |d: u16, devid: u32| format!("/local/domain/0/backend/vbd/{d}/{devid}");
    // the guest's disk names only its conf: the keyring comes from the conf's [client] section
    dom0.write(
        &format!("{}/params", be(GUEST, 51712)),
        &format!("rbd:rbd/mine:conf={}", c.conf.display()),
    )
    .unwrap();
    // another guest's disk with a keyring of its own, and a passphrase
    let dir = std::env::temp_dir().join(format!("rbdback-broker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let theirs = dir.join("other.keyring");
    std::fs::write(&theirs, "[client.other]\n\tkey = NOT-YOURS\n").unwrap();
    dom0.write(
        &format!("{}/params", be(OTHER, 51712)),
        &format!(
            "rbd:rbd/theirs:conf={}:keyring={}",
            c.conf.display(),
            theirs.display()
        ),
    )
    .unwrap();
    let (ours, brokers) = UnixStream::pair().unwrap();
    let cfg = BrokerConfig {
        domid: GUEST,
        backend_domid: 0,
        kind: "vbd".into(),
        run_dir: dir.clone(),
        learn: false,
    };
    let sim = RemotePlatform::new(xen.dir());
    let s2 = sim.clone();
    let thread = std::thread::spawn(move || broker::run(&s2, &cfg, &brokers));
    let b = Broker::on(ours);

    // Ceph files: the conf and the keyring the conf names, both as librados would read them
    let files = b.ceph_files(51712).unwrap();
    let roles: Vec<Role> = files.iter().map(|(r, _)| *r).collect();
    assert_eq!(roles, vec![Role::Conf, Role::Keyring]);
    let mut it = files.into_iter();
    let conf = read(it.next().unwrap().1);
    assert_eq!(conf, std::fs::read_to_string(&c.conf).unwrap());
    let keyring = read(it.next().unwrap().1);
    assert!(keyring.contains("[client.admin]"), "{keyring}");
    // the same devid of another guest is not this broker's business
    let e = b.ceph_files(51728).unwrap_err();
    assert!(e.contains("has no params"), "{e}");
    dom0.write(
        &format!("{}/params", be(GUEST, 51728)),
        "rbd:rbd/x:keyring=/nonexistent",
    )
    .unwrap();
    let e = b.ceph_files(51728).unwrap_err();
    assert!(e.contains("/nonexistent"), "{e}");

    // event channels: the handle reaches the guest's ports, not another's
    let mut ev = sim.evtchn_import(b.evtchn().unwrap()).unwrap();
    let fe = xen.frontend(GUEST).unwrap();
    let other = xen.frontend(OTHER).unwrap();
    let theirs_port = other.alloc_unbound(0).unwrap();
    assert!(matches!(
        ev.bind_interdomain(OTHER, theirs_port),
        Err(XenError::Evtchn { ref source, .. }) if source.raw_os_error() == Some(libc::EACCES)
    ));
    let port = fe.alloc_unbound(0).unwrap();
    ev.bind_interdomain(GUEST, port).unwrap();

    // xenstore: its own backend nodes, not its toolstack's, not another guest's
    let xs = Xenstore::from_stream(b.xenstore().unwrap(), std::path::Path::new("proxy")).unwrap();
    assert!(xs
        .read(&format!("{}/params", be(GUEST, 51712)))
        .unwrap()
        .is_some());
    let refused = |r: Result<(), rbdback::xen::xenstore::XsError>| {
        assert_eq!(r.unwrap_err().errno(), Some("EACCES"))
    };
    refused(xs.read(&format!("{}/params", be(OTHER, 51712))).map(drop));
    refused(xs.write(&format!("{}/params", be(GUEST, 51712)), "rbd:rbd/theirs"));
    refused(xs.write(&format!("{}/state", be(OTHER, 51712)), "4"));
    xs.write(&format!("{}/state", be(GUEST, 51712)), "2")
        .unwrap();
    xs.write(
        &format!("/local/domain/0/error/backend/vbd/{GUEST}/51712/error"),
        "5 test",
    )
    .unwrap();

    // the backend goes: so does its broker
    drop((b, xs, ev));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !thread.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker outlived its backend"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    thread.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
