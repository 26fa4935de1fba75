//! The direct RADOS engine on the project's local Ceph cluster, checked with Ceph's own tools:
//! `rbd export`, `rbd object-map check`, `rbd snap`, clones read through librbd, and librbd
//! clients asking for the exclusive lock.

use std::process::Command;
use std::time::{Duration, Instant};

use rbdback::rados::direct::LockPolicy;
use rbdback::rados::testing::{
    arm_osd_delay, cluster, drop_with_silent_osds, one, wait_all, TestCluster,
};
use rbdback::rados::{
    BlockOp, ClientIdentity, EngineChoice, EngineKind, Image, ImageSpec, LockHold, LockStatus,
    Queue, RadosError,
};

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i as u64 * 7 + seed * 131) % 253).unwrap_or(0) | 1)
        .collect()
}

fn direct_spec(c: &TestCluster, name: &str) -> ImageSpec {
    let mut s = c.spec(name);
    s.engine = EngineChoice::Direct;
    s
}

fn write(q: &mut Queue, expect: &mut [u8], off: u64, data: Vec<u8>) {
    let o = usize::try_from(off).unwrap();
    expect[o..o + data.len()].copy_from_slice(&data);
    one(
        q,
        BlockOp::Write {
            offset: off,
            buf: data,
        },
    )
    .result
    .unwrap();
}

/// Writes a pattern of `len` bytes at each `(offset, len)`, the i-th seeded `seed + i`.
fn write_pieces(q: &mut Queue, expect: &mut [u8], pieces: &[(u64, usize)], seed: u64) {
    for (i, &(off, len)) in pieces.iter().enumerate() {
        write(q, expect, off, pattern(len, seed + i as u64));
    }
}

fn read(q: &mut Queue, off: u64, len: usize) -> Vec<u8> {
    let c = one(
        q,
        BlockOp::Read {
            offset: off,
            buf: vec![0xee; len],
        },
    );
    c.result.unwrap();
    c.buf.unwrap()
}

fn object_map_check(c: &TestCluster, name: &str) -> String {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(&c.conf)
        .args([
            "object-map",
            "check",
            "--no-progress",
            &format!("rbd/{name}"),
        ])
        .output()
        .unwrap();
    format!(
        "status {} stdout {:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `rbd object-map check` exits 0 even when it had to invalidate the map: read its log too.
fn assert_map_clean(check: &str) {
    assert!(check.starts_with("status exit status: 0"), "{check}");
    assert!(
        !check.contains("object map error") && !check.contains("invalid"),
        "{check}"
    );
}

/// Writes of every shape (in flight together), discards and write-zeroes through the direct
/// engine, on an image with Ceph's default features (exclusive-lock, object-map, fast-diff):
/// `rbd export` equals what was written and `rbd object-map check` finds nothing to fix.
#[test]
fn writes_and_discards_equal_rbd_export_and_the_object_map_checks_clean() {
    let c = cluster();
    let name = c.create_image("direct-export", 24, None);
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    assert_eq!(img.info().engine, EngineKind::Direct);
    assert_eq!(img.size(), 24 << 20);
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 24 << 20];
    let mut n = 0;
    for i in 0..48u64 {
        let (off, len) = match i % 4 {
            0 => (i * 300_000, 4096),
            1 => (i * 300_000 + 512, 512),
            2 => ((4 << 20) * (i % 5) + (4 << 20) - 256 * 1024, 1 << 20),
            _ => ((8 << 20) + i * 8192, 8192),
        };
        let data = pattern(len, i);
        let o = usize::try_from(off).unwrap();
        expect[o..o + len].copy_from_slice(&data);
        q.submit(
            i,
            BlockOp::Write {
                offset: off,
                buf: data,
            },
        )
        .unwrap();
        n += 1;
    }
    for c in wait_all(&mut q, n) {
        c.result.unwrap();
    }
    // a whole object removed, a tail truncated, a middle zeroed, an unaligned discard skipped
    let discards = [
        (16u64 << 20, 4u64 << 20),
        ((12 << 20) + (1 << 20), 3 << 20),
        ((8 << 20) + 65536, 131072),
    ];
    for (off, len) in discards {
        one(&mut q, BlockOp::Discard { offset: off, len })
            .result
            .unwrap();
        let o = usize::try_from(off).unwrap();
        expect[o..o + usize::try_from(len).unwrap()].fill(0);
    }
    one(
        &mut q,
        BlockOp::Discard {
            offset: 100,
            len: 1000,
        },
    )
    .result
    .unwrap();
    one(
        &mut q,
        BlockOp::WriteZeroes {
            offset: 4096 * 3,
            len: 4096,
        },
    )
    .result
    .unwrap();
    expect[4096 * 3..4096 * 4].fill(0);
    one(&mut q, BlockOp::Flush).result.unwrap();
    let got = read(&mut q, 0, 24 << 20);
    assert!(got == expect, "read back through the engine");
    // an out-of-range request is an error, not a panic
    assert!(one(
        &mut q,
        BlockOp::Read {
            offset: 24 << 20,
            buf: vec![0; 512]
        }
    )
    .result
    .is_err());
    drop(q);
    drop(img);
    assert!(
        c.export(&name) == expect,
        "rbd export equals what was written"
    );
    let check = object_map_check(c, &name);
    assert_map_clean(&check);
}

/// An image of `size` with fancy striping: stripe unit 64 KiB over 4 objects of 1 MiB.
fn striped_image(c: &TestCluster, prefix: &str, size: &str) -> String {
    let name = format!("{prefix}-{}", std::process::id());
    c.rbd(&[
        "create",
        "--size",
        size,
        "--object-size",
        "1M",
        "--stripe-unit",
        "64K",
        "--stripe-count",
        "4",
        &format!("rbd/{name}"),
    ]);
    name
}

/// Fancy striping (stripe unit 64 KiB over 4 objects) maps like librbd's.
#[test]
fn striping_v2_equals_rbd_export() {
    let c = cluster();
    let name = striped_image(c, "direct-stripe", "16M");
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 16 << 20];
    write_pieces(
        &mut q,
        &mut expect,
        &[
            (0, 1 << 20),
            (3 << 20, 700_000),
            (9_000_000, 4096),
            ((16 << 20) - 8192, 8192),
        ],
        3,
    );
    assert!(read(&mut q, 0, 16 << 20) == expect);
    drop(q);
    drop(img);
    assert!(
        c.export(&name) == expect,
        "rbd export equals what was written"
    );
}

/// An image whose data lives in a separate pool (`rbd create --data-pool`, the data-pool
/// feature): the header names the pool, the data objects land there (and only there), and
/// the result equals `rbd export`; discards remove objects from the data pool too.
#[test]
fn an_image_with_a_separate_data_pool_equals_rbd_export() {
    let c = cluster();
    let pool = "rbd-data";
    if !c
        .ceph(&["osd", "pool", "ls"])
        .lines()
        .any(|l| l.trim() == pool)
    {
        c.ceph(&["osd", "pool", "create", pool, "8", "8", "replicated"]);
        c.ceph(&["osd", "pool", "application", "enable", pool, "rbd"]);
    }
    let name = format!("direct-datapool-{}", std::process::id());
    c.rbd(&[
        "create",
        "--size",
        "16M",
        "--data-pool",
        pool,
        &format!("rbd/{name}"),
    ]);
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    assert_eq!(img.info().engine, EngineKind::Direct);
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 16 << 20];
    write_pieces(
        &mut q,
        &mut expect,
        &[
            (0, 1 << 20),
            ((4 << 20) - 4096, 8192),
            (9_000_000, 4096),
            ((16 << 20) - 65536, 65536),
        ],
        11,
    );
    // a whole object discarded: removed from the data pool
    one(
        &mut q,
        BlockOp::Discard {
            offset: 8 << 20,
            len: 4 << 20,
        },
    )
    .result
    .unwrap();
    expect[8 << 20..12 << 20].fill(0);
    assert!(read(&mut q, 0, 16 << 20) == expect);
    drop(q);
    drop(img);
    assert!(
        c.export(&name) == expect,
        "rbd export equals what was written"
    );
    let prefix = data_prefix(c, &name);
    let listed = |p: &str| {
        String::from_utf8_lossy(&c.tool("rados", &["-p", p, "ls"]))
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let mut objects = listed(pool);
    objects.sort();
    let ids: Vec<&str> = objects.iter().map(|o| &o[o.len() - 16..]).collect();
    assert_eq!(
        ids,
        vec!["0000000000000000", "0000000000000001", "0000000000000003"],
        "the data objects are in {pool} (object 2 discarded)"
    );
    assert!(
        listed("rbd").is_empty(),
        "no data object in the header's pool"
    );
}

/// `rbd snap create` while the image is open and written: the engine hands over the lock,
/// the snapshot keeps the data from before it, and the next write carries the new snapshot
/// context (copy-on-write of the snapshot's objects).
#[test]
fn a_snapshot_taken_while_writing_keeps_the_pre_snapshot_data() {
    // with the exclusive lock (the snapshot's client takes it over) and without it (only
    // the header notify tells the engine)
    snapshot_while_writing(None);
    snapshot_while_writing(Some("layering"));
}

fn snapshot_while_writing(features: Option<&str>) {
    let c = cluster();
    let name = c.create_image("direct-snap", 8, features);
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    let mut q = img.queue().unwrap();
    let mut before = vec![0u8; 8 << 20];
    write(&mut q, &mut before, 0, pattern(1 << 20, 1));
    write(&mut q, &mut before, 5 << 20, pattern(4096, 2));
    // keep writing elsewhere while the snapshot is taken by another client
    let snap = format!("rbd/{name}@s1");
    let conf = c.conf.clone();
    let t = std::thread::spawn(move || {
        Command::new("rbd")
            .arg("-c")
            .arg(&conf)
            .args(["snap", "create", "--no-progress", &snap])
            .output()
            .unwrap()
    });
    let mut tag = 0;
    let mut inflight = 0;
    while !t.is_finished() {
        q.submit(
            tag,
            BlockOp::Write {
                offset: (7 << 20) + (tag % 64) * 4096,
                buf: vec![9; 4096],
            },
        )
        .unwrap();
        tag += 1;
        inflight += 1;
        let mut out = Vec::new();
        q.reap(&mut out);
        inflight -= out.len();
        for c in out {
            c.result.unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for c in wait_all(&mut q, inflight) {
        c.result.unwrap();
    }
    let out = t.join().unwrap();
    assert!(
        out.status.success(),
        "rbd snap create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the snapshot's content from our view of before: what was at 0..6 MiB
    let mut after = before.clone();
    write(&mut q, &mut after, 0, pattern(1 << 20, 5));
    write(&mut q, &mut after, 5 << 20, pattern(4096, 6));
    one(
        &mut q,
        BlockOp::Discard {
            offset: 4 << 20,
            len: 4 << 20,
        },
    )
    .result
    .unwrap();
    after[4 << 20..].fill(0);
    drop(q);
    drop(img);
    let snap_data = c.export(&format!("{name}@s1"));
    assert!(
        snap_data[..6 << 20] == before[..6 << 20],
        "the snapshot kept the pre-snapshot data"
    );
    assert!(
        c.export(&name) == after,
        "the head has the post-snapshot writes"
    );
    if features.is_none() {
        assert_map_clean(&object_map_check(c, &name));
        // fast-diff reads the object maps: the object written after the snapshot is dirty,
        // the one discarded after it is gone
        let diff = String::from_utf8_lossy(&c.rbd(&[
            "diff",
            "--from-snap",
            "s1",
            "--whole-object",
            "--format",
            "json",
            &format!("rbd/{name}"),
        ]))
        .into_owned();
        assert!(
            diff.contains(r#"{"offset":0,"length":4194304,"exists":"true"}"#)
                && diff.contains(r#"{"offset":4194304,"length":4194304,"exists":"false"}"#),
            "{diff}"
        );
    }
}

/// A clone reads through to its parent and copies up on write, as librbd shows it.
#[test]
fn clone_reads_and_copy_ups_match_librbd() {
    let c = cluster();
    let parent = c.create_image("direct-parent", 12, None);
    let mut pdata = vec![0u8; 12 << 20];
    {
        let mut s = c.spec(&parent);
        s.engine = EngineChoice::Librbd;
        let img = Image::open(&s).unwrap();
        let mut q = img.queue().unwrap();
        write(&mut q, &mut pdata, 0, pattern(6 << 20, 11));
        write(&mut q, &mut pdata, (9 << 20) + 4096, pattern(8192, 12));
    }
    let child = clone_of(c, &parent);
    let img = Image::open(&direct_spec(c, &child)).unwrap();
    let mut q = img.queue().unwrap();
    assert!(
        read(&mut q, 0, 12 << 20) == pdata,
        "clone reads fall through to the parent"
    );
    let mut expect = pdata.clone();
    // partial writes into objects that exist only in the parent: copy-up
    write(&mut q, &mut expect, 4096, pattern(4096, 21));
    write(&mut q, &mut expect, (9 << 20) + 100 * 512, pattern(512, 22));
    // a snapshot of the clone, then more writes: deep copy-up through the snapshot
    drop(q);
    drop(img);
    c.rbd(&["snap", "create", &format!("rbd/{child}@c1")]);
    let snap_expect = expect.clone();
    let img = Image::open(&direct_spec(c, &child)).unwrap();
    let mut q = img.queue().unwrap();
    write(&mut q, &mut expect, (4 << 20) + 8192, pattern(4096, 23));
    one(
        &mut q,
        BlockOp::WriteZeroes {
            offset: 8 << 20,
            len: 4 << 20,
        },
    )
    .result
    .unwrap();
    expect[8 << 20..].fill(0);
    assert!(read(&mut q, 0, 12 << 20) == expect);
    drop(q);
    drop(img);
    assert!(
        c.export(&child) == expect,
        "librbd reads the clone as written"
    );
    assert!(
        c.export(&format!("{child}@c1")) == snap_expect,
        "the clone's snapshot kept its data"
    );
    assert_map_clean(&object_map_check(c, &child));
}

/// `rbd bench` writing `total` in 4 KiB random writes: a librbd client that wants the lock
/// (`rbd` itself, so that killing it kills the client).
fn rbd_bench(c: &TestCluster, name: &str, total: &str) -> Command {
    let mut cmd = Command::new("rbd");
    cmd.arg("-c").arg(&c.conf).args([
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4K",
        "--io-total",
        total,
        "--io-pattern",
        "rand",
        &format!("rbd/{name}"),
    ]);
    cmd
}

/// A short `rbd bench`, given at most 60 s.
fn rbd_write_bench(c: &TestCluster, name: &str) -> std::process::Output {
    let mut bench = rbd_bench(c, name, "64K")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while bench.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            let _ = bench.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bench.wait_with_output().unwrap()
}

/// A librbd client asking for the lock gets it (hand-over); the engine takes it back for
/// its next write. With the refusing policy the librbd client's writes fail instead.
#[test]
fn a_second_client_gets_the_lock_or_a_refusal() {
    let c = cluster();
    let name = c.create_image("direct-lock", 8, None);
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    assert_eq!(
        img.lock_status().state,
        LockHold::NotHeld,
        "taken on the first write"
    );
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 8 << 20];
    write(&mut q, &mut expect, 0, pattern(4096, 1));
    assert_eq!(
        img.lock_status(),
        LockStatus {
            state: LockHold::Held,
            handovers: 0
        }
    );
    let lockers =
        String::from_utf8_lossy(&c.rbd(&["lock", "ls", &format!("rbd/{name}")])).into_owned();
    assert!(
        lockers.contains("auto "),
        "we hold librbd's lock: {lockers}"
    );
    let t = Instant::now();
    let out = rbd_write_bench(c, &name);
    assert!(
        out.status.success(),
        "rbd bench got the lock: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "hand-over took {:?}",
        t.elapsed()
    );
    assert_eq!(img.lock_status().handovers, 1, "handed over to rbd bench");
    // take it back
    write(&mut q, &mut expect, 8192, pattern(4096, 2));
    assert_eq!(
        img.lock_status(),
        LockStatus {
            state: LockHold::Held,
            handovers: 1
        }
    );
    assert!(read(&mut q, 8192, 4096) == expect[8192..12288]);
    drop(q);
    drop(img);

    let mut spec = direct_spec(c, &name);
    spec.lock_policy = LockPolicy::Refuse;
    let img = Image::open(&spec).unwrap();
    let mut q = img.queue().unwrap();
    write(&mut q, &mut expect, 16384, pattern(4096, 3));
    let out = rbd_write_bench(c, &name);
    assert!(!out.status.success(), "rbd bench must not get the lock");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Read-only") || err.contains("30"),
        "refusal is EROFS: {err}"
    );
    // we still hold it and write
    write(&mut q, &mut expect, 20480, pattern(4096, 4));
    assert_eq!(
        img.lock_status(),
        LockStatus {
            state: LockHold::Held,
            handovers: 0
        },
        "a refusal is no hand-over"
    );
    drop(q);
    drop(img);
    let got = c.export(&name);
    // the first `rbd bench`, which got the lock, wrote 16 random blocks anywhere in the
    // image (now and then over block 0): compare what was written after it
    for off in [8192usize, 16384, 20480] {
        assert!(
            got[off..off + 4096] == expect[off..off + 4096],
            "block at {off}"
        );
    }
}

/// Images the direct engine cannot honour are refused with the feature's name; `auto` then
/// uses librbd. Missing images and unreachable clusters are named too.
#[test]
fn unsupported_features_and_bad_targets_are_named() {
    let c = cluster();
    let name = c.create_image("direct-journal", 4, Some("exclusive-lock,journaling"));
    let e = Image::open(&direct_spec(c, &name)).unwrap_err();
    assert!(
        matches!(
            e,
            RadosError::Unsupported {
                feature: "journaling",
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("journaling") && e.to_string().contains("librbd"),
        "{e}"
    );
    let auto = Image::open(&c.spec(&name)).unwrap();
    assert_eq!(auto.info().engine, EngineKind::Librbd);

    let e = Image::open(&direct_spec(c, "no-such-image")).unwrap_err();
    assert!(matches!(e, RadosError::NoImage { .. }), "{e}");
    // a format 1 header (Ceph 16 no longer creates them; its object is enough to tell)
    let v1 = format!("old-v1-{}", std::process::id());
    let st = Command::new("rados")
        .arg("-c")
        .arg(&c.conf)
        .args(["-p", "rbd", "put", &format!("{v1}.rbd"), "/dev/null"])
        .status()
        .unwrap();
    assert!(st.success());
    let e = Image::open(&direct_spec(c, &v1)).unwrap_err();
    assert!(
        matches!(
            e,
            RadosError::Unsupported {
                feature: "image format 1",
                ..
            }
        ),
        "{e}"
    );
    let mut spec = direct_spec(c, "x");
    spec.conf_options = vec![("mon_host".into(), "v2:127.0.0.1:9".into())];
    let t = Instant::now();
    let e = Image::open(&spec).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(e, RadosError::Connect { .. }), "{e}");
    let mut spec = direct_spec(c, "x");
    spec.keyring = Some("/dev/null".into());
    spec.key = Some("AQBeNGJl3vZUJRAA1Zt0X4Z1p2ZC1HhIxYr3Kg==".into());
    let e = Image::open(&spec).unwrap_err();
    assert!(matches!(e, RadosError::Connect { .. }), "{e}");
}

/// A snapshot opened by name reads its data and refuses writes; images without
/// exclusive-lock are written without it.
#[test]
fn snapshots_open_read_only_and_lockless_images_write() {
    let c = cluster();
    let name = c.create_image("direct-plain", 4, Some("layering"));
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 4 << 20];
    write(&mut q, &mut expect, 0, pattern(4096, 8));
    drop(q);
    drop(img);
    c.rbd(&["snap", "create", &format!("rbd/{name}@s")]);
    let mut spec = direct_spec(c, &name);
    spec.snapshot = Some("s".into());
    let img = Image::open(&spec).unwrap();
    assert!(img.info().read_only);
    let mut q = img.queue().unwrap();
    assert!(q
        .submit(
            1,
            BlockOp::Write {
                offset: 0,
                buf: vec![1; 512]
            }
        )
        .is_err());
    assert!(read(&mut q, 0, 4 << 20) == expect);
    let mut spec = direct_spec(c, &name);
    spec.snapshot = Some("nope".into());
    let e = Image::open(&spec).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

/// An operator fencing this client (`rbd lock rm`, which blocklists the holder) stops its
/// writes with a named error instead of letting them race the new owner.
#[test]
fn a_broken_lock_is_noticed_and_fences_writes() {
    let c = cluster();
    let name = c.create_image("direct-fence", 4, None);
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 4 << 20];
    write(&mut q, &mut expect, 0, pattern(4096, 1));
    // `rbd lock ls` prints: "There is 1 exclusive lock on this image.\nLocker ID Address\n<client> <id> <addr>"
    let ls = String::from_utf8_lossy(&c.rbd(&["lock", "ls", &format!("rbd/{name}")])).into_owned();
    let line = ls
        .lines()
        .find(|l| l.contains("auto "))
        .unwrap_or_else(|| panic!("no lock: {ls}"));
    let mut f = line.split_whitespace();
    let (locker, id) = (
        f.next().unwrap(),
        format!("{} {}", f.next().unwrap(), f.next().unwrap()),
    );
    c.rbd(&["lock", "rm", &format!("rbd/{name}"), &id, locker]);
    // writes now fail (blocklisted), promptly and by name
    let t = Instant::now();
    let mut failed = None;
    while t.elapsed() < Duration::from_secs(60) {
        let r = one(
            &mut q,
            BlockOp::Write {
                offset: 8192,
                buf: vec![7; 4096],
            },
        );
        if let Err(e) = r.result {
            failed = Some(e.to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let msg = failed.expect("writes go on after the lock was broken");
    assert!(
        msg.contains("blocklist") || msg.contains("shutdown") || msg.contains("ESHUTDOWN"),
        "{msg}"
    );
    drop(q);
    drop(img);
    // the data written before the fence is intact
    assert!(c.export(&name)[..4096] == expect[..4096]);
}

/// A request that finishes while it is submitted (a discard too small to free anything, a
/// read past the end) still wakes the queue's owner: waiting on the fd alone gets it.
#[test]
fn requests_finished_at_submission_wake_the_owner() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let c = cluster();
    let name = c.create_image("direct-wake", 4, None);
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    let mut q = img.queue().unwrap();
    for op in [
        BlockOp::Discard {
            offset: 512,
            len: 4096,
        },
        BlockOp::Read {
            offset: 4 << 20,
            buf: vec![0; 512],
        },
        BlockOp::Flush,
    ] {
        q.submit(1, op).unwrap();
        let mut fds = [PollFd::new(q.as_fd(), PollFlags::POLLIN)];
        assert_eq!(
            poll(&mut fds, PollTimeout::from(2000u16)).unwrap(),
            1,
            "woken"
        );
        let mut out = Vec::new();
        q.reap(&mut out);
        assert_eq!(out.len(), 1);
    }
}

/// A librbd client killed while holding the exclusive lock (and the object map's lock) does
/// not block the engine for ever: it answers no lock request, so it is blocklisted, its locks
/// are broken, and the engine's write goes through.
#[test]
fn a_dead_lock_holder_is_fenced_and_its_lock_broken() {
    let c = cluster();
    let name = c.create_image("direct-dead", 8, None);
    let mut bench = rbd_bench(c, &name, "4G")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // wait until it holds the lock, then kill it without letting it release anything
    let t = Instant::now();
    loop {
        let ls =
            String::from_utf8_lossy(&c.rbd(&["lock", "ls", &format!("rbd/{name}")])).into_owned();
        if ls.contains("auto ") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "rbd bench never took the lock"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bench.kill().unwrap();
    let _ = bench.wait();
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    let mut q = img.queue().unwrap();
    let t = Instant::now();
    let r = one(
        &mut q,
        BlockOp::Write {
            offset: 0,
            buf: pattern(4096, 5),
        },
    );
    r.result.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    drop(q);
    drop(img);
    assert!(c.export(&name)[..4096] == pattern(4096, 5)[..]);
    assert_map_clean(&object_map_check(c, &name));
}

/// An image in a RADOS namespace (how ceph-csi isolates tenants) is addressed in it.
#[test]
fn images_in_a_namespace_are_served() {
    let c = cluster();
    let ns = format!("tenant{}", std::process::id());
    let _ = Command::new("rbd")
        .arg("-c")
        .arg(&c.conf)
        .args(["namespace", "create", &format!("rbd/{ns}")])
        .output();
    let name = "disk0";
    c.rbd(&["create", "--size", "8M", &format!("rbd/{ns}/{name}")]);
    let mut spec = direct_spec(c, name);
    spec.namespace = Some(ns.clone());
    let img = Image::open(&spec).unwrap();
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 8 << 20];
    write(&mut q, &mut expect, (4 << 20) - 4096, pattern(8192, 4));
    drop(q);
    drop(img);
    let out = std::env::temp_dir().join(format!("rbdback-ns-{}", std::process::id()));
    let _ = std::fs::remove_file(&out);
    c.rbd(&[
        "export",
        "--no-progress",
        &format!("rbd/{ns}/{name}"),
        &out.display().to_string(),
    ]);
    let got = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert!(
        got == expect,
        "rbd export of the namespaced image equals what was written"
    );
    // the same name outside the namespace does not exist
    let e = Image::open(&direct_spec(c, name)).unwrap_err();
    assert!(matches!(e, RadosError::NoImage { .. }), "{e}");
}

/// A feature the engine cannot honour, enabled while the image is open (`rbd feature enable`
/// takes the lock from us, then notifies), stops the disk's requests with its name.
#[test]
fn a_feature_enabled_live_stops_the_engine_by_name() {
    let c = cluster();
    let name = c.create_image("direct-live", 8, None);
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 8 << 20];
    write(&mut q, &mut expect, 0, pattern(4096, 1));
    c.rbd(&["feature", "enable", &format!("rbd/{name}"), "journaling"]);
    let r = one(
        &mut q,
        BlockOp::Write {
            offset: 4096,
            buf: vec![3; 4096],
        },
    );
    let e = r.result.unwrap_err().to_string();
    assert!(e.contains("journaling") && e.contains("librbd"), "{e}");
    drop(q);
    drop(img);
    assert!(c.export(&name)[..4096] == expect[..4096]);
}

/// Snapshots `parent` as `@base`, protects it and clones it as `<parent>-clone`.
fn clone_of(c: &TestCluster, parent: &str) -> String {
    c.rbd(&["snap", "create", &format!("rbd/{parent}@base")]);
    c.rbd(&["snap", "protect", &format!("rbd/{parent}@base")]);
    let child = format!("{parent}-clone");
    c.rbd(&[
        "clone",
        &format!("rbd/{parent}@base"),
        &format!("rbd/{child}"),
    ]);
    child
}

fn rados(c: &TestCluster, args: &[&str]) {
    let st = Command::new("rados")
        .arg("-c")
        .arg(&c.conf)
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "rados {args:?}");
}

fn data_prefix(c: &TestCluster, name: &str) -> String {
    let info = String::from_utf8(c.rbd(&["info", &format!("rbd/{name}")])).unwrap();
    info.lines()
        .find_map(|l| l.trim().strip_prefix("block_name_prefix: "))
        .unwrap_or_else(|| panic!("no block_name_prefix in {info}"))
        .to_owned()
}

#[test]
fn the_lock_holder_trusts_the_object_map_for_absent_objects() {
    let c = cluster();
    let parent = c.create_image("mapskip-parent", 12, None);
    let pdata = pattern(12 << 20, 31);
    {
        let img = Image::open(&direct_spec(c, &parent)).unwrap();
        let mut q = img.queue().unwrap();
        write(&mut q, &mut vec![0; 12 << 20], 0, pdata.clone());
    }
    let child = clone_of(c, &parent);
    let plain = c.create_image("mapskip", 12, None);
    let planted = vec![0x5au8; 4 << 20];
    let file = std::env::temp_dir().join(format!("{plain}.obj"));
    std::fs::write(&file, &planted).unwrap();

    // what absent objects read as: zeros, or the parent's data for the clone
    for (name, base) in [(&plain, vec![0u8; 12 << 20]), (&child, pdata.clone())] {
        let img = Image::open(&direct_spec(c, name)).unwrap();
        let mut q = img.queue().unwrap();
        // writes take the exclusive lock and load the object map: objects 0 and 2 exist now,
        // object 1 does not
        let mut expect = base.clone();
        write(&mut q, &mut expect, 0, pattern(4096, 32));
        write(&mut q, &mut expect, 8 << 20, pattern(4096, 33));
        // object 1 appears behind the lock holder's back (rados put, which no RBD client
        // does): the holder, trusting its map, never asks the OSD for it
        let obj1 = format!("{}.{:016x}", data_prefix(c, name), 1);
        rados(c, &["-p", "rbd", "put", &obj1, file.to_str().unwrap()]);
        let at = (4usize << 20) + 4096;
        assert!(
            read(&mut q, at as u64, 4096) == base[at..][..4096],
            "{name}: map not trusted"
        );
        // a read answered at once for object 1 and by the OSD for object 2
        let at = (8usize << 20) - 4096;
        assert!(
            read(&mut q, at as u64, 8192) == expect[at..][..8192],
            "{name}: across objects"
        );
        drop(q);
        drop(img);
        // without the lock the map proves nothing: a read-only open asks the OSD
        let mut ro = direct_spec(c, name);
        ro.read_only = true;
        let img = Image::open(&ro).unwrap();
        let mut q = img.queue().unwrap();
        assert!(
            read(&mut q, 4 << 20, 4096) == planted[..4096],
            "{name}: read-only open"
        );
        drop(q);
        drop(img);
        rados(c, &["-p", "rbd", "rm", &obj1]);
    }
    let _ = std::fs::remove_file(&file);
}

#[test]
fn closing_never_waits_longer_than_its_bound_for_a_silent_cluster() {
    let c = cluster();
    let name = c.create_image("close-bound", 8, None);
    let mut spec = direct_spec(c, &name);
    arm_osd_delay(&mut spec);
    spec.close_wait = Duration::from_secs(1);
    let img = Image::open(&spec).unwrap();
    let mut q = img.queue().unwrap();
    // a write takes the exclusive lock: closing must release it (OSD round trips)
    write(&mut q, &mut vec![0; 8 << 20], 0, pattern(4096, 51));
    drop(q);
    let took = drop_with_silent_osds(img);
    assert!(
        took < Duration::from_secs(10),
        "closing waited {took:?} for a cluster that does not answer"
    );
}

/// `rbd du`'s used bytes for `name`'s head (the image must have no snapshots).
fn rbd_du_used(c: &TestCluster, name: &str) -> u64 {
    let out =
        String::from_utf8(c.rbd(&["du", "--format", "json", &format!("rbd/{name}")])).unwrap();
    let (_, rest) = out.split_once("\"used_size\":").unwrap();
    rest.split(|ch: char| !ch.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Used bytes counted from the object map and by a scan equal `rbd du`'s, for the default
/// layout with a partial last object, fancy striping, an image without an object map and a
/// clone (whose parent's objects are not its own).
#[test]
fn usage_equals_rbd_du() {
    use rbdback::rados::{usage, Counted};
    let c = cluster();
    let deadline = || Instant::now() + Duration::from_secs(30);
    let writes: &[(u64, usize)] = &[(0, 4096), (5 << 20, 8192), ((9 << 20) - 4096, 4096)];
    let cases = [
        ("usage-om", None, Counted::ObjectMap, 9 << 20),
        ("usage-plain", Some("layering"), Counted::Scan, 9 << 20),
    ];
    for (prefix, features, counted, used) in cases {
        let name = c.create_image(prefix, 1, features);
        c.rbd(&["resize", "--size", "9M", &format!("rbd/{name}")]);
        let before = usage(&c.spec(&name), deadline()).unwrap();
        assert_eq!((before.size, before.used, before.objects), (9 << 20, 0, 3));
        assert_eq!(before.counted, counted);
        let img = Image::open(&direct_spec(c, &name)).unwrap();
        let mut q = img.queue().unwrap();
        let mut expect = vec![0u8; 9 << 20];
        for (i, (off, len)) in writes.iter().enumerate() {
            write(&mut q, &mut expect, *off, pattern(*len, i as u64));
        }
        drop(q);
        drop(img);
        let u = usage(&c.spec(&name), deadline()).unwrap();
        assert_eq!(u.counted, counted, "{name}");
        assert_eq!(u.used, used, "{name}: three objects, the last of 1 MiB");
        assert_eq!(u.used, rbd_du_used(c, &name), "{name}: as rbd du");
    }
    // fancy striping: 64 KiB units over 4 objects of 1 MiB
    let name = striped_image(c, "usage-stripe", "6M");
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 6 << 20];
    write(&mut q, &mut expect, 0, pattern(4096, 1));
    write(&mut q, &mut expect, (5 << 20) + 4096, pattern(4096, 2));
    drop(q);
    drop(img);
    let u = usage(&c.spec(&name), deadline()).unwrap();
    assert_eq!(
        u.used,
        (1 << 20) + (512 << 10),
        "one whole object, one half inside"
    );
    assert_eq!(u.used, rbd_du_used(c, &name));
    // a clone owns only the objects it wrote
    let parent = c.create_image("usage-parent", 8, None);
    c.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4M",
        "--io-total",
        "8M",
        &format!("rbd/{parent}"),
    ]);
    let child = clone_of(c, &parent);
    assert_eq!(usage(&c.spec(&child), deadline()).unwrap().used, 0);
    let img = Image::open(&direct_spec(c, &child)).unwrap();
    let mut q = img.queue().unwrap();
    write(&mut q, &mut vec![0u8; 8 << 20], 4 << 20, pattern(4096, 3));
    drop(q);
    drop(img);
    let u = usage(&c.spec(&child), deadline()).unwrap();
    assert_eq!(u.used, 4 << 20);
    assert_eq!(u.used, rbd_du_used(c, &child));
}

/// Against OSDs that do not answer, a count ends by its deadline (plus one operation
/// timeout) with an error naming the time, never with a made-up number.
#[test]
fn usage_of_a_silent_cluster_ends_by_its_deadline() {
    let c = cluster();
    let name = c.create_image("usage-silent", 8, Some("layering"));
    let mut spec = c.spec(&name);
    spec.conf_options
        .push(("ms_inject_delay_type".into(), "osd".into()));
    spec.conf_options
        .push(("ms_inject_delay_probability".into(), "1".into()));
    spec.conf_options
        .push(("ms_inject_delay_max".into(), "600".into()));
    let t0 = Instant::now();
    let e = rbdback::rados::usage(&spec, t0 + Duration::from_secs(2)).unwrap_err();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let msg = rbdback::chain(&e);
    assert!(matches!(e, RadosError::TimedOut { secs: 2, .. }), "{msg}");
    assert!(
        msg.contains(&format!("header of image rbd/{name}")),
        "{msg}"
    );
}

/// A scan too long for its deadline (64 TiB without an object map: 16 Mi objects to ask
/// for) stops there and says how far it got.
#[test]
fn a_scan_stops_at_its_deadline_and_says_how_far_it_got() {
    let c = cluster();
    let name = c.create_image("usage-huge", 1, Some("layering"));
    c.rbd(&["resize", "--size", "64T", &format!("rbd/{name}")]);
    let t0 = Instant::now();
    let e = rbdback::rados::usage(&c.spec(&name), t0 + Duration::from_secs(2)).unwrap_err();
    let took = t0.elapsed();
    let msg = rbdback::chain(&e);
    // the scan's rate on this cluster (docs/csi.md quotes it)
    eprintln!("{msg} ({took:?})");
    assert!(took < Duration::from_secs(5), "took {took:?}: {msg}");
    assert!(matches!(e, RadosError::TimedOut { secs: 2, .. }), "{msg}");
    assert!(msg.contains(" of 16777216 checked"), "{msg}");
    // `rbd rm` would ask for (and remove) every one of the 16 Mi objects; none was ever
    // written, so dropping the image's metadata is its whole removal
    let info = String::from_utf8(c.rbd(&["info", &format!("rbd/{name}")])).unwrap();
    let id = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("id: "))
        .unwrap()
        .to_owned();
    rados(c, &["-p", "rbd", "rm", &format!("rbd_header.{id}")]);
    rados(c, &["-p", "rbd", "rm", &format!("rbd_id.{name}")]);
    rados(
        c,
        &[
            "-p",
            "rbd",
            "rmomapkey",
            "rbd_directory",
            &format!("name_{name}"),
        ],
    );
    rados(
        c,
        &[
            "-p",
            "rbd",
            "rmomapkey",
            "rbd_directory",
            &format!("id_{id}"),
        ],
    );
}

/// The RADOS client of a backend that served `name` and is gone.
fn gone_client(c: &TestCluster, name: &str) -> ClientIdentity {
    let img = Image::open(&direct_spec(c, name)).unwrap();
    let me = img.client().unwrap();
    drop(img);
    me
}

fn blocklisted(c: &TestCluster, addr: &str) -> bool {
    c.ceph(&["osd", "blocklist", "ls"]).contains(addr)
}

fn resuming_after(mut spec: ImageSpec, prev: &ClientIdentity) -> ImageSpec {
    spec.predecessors = vec![prev.clone()];
    spec.fence_predecessors = true;
    spec
}

/// A predecessor is reported fenced only once it is: with the exclusive lock the control
/// thread blocklists it after the open returned, and `predecessors_fenced` turns true with
/// the address in the OSD map's blocklist; opens that fence before returning (librbd, an
/// image without the lock) and opens with nothing to fence report it at once.
#[test]
fn predecessors_are_reported_fenced_once_blocklisted() {
    let c = cluster();
    let name = c.create_image("direct-pred", 4, None);
    let prev = gone_client(c, &name);
    let img = Image::open(&resuming_after(direct_spec(c, &name), &prev)).unwrap();
    let t = Instant::now();
    while !img.predecessors_fenced() {
        assert!(t.elapsed() < Duration::from_secs(30), "never fenced");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        blocklisted(c, &prev.addr),
        "reported fenced, not blocklisted"
    );
    drop(img);
    let mut spec = direct_spec(c, &name);
    spec.predecessors = vec![ClientIdentity {
        fenced: true,
        ..prev.clone()
    }];
    spec.fence_predecessors = true;
    assert!(
        Image::open(&spec).unwrap().predecessors_fenced(),
        "nothing to fence"
    );
    let lockless = c.create_image("direct-pred-nolock", 4, Some("layering"));
    for (image, engine) in [
        (&name, EngineChoice::Librbd),
        (&lockless, EngineChoice::Direct),
    ] {
        let prev = gone_client(c, image);
        let mut spec = resuming_after(c.spec(image), &prev);
        spec.engine = engine;
        let img = Image::open(&spec).unwrap();
        assert!(
            img.predecessors_fenced(),
            "{engine:?} fences before open returns"
        );
        assert!(blocklisted(c, &prev.addr), "{engine:?}");
    }
}

/// A keyring for `client.nofence`, whose monitor capabilities do not allow `osd blocklist`.
fn nofence_keyring(c: &TestCluster) -> String {
    let key = c.ceph(&[
        "auth",
        "get-or-create",
        "client.nofence",
        "mon",
        "allow r",
        "osd",
        "allow rwx pool=rbd",
    ]);
    let path = std::env::temp_dir().join(format!("rbdback-nofence-{}.keyring", std::process::id()));
    std::fs::write(&path, key).unwrap();
    path.display().to_string()
}

/// A client that may not blocklist resumes after a predecessor: the fence can never
/// succeed, so writes fail at once naming the missing capability (instead of waiting for
/// ever), reads are served, the predecessor is never reported fenced; the librbd engine
/// fails the open with the same reason.
#[test]
fn a_fence_the_monitors_refuse_fails_writes_by_name_and_serves_reads() {
    let c = cluster();
    let name = c.create_image("direct-nofence", 4, None);
    let img = Image::open(&direct_spec(c, &name)).unwrap();
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 4 << 20];
    write(&mut q, &mut expect, 0, pattern(8192, 9));
    let prev = img.client().unwrap();
    drop(q);
    drop(img);
    let mut spec = resuming_after(direct_spec(c, &name), &prev);
    spec.client_id = "nofence".into();
    spec.keyring = Some(nofence_keyring(c));
    let img = Image::open(&spec).unwrap();
    let mut q = img.queue().unwrap();
    assert!(read(&mut q, 0, 8192) == expect[..8192]);
    for _ in 0..2 {
        let t = Instant::now();
        let r = one(
            &mut q,
            BlockOp::Write {
                offset: 0,
                buf: vec![1; 4096],
            },
        );
        let e = r.result.expect_err("a write went out unfenced").to_string();
        assert!(
            e.contains("osd blocklist") && e.contains("profile rbd"),
            "the missing capability is not named: {e}"
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
    assert!(read(&mut q, 0, 8192) == expect[..8192]);
    assert!(!img.predecessors_fenced());
    assert!(!blocklisted(c, &prev.addr));
    drop(q);
    drop(img);
    spec.engine = EngineChoice::Librbd;
    let e = Image::open(&spec).unwrap_err().to_string();
    assert!(e.contains("osd blocklist"), "{e}");
    assert!(
        c.export(&name)[..8192] == expect[..8192],
        "nothing was written"
    );
}
