//! One `rbdback serve` process: finds the VBDs of one guest in xenstore and runs a control
//! thread per VBD (`rbdback supervise`, which keeps one per guest, is [`super::supervisor`]).
//!
//! Owns: discovery (`backend/<kind>/<domid>/*`), the claim rule, the per-VBD threads.
//! Trusts: nothing: a VBD whose `params` is not an RBD target, or that a kernel backend driver
//! has bound, is left alone.
//! Must never: let one VBD's failure or removal stop the others.

use std::collections::HashMap;
use std::path::Path;

use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::xen::xenstore::{Xenstore, XsError};
use crate::xen::{DomId, Platform, XenError};

use super::metrics::Registry;
use super::vbd::{run_vbd, ImageOpener, Options, VbdEnd, VbdId};

/// What `serve` serves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Backend kind directory (`vbd`).
    pub kind: String,
    /// Our domain (0 in dom0).
    pub backend_domid: DomId,
    /// The guest.
    pub domid: DomId,
    /// Exit once the guest has no VBD left (a per-VM process); false keeps waiting.
    pub exit_when_empty: bool,
    /// Advertised limits and tunables.
    pub options: Options,
}

/// Whether `params` names a disk rbdback serves.
pub fn is_rbd_params(params: &str) -> bool {
    let p = params.trim_start();
    p.starts_with("rbd:") || p.starts_with("csi:")
}

/// Whether a kernel backend (xen-blkback) has bound this device: then it is not ours until
/// the hotplug script unbinds it (see docs/deployment.md).
pub fn kernel_bound(kind: &str, domid: DomId, devid: u32) -> bool {
    Path::new(&format!(
        "/sys/bus/xen-backend/devices/{kind}-{domid}-{devid}/driver"
    ))
    .exists()
}

/// Whether a kernel driver for this backend kind is registered (xen-blkback loaded): then a
/// device is claimed only after the hotplug script said `hotplug-status=connected`, because
/// the kernel may bind a device just after we looked.
pub fn kernel_driver_registered(kind: &str) -> bool {
    Path::new(&format!("/sys/bus/xen-backend/drivers/{kind}")).exists()
}

struct Running {
    stop: Sender<()>,
    thread: JoinHandle<VbdEnd>,
}

/// How a `serve` run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// The guest has no disk left (`exit_when_empty`).
    Empty,
    /// `stop` fired: the rings were left, with their journals, to the next instance.
    HandedOver,
}

/// Serves the guest's VBDs until `stop` fires (or, with `exit_when_empty`, until none is left).
pub fn serve<P: Platform>(
    platform: Arc<P>,
    opener: Arc<dyn ImageOpener>,
    cfg: &ServeConfig,
    stop: &mpsc::Receiver<()>,
) -> Result<ServeEnd, XenError> {
    serve_observed(platform, opener, cfg, stop, &Arc::new(Registry::default()))
}

/// [`serve`], listing every disk in `registry` while it runs (`rbdback status`, metrics).
pub fn serve_observed<P: Platform>(
    platform: Arc<P>,
    opener: Arc<dyn ImageOpener>,
    cfg: &ServeConfig,
    stop: &mpsc::Receiver<()>,
    registry: &Arc<Registry>,
) -> Result<ServeEnd, XenError> {
    let xs = Arc::new(platform.xenstore()?);
    let gnttab = Arc::new(platform.gnttab()?);
    let dir = format!(
        "/local/domain/{}/backend/{}/{}",
        cfg.backend_domid, cfg.kind, cfg.domid
    );
    let watch = xs.watch(&dir).map_err(XenError::from)?;
    let mut running: HashMap<u32, Running> = HashMap::new();
    let mut done: HashMap<u32, Instant> = HashMap::new();
    let mut seen_any = false;
    info!(dir = %dir, "serving");
    let end = loop {
        if stop.try_recv().is_ok() {
            info!("stopping: the rings stay with the guest for the next backend");
            break ServeEnd::HandedOver;
        }
        // short: a handover (upgrade, SIGTERM) is seen within this
        let _ = watch.recv_timeout(Duration::from_millis(100));
        while watch.try_recv().is_some() {}
        // Reap VBD threads that ended.
        let ended: Vec<u32> = running
            .iter()
            .filter(|(_, r)| r.thread.is_finished())
            .map(|(d, _)| *d)
            .collect();
        for devid in ended {
            if let Some(r) = running.remove(&devid) {
                let end = r.thread.join();
                info!(devid, ?end, "vbd thread ended");
                done.insert(devid, Instant::now());
            }
        }
        let devids = match list_devids(&xs, &dir) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot list devices");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        // A device that ended is forgotten once the toolstack removed its directory, so a
        // re-attach with the same devid is served again.
        done.retain(|d, _| devids.contains(d));
        for devid in devids {
            if running.contains_key(&devid) || done.contains_key(&devid) {
                continue;
            }
            let be = format!("{dir}/{devid}");
            let params = match xs.read(&format!("{be}/params")) {
                Ok(Some(p)) => p,
                _ => continue, // not written yet; the watch fires again when it is
            };
            if !is_rbd_params(&params) || kernel_bound(&cfg.kind, cfg.domid, devid) {
                continue;
            }
            // libxl writes the backend and frontend directories in one transaction: a backend
            // directory whose frontend is gone is stale, nobody can be served through it
            if let Ok(Some(fe)) = xs.read(&format!("{be}/frontend")) {
                if matches!(xs.read(fe.trim()), Ok(None)) {
                    continue;
                }
            }
            if kernel_driver_registered(&cfg.kind)
                && xs
                    .read(&format!("{be}/hotplug-status"))
                    .ok()
                    .flatten()
                    .as_deref()
                    != Some("connected")
            {
                continue; // the watch fires again when block-rbdback writes it
            }
            seen_any = true;
            let id = VbdId {
                kind: cfg.kind.clone(),
                backend_domid: cfg.backend_domid,
                domid: cfg.domid,
                devid,
            };
            let (tx, rx) = mpsc::channel();
            let (p, g, x, o) = (
                Arc::clone(&platform),
                Arc::clone(&gnttab),
                Arc::clone(&xs),
                Arc::clone(&opener),
            );
            let opts = cfg.options.clone();
            let name = format!("rbdback-vbd-{devid}");
            let (reg, disk) = (Arc::clone(registry), registry.add(cfg.domid, devid));
            match std::thread::Builder::new().name(name).spawn(move || {
                let end = run_vbd(p, g, x, o, id, opts, rx, Arc::clone(&disk));
                reg.remove(&disk);
                end
            }) {
                Ok(thread) => {
                    info!(devid, "vbd claimed");
                    running.insert(devid, Running { stop: tx, thread });
                }
                Err(e) => warn!(devid, error = %e, "cannot start the vbd thread"),
            }
        }
        if cfg.exit_when_empty && seen_any && running.is_empty() {
            info!("no device left; exiting");
            break ServeEnd::Empty;
        }
    };
    // every disk stops (or hands over) at once, then all are waited for
    for r in running.values() {
        let _ = r.stop.send(());
    }
    for (_, r) in running.drain() {
        let _ = r.thread.join();
    }
    Ok(end)
}

fn list_devids(xs: &Xenstore, dir: &str) -> Result<Vec<u32>, XsError> {
    Ok(xs
        .directory(dir)?
        .iter()
        .filter_map(|d| d.parse::<u32>().ok())
        .collect())
}
