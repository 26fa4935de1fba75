//! Guest data movement by grant copy: the hypervisor copies between the frontend's granted
//! pages and our buffers, so no guest data page is ever mapped into this process.
//!
//! Owns: turning a request's spans into `xengnttab_grant_copy` segments and checking each
//! segment's status one by one.
//! Trusts: nothing about the spans beyond what the ring layer validated (offset + len within
//! one page); the hypervisor enforces the grant's permissions.
//! Must never: report success for a request unless every one of its segments succeeded.

use std::sync::Arc;

use crate::xen::{CopyDir, CopySeg, DomId, GrantTable};

use super::dataplane::{GrantFault, GrantIo, GrantSpan};

/// Grant-copy access to one frontend's pages.
#[derive(Debug)]
pub struct CopyGrants<G: GrantTable> {
    gnttab: Arc<G>,
    domid: DomId,
}

impl<G: GrantTable> CopyGrants<G> {
    /// Copies to and from the pages `domid` grants us, through `gnttab`.
    pub fn new(gnttab: Arc<G>, domid: DomId) -> Self {
        CopyGrants { gnttab, domid }
    }
}

fn check(segs: &[CopySeg<'_>]) -> Result<(), GrantFault> {
    match segs.iter().find(|s| s.status != 0) {
        Some(s) => Err(GrantFault {
            gref: s.gref,
            reason: format!("grant copy status {}", s.status),
        }),
        None => Ok(()),
    }
}

impl<G: GrantTable> CopyGrants<G> {
    /// One grant copy call for all of a request's segments, then each segment's status.
    fn run(&self, first: u32, segs: &mut [CopySeg<'_>]) -> Result<(), GrantFault> {
        self.gnttab.copy(segs).map_err(|e| GrantFault {
            gref: first,
            reason: e.to_string(),
        })?;
        check(segs)
    }

    fn seg<'a>(&self, s: &GrantSpan, dir: CopyDir<'a>) -> CopySeg<'a> {
        CopySeg {
            domid: self.domid,
            gref: s.gref,
            offset: s.offset,
            dir,
            status: 0,
        }
    }
}

impl<G: GrantTable> GrantIo for CopyGrants<G> {
    fn copy_from_guest(&mut self, spans: &[GrantSpan], dst: &mut [u8]) -> Result<(), GrantFault> {
        let mut segs = Vec::with_capacity(spans.len());
        let mut rest = dst;
        for s in spans {
            let len = usize::from(s.len).min(rest.len());
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            segs.push(self.seg(s, CopyDir::FromGuest { dst: head }));
        }
        self.run(spans.first().map_or(0, |s| s.gref), &mut segs)
    }

    fn copy_to_guest(&mut self, spans: &[GrantSpan], src: &[u8]) -> Result<(), GrantFault> {
        let mut segs = Vec::with_capacity(spans.len());
        let mut rest = src;
        for s in spans {
            let (head, tail) = rest.split_at(usize::from(s.len).min(rest.len()));
            rest = tail;
            segs.push(self.seg(s, CopyDir::ToGuest { src: head }));
        }
        self.run(spans.first().map_or(0, |s| s.gref), &mut segs)
    }
}
