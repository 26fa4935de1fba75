//! Checks every size and field offset of our blkif layouts against Xen's own headers
//! (`/usr/include/xen/io/blkif.h` and `ring.h`, from libxen-dev), for all three ABIs.
//!
//! A small C program is compiled with gcc twice: natively (the `native` and, on x86_64 hosts,
//! `x86_64-abi` layout), and emulating i386 (`x86_32-abi`): `-m32` is not available, so the real
//! header is included under `#pragma pack(push, 4)` (i386 aligns 64-bit fields to 4, which is
//! what Linux blkback's `common.h` does for its x86_32 structs) with `__i386__` defined for the
//! header's i386-only padding. Ring capacities come from ring.h's own `__RING_SIZE`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use rbdback::ring::abi::{
    ring_capacity, Abi, MAX_DIRECT_SEGMENTS, MAX_INDIRECT_PAGES, MAX_RING_PAGE_ORDER, SEGMENT_SIZE,
    SRING_HEADER_SIZE, SRING_REQ_EVENT, SRING_REQ_PROD, SRING_RSP_EVENT, SRING_RSP_PROD,
};
use rbdback::ring::request::{op, DISCARD_SECURE};

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <xen/xen.h>
#ifdef EMULATE_I386
#define __i386__ 1
#pragma pack(push, 4)
#endif
#include <xen/io/blkif.h>
#ifdef EMULATE_I386
#pragma pack(pop)
#endif

#define SZ(name, t) printf("%s %zu\n", name, sizeof(t))
#define OFF(name, t, f) printf("%s %zu\n", name, offsetof(t, f))

int main(void) {
    SZ("slot_size", union blkif_sring_entry);
    SZ("req_size", struct blkif_request);
    OFF("req_operation", struct blkif_request, operation);
    OFF("req_nr_segments", struct blkif_request, nr_segments);
    OFF("req_handle", struct blkif_request, handle);
    OFF("req_id", struct blkif_request, id);
    OFF("req_sector", struct blkif_request, sector_number);
    OFF("req_seg", struct blkif_request, seg);
    SZ("discard_size", struct blkif_request_discard);
    OFF("discard_flag", struct blkif_request_discard, flag);
    OFF("discard_id", struct blkif_request_discard, id);
    OFF("discard_sector", struct blkif_request_discard, sector_number);
    OFF("discard_nr_sectors", struct blkif_request_discard, nr_sectors);
    SZ("ind_size", struct blkif_request_indirect);
    OFF("ind_op", struct blkif_request_indirect, indirect_op);
    OFF("ind_nr_segments", struct blkif_request_indirect, nr_segments);
    OFF("ind_id", struct blkif_request_indirect, id);
    OFF("ind_sector", struct blkif_request_indirect, sector_number);
    OFF("ind_handle", struct blkif_request_indirect, handle);
    OFF("ind_grefs", struct blkif_request_indirect, indirect_grefs);
    SZ("rsp_size", struct blkif_response);
    OFF("rsp_id", struct blkif_response, id);
    OFF("rsp_operation", struct blkif_response, operation);
    OFF("rsp_status", struct blkif_response, status);
    SZ("segment_size", struct blkif_request_segment);
    OFF("seg_gref", struct blkif_request_segment, gref);
    OFF("seg_first_sect", struct blkif_request_segment, first_sect);
    OFF("seg_last_sect", struct blkif_request_segment, last_sect);
    OFF("sring_req_prod", struct blkif_sring, req_prod);
    OFF("sring_req_event", struct blkif_sring, req_event);
    OFF("sring_rsp_prod", struct blkif_sring, rsp_prod);
    OFF("sring_rsp_event", struct blkif_sring, rsp_event);
    OFF("sring_header", struct blkif_sring, ring);
    printf("max_segments %d\n", BLKIF_MAX_SEGMENTS_PER_REQUEST);
    printf("max_indirect_pages %d\n", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    printf("op_read %d\nop_write %d\nop_barrier %d\nop_flush %d\nop_discard %d\nop_indirect %d\n",
           BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE,
           BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT);
    printf("discard_secure %d\n", BLKIF_DISCARD_SECURE);
    printf("rsp_okay %d\nrsp_error %d\nrsp_eopnotsupp %d\n", BLKIF_RSP_OKAY, BLKIF_RSP_ERROR,
           BLKIF_RSP_EOPNOTSUPP);
    /* ring.h's own arithmetic, on a real (over-allocated) shared ring. */
    struct blkif_sring *s = calloc(1, 4096 << 4);
    if (!s) return 1;
    for (int order = 0; order <= 4; order++)
        printf("capacity_%d %ld\n", order, (long)__RING_SIZE(s, 4096 << order));
    free(s);
    return 0;
}
"#;

fn run_c(dir: &Path, name: &str, defines: &[&str]) -> BTreeMap<String, i64> {
    let src = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    std::fs::write(&src, PROGRAM).unwrap();
    let out = Command::new("gcc")
        .args(["-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .args(defines)
        .output()
        .expect("gcc must be installed (tools/install-deps: build-essential)");
    assert!(
        out.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn ours(abi: Abi) -> BTreeMap<String, i64> {
    let l = abi.layout();
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: usize| {
        m.insert(k.to_string(), i64::try_from(v).unwrap());
    };
    put("slot_size", l.slot_size);
    put("req_size", l.req_size);
    put("req_operation", l.req_operation);
    put("req_nr_segments", l.req_nr_segments);
    put("req_handle", l.req_handle);
    put("req_id", l.req_id);
    put("req_sector", l.req_sector);
    put("req_seg", l.req_seg);
    put("discard_size", l.discard_size);
    put("discard_flag", l.discard_flag);
    put("discard_id", l.req_id);
    put("discard_sector", l.discard_sector);
    put("discard_nr_sectors", l.discard_nr_sectors);
    put("ind_size", l.ind_size);
    put("ind_op", l.ind_op);
    put("ind_nr_segments", l.ind_nr_segments);
    put("ind_id", l.req_id);
    put("ind_sector", l.ind_sector);
    put("ind_handle", l.ind_handle);
    put("ind_grefs", l.ind_grefs);
    put("rsp_size", l.rsp_size);
    put("rsp_id", l.rsp_id);
    put("rsp_operation", l.rsp_operation);
    put("rsp_status", l.rsp_status);
    // Segment layout is fixed (Segment::encode writes gref at 0, first/last at 4/5).
    put("segment_size", SEGMENT_SIZE);
    put("seg_gref", 0);
    put("seg_first_sect", 4);
    put("seg_last_sect", 5);
    put("sring_req_prod", SRING_REQ_PROD);
    put("sring_req_event", SRING_REQ_EVENT);
    put("sring_rsp_prod", SRING_RSP_PROD);
    put("sring_rsp_event", SRING_RSP_EVENT);
    put("sring_header", SRING_HEADER_SIZE);
    put("max_segments", MAX_DIRECT_SEGMENTS);
    put("max_indirect_pages", MAX_INDIRECT_PAGES);
    put("op_read", op::READ.into());
    put("op_write", op::WRITE.into());
    put("op_barrier", op::WRITE_BARRIER.into());
    put("op_flush", op::FLUSH_DISKCACHE.into());
    put("op_discard", op::DISCARD.into());
    put("op_indirect", op::INDIRECT.into());
    put("discard_secure", DISCARD_SECURE.into());
    use rbdback::ring::Status;
    m.insert("rsp_okay".into(), Status::Okay.code().into());
    m.insert("rsp_error".into(), Status::Error.code().into());
    m.insert("rsp_eopnotsupp".into(), Status::NotSupported.code().into());
    for order in 0..=MAX_RING_PAGE_ORDER {
        m.insert(
            format!("capacity_{order}"),
            ring_capacity(abi, order).unwrap().into(),
        );
    }
    m
}

fn compare(abi: Abi, xen: &BTreeMap<String, i64>) {
    let ours = ours(abi);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        xen.keys().collect::<Vec<_>>(),
        "the test checks every field the C program prints"
    );
    for (k, v) in xen {
        assert_eq!(ours[k], *v, "{abi}: {k}: ours {} vs Xen's {v}", ours[k]);
    }
}

#[test]
fn layouts_match_xen_headers_for_all_three_abis() {
    let dir = std::env::temp_dir().join(format!("rbdback-ring-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let native = run_c(&dir, "native", &[]);
    let x86_32 = run_c(&dir, "x86_32", &["-DEMULATE_I386"]);
    let _ = std::fs::remove_dir_all(&dir);

    compare(Abi::Native, &native);
    // x86_64-abi is the native layout of an x86_64 host.
    #[cfg(target_arch = "x86_64")]
    compare(Abi::X86_64, &native);
    compare(Abi::X86_32, &x86_32);

    // Facts from DESIGN.md as a cross-check of the emulation itself.
    assert_eq!(x86_32["req_id"], 4);
    assert_eq!(x86_32["slot_size"], 108);
    assert_eq!(native["req_id"], 8);
    assert_eq!(native["slot_size"], 112);
    assert_eq!(native["capacity_0"], 32);
}
