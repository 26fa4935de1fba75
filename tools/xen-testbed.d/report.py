#!/usr/bin/env python3
"""Turn a Xen test bed console log into the result table (run on the host by tools/xen-testbed).

Every check the bed must report is listed below: a check that never reported (the guest did not
get that far, dom0 crashed, the run timed out) is a FAIL, so the table cannot pass by omission.
Exit status 0 iff every required check reported PASS.  Figures are functional only: the bed
runs under software emulation (QEMU TCG), so nothing here is a performance number.
"""
import re
import sys

DOM0 = ["dom0-toolstack", "rbdback-package", "ceph-health-ok", "rbd-images-created", "hotplug-selftest", "xl-create",
        "xvda-connected", "ring-page-order", "multi-queue", "persistent-grants", "indirect-segments",
        "block-attach", "block-detach", "domu-finished",
        "export-xvda-64-16M", "export-xvda-68-8M-zero", "export-xvda-96-4M", "export-xvdb-8-4M",
        "no-crash-messages"]
RBDBACK = ["rbdback-supervisor", "rbdback-serve", "serve-sandboxed", "osd-restart", "serve-kill-1", "serve-kill-2", "serve-upgrade",
           "xvda-state-steady", "bad-attach-missing-image", "bad-attach-missing-pool",
           "bad-attach-unknown-id", "bad-attach-no-pool-in-target", "bad-attach-missing-keyring",
           "bad-create", "csi-stage", "csi-publish", "csi-attach", "xvdc-io", "csi-detach",
           "csi-unpublish-unstage", "export-xvdc-4-4M"]
# XENLAB_MIGRATION=1: the migration guest (live migration, save/restore, a hung source)
MIGRATION = ["mig-create", "mig-xvda-present", "mig-live-migrate", "mig-save-restore", "mig-hung-source-fenced",
             "mig-hung-source-cannot-write", "mig-fio-long-verify", "mig-no-io-errors", "mig-finished",
             "mig-one-writer", "export-xenlab-m-0-32M"]
GUEST = ["xvda-present", "blkfront-params", "guest-persistent-grants", "guest-indirect-segments",
         "guest-queues", "guest-ring-size", "fio-seq-verify", "fio-rand-verify", "fio-mixed-verify",
         "fio-flush", "flush-reached-device", "discard-zeros", "pattern-readback", "xvdb-io",
         "xvdb-detached", "guest-no-io-errors"]
MARKS = [("Xen boot", r"Xen version"), ("dom0 kernel", r"Building a PV Dom0"),
         ("dom0 userspace", r"dom0 userspace started"), ("Ceph HEALTH_OK", r"XENLAB-CHECK ceph-health-ok"),
         ("DOM0-READY", r"DOM0-READY"), ("xl create done", r"XL-CREATE-DONE"),
         ("guest xvda up", r"DOMU-MARK XVDA-UP"), ("guest fio done", r"fio done"),
         ("guest done", r"DOMU\[.*DONE"), ("live migration", r"EVENT migrate"),
         ("save/restore", r"EVENT save-restore"), ("hung migration", r"EVENT hung-migrate"),
         ("power off", r"POWEROFF")]
STRIP = re.compile(r"^\[\s*([0-9.]+)\]\s*(?:domU2?>\s*)?")


def main(path):
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    checks, order, features, nodes, times = {}, [], [], [], {}
    backend, blkback, migration = "rbdback", "absent", "0"
    for raw in lines:
        m = STRIP.match(raw)
        t = float(m.group(1)) if m else None
        line = STRIP.sub("", raw).strip()
        for name, pat in MARKS:
            if name not in times and t is not None and re.search(pat, line):
                times[name] = t
        mm = re.match(r"XENLAB-MODE backend=(\S+) blkback=(\S+)(?: migration=(\S+))?", line)
        if mm:
            backend, blkback, migration = mm.group(1), mm.group(2), mm.group(3) or "0"
        mc = re.match(r"(?:XENLAB|DOMU)-CHECK (\S+) (PASS|FAIL) ?(.*)", line)
        if mc:
            name, res, detail = mc.groups()
            if name not in checks:
                order.append(name)
            checks[name] = (res, detail)
        elif line.startswith("DOMU-FEATURE "):
            features.append(line[len("DOMU-FEATURE "):])
        elif line.startswith("XENLAB-NODE "):
            nodes.append(line[len("XENLAB-NODE "):])

    required = DOM0 + GUEST + (RBDBACK if backend == "rbdback" else [])
    if backend == "rbdback" and migration == "1":
        required += MIGRATION
    if backend == "rbdback" and blkback == "loaded":
        required.append("blkback-unbound")
    for name in required:
        if name not in checks:
            order.append(name)
            checks[name] = ("FAIL", "not reported (an earlier step failed or the run ended)")

    print(f"Xen test bed result -- backend under test: {backend} (xen-blkback in dom0: {blkback})")
    print("Functional checks only: the bed runs under QEMU TCG emulation; no figure here is a performance figure.\n")
    w = max(len(n) for n in order) if order else 10
    print(f"  {'check':<{w}}  result  detail")
    print(f"  {'-' * w}  ------  ------")
    for name in order:
        res, detail = checks[name]
        print(f"  {name:<{w}}  {res:<6}  {detail[:160]}")
    if features:
        print("\nNegotiated features, as the guest sees them:")
        for f in features:
            print(f"  {f[:170]}")
    if nodes:
        print("\nxenstore nodes while the guest ran (dom0):")
        for n in nodes:
            print(f"  {n[:170]}")
    if times:
        print("\nTimeline (host seconds since QEMU start):")
        for name, _ in MARKS:
            if name in times:
                print(f"  {name:<16} {times[name]:7.1f}")
    failed = [n for n in order if checks[n][0] != "PASS"]
    print(f"\nRESULT: {'PASS' if not failed else 'FAIL'} ({len(order) - len(failed)}/{len(order)} checks passed"
          + (f"; failed: {' '.join(failed)})" if failed else ")"))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: report.py CONSOLE_LOG")
    sys.exit(main(sys.argv[1]))
