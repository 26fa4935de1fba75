//! The `rbdback` command.
//!
//! - `rbdback serve --domid N [--kind vbd]`: serve one guest's RBD disks (one process per VM).
//! - `rbdback supervise [--kind vbd]`: dom0 service; keeps one `serve` process per guest that
//!   has RBD disks under `backend/<kind>`.
//! - `rbdback demo`: a guest's I/O through the whole stack (local Ceph, simulated Xen).
//! - `rbdback ring-demo`: the ring layer alone: a mock blkfront fills a blkif ring with a mixed
//!   workload (reads, writes, indirect requests, flushes, discards and some invalid requests);
//!   the back ring takes, validates and answers them against an in-memory disk; the frontend
//!   checks every status and every byte read, and the throughput is printed.
//! - `rbdback csi --node-id ID`: the CSI node plugin (gRPC on a unix socket) for volumes that
//!   ceph-csi's controller provisions; also runs the supervisor unless `--no-supervise`.
//! - `rbdback engine-bench`: one storage-engine queue at a fixed depth on an existing image
//!   (benchmark images only: it writes), without the ring; `tools/bench-engines` runs it
//!   beside fio.

use std::process::ExitCode;
use std::sync::Arc;

use rbdback::chain;
use rbdback::device::backend::{serve, supervise, ServeConfig};
use rbdback::device::dataplane::QueueConfig;
use rbdback::device::params::parse_seconds;
use rbdback::device::vbd::{Options, RadosOpener};
use rbdback::xen::real::RealPlatform;
use rbdback::xen::Platform;

// The process allocates through tcmalloc, the allocator Ceph builds its own daemons with:
// linked ahead of libc, it serves librados' C++ allocations as well as ours. With glibc's
// malloc the client spent ~20 % more CPU per I/O (arena locks between the submitting thread
// and librados' messenger, which frees what the other allocated; docs/performance.md).
#[link(
    name = "libtcmalloc_minimal.so.4",
    kind = "dylib",
    modifiers = "+verbatim"
)]
extern "C" {}

const USAGE: &str = "usage:
  rbdback serve --domid N [--kind vbd] [--backend-domid 0] [--stay]
                [--io-timeout SECS (0: wait for ever)] [--stall-warn SECS (30)]
  rbdback supervise [--kind vbd] [--backend-domid 0] [--io-timeout SECS] [--stall-warn SECS]
  rbdback demo [--ceph-conf FILE] [--requests N] [--qd N] [--queues N] [--writes PCT]
               [--span-mib N] [--bench-image NAME (existing image, no verification)
               [--bs-kib 4-1024] [--seq]]
  rbdback ring-demo [--abi x86_64-abi|x86_32-abi] [--order 0-4] [--requests N]
  rbdback soak [--minutes N] [--fault-every SECS] (tools/soak: faults on a private cluster)
  rbdback csi --node-id ID [--endpoint unix:///var/lib/kubelet/plugins/rbd.csi.ceph.com/csi.sock]
              [--driver-name rbd.csi.ceph.com] [--state-dir /var/lib/rbdback/csi]
              [--ceph-conf FILE] [--clusters /etc/ceph-csi-config/config.json] [--no-supervise]
  rbdback engine-bench --image POOL/NAME [--ceph-conf FILE] [--engine direct|librbd]
               [--rw randread|randwrite|read|write] [--bs BYTES] [--qd N] [--seconds N]
               [--span-mib N]";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    match args.first().map(String::as_str) {
        Some("serve") => run_serve(rest),
        Some("supervise") => run_supervise(rest),
        Some("csi") => run_csi(rest),
        Some("demo") => run_full_demo(rest),
        Some("ring-demo") => run_demo(rest),
        Some("soak") => run_soak(rest),
        Some("engine-bench") => run_engine_bench(rest),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Value of `--name` in `args`.
fn opt<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn num<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match opt(args, name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{name} {v:?} is not a valid number")),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("rbdback: {msg}");
    ExitCode::FAILURE
}

/// `--io-timeout` and `--stall-warn`: the disks' defaults (their `params` may override them).
fn queue_defaults(args: &[String]) -> Result<QueueConfig, String> {
    let mut q = QueueConfig::default();
    let secs = |name: &str, key: &str| -> Result<Option<std::time::Duration>, String> {
        opt(args, name)
            .map(|v| parse_seconds(key, v).map_err(|e| format!("{name}: {e}")))
            .transpose()
    };
    if let Some(t) = secs("--io-timeout", "io_timeout")? {
        q.io_timeout = (!t.is_zero()).then_some(t);
    }
    if let Some(w) = secs("--stall-warn", "stall_warn")? {
        if w.is_zero() {
            return Err("--stall-warn must be more than 0 seconds".into());
        }
        q.stall_warn = w;
    }
    Ok(q)
}

/// The same flags, passed on to `serve` children.
fn queue_flags(args: &[String]) -> Vec<String> {
    ["--io-timeout", "--stall-warn"]
        .iter()
        .filter_map(|n| opt(args, n).map(|v| [(*n).to_owned(), v.to_owned()]))
        .flatten()
        .collect()
}

fn run_serve(args: &[String]) -> ExitCode {
    let domid = match opt(args, "--domid").map(str::parse::<u16>) {
        Some(Ok(d)) => d,
        _ => return fail("serve needs --domid N (the guest's domain id)"),
    };
    let backend_domid = match num(args, "--backend-domid", 0u16) {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    let queue = match queue_defaults(args) {
        Ok(q) => q,
        Err(e) => return fail(&e),
    };
    let cfg = ServeConfig {
        kind: opt(args, "--kind").unwrap_or("vbd").to_owned(),
        backend_domid,
        domid,
        exit_when_empty: !args.iter().any(|a| a == "--stay"),
        options: Options {
            queue,
            ..Options::default()
        },
    };
    let platform = Arc::new(RealPlatform::new());
    let (_stop_tx, stop_rx) = std::sync::mpsc::channel();
    match serve(platform, Arc::new(RadosOpener), &cfg, &stop_rx) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&chain(&e)),
    }
}

#[cfg(feature = "csi")]
fn run_csi(args: &[String]) -> ExitCode {
    let Some(node_id) = opt(args, "--node-id") else {
        return fail("csi needs --node-id ID (this node's name, as Kubernetes knows it)");
    };
    let endpoint = opt(args, "--endpoint")
        .unwrap_or("unix:///var/lib/kubelet/plugins/rbd.csi.ceph.com/csi.sock");
    let Some(socket) = endpoint.strip_prefix("unix://") else {
        return fail(&format!("--endpoint must be unix:///path (got {endpoint})"));
    };
    let cfg = rbdback::csi::Config {
        driver_name: opt(args, "--driver-name")
            .unwrap_or("rbd.csi.ceph.com")
            .to_owned(),
        node_id: node_id.to_owned(),
        state_dir: opt(args, "--state-dir")
            .unwrap_or("/var/lib/rbdback/csi")
            .into(),
        ceph_conf: opt(args, "--ceph-conf").map(str::to_owned),
        clusters: opt(args, "--clusters").map(Into::into),
        open_timeout: std::time::Duration::from_secs(30),
    };
    if !args.iter().any(|a| a == "--no-supervise") {
        // the guests' backends: the same loop as `rbdback supervise`
        let rest: Vec<String> = Vec::new();
        if let Err(e) = std::thread::Builder::new()
            .name("supervise".into())
            .spawn(move || {
                let code = run_supervise(&rest);
                if code != ExitCode::SUCCESS {
                    tracing::error!("the supervisor stopped; the CSI plugin exits too");
                    std::process::exit(1);
                }
            })
        {
            return fail(&format!("cannot start the supervisor: {e}"));
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the gRPC runtime: {e}")),
    };
    // kubelet's container runtime stops the plugin with SIGTERM; a terminal with SIGINT
    let shutdown = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("CSI plugin stopping");
    };
    match rt.block_on(rbdback::csi::serve(
        cfg,
        std::path::Path::new(socket),
        shutdown,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("CSI plugin on {socket}: {e}")),
    }
}

#[cfg(not(feature = "csi"))]
fn run_csi(_args: &[String]) -> ExitCode {
    fail("this rbdback was built without the csi feature")
}

fn run_supervise(args: &[String]) -> ExitCode {
    let backend_domid = match num(args, "--backend-domid", 0u16) {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    let kind = opt(args, "--kind").unwrap_or("vbd");
    if let Err(e) = queue_defaults(args) {
        return fail(&e);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(&format!("cannot find our own executable: {e}")),
    };
    let xs = match RealPlatform::new().xenstore() {
        Ok(x) => x,
        Err(e) => return fail(&chain(&e)),
    };
    let (_stop_tx, stop_rx) = std::sync::mpsc::channel();
    let mut extra = vec!["--backend-domid".to_owned(), backend_domid.to_string()];
    extra.extend(queue_flags(args));
    match supervise(&xs, kind, backend_domid, &exe, &extra, &stop_rx) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&chain(&e)),
    }
}

#[cfg(feature = "test-utils")]
fn run_soak(args: &[String]) -> ExitCode {
    let mut o = rbdback::soak::SoakOptions::default();
    let parsed = (|| -> Result<(), String> {
        o.minutes = num(args, "--minutes", o.minutes)?;
        o.fault_every =
            std::time::Duration::from_secs(num(args, "--fault-every", o.fault_every.as_secs())?);
        Ok(())
    })();
    if let Err(e) = parsed {
        return fail(&e);
    }
    match rbdback::soak::run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("soak failed: {}", chain(&e))),
    }
}

#[cfg(not(feature = "test-utils"))]
fn run_soak(_args: &[String]) -> ExitCode {
    fail("soak needs the simulated guest: build with `--features test-utils`")
}

#[cfg(feature = "test-utils")]
fn run_full_demo(args: &[String]) -> ExitCode {
    let mut o = rbdback::demo::DemoOptions::default();
    let parsed = (|| -> Result<(), String> {
        o.ceph_conf = opt(args, "--ceph-conf").map(std::path::PathBuf::from);
        o.requests = num(args, "--requests", o.requests)?;
        o.qd = num(args, "--qd", o.qd)?;
        o.queues = num(args, "--queues", o.queues)?;
        o.write_pct = num(args, "--writes", o.write_pct)?;
        o.span_mib = num(args, "--span-mib", o.span_mib)?;
        o.bench_image = opt(args, "--bench-image").map(str::to_owned);
        o.bs_kib = num(args, "--bs-kib", o.bs_kib)?;
        o.seq = args.iter().any(|a| a == "--seq");
        Ok(())
    })();
    if let Err(e) = parsed {
        return fail(&e);
    }
    match rbdback::demo::run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("demo failed: {}", chain(&e))),
    }
}

#[cfg(not(feature = "test-utils"))]
fn run_full_demo(_args: &[String]) -> ExitCode {
    fail("demo needs the simulated guest: build with `--features test-utils`")
}

#[cfg(feature = "test-utils")]
fn run_demo(args: &[String]) -> ExitCode {
    match ring_demo::Options::parse(args).and_then(|o| ring_demo::run(&o)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbdback demo: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "test-utils"))]
fn run_demo(_args: &[String]) -> ExitCode {
    eprintln!("rbdback demo needs the mock frontend: build with `--features test-utils`");
    ExitCode::from(2)
}

#[cfg(feature = "test-utils")]
// Demo arithmetic: sectors of a 64 MiB disk and at most 512 * 33 page numbers, all of which fit
// every integer type they are cast to; byte patterns are truncated on purpose.
#[allow(clippy::cast_possible_truncation)]
mod ring_demo {
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    use rbdback::ring::abi::{ring_bytes, PAGE_SIZE};
    use rbdback::ring::front::{indirect_pages, MockFrontend, WireRequest};
    use rbdback::ring::request::op;
    use rbdback::ring::{
        Abi, BackRing, Limits, Parsed, Request, RequestKind, Segment, Status, Transfer,
    };
    use rbdback::shm::SharedMem;

    const DISK_BYTES: usize = 64 << 20;
    const DISK_SECTORS: u64 = (DISK_BYTES / 512) as u64;
    /// Data pages reserved per ring slot (the largest request below uses 32).
    const PAGES_PER_SLOT: usize = 33;

    pub struct Options {
        abi: Abi,
        order: u8,
        requests: u64,
    }

    impl Options {
        pub fn parse(args: &[String]) -> Result<Options, String> {
            let mut o = Options {
                abi: Abi::X86_64,
                order: 2,
                requests: 200_000,
            };
            let mut it = args.iter();
            while let Some(a) = it.next() {
                let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                match a.as_str() {
                    "--abi" => {
                        o.abi = Abi::from_protocol(Some(v)).ok_or(format!("unknown abi {v}"))?
                    }
                    "--order" => o.order = v.parse().map_err(|e| format!("--order: {e}"))?,
                    "--requests" => {
                        o.requests = v.parse().map_err(|e| format!("--requests: {e}"))?
                    }
                    _ => return Err(format!("unknown option {a}")),
                }
            }
            Ok(o)
        }
    }

    /// A tiny deterministic PRNG (xorshift64*), so runs are reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// What the frontend expects back for one request.
    struct Expect {
        id: u64,
        status: Status,
        /// For reads: the pages and bytes the disk held when the read was queued.
        read: Option<(Vec<Segment>, Vec<u8>)>,
    }

    #[derive(Default)]
    struct Counts {
        reads: u64,
        writes: u64,
        indirect: u64,
        flushes: u64,
        discards: u64,
        invalid: u64,
        bytes: u64,
        verified_reads: u64,
    }

    /// The guest side: its view of the disk (`shadow`) and the pages it grants.
    struct Guest {
        rng: Rng,
        shadow: Vec<u8>,
        next_id: u64,
        counts: Counts,
    }

    impl Guest {
        /// Segments for `nsegs` pages of the slot that request `id` occupies.
        fn segments(&mut self, id: u64, cap: u64, nsegs: usize) -> Vec<Segment> {
            let base = (id % cap) as usize * PAGES_PER_SLOT;
            (0..nsegs)
                .map(|i| Segment {
                    gref: (base + i) as u32,
                    first_sect: 0,
                    last_sect: 7,
                })
                .collect()
        }

        /// Builds the next request, writing its data / descriptor pages into guest memory.
        fn next_request(&mut self, cap: u64, grants: &SharedMem<'_>) -> (WireRequest, Expect) {
            let id = self.next_id;
            self.next_id += 1;
            let dice = self.rng.below(1000);
            let sector = self.rng.below(DISK_SECTORS / 8 - 64) * 8;
            let ok = |id| Expect {
                id,
                status: Status::Okay,
                read: None,
            };
            if dice < 5 {
                self.counts.invalid += 1;
                let req = if dice < 3 {
                    let segs = self.segments(id, cap, 1);
                    WireRequest::read(id, DISK_SECTORS - 4, segs) // reaches past the end
                } else {
                    WireRequest::rw(op::RESERVED_1, id, 0, vec![])
                };
                let status = if dice < 3 {
                    Status::Error
                } else {
                    Status::NotSupported
                };
                return (
                    req,
                    Expect {
                        id,
                        status,
                        read: None,
                    },
                );
            }
            if dice < 20 {
                self.counts.flushes += 1;
                return (WireRequest::flush(id), ok(id));
            }
            if dice < 30 {
                self.counts.discards += 1;
                let nr = 8 * (1 + self.rng.below(16));
                let at = sector as usize * 512;
                self.shadow[at..at + nr as usize * 512].fill(0);
                let req = WireRequest::Discard {
                    flag: 0,
                    id,
                    sector,
                    nr_sectors: nr,
                };
                return (req, ok(id));
            }
            let indirect = dice >= 950;
            let nsegs = if indirect {
                32
            } else if dice < 600 {
                1
            } else {
                1 + self.rng.below(11) as usize
            };
            let segs = self.segments(id, cap, nsegs);
            let at = sector as usize * 512;
            let len = nsegs * PAGE_SIZE;
            self.counts.bytes += len as u64;
            let write = self.rng.below(3) == 0;
            let req_op = if write { op::WRITE } else { op::READ };
            if indirect {
                self.counts.indirect += 1;
            }
            let expect = if write {
                self.counts.writes += 1;
                let fill = (self.rng.next() & 0xff) as u8;
                for (i, s) in segs.iter().enumerate() {
                    let page: Vec<u8> = (0..PAGE_SIZE)
                        .map(|b| fill ^ (b as u8) ^ (i as u8))
                        .collect();
                    grants
                        .write(s.gref as usize * PAGE_SIZE, &page)
                        .expect("guest page in range");
                    self.shadow[at + i * PAGE_SIZE..at + (i + 1) * PAGE_SIZE]
                        .copy_from_slice(&page);
                }
                ok(id)
            } else {
                self.counts.reads += 1;
                Expect {
                    id,
                    status: Status::Okay,
                    read: Some((segs.clone(), self.shadow[at..at + len].to_vec())),
                }
            };
            let req = if indirect {
                // The descriptor page is the slot's last page.
                let desc = (id % cap) as usize * PAGES_PER_SLOT + PAGES_PER_SLOT - 1;
                let pages = indirect_pages(&segs);
                grants
                    .write(desc * PAGE_SIZE, &pages[0])
                    .expect("descriptor page in range");
                WireRequest::Indirect {
                    indirect_op: req_op,
                    nr_segments: nsegs as u16,
                    id,
                    sector,
                    grefs: vec![desc as u32],
                }
            } else {
                WireRequest::rw(req_op, id, sector, segs)
            };
            (req, expect)
        }
    }

    /// The backend side, standing in for the device layer: grant "maps" are offsets into the
    /// guest's page area, checked like a failing grant map would be.
    struct Backend {
        disk: Vec<u8>,
        limits: Limits,
    }

    impl Backend {
        fn grant_offset(grants: &SharedMem<'_>, s: &Segment) -> Option<usize> {
            let off = s.gref as usize * PAGE_SIZE + s.offset_bytes();
            (off + s.len_bytes() <= grants.len()).then_some(off)
        }

        fn transfer(&mut self, grants: &SharedMem<'_>, t: &Transfer, write: bool) -> Status {
            let mut at = t.offset_bytes() as usize;
            for s in t.segments.iter() {
                let Some(off) = Self::grant_offset(grants, s) else {
                    return Status::Error;
                };
                let Some(disk) = self.disk.get_mut(at..at + s.len_bytes()) else {
                    return Status::Error;
                };
                let r = if write {
                    grants.read(off, disk)
                } else {
                    grants.write(off, disk)
                };
                if r.is_err() {
                    return Status::Error;
                }
                at += s.len_bytes();
            }
            Status::Okay
        }

        fn execute(&mut self, grants: &SharedMem<'_>, req: &Request) -> Status {
            match &req.kind {
                RequestKind::Read(t) => self.transfer(grants, t, false),
                RequestKind::Write(t) => self.transfer(grants, t, true),
                RequestKind::Flush(t) | RequestKind::Barrier(t) => match t {
                    Some(t) => self.transfer(grants, t, true),
                    None => Status::Okay,
                },
                RequestKind::Discard(d) => {
                    let at = d.sector as usize * 512;
                    match self.disk.get_mut(at..at + d.nr_sectors as usize * 512) {
                        Some(r) => {
                            r.fill(0);
                            Status::Okay
                        }
                        None => Status::Error,
                    }
                }
            }
        }

        /// One wake-up: take everything published, validate, execute, answer, publish.
        fn service(
            &mut self,
            ring: &mut BackRing,
            mem: &SharedMem<'_>,
            grants: &SharedMem<'_>,
            slots: &mut Vec<rbdback::ring::RequestSlot>,
        ) -> Result<usize, String> {
            slots.clear();
            let n = ring
                .take_requests(mem, slots, usize::MAX)
                .map_err(|e| format!("ring broken: {e}"))?;
            for slot in slots.drain(..) {
                let rsp = match slot.parse(&self.limits) {
                    Ok(Parsed::Ready(req)) => req.response(self.execute(grants, &req)),
                    Ok(Parsed::NeedsIndirectPages(ind)) => {
                        // The device layer would grant-copy these pages; here they are copied
                        // out of the guest area.
                        let mut pages = Vec::with_capacity(ind.pages_needed());
                        for g in ind.page_grefs() {
                            let mut p = vec![0u8; PAGE_SIZE];
                            if grants.read(*g as usize * PAGE_SIZE, &mut p).is_err() {
                                break;
                            }
                            pages.push(p);
                        }
                        let refs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
                        match ind.complete(&refs, &self.limits) {
                            Ok(req) => req.response(self.execute(grants, &req)),
                            Err(rej) => rej.response(),
                        }
                    }
                    Err(rej) => {
                        tracing::debug!("{rej}");
                        rej.response()
                    }
                };
                ring.push_response(mem, &rsp)
                    .map_err(|e| format!("respond: {e}"))?;
            }
            ring.publish_responses(mem)
                .map_err(|e| format!("publish: {e}"))?;
            Ok(n)
        }
    }

    pub fn run(o: &Options) -> Result<(), String> {
        let mut ring_buf = vec![0u8; ring_bytes(o.order)];
        let mem = SharedMem::from_mut_slice(&mut ring_buf);
        let mut front = MockFrontend::new(o.abi, o.order).map_err(|e| e.to_string())?;
        let mut back = BackRing::new(o.abi, o.order).map_err(|e| e.to_string())?;
        front.init_shared(&mem).map_err(|e| e.to_string())?;
        let cap = u64::from(back.capacity());
        let mut grant_buf = vec![0u8; cap as usize * PAGES_PER_SLOT * PAGE_SIZE];
        let grants = SharedMem::from_mut_slice(&mut grant_buf);

        let mut limits = Limits::new(DISK_SECTORS);
        limits.discard = true;
        let mut backend = Backend {
            disk: vec![0u8; DISK_BYTES],
            limits,
        };
        let mut guest = Guest {
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            shadow: vec![0u8; DISK_BYTES],
            next_id: 0,
            counts: Counts::default(),
        };
        tracing::info!(
            abi = %o.abi, order = o.order, slots = cap, requests = o.requests,
            "ring demo: mock blkfront -> BackRing -> 64 MiB in-memory disk"
        );

        let mut expect: VecDeque<Expect> = VecDeque::new();
        let mut slots = Vec::with_capacity(cap as usize);
        let mut rsps = Vec::with_capacity(cap as usize);
        let mut backend_time = Duration::ZERO;
        let mut wakeups = 0u64;
        let t0 = Instant::now();
        let mut queued = 0;
        let mut answered = 0;
        while answered < o.requests {
            while queued < o.requests && front.free_slots() > 0 {
                let (req, e) = guest.next_request(cap, &grants);
                front.queue(&mem, &req).map_err(|e| e.to_string())?;
                expect.push_back(e);
                queued += 1;
            }
            front.push_requests(&mem).map_err(|e| e.to_string())?;

            let tb = Instant::now();
            backend.service(&mut back, &mem, &grants, &mut slots)?;
            backend_time += tb.elapsed();
            wakeups += 1;

            rsps.clear();
            front
                .take_responses(&mem, &mut rsps)
                .map_err(|e| e.to_string())?;
            for r in &rsps {
                let e = expect.pop_front().ok_or("response without request")?;
                if r.id != e.id || r.status != e.status {
                    return Err(format!(
                        "request {}: expected {:?}, got id {} {:?}",
                        e.id, e.status, r.id, r.status
                    ));
                }
                if let Some((segs, want)) = e.read {
                    for (i, s) in segs.iter().enumerate() {
                        let mut got = vec![0u8; PAGE_SIZE];
                        grants
                            .read(s.gref as usize * PAGE_SIZE, &mut got)
                            .map_err(|e| e.to_string())?;
                        if got[..] != want[i * PAGE_SIZE..(i + 1) * PAGE_SIZE] {
                            return Err(format!("request {}: page {i} read back wrong data", e.id));
                        }
                    }
                    guest.counts.verified_reads += 1;
                }
                answered += 1;
            }
        }
        let total = t0.elapsed();
        if backend.disk != guest.shadow {
            return Err("final disk contents differ from what the guest wrote".into());
        }
        let c = &guest.counts;
        let secs = total.as_secs_f64();
        let bsecs = backend_time.as_secs_f64();
        println!(
            "ring demo ({}, {} slots): {} requests in {:.2}s over {} wake-ups",
            o.abi, cap, answered, secs, wakeups
        );
        println!(
            "  reads {} (all {} verified), writes {}, indirect {}, flushes {}, discards {}, invalid {} (answered with errors as expected)",
            c.reads, c.verified_reads, c.writes, c.indirect, c.flushes, c.discards, c.invalid
        );
        println!(
            "  end to end: {:.0} requests/s, {:.0} MiB/s of data",
            answered as f64 / secs,
            c.bytes as f64 / secs / 1048576.0
        );
        println!(
            "  backend (take + validate + copy data + respond): {:.0} requests/s, {:.0} MiB/s",
            answered as f64 / bsecs,
            c.bytes as f64 / bsecs / 1048576.0
        );
        println!("  final disk image matches the guest's view: OK");
        Ok(())
    }
}

fn run_engine_bench(args: &[String]) -> ExitCode {
    use rbdback::rados::bench::{self, BenchConfig, Pattern};
    use rbdback::rados::{EngineChoice, ImageSpec};
    let Some((pool, image)) = opt(args, "--image").and_then(|s| s.split_once('/')) else {
        return fail("engine-bench needs --image POOL/NAME");
    };
    let mut spec = ImageSpec::new(pool, image);
    spec.conf = opt(args, "--ceph-conf").map(str::to_owned);
    spec.engine = match opt(args, "--engine").unwrap_or("direct") {
        "direct" => EngineChoice::Direct,
        "librbd" => EngineChoice::Librbd,
        other => return fail(&format!("--engine {other:?}: direct or librbd")),
    };
    let Some(pattern) = Pattern::parse(opt(args, "--rw").unwrap_or("randread")) else {
        return fail("--rw: randread, randwrite, read or write");
    };
    let parsed = (|| -> Result<BenchConfig, String> {
        Ok(BenchConfig {
            spec: spec.clone(),
            pattern,
            bs: num(args, "--bs", 4096usize)?,
            qd: num(args, "--qd", 32usize)?,
            duration: std::time::Duration::from_secs_f64(num(args, "--seconds", 10.0f64)?),
            span: num(args, "--span-mib", 256u64)? << 20,
        })
    })();
    let cfg = match parsed {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    match bench::run(&cfg) {
        Ok(r) => {
            println!(
                "engine-bench: {:.0} IOPS, {:.1} MiB/s, lat mean {:.1} us p50 {:.1} us p99 {:.1} us, {} ios in {:.1} s",
                r.iops(),
                r.mib_s(),
                r.mean_us(),
                r.pct_us(50),
                r.pct_us(99),
                r.ios,
                r.secs
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}
