//! Persistent grants: when the frontend negotiates `feature-persistent`, it reuses a set of
//! granted pages for its data, so the backend maps each page once and copies through the
//! mapping instead of asking the hypervisor for a grant copy per request.
//!
//! Owns: a bounded LRU of single-page mappings per queue (Linux blkback's default bound is
//! 1056 per ring), and falling back to grant copy for a page it cannot or may not map.
//! Trusts: nothing in the mapped pages (they are read and written through [`crate::shm`]).
//! Must never: keep more than its bound mapped (XSA-371: a frontend must not make the backend
//! pin unbounded memory), or unmap a page while a copy through it runs (copies are synchronous
//! inside one call, so eviction between calls is safe).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::shm::SharedMem;
use crate::xen::{DomId, GrantMapping, GrantRef, GrantTable};

use super::dataplane::{GrantFault, GrantIo, GrantSpan};
use super::grants::CopyGrants;

/// Default bound on mapped pages per queue (Linux blkback's `max_persistent_grants`).
pub const DEFAULT_MAX_PERSISTENT: usize = 1056;

/// Counters for the operator (and the benchmark that compares the two strategies).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PersistentStats {
    /// Copies served through an existing mapping.
    pub hits: u64,
    /// Pages mapped.
    pub maps: u64,
    /// Pages unmapped to stay within the bound.
    pub evictions: u64,
    /// Spans that fell back to grant copy (mapping refused).
    pub fallbacks: u64,
}

/// Persistent-grant access to one frontend's pages, with grant copy as the fallback.
pub struct PersistentGrants<G: GrantTable> {
    gnttab: Arc<G>,
    domid: DomId,
    max: usize,
    maps: HashMap<GrantRef, G::Mapping>,
    lru: VecDeque<GrantRef>,
    refused: HashMap<GrantRef, ()>,
    copy: CopyGrants<G>,
    stats: PersistentStats,
}

impl<G: GrantTable> std::fmt::Debug for PersistentGrants<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentGrants")
            .field("domid", &self.domid)
            .field("mapped", &self.maps.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<G: GrantTable> PersistentGrants<G> {
    /// At most `max` pages of `domid` stay mapped.
    pub fn new(gnttab: Arc<G>, domid: DomId, max: usize) -> Self {
        PersistentGrants {
            copy: CopyGrants::new(Arc::clone(&gnttab), domid),
            gnttab,
            domid,
            max: max.max(1),
            maps: HashMap::new(),
            lru: VecDeque::new(),
            refused: HashMap::new(),
            stats: PersistentStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> PersistentStats {
        self.stats
    }

    /// Pages currently mapped.
    pub fn mapped(&self) -> usize {
        self.maps.len()
    }

    fn touch(&mut self, gref: GrantRef) {
        if let Some(pos) = self.lru.iter().position(|&g| g == gref) {
            self.lru.remove(pos);
        }
        self.lru.push_back(gref);
    }

    /// Makes sure `gref` is mapped; false if it cannot be (use grant copy then).
    fn ensure(&mut self, gref: GrantRef) -> bool {
        if self.maps.contains_key(&gref) {
            self.stats.hits += 1;
            self.touch(gref);
            return true;
        }
        if self.refused.contains_key(&gref) {
            return false;
        }
        // Linux blkfront grants its persistent pages read-write; a read-only grant (or any
        // other refusal) is served by grant copy from then on.
        match self.gnttab.map(self.domid, &[gref], true) {
            Ok(m) => {
                while self.maps.len() >= self.max {
                    match self.lru.pop_front() {
                        Some(old) => {
                            self.maps.remove(&old);
                            self.stats.evictions += 1;
                        }
                        None => break,
                    }
                }
                self.maps.insert(gref, m);
                self.lru.push_back(gref);
                self.stats.maps += 1;
                true
            }
            Err(_) => {
                if self.refused.len() < self.max {
                    self.refused.insert(gref, ());
                }
                self.stats.fallbacks += 1;
                false
            }
        }
    }
}

impl<G: GrantTable> PersistentGrants<G> {
    /// The mapped page of `gref` (after [`Self::ensure`] said it is mapped).
    fn mem_of(&self, gref: GrantRef) -> Result<SharedMem<'_>, GrantFault> {
        self.maps
            .get(&gref)
            .map(GrantMapping::mem)
            .ok_or_else(|| GrantFault {
                gref,
                reason: "mapping vanished".into(),
            })
    }
}

fn shm_fault(gref: GrantRef) -> impl FnOnce(crate::shm::OutOfBounds) -> GrantFault {
    move |e| GrantFault {
        gref,
        reason: e.to_string(),
    }
}

impl<G: GrantTable> GrantIo for PersistentGrants<G> {
    fn copy_from_guest(&mut self, spans: &[GrantSpan], dst: &mut [u8]) -> Result<(), GrantFault> {
        let mut rest = dst;
        for s in spans {
            let len = usize::from(s.len).min(rest.len());
            let (out, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            if self.ensure(s.gref) {
                self.mem_of(s.gref)?
                    .read(usize::from(s.offset), out)
                    .map_err(shm_fault(s.gref))?;
            } else {
                self.copy.copy_from_guest(std::slice::from_ref(s), out)?;
            }
        }
        Ok(())
    }

    fn copy_to_guest(&mut self, spans: &[GrantSpan], src: &[u8]) -> Result<(), GrantFault> {
        let mut rest = src;
        for s in spans {
            let (data, tail) = rest.split_at(usize::from(s.len).min(rest.len()));
            rest = tail;
            if self.ensure(s.gref) {
                self.mem_of(s.gref)?
                    .write(usize::from(s.offset), data)
                    .map_err(shm_fault(s.gref))?;
            } else {
                self.copy.copy_to_guest(std::slice::from_ref(s), data)?;
            }
        }
        Ok(())
    }
}
