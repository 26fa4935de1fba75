//! A simulated guest with a Linux-blkfront-like block frontend, over the simulated Xen.
//!
//! Owns: the toolstack's part of attaching a disk (the xenstore nodes libxl writes), the
//! frontend's handshake (`talk_to_blkback`), its rings, event channels and data pages, and a
//! request pipeline for tests, fuzzing, benches and the demo.
//! Trusts: the backend only as far as Linux blkfront does (responses are checked).
//! Must never: be used outside tests and the demo (`test-utils`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::ring::abi::PAGE_SIZE;
use crate::ring::front::{FrontError, MockFrontend, WireRequest};
use crate::ring::{Abi, Response, Segment, Status};
use crate::xen::sim::{SimFrontend, SimPages};
use crate::xen::xenstore::{Perm, Xenstore, XsError};
use crate::xen::{DomId, GrantRef, Port, XenError};

use super::xenbus::XenbusState;

/// Something went wrong in the simulated guest.
#[derive(Debug, Error)]
pub enum FrontTestError {
    /// Xen simulation error.
    #[error("xen")]
    Xen(#[from] XenError),
    /// Xenstore error.
    #[error("xenstore")]
    Xs(#[from] XsError),
    /// Ring error.
    #[error("ring")]
    Ring(#[from] FrontError),
    /// The backend did not reach a state in time.
    #[error("backend did not reach state {want} within {secs}s (it is in {got})")]
    Timeout {
        /// Wanted state.
        want: XenbusState,
        /// Last seen.
        got: XenbusState,
        /// Seconds waited.
        secs: u64,
    },
    /// A response we did not expect.
    #[error("unexpected response id {0:#x}")]
    UnknownResponse(u64),
    /// Requests stayed unanswered after the workload stopped issuing.
    #[error("{outstanding} requests still unanswered {secs} s after the workload stopped")]
    Stuck {
        /// Requests without a response.
        outstanding: usize,
        /// Seconds waited.
        secs: u64,
    },
}

/// How the toolstack attaches the disk and how the guest's blkfront is configured.
#[derive(Debug, Clone)]
pub struct AttachSpec {
    /// Backend kind directory (`vbd`).
    pub kind: String,
    /// Virtual device number (51712 = xvda).
    pub devid: u32,
    /// `params` (the RBD target).
    pub params: String,
    /// `r` or `w`.
    pub mode: String,
    /// Ring ABI the guest uses.
    pub abi: Abi,
    /// Ring page order to ask for (capped by the backend's maximum).
    pub ring_order: u32,
    /// Queues to ask for (capped by the backend's maximum).
    pub queues: u32,
    /// Data pages to grant for I/O.
    pub data_pages: usize,
    /// Offer `feature-persistent` (Linux blkfront does by default).
    pub persistent: bool,
}

impl AttachSpec {
    /// xvda, read-write, x86_64 ABI, one queue, order 0, 256 data pages.
    pub fn new(params: &str) -> AttachSpec {
        AttachSpec {
            kind: "vbd".into(),
            devid: 51712,
            params: params.into(),
            mode: "w".into(),
            abi: Abi::X86_64,
            ring_order: 0,
            queues: 1,
            data_pages: 256,
            persistent: true,
        }
    }
}

/// Writes the nodes libxl writes for a disk (backend and frontend directories), as dom0.
pub fn toolstack_attach(
    xs: &Xenstore,
    backend_domid: DomId,
    domid: DomId,
    spec: &AttachSpec,
) -> Result<(String, String), XsError> {
    let be = format!(
        "/local/domain/{backend_domid}/backend/{}/{domid}/{}",
        spec.kind, spec.devid
    );
    let fe = format!("/local/domain/{domid}/device/vbd/{}", spec.devid);
    // As libxl: the backend directory belongs to the backend domain and the guest may read
    // it; the frontend directory belongs to the guest and the backend may read it.
    let perm = |domid: DomId, read: bool| Perm {
        domid,
        read,
        write: false,
    };
    xs.mkdir(&be)?;
    xs.set_perms(&be, &[perm(backend_domid, false), perm(domid, true)])?;
    xs.mkdir(&fe)?;
    xs.set_perms(&fe, &[perm(domid, false), perm(backend_domid, true)])?;
    xs.transaction(|tx| {
        tx.write(&format!("{be}/frontend"), &fe)?;
        tx.write(&format!("{be}/frontend-id"), &domid.to_string())?;
        tx.write(&format!("{be}/online"), "1")?;
        tx.write(&format!("{be}/removable"), "0")?;
        tx.write(&format!("{be}/type"), "phy")?;
        tx.write(&format!("{be}/mode"), &spec.mode)?;
        tx.write(&format!("{be}/device-type"), "disk")?;
        tx.write(&format!("{be}/discard-enable"), "1")?;
        tx.write(&format!("{be}/params"), &spec.params)?;
        tx.write(&format!("{be}/state"), "1")?;
        tx.write(&format!("{fe}/backend"), &be)?;
        tx.write(&format!("{fe}/backend-id"), &backend_domid.to_string())?;
        tx.write(&format!("{fe}/virtual-device"), &spec.devid.to_string())?;
        tx.write(&format!("{fe}/device-type"), "disk")?;
        tx.write(&format!("{fe}/state"), "1")?;
        Ok(())
    })?;
    Ok((be, fe))
}

/// Runs `rbdback serve` for guest `domid` over the simulated Xen on its own thread, with the
/// production image opener; sending `()` (or dropping the sender) stops it.
pub fn spawn_serve(
    xen: &std::sync::Arc<crate::xen::sim::SimXen>,
    domid: DomId,
    exit_when_empty: bool,
    options: super::vbd::Options,
) -> (
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<Result<super::backend::ServeEnd, XenError>>,
) {
    let platform = std::sync::Arc::new(xen.platform());
    let cfg = super::backend::ServeConfig {
        kind: "vbd".into(),
        backend_domid: 0,
        domid,
        exit_when_empty,
        options,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        super::backend::serve(
            platform,
            std::sync::Arc::new(super::vbd::RadosOpener),
            &cfg,
            &rx,
        )
    });
    (tx, h)
}

/// The toolstack's detach: `online = 0`, then `state = 5` (Closing) as libxl does.
pub fn toolstack_detach(xs: &Xenstore, be: &str) -> Result<(), XsError> {
    xs.write(&format!("{be}/online"), "0")?;
    xs.write(&format!("{be}/state"), "5")
}

struct FrontQueue {
    ring: SimPages,
    front: MockFrontend,
    port: Port,
}

/// One outstanding request of the pipeline.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    started: Instant,
    first_page: usize,
    pages: usize,
    read: bool,
}

/// The frontend of one disk in a simulated guest.
pub struct SimBlkfront {
    dom: SimFrontend,
    xs: Xenstore,
    /// Backend directory.
    pub be: String,
    /// Frontend directory.
    pub fe: String,
    abi: Abi,
    queues: Vec<FrontQueue>,
    data: SimPages,
    data_refs: Vec<GrantRef>,
    /// Disk size in sectors, as the backend advertised.
    pub sectors: u64,
    /// The backend's `info` node.
    pub info: u32,
    /// Whether the backend advertised discard.
    pub discard: bool,
    /// Indirect segments the backend allows.
    pub max_indirect: u32,
    next_id: u64,
}

impl std::fmt::Debug for SimBlkfront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBlkfront")
            .field("fe", &self.fe)
            .field("queues", &self.queues.len())
            .finish()
    }
}

fn wait_state(
    xs: &Xenstore,
    path: &str,
    want: &[XenbusState],
    timeout: Duration,
) -> Result<XenbusState, FrontTestError> {
    let deadline = Instant::now() + timeout;
    let watch = xs.watch(path)?;
    loop {
        let got = xs
            .read(path)?
            .map_or(XenbusState::Unknown, |s| XenbusState::parse(&s));
        if want.contains(&got) {
            return Ok(got);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(FrontTestError::Timeout {
                want: want.first().copied().unwrap_or(XenbusState::Unknown),
                got,
                secs: timeout.as_secs(),
            });
        }
        let _ = watch.recv_timeout((deadline - now).min(Duration::from_millis(100)));
    }
}

impl SimBlkfront {
    /// Runs blkfront's side of the handshake on an attached disk and waits for Connected.
    pub fn connect(
        dom: SimFrontend,
        be: &str,
        fe: &str,
        spec: &AttachSpec,
        timeout: Duration,
    ) -> Result<SimBlkfront, FrontTestError> {
        let xs = dom.xenstore()?;
        let backend_domid: DomId = 0;
        wait_state(
            &xs,
            &format!("{be}/state"),
            &[XenbusState::InitWait],
            timeout,
        )?;
        let num = |n: &str| -> Result<u32, FrontTestError> {
            Ok(xs
                .read(&format!("{be}/{n}"))?
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0))
        };
        let order = spec.ring_order.min(num("max-ring-page-order")?);
        let nq = spec.queues.clamp(1, num("multi-queue-max-queues")?.max(1));
        let max_indirect = num("feature-max-indirect-segments")?;
        let mut queues = Vec::new();
        let pages = 1usize << order;
        for _ in 0..nq {
            let ring = dom.alloc_pages(pages)?;
            let order8 = u8::try_from(order).unwrap_or(0);
            let mut front = MockFrontend::new(spec.abi, order8)?;
            front.init_shared(&ring.mem())?;
            let port = dom.alloc_unbound(backend_domid)?;
            queues.push(FrontQueue { ring, front, port });
        }
        let mut refs_per_queue = Vec::new();
        for q in &queues {
            let mut refs = Vec::new();
            for i in 0..pages {
                refs.push(dom.grant(&q.ring, i, backend_domid, false)?);
            }
            refs_per_queue.push(refs);
        }
        let data = dom.alloc_pages(spec.data_pages)?;
        let mut data_refs = Vec::new();
        for i in 0..spec.data_pages {
            data_refs.push(dom.grant(&data, i, backend_domid, false)?);
        }
        let protocol = match spec.abi {
            Abi::X86_32 => "x86_32-abi",
            Abi::X86_64 => "x86_64-abi",
            Abi::Native => "native",
        };
        xs.transaction(|tx| {
            let w = |n: &str, v: &str| tx.write(&format!("{fe}/{n}"), v);
            w("protocol", protocol)?;
            w(
                "feature-persistent",
                if spec.persistent { "1" } else { "0" },
            )?;
            if order > 0 {
                w("ring-page-order", &order.to_string())?;
            }
            if nq > 1 {
                w("multi-queue-num-queues", &nq.to_string())?;
            }
            for (qi, (q, refs)) in queues.iter().zip(&refs_per_queue).enumerate() {
                let dir = if nq > 1 {
                    format!("queue-{qi}/")
                } else {
                    String::new()
                };
                if order == 0 {
                    w(&format!("{dir}ring-ref"), &refs[0].to_string())?;
                } else {
                    for (i, r) in refs.iter().enumerate() {
                        w(&format!("{dir}ring-ref{i}"), &r.to_string())?;
                    }
                }
                w(&format!("{dir}event-channel"), &q.port.to_string())?;
            }
            w("state", "3")?;
            Ok(())
        })?;
        wait_state(
            &xs,
            &format!("{be}/state"),
            &[XenbusState::Connected],
            timeout,
        )?;
        let rd = |n: &str| -> Result<Option<String>, FrontTestError> {
            Ok(xs.read(&format!("{be}/{n}"))?)
        };
        let sectors = rd("sectors")?
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let info = rd("info")?.and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        let discard = rd("feature-discard")?.as_deref() == Some("1");
        xs.write(&format!("{fe}/state"), "4")?;
        Ok(SimBlkfront {
            dom,
            xs,
            be: be.to_owned(),
            fe: fe.to_owned(),
            abi: spec.abi,
            queues,
            data,
            data_refs,
            sectors,
            info,
            discard,
            max_indirect,
            next_id: 1,
        })
    }

    /// Follows an online resize as Linux blkfront does: the backend rewrites `sectors`, then
    /// its `state` (still Connected); on that state watch blkfront, already connected,
    /// re-reads `sectors` and sets the new capacity (`blkback_changed` ->
    /// `blkfront_connect`). Waits for a watch event after which the size differs from the
    /// one known, at most `timeout`; returns the new size in sectors.
    pub fn wait_resize(&mut self, timeout: Duration) -> Result<u64, FrontTestError> {
        let deadline = Instant::now() + timeout;
        let state = format!("{}/state", self.be);
        let watch = self.xs.watch(&state)?;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let got = self
                    .xs
                    .read(&state)?
                    .map_or(XenbusState::Unknown, |s| XenbusState::parse(&s));
                return Err(FrontTestError::Timeout {
                    want: XenbusState::Connected,
                    got,
                    secs: timeout.as_secs(),
                });
            }
            // only a watch event makes blkfront look (the first fires on registration)
            if watch.recv_timeout(deadline - now).is_none() {
                continue;
            }
            let connected = self.xs.read(&state)?.as_deref().map(XenbusState::parse)
                == Some(XenbusState::Connected);
            let sectors = self
                .xs
                .read(&format!("{}/sectors", self.be))?
                .and_then(|v| v.trim().parse().ok());
            match sectors {
                Some(n) if connected && n != self.sectors => {
                    self.sectors = n;
                    return Ok(n);
                }
                _ => {}
            }
        }
    }

    /// Number of queues negotiated.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The guest's xenstore connection.
    pub fn xenstore(&self) -> &Xenstore {
        &self.xs
    }

    /// Data page `i` as shared memory (the guest's view).
    pub fn data_page(&self, i: usize) -> crate::shm::SharedMem<'_> {
        self.data.page(i)
    }

    /// Grant reference of data page `i`.
    pub fn data_ref(&self, i: usize) -> GrantRef {
        self.data_refs.get(i).copied().unwrap_or(u32::MAX)
    }

    /// Number of granted data pages.
    pub fn data_pages(&self) -> usize {
        self.data_refs.len()
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Queues requests on queue `q`, publishes them and notifies the backend if asked.
    pub fn submit(&mut self, q: usize, reqs: &[WireRequest]) -> Result<(), FrontTestError> {
        let Some(fq) = self.queues.get_mut(q) else {
            return Ok(());
        };
        let mem = fq.ring.mem();
        for r in reqs {
            fq.front.queue(&mem, r)?;
        }
        if fq.front.push_requests(&mem)? {
            self.dom.notify(fq.port)?;
        }
        Ok(())
    }

    /// Collects responses on queue `q`, waiting up to `timeout` for at least one.
    pub fn responses(
        &mut self,
        q: usize,
        timeout: Duration,
    ) -> Result<Vec<Response>, FrontTestError> {
        let mut out = Vec::new();
        let Some(fq) = self.queues.get_mut(q) else {
            return Ok(out);
        };
        let deadline = Instant::now() + timeout;
        loop {
            fq.front.take_responses(&fq.ring.mem(), &mut out)?;
            if !out.is_empty() || fq.front.in_flight() == 0 {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(out);
            }
            let _ = self
                .dom
                .wait(fq.port, (deadline - now).min(Duration::from_millis(50)))?;
        }
    }

    /// Requests in flight on queue `q`.
    pub fn in_flight(&self, q: usize) -> u32 {
        self.queues.get(q).map_or(0, |f| f.front.in_flight())
    }

    /// Synchronous write of whole pages at `sector` using data pages from `first_page`.
    pub fn write_sync(
        &mut self,
        q: usize,
        sector: u64,
        first_page: usize,
        data: &[u8],
    ) -> Result<Status, FrontTestError> {
        let pages = data.len().div_ceil(PAGE_SIZE);
        for (i, chunk) in data.chunks(PAGE_SIZE).enumerate() {
            let _ = self.data.page(first_page + i).write(0, chunk);
        }
        let segs = self.segments(first_page, pages, data.len());
        let id = self.next_id();
        let req = if segs.len() > 11 {
            self.indirect(crate::ring::request::op::WRITE, id, sector, &segs)?
        } else {
            WireRequest::write(id, sector, segs)
        };
        self.one(q, req)
    }

    /// Synchronous read of `len` bytes (a multiple of 512) at `sector`.
    pub fn read_sync(
        &mut self,
        q: usize,
        sector: u64,
        first_page: usize,
        len: usize,
    ) -> Result<(Status, Vec<u8>), FrontTestError> {
        let pages = len.div_ceil(PAGE_SIZE);
        let segs = self.segments(first_page, pages, len);
        let id = self.next_id();
        let req = if segs.len() > 11 {
            self.indirect(crate::ring::request::op::READ, id, sector, &segs)?
        } else {
            WireRequest::read(id, sector, segs)
        };
        let st = self.one(q, req)?;
        let mut out = vec![0u8; len];
        for (i, chunk) in out.chunks_mut(PAGE_SIZE).enumerate() {
            let _ = self.data.page(first_page + i).read(0, chunk);
        }
        Ok((st, out))
    }

    /// Sends one request and waits for its response.
    pub fn one(&mut self, q: usize, req: WireRequest) -> Result<Status, FrontTestError> {
        let id = req.id();
        self.submit(q, &[req])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(r) = self.responses(q, Duration::from_millis(200))?.first() {
                return if r.id == id {
                    Ok(r.status)
                } else {
                    Err(FrontTestError::UnknownResponse(r.id))
                };
            }
        }
        Err(FrontTestError::Timeout {
            want: XenbusState::Connected,
            got: XenbusState::Connected,
            secs: 30,
        })
    }

    /// Segments covering `len` bytes of whole pages starting at data page `first`.
    pub fn segments(&self, first: usize, pages: usize, len: usize) -> Vec<Segment> {
        (0..pages)
            .map(|i| {
                let bytes = (len - i * PAGE_SIZE).min(PAGE_SIZE);
                let last = u8::try_from(bytes.div_ceil(512).saturating_sub(1)).unwrap_or(7);
                Segment {
                    gref: self.data_ref(first + i),
                    first_sect: 0,
                    last_sect: last,
                }
            })
            .collect()
    }

    /// Builds an indirect request, writing its descriptor pages into the last data pages.
    pub fn indirect(
        &mut self,
        op: u8,
        id: u64,
        sector: u64,
        segs: &[Segment],
    ) -> Result<WireRequest, FrontTestError> {
        let last = self.data_refs.len() - 1;
        self.indirect_in(op, id, sector, segs, |i| last - i)
    }

    /// Builds an indirect request whose `i`-th descriptor page is data page `page(i)`
    /// (requests in flight together need pages of their own).
    pub fn indirect_in(
        &mut self,
        op: u8,
        id: u64,
        sector: u64,
        segs: &[Segment],
        page: impl Fn(usize) -> usize,
    ) -> Result<WireRequest, FrontTestError> {
        let pages = crate::ring::front::indirect_pages(segs);
        let mut grefs = Vec::new();
        for (i, p) in pages.iter().enumerate() {
            let idx = page(i);
            let _ = self.data.page(idx).write(0, p);
            grefs.push(self.data_ref(idx));
        }
        Ok(WireRequest::Indirect {
            indirect_op: op,
            nr_segments: u16::try_from(segs.len()).unwrap_or(u16::MAX),
            id,
            sector,
            grefs,
        })
    }

    /// The frontend's close: Closing, wait for the backend's Closing/Closed, then Closed.
    pub fn close(&mut self, timeout: Duration) -> Result<(), FrontTestError> {
        self.xs.write(&format!("{}/state", self.fe), "5")?;
        wait_state(
            &self.xs,
            &format!("{}/state", self.be),
            &[XenbusState::Closing, XenbusState::Closed],
            timeout,
        )?;
        self.xs.write(&format!("{}/state", self.fe), "6")?;
        wait_state(
            &self.xs,
            &format!("{}/state", self.be),
            &[XenbusState::Closed],
            timeout,
        )?;
        Ok(())
    }

    /// The shared ring of queue `q` (the guest's view), for tests that break the protocol.
    pub fn ring_mem(&self, q: usize) -> crate::shm::SharedMem<'_> {
        match self.queues.get(q) {
            Some(fq) => fq.ring.mem(),
            None => crate::shm::SharedMem::from_mut_slice(&mut []),
        }
    }

    /// The guest's event channel port of queue `q`.
    pub fn port(&self, q: usize) -> Port {
        self.queues.get(q).map_or(0, |f| f.port)
    }

    /// The simulated domain (to grant, revoke and notify directly in tests).
    pub fn domain(&self) -> &SimFrontend {
        &self.dom
    }

    /// The ABI in use.
    pub fn abi(&self) -> Abi {
        self.abi
    }
}

/// Latency and throughput of a pipelined run.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Requests completed.
    pub completed: u64,
    /// Requests that returned an error status.
    pub errors: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latencies in microseconds (sorted).
    pub latencies_us: Vec<u64>,
    /// Reads whose data did not match the model.
    pub mismatches: u64,
    /// Reads whose data was checked against the model.
    pub reads_checked: u64,
    /// What each written 4 KiB block (by index) holds: the version of its last write.
    pub model: HashMap<u64, u64>,
    /// Versions of failed writes a block may hold instead (until a later write succeeds).
    pub uncertain: HashMap<u64, Vec<u64>>,
    /// Requests issued.
    pub issued: u64,
}

/// Watches a backend's `state` node from the guest's side and records every value it sees,
/// with the frontend's own state at that moment, so a test can check the backend never
/// walks the frontend through a sequence Linux blkfront cannot take (see
/// [`BackendStates::violations`]).
#[derive(Debug)]
pub struct BackendStates {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(XenbusState, XenbusState)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackendStates {
    /// Starts recording `be/state` changes (a connection of `xs`'s domain of its own).
    pub fn watch(dom: &SimFrontend, be: &str, fe: &str) -> Result<BackendStates, FrontTestError> {
        let xs = dom.xenstore()?;
        let watch = xs.watch(&format!("{be}/state"))?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s2, st2, be, fe) = (
            std::sync::Arc::clone(&seen),
            std::sync::Arc::clone(&stop),
            be.to_owned(),
            fe.to_owned(),
        );
        let thread = std::thread::spawn(move || {
            let read = |p: &str| {
                xs.read(p)
                    .ok()
                    .flatten()
                    .map_or(XenbusState::Unknown, |v| XenbusState::parse(&v))
            };
            let mut last = None;
            while !st2.load(std::sync::atomic::Ordering::Relaxed) {
                if watch.recv_timeout(Duration::from_millis(20)).is_none() {
                    continue;
                }
                let b = read(&format!("{be}/state"));
                if last != Some(b) {
                    last = Some(b);
                    let f = read(&format!("{fe}/state"));
                    if let Ok(mut v) = s2.lock() {
                        v.push((b, f));
                    }
                }
            }
        });
        Ok(BackendStates {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// Backend states seen so far (with the frontend's state at each).
    pub fn seen(&self) -> Vec<(XenbusState, XenbusState)> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Transitions Linux blkback never makes and Linux blkfront cannot survive: InitWait
    /// under a Connected frontend, or Connected under a frontend that is closing or closed
    /// (blkfront then calls `talk_to_blkback` on rings it still holds: `BUG_ON` in
    /// `negotiate_mq`).
    pub fn violations(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter_map(|&(b, f)| match (b, f) {
                (XenbusState::InitWait, XenbusState::Connected) => {
                    Some("InitWait while the frontend is Connected".to_owned())
                }
                (XenbusState::Connected, XenbusState::Closing | XenbusState::Closed) => Some(
                    format!("Connected while the frontend is {f} (blkfront BUG()s on this)"),
                ),
                _ => None,
            })
            .collect()
    }
}

impl Drop for BackendStates {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The 4 KiB pattern [`run_verified`] writes to `block` at version `ver` (0: zeros).
pub fn block_pattern(block: u64, ver: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE];
    if ver != 0 {
        fill_block(&mut buf, block, ver);
    }
    buf
}

fn fill_block(buf: &mut [u8], block: u64, ver: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let v = block
            .wrapping_mul(31)
            .wrapping_add(ver.wrapping_mul(7))
            .wrapping_add(i as u64)
            % 251;
        *b = u8::try_from(v).unwrap_or(0);
    }
}

impl RunReport {
    /// Whether `data` is what `block` may hold: its last successful write (zeros if none), or
    /// a write that failed after it.
    pub fn holds(&self, block: u64, data: &[u8]) -> bool {
        let last = self.model.get(&block).copied().unwrap_or(0);
        std::iter::once(&last)
            .chain(self.uncertain.get(&block).into_iter().flatten())
            .any(|v| block_pattern(block, *v) == data)
    }

    /// Blocks of `image` (the disk's bytes, e.g. from `rbd export`) that differ from what the
    /// run wrote (never-written blocks must be zeros), within the first `blocks` blocks.
    pub fn diff_image(&self, image: &[u8], blocks: u64) -> Vec<u64> {
        (0..blocks)
            .filter(|b| {
                let start = usize::try_from(b * PAGE_SIZE as u64).unwrap_or(usize::MAX);
                !image
                    .get(start..start + PAGE_SIZE)
                    .is_some_and(|got| self.holds(*b, got))
            })
            .collect()
    }
}

impl RunReport {
    /// The p-th percentile latency in µs.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let n = self.latencies_us.len();
        let idx = ((p / 100.0) * (n as f64 - 1.0)).round();
        let idx = if idx.is_finite() && idx >= 0.0 {
            // Bounded by n - 1 above.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let i = idx as usize;
            i.min(n - 1)
        } else {
            0
        };
        self.latencies_us.get(idx).copied().unwrap_or(0)
    }
}

/// A verified random workload: `total` requests of `blocks` 4 KiB pages over the first
/// `span_sectors` of the disk, `write_pct` percent writes, `qd` in flight per queue. Every
/// read is checked against a model of what was written (fresh disks read as zeros).
pub fn run_verified(
    front: &mut SimBlkfront,
    total: u64,
    qd: usize,
    write_pct: u32,
    span_sectors: u64,
    seed: u64,
    progress: impl FnMut(u64, &RunReport),
) -> Result<RunReport, FrontTestError> {
    run_workload(
        front,
        total,
        qd,
        write_pct,
        span_sectors,
        seed,
        true,
        progress,
    )
}

/// [`run_verified`] with read verification optional (`verify = false` for benchmarks on a
/// disk whose contents the model does not know).
#[allow(clippy::too_many_arguments)]
pub fn run_workload(
    front: &mut SimBlkfront,
    total: u64,
    qd: usize,
    write_pct: u32,
    span_sectors: u64,
    seed: u64,
    verify: bool,
    mut progress: impl FnMut(u64, &RunReport),
) -> Result<RunReport, FrontTestError> {
    let spec = Workload {
        indirect_every: 0,
        flush_every: 0,
        qd,
        write_pct,
        span_sectors,
        seed,
        verify,
        latencies: true,
    };
    spec.run(
        front,
        |r| r.issued < total,
        |r, _| {
            if r.completed % 1000 == 0 {
                progress(total, r);
            }
        },
    )
}

/// One answered request of a [`Workload`], for tests that time what the guest saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Request id.
    pub id: u64,
    /// A write (else a read).
    pub write: bool,
    /// The 4 KiB block.
    pub block: u64,
    /// When the guest queued it.
    pub issued: Instant,
    /// When its response arrived.
    pub answered: Instant,
    /// The response's status.
    pub status: Status,
    /// A read whose data matched no version the model allows.
    pub mismatch: bool,
}

/// A random workload of single 4 KiB blocks over the first `span_sectors` of the disk,
/// `write_pct` percent writes, `qd` in flight per queue, never two requests on one block at
/// once. With `verify`, every read is checked against a model of what was written (fresh
/// disks read as zeros). A write that fails leaves its block holding the old or the new
/// data (a block device promises nothing else), so either is accepted until a later write
/// succeeds: a failed write that lands after a newer one then shows as a mismatch.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Requests in flight per queue.
    pub qd: usize,
    /// Percent writes.
    pub write_pct: u32,
    /// Sectors at the start of the disk the workload spans.
    pub span_sectors: u64,
    /// Random seed.
    pub seed: u64,
    /// Check reads against the model.
    pub verify: bool,
    /// Every this many requests, one spans [`INDIRECT_BLOCKS`] blocks through an indirect
    /// descriptor page (0: never); one such request per queue at a time.
    pub indirect_every: u64,
    /// Every this many requests, a write is sent as a flush with data (blkif's
    /// `BLKIF_OP_FLUSH_DISKCACHE`: write, then flush) (0: never).
    pub flush_every: u64,
    /// Keep every request's latency in the report (a long run without them stays small).
    pub latencies: bool,
}

/// The (block, version) of each page a request of a [`Workload`] moves.
type Moved = Vec<(u64, u64)>;

/// Blocks (4 KiB pages) of a [`Workload`]'s indirect requests: more than blkif's 11 direct
/// segments.
pub const INDIRECT_BLOCKS: usize = 16;

/// How long [`Workload::run`] waits for the requests still out once it stops issuing.
pub const DRAIN_WAIT: Duration = Duration::from_secs(300);

impl Workload {
    /// Issues requests while `keep_going` says so, then waits for the ones still out (at
    /// most [`DRAIN_WAIT`]); `on_done` sees every answer.
    pub fn run(
        &self,
        front: &mut SimBlkfront,
        mut keep_going: impl FnMut(&RunReport) -> bool,
        mut on_done: impl FnMut(&RunReport, &Done),
    ) -> Result<RunReport, FrontTestError> {
        let mut rng = self.seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let nq = front.queue_count();
        let slots_per_q = (front.data_pages() / nq.max(1)).saturating_sub(8).max(1);
        // the last pages of each queue's share: one indirect request's data and descriptor
        let indirect_pages = if self.indirect_every > 0 {
            INDIRECT_BLOCKS + 1
        } else {
            0
        };
        let slots_per_q = slots_per_q.saturating_sub(indirect_pages).max(1);
        let qd = self.qd.min(slots_per_q).max(1);
        let indirect_base = |q: usize| q * (slots_per_q + indirect_pages) + slots_per_q;
        let mut indirect_busy = vec![false; nq];
        // The model: version of each 4 KiB block (0 = never written = zeros), and versions of
        // failed writes a block may hold instead.
        let blocks = (self.span_sectors / 8).max(1);
        let mut report = RunReport::default();
        let mut free: Vec<Vec<usize>> = (0..nq)
            .map(|q| {
                (0..qd)
                    .map(|s| q * (slots_per_q + indirect_pages) + s)
                    .collect()
            })
            .collect();
        // per request: what it is, and the (block, version) of each page it moves
        let mut outstanding: Vec<HashMap<u64, (Outstanding, Moved)>> = vec![HashMap::new(); nq];
        let start = Instant::now();
        let mut version = 0u64;
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut issuing = true;
        let mut drain_deadline = None;
        loop {
            issuing = issuing && keep_going(&report);
            let out: usize = outstanding.iter().map(HashMap::len).sum();
            if !issuing && out == 0 {
                break;
            }
            if !issuing {
                let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_WAIT);
                if Instant::now() >= deadline {
                    return Err(FrontTestError::Stuck {
                        outstanding: out,
                        secs: DRAIN_WAIT.as_secs(),
                    });
                }
            }
            for q in 0..nq {
                let mut batch = Vec::new();
                if !issuing {
                    continue;
                }
                while let Some(page) = free.get_mut(q).and_then(Vec::pop) {
                    if !keep_going(&report) {
                        // not one request more than asked for
                        issuing = false;
                        if let Some(f) = free.get_mut(q) {
                            f.push(page);
                        }
                        break;
                    }
                    let wide = self.indirect_every > 0
                        && indirect_busy.get(q) == Some(&false)
                        && (report.issued + 1) % self.indirect_every == 0
                        && blocks > INDIRECT_BLOCKS as u64;
                    let span = if wide { INDIRECT_BLOCKS as u64 } else { 1 };
                    let block = next() % (blocks - span + 1);
                    // Don't overlap an in-flight request on the same blocks: keeps the model
                    // exact.
                    if outstanding.iter().any(|m| {
                        m.values().any(|(_, bs)| {
                            bs.iter().any(|(b, _)| (block..block + span).contains(b))
                        })
                    }) {
                        if let Some(f) = free.get_mut(q) {
                            f.push(page);
                        }
                        break;
                    }
                    let write = u32::try_from(next() % 100).unwrap_or(0) < self.write_pct;
                    let id = front.next_id();
                    let (first, pages) = if wide {
                        // the slot page goes back: the request uses the queue's wide pages
                        if let Some(f) = free.get_mut(q) {
                            f.push(page);
                        }
                        if let Some(b) = indirect_busy.get_mut(q) {
                            *b = true;
                        }
                        (indirect_base(q), INDIRECT_BLOCKS)
                    } else {
                        (page, 1)
                    };
                    let mut moved = Vec::with_capacity(pages);
                    for (i, b) in (block..block + span).enumerate() {
                        let ver = if write {
                            version += 1;
                            fill_block(&mut buf, b, version);
                            let _ = front.data_page(first + i).write(0, &buf);
                            version
                        } else {
                            0
                        };
                        moved.push((b, ver));
                    }
                    let seg = front.segments(first, pages, pages * PAGE_SIZE);
                    let flush = write
                        && !wide
                        && self.flush_every > 0
                        && report.issued % self.flush_every == 0;
                    let op = if flush {
                        crate::ring::request::op::FLUSH_DISKCACHE
                    } else if write {
                        crate::ring::request::op::WRITE
                    } else {
                        crate::ring::request::op::READ
                    };
                    let req = if wide {
                        // the descriptor page is the one after the data pages
                        let desc = first + pages;
                        front.indirect_in(op, id, block * 8, &seg, |_| desc)?
                    } else if flush {
                        WireRequest::rw(op, id, block * 8, seg)
                    } else if write {
                        WireRequest::write(id, block * 8, seg)
                    } else {
                        WireRequest::read(id, block * 8, seg)
                    };
                    let o = Outstanding {
                        started: Instant::now(),
                        first_page: first,
                        pages,
                        read: !write,
                    };
                    if let Some(m) = outstanding.get_mut(q) {
                        m.insert(id, (o, moved));
                    }
                    batch.push(req);
                    report.issued += 1;
                }
                if !batch.is_empty() {
                    front.submit(q, &batch)?;
                }
            }
            for q in 0..nq {
                let wait = if front.in_flight(q) > 0 {
                    Duration::from_millis(100)
                } else {
                    Duration::ZERO
                };
                for r in front.responses(q, wait)? {
                    let Some((o, moved)) = outstanding.get_mut(q).and_then(|m| m.remove(&r.id))
                    else {
                        return Err(FrontTestError::UnknownResponse(r.id));
                    };
                    let answered = Instant::now();
                    let us = u64::try_from((answered - o.started).as_micros()).unwrap_or(u64::MAX);
                    if self.latencies {
                        report.latencies_us.push(us);
                    }
                    report.completed += 1;
                    report.bytes += (o.pages * PAGE_SIZE) as u64;
                    let mut mismatch = false;
                    for (i, &(block, ver)) in moved.iter().enumerate() {
                        if r.status != Status::Okay {
                            if !o.read {
                                report.uncertain.entry(block).or_default().push(ver);
                            }
                        } else if o.read && self.verify {
                            let mut got = vec![0u8; PAGE_SIZE];
                            let _ = front.data_page(o.first_page + i).read(0, &mut got);
                            if !report.holds(block, &got) {
                                mismatch = true;
                            }
                        } else if !o.read {
                            report.model.insert(block, ver);
                            report.uncertain.remove(&block);
                        }
                    }
                    if r.status != Status::Okay {
                        report.errors += 1;
                    } else if o.read && self.verify {
                        report.reads_checked += 1;
                        report.mismatches += u64::from(mismatch);
                    }
                    if o.pages > 1 {
                        if let Some(b) = indirect_busy.get_mut(q) {
                            *b = false;
                        }
                    } else if let Some(f) = free.get_mut(q) {
                        f.push(o.first_page);
                    }
                    report.elapsed = start.elapsed();
                    on_done(
                        &report,
                        &Done {
                            id: r.id,
                            write: !o.read,
                            block: moved.first().map_or(0, |m| m.0),
                            issued: o.started,
                            answered,
                            status: r.status,
                            mismatch,
                        },
                    );
                }
            }
        }
        report.elapsed = start.elapsed();
        report.latencies_us.sort_unstable();
        Ok(report)
    }
}

/// A benchmark stream (nothing verified): `total` requests of `pages` 4 KiB pages each, `qd`
/// in flight on queue 0, sequential (`seq`) or random over the first `span_sectors`, all
/// reads or all writes. Requests over 11 pages go indirect, each slot with its own data and
/// descriptor pages; the frontend needs `qd * (pages + 1)` data pages.
#[allow(clippy::too_many_arguments)]
pub fn run_stream(
    front: &mut SimBlkfront,
    total: u64,
    pages: usize,
    qd: usize,
    write: bool,
    seq: bool,
    span_sectors: u64,
    mut progress: impl FnMut(u64, &RunReport),
) -> Result<RunReport, FrontTestError> {
    let pages = pages.clamp(1, 256);
    let slot_pages = pages + 1;
    let qd = qd.clamp(1, (front.data_pages() / slot_pages).max(1));
    let req_sectors = pages as u64 * 8;
    let positions = (span_sectors / req_sectors).max(1);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut cursor = 0u64;
    let mut next_sector = move || {
        let n = if seq {
            cursor += 1;
            (cursor - 1) % positions
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % positions
        };
        n * req_sectors
    };
    let op = if write {
        crate::ring::request::op::WRITE
    } else {
        crate::ring::request::op::READ
    };
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut started: HashMap<u64, (usize, Instant)> = HashMap::new();
    let mut report = RunReport::default();
    let start = Instant::now();
    let mut issued = 0u64;
    while report.completed < total {
        let mut batch = Vec::new();
        while issued < total {
            let Some(slot) = free.pop() else { break };
            let first = slot * slot_pages;
            let id = front.next_id();
            let segs = front.segments(first, pages, pages * PAGE_SIZE);
            let sector = next_sector();
            let req = if pages <= 11 {
                if write {
                    WireRequest::write(id, sector, segs)
                } else {
                    WireRequest::read(id, sector, segs)
                }
            } else {
                front.indirect_in(op, id, sector, &segs, |i| first + pages + i)?
            };
            started.insert(id, (slot, Instant::now()));
            batch.push(req);
            issued += 1;
        }
        if !batch.is_empty() {
            front.submit(0, &batch)?;
        }
        for r in front.responses(0, Duration::from_millis(100))? {
            let Some((slot, t)) = started.remove(&r.id) else {
                return Err(FrontTestError::UnknownResponse(r.id));
            };
            report
                .latencies_us
                .push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
            report.completed += 1;
            report.bytes += (pages * PAGE_SIZE) as u64;
            if r.status != Status::Okay {
                report.errors += 1;
            }
            free.push(slot);
            if report.completed % 256 == 0 {
                report.elapsed = start.elapsed();
                progress(total, &report);
            }
        }
    }
    report.elapsed = start.elapsed();
    report.latencies_us.sort_unstable();
    Ok(report)
}
