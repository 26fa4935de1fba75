//! The librbd engine on the project's local Ceph cluster, checked with Ceph's own tools.

use std::time::{Duration, Instant};

use rbdback::rados::testing::{arm_osd_delay, cluster, drop_with_silent_osds, one, wait_all};
use rbdback::rados::{
    BlockOp, Encryption, EncryptionFormat, EngineChoice, EngineKind, Image, RadosError,
};

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i as u64 * 13 + seed * 101) % 251).unwrap_or(0))
        .collect()
}

#[test]
fn writes_equal_rbd_export_and_reads_come_back() {
    let c = cluster();
    let name = c.create_image("librbd-export", 16, None);
    let mut spec = c.spec(&name);
    spec.engine = EngineChoice::Librbd;
    let img = Image::open(&spec).unwrap();
    assert_eq!(img.info().engine, EngineKind::Librbd);
    assert_eq!(img.size(), 16 << 20);
    let mut q = img.queue().unwrap();
    let mut expect = vec![0u8; 16 << 20];
    // 64 writes in flight at once: 4 KiB and 512-byte pieces in the first 4 MiB, 512 KiB
    // pieces after it, some across object boundaries. None overlaps another: writes in
    // flight together have no defined order, so overlapping ones could land either way.
    let mut n = 0;
    for i in 0..64u64 {
        let (off, len) = match i % 3 {
            0 => (i * 65536, 4096),
            1 => (i * 65536 + 512 * 3, 512),
            _ => ((4 << 20) + (i / 3) * (576 << 10), 512 << 10),
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
    q.submit(999, BlockOp::Flush).unwrap();
    wait_all(&mut q, 1)[0].result.as_ref().unwrap();
    // read back through the engine
    q.submit(
        7,
        BlockOp::Read {
            offset: 0,
            buf: vec![0; 1 << 20],
        },
    )
    .unwrap();
    let r = wait_all(&mut q, 1).pop().unwrap();
    r.result.unwrap();
    assert!(r.buf.unwrap() == expect[..1 << 20], "read back");
    drop(q);
    drop(img);
    assert!(
        c.export(&name) == expect,
        "rbd export equals what was written"
    );
}

#[test]
fn discard_reads_back_zeros() {
    let c = cluster();
    let name = c.create_image("librbd-discard", 8, None);
    let mut spec = c.spec(&name);
    spec.engine = EngineChoice::Librbd;
    let img = Image::open(&spec).unwrap();
    let mut q = img.queue().unwrap();
    q.submit(
        1,
        BlockOp::Write {
            offset: 0,
            buf: vec![0xaa; 8 << 20],
        },
    )
    .unwrap();
    wait_all(&mut q, 1)[0].result.as_ref().unwrap();
    q.submit(
        2,
        BlockOp::Discard {
            offset: 4 << 20,
            len: 4 << 20,
        },
    )
    .unwrap();
    q.submit(
        3,
        BlockOp::WriteZeroes {
            offset: 4096,
            len: 4096,
        },
    )
    .unwrap();
    for c in wait_all(&mut q, 2) {
        c.result.unwrap();
    }
    q.submit(
        4,
        BlockOp::Read {
            offset: 0,
            buf: vec![1; 8 << 20],
        },
    )
    .unwrap();
    let d = wait_all(&mut q, 1).pop().unwrap().buf.unwrap();
    assert!(d[..4096].iter().all(|&b| b == 0xaa));
    assert!(d[4096..8192].iter().all(|&b| b == 0));
    assert!(d[8192..4 << 20].iter().all(|&b| b == 0xaa));
    assert!(
        d[4 << 20..].iter().all(|&b| b == 0),
        "discarded object reads zeros"
    );
}

#[test]
fn read_only_and_snapshots_refuse_writes() {
    let c = cluster();
    let name = c.create_image("librbd-ro", 4, None);
    let mut spec = c.spec(&name);
    spec.engine = EngineChoice::Librbd;
    let img = Image::open(&spec).unwrap();
    let mut q = img.queue().unwrap();
    q.submit(
        1,
        BlockOp::Write {
            offset: 0,
            buf: vec![5; 4096],
        },
    )
    .unwrap();
    wait_all(&mut q, 1)[0].result.as_ref().unwrap();
    drop(q);
    drop(img);
    c.rbd(&["snap", "create", &format!("rbd/{name}@s1")]);
    let mut spec = c.spec(&name);
    spec.engine = EngineChoice::Librbd;
    spec.snapshot = Some("s1".into());
    let snap = Image::open(&spec).unwrap();
    assert!(snap.info().read_only);
    let mut q = snap.queue().unwrap();
    let e = q
        .submit(
            1,
            BlockOp::Write {
                offset: 0,
                buf: vec![6; 4096],
            },
        )
        .unwrap_err();
    assert!(matches!(e.op, BlockOp::Write { .. }), "the op comes back");
    q.submit(
        2,
        BlockOp::Read {
            offset: 0,
            buf: vec![0; 4096],
        },
    )
    .unwrap();
    let d = wait_all(&mut q, 1).pop().unwrap().buf.unwrap();
    assert!(d.iter().all(|&b| b == 5), "snapshot data");
}

#[test]
fn missing_image_and_pool_are_named() {
    let c = cluster();
    let e = Image::open(&c.spec("no-such-image")).unwrap_err();
    assert!(matches!(e, RadosError::NoImage { .. }), "{e}");
    assert!(
        e.to_string().contains("rbd/no-such-image does not exist"),
        "{e}"
    );
    let mut spec = c.spec("x");
    spec.pool = rbdback::rados::PoolRef::Name("no-such-pool".into());
    let e = Image::open(&spec).unwrap_err();
    assert!(matches!(e, RadosError::NoPool(_)), "{e}");
}

#[test]
fn bad_key_fails_with_a_named_error_in_bounded_time() {
    let c = cluster();
    let mut spec = c.spec("whatever");
    spec.keyring = Some("/dev/null".into());
    spec.key = Some("AQBeNGJl3vZUJRAA1Zt0X4Z1p2ZC1HhIxYr3Kg==".into());
    let t = Instant::now();
    let e = Image::open(&spec).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(e, RadosError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

#[test]
fn unreachable_monitor_fails_in_bounded_time() {
    let c = cluster();
    let mut spec = c.spec("whatever");
    // A loopback port nothing listens on.
    spec.conf_options = vec![("mon_host".into(), "v2:127.0.0.1:9".into())];
    let t = Instant::now();
    let e = Image::open(&spec).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(e, RadosError::Connect { .. }), "{e}");
}

fn io(q: &mut rbdback::rados::Queue, op: BlockOp) -> Option<Vec<u8>> {
    let c = one(q, op);
    c.result.unwrap();
    c.buf
}

/// 64 KiB at 1 MiB.
fn read_1m(q: &mut rbdback::rados::Queue) -> Vec<u8> {
    let buf = vec![0; 64 << 10];
    io(
        q,
        BlockOp::Read {
            offset: 1 << 20,
            buf,
        },
    )
    .unwrap()
}

#[test]
fn encrypted_images_are_served_decrypted_and_refused_by_the_direct_engine() {
    let c = cluster();
    let name = c.create_image("librbd-luks", 64, None);
    let dir = std::env::temp_dir();
    let pass = dir.join(format!("{name}.pass"));
    let wrong = dir.join(format!("{name}.wrong"));
    std::fs::write(&pass, b"correct horse battery").unwrap();
    std::fs::write(&wrong, b"incorrect horse").unwrap();
    c.rbd(&[
        "encryption",
        "format",
        &format!("rbd/{name}"),
        "luks2",
        pass.to_str().unwrap(),
    ]);
    let enc = |file: &std::path::Path, format| {
        let mut s = c.spec(&name);
        s.encryption = Some(Encryption {
            format,
            passphrase_file: file.to_str().unwrap().to_owned(),
        });
        s
    };
    let data = pattern(64 << 10, 41);
    {
        // auto hands the image to librbd, which decrypts it
        let img = Image::open(&enc(&pass, EncryptionFormat::Luks2)).unwrap();
        assert_eq!(img.info().engine, EngineKind::Librbd);
        let size = img.size();
        assert!(
            size > 0 && size < 64 << 20,
            "the LUKS header is not the guest's: {size}"
        );
        let mut q = img.queue().unwrap();
        io(
            &mut q,
            BlockOp::Write {
                offset: 1 << 20,
                buf: data.clone(),
            },
        );
        assert!(read_1m(&mut q) == data);
    }
    // a second open with the passphrase reads the plaintext back ...
    let img = Image::open(&enc(&pass, EncryptionFormat::Luks2)).unwrap();
    let mut q = img.queue().unwrap();
    assert!(read_1m(&mut q) == data);
    drop(q);
    drop(img);
    // ... while the stored image holds a LUKS header and only ciphertext
    let raw = c.export(&name);
    assert_eq!(&raw[..6], b"LUKS\xba\xbe");
    assert!(
        raw.chunks(4096).all(|b| b != &data[..4096]),
        "plaintext found in the stored image"
    );
    // a wrong passphrase, or the wrong LUKS version, is named
    for (file, format) in [
        (&wrong, EncryptionFormat::Luks2),
        (&pass, EncryptionFormat::Luks1),
    ] {
        let e = Image::open(&enc(file, format)).unwrap_err();
        assert!(matches!(e, RadosError::EncryptionLoad { .. }), "{e}");
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
    }
    let e = Image::open(&enc(
        &dir.join("no-such-passphrase-file"),
        EncryptionFormat::Luks2,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("passphrase file"), "{e}");
    // the direct engine does not decrypt: it refuses by name and points to librbd
    let mut s = enc(&pass, EncryptionFormat::Luks2);
    s.engine = EngineChoice::Direct;
    let e = Image::open(&s).unwrap_err();
    assert!(
        e.to_string().contains("encryption") && e.to_string().contains("engine=librbd"),
        "{e}"
    );
    let _ = std::fs::remove_file(&pass);
    let _ = std::fs::remove_file(&wrong);
}

#[test]
fn closing_never_waits_longer_than_its_bound_for_a_silent_cluster() {
    let c = cluster();
    let name = c.create_image("librbd-close-bound", 8, None);
    let mut spec = c.spec(&name);
    spec.engine = EngineChoice::Librbd;
    arm_osd_delay(&mut spec);
    spec.close_wait = Duration::from_secs(1);
    let img = Image::open(&spec).unwrap();
    let mut q = img.queue().unwrap();
    // a write takes the exclusive lock: rbd_close must release it
    let buf = pattern(4096, 61);
    io(&mut q, BlockOp::Write { offset: 0, buf });
    drop(q);
    let took = drop_with_silent_osds(img);
    assert!(
        took < Duration::from_secs(10),
        "closing waited {took:?} for a cluster that does not answer"
    );
}
