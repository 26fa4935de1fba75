//! The crash-recovery journal of one ring queue: what a backend that dies at any instruction
//! leaves behind so that the next instance resumes the ring without the guest noticing.
//!
//! Owns: a small file (in the state directory, on tmpfs: `/run/rbdback`) mapped shared, holding
//! the ring's private indices (`req_cons`, `rsp_prod_pvt`, `rsp_prod` as published) and one
//! entry per request taken and not yet answered-and-published: a copy of its slot, and once
//! answered, the response and the position it was written at.
//!
//! Why a copy of every taken request: blkif responses are written into the slots requests
//! came from (the ring is a union, `ring.h`), and a response answers any request, not
//! necessarily the one whose slot it lands in. A request still in flight may therefore have
//! lost its slot to a response the dead backend wrote and did not publish; only the journal
//! still has it.
//!
//! Write order, each step a store the next instance may find the process killed after:
//! 1. taking: the entry (index, slot bytes), then its state `TAKEN`, for every slot taken;
//!    then `req_cons`. Entries at or past the recorded `req_cons` are ignored on recovery
//!    (those requests are taken from the ring again: no response can have reached their
//!    slots yet, since nothing is answered before `req_cons` is recorded).
//! 2. answering: the entry's response and position, then its state `ANSWERED`; then the
//!    response is written into the ring; then `rsp_prod_pvt`. On recovery every answered
//!    entry at or past the shared `rsp_prod` is written into the ring again (idempotent), and
//!    `rsp_prod_pvt` is taken as one past the last of them.
//! 3. publishing: `rsp_prod` in the ring, then `published` here, then the answered entries
//!    below it are freed, one by one. On recovery the shared `rsp_prod` (between the recorded
//!    `published` and `rsp_prod_pvt`) says which answered entries were already published, and
//!    an answered entry behind the recorded `published` (the process died while freeing) is
//!    free.
//!
//! Trusts: its own file only after checking it (magic, geometry, the ring it belongs to,
//! indices that fit one ring); a journal that does not check out is not used (the VBD is then
//! closed as blkback closes one), never half-applied.
//! Must never: be written after the response it records (steps above), or be read as
//! anything but a copy (recovered slots are parsed and validated like fresh ones).

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::ring::abi::MAX_SLOT_SIZE;
use crate::ring::{Abi, RequestSlot, Response, Status};
use crate::shm::{MappedFile, OutOfBounds, SharedMem};

const MAGIC: &[u8; 8] = b"RBDBJRN1";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const ENTRY: usize = 32 + MAX_SLOT_SIZE;

// header fields
const H_VERSION: usize = 8;
const H_ENTRIES: usize = 12;
const H_ABI: usize = 16;
const H_ORDER: usize = 20;
const H_RING: usize = 24;
const H_REQ_CONS: usize = 32;
const H_RSP_PVT: usize = 36;
const H_PUBLISHED: usize = 40;
const H_FLAGS: usize = 44;

// entry fields
const E_STATE: usize = 0;
const E_INDEX: usize = 4;
const E_POS: usize = 8;
const E_STATUS: usize = 12;
const E_ID: usize = 16;
const E_OP: usize = 24;
const E_SLOT: usize = 32;

const FREE: u32 = 0;
const TAKEN: u32 = 1;
const ANSWERED: u32 = 2;

/// Flag: the previous instance stopped on purpose with nothing in flight and its image
/// closed (its exclusive lock released): the next one need not fence it.
const FLAG_CLEAN: u32 = 1;

/// A journal that cannot be used.
#[derive(Debug, Error)]
pub enum JournalError {
    /// The file could not be created, opened or mapped.
    #[error("journal {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a journal of this ring (another ring, another geometry, garbage).
    #[error("journal {} does not belong to this ring: {why}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What did not match.
        why: String,
    },
    /// The journal's records contradict each other or the shared ring.
    #[error("journal {} is inconsistent: {why}", path.display())]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Which ring a journal belongs to: its layout and the grants and port the frontend gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingIdentity {
    /// Slot layout.
    pub abi: Abi,
    /// `ring-page-order`.
    pub order: u8,
    /// `ring-ref*`, in order.
    pub refs: Vec<u32>,
    /// The frontend's `event-channel`.
    pub event_channel: u32,
}

impl RingIdentity {
    fn hash(&self) -> u64 {
        // FNV-1a over the identity's fields: only to tell rings apart, not a security check
        // (the file is written by rbdback alone, in a directory only it may write).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: &[u8]| {
            for &x in b {
                h ^= u64::from(x);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&abi_code(self.abi).to_le_bytes());
        eat(&[self.order]);
        for r in &self.refs {
            eat(&r.to_le_bytes());
        }
        eat(&self.event_channel.to_le_bytes());
        h
    }
}

fn abi_code(abi: Abi) -> u32 {
    match abi {
        Abi::Native => 0,
        Abi::X86_32 => 1,
        Abi::X86_64 => 2,
    }
}

/// A request the previous instance took and did not answer.
#[derive(Debug)]
pub struct Unanswered {
    /// Its ring index.
    pub index: u32,
    /// Its journal entry (keeps recording it).
    pub entry: u16,
    /// The slot as it was taken.
    pub slot: RequestSlot,
}

/// A response the previous instance wrote and may not have published.
#[derive(Debug)]
pub struct Written {
    /// Response position.
    pub pos: u32,
    /// The response.
    pub response: Response,
}

/// What a journal says about the ring when a backend takes it over.
#[derive(Debug)]
pub struct Recovered {
    /// Next request index to take.
    pub req_cons: u32,
    /// Next response position.
    pub rsp_prod_pvt: u32,
    /// `rsp_prod` as published (the shared index, checked against the record).
    pub published: u32,
    /// Requests to issue again, in ring order.
    pub unanswered: Vec<Unanswered>,
    /// Responses written and not published, to write again, in position order.
    pub unpublished: Vec<Written>,
    /// The previous instance stopped on purpose with nothing in flight.
    pub clean: bool,
}

/// The journal of one ring queue (see the module docs).
#[derive(Debug)]
pub struct Journal {
    file: MappedFile,
    path: PathBuf,
    entries: u32,
    free: Vec<u16>,
    /// Answered entries not yet published: (position, entry).
    unpublished: Vec<(u32, u16)>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

fn oob(path: &Path) -> impl Fn(OutOfBounds) -> JournalError + '_ {
    move |e| JournalError::Inconsistent {
        path: path.to_owned(),
        why: e.to_string(),
    }
}

fn len_for(entries: u32) -> usize {
    HEADER + entries as usize * ENTRY
}

fn entry_off(e: u16) -> usize {
    HEADER + usize::from(e) * ENTRY
}

fn get_u64(mem: &SharedMem<'_>, off: usize) -> Result<u64, OutOfBounds> {
    let mut b = [0u8; 8];
    mem.read(off, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

impl Journal {
    /// A fresh journal for a ring just connected (replaces any file at `path`).
    pub fn create(path: &Path, id: &RingIdentity, entries: u32) -> Result<Journal, JournalError> {
        let file = MappedFile::open(path, len_for(entries), true).map_err(io_err(path))?;
        let mem = file.mem();
        let w = |off: usize, v: u32| mem.store_u32(off, v);
        (|| -> Result<(), OutOfBounds> {
            mem.write(0, MAGIC)?;
            w(H_VERSION, VERSION)?;
            w(H_ENTRIES, entries)?;
            w(H_ABI, abi_code(id.abi))?;
            w(H_ORDER, u32::from(id.order))?;
            mem.write(H_RING, &id.hash().to_le_bytes())
        })()
        .map_err(oob(path))?;
        Ok(Journal {
            file,
            path: path.to_owned(),
            entries,
            free: (0..u16::try_from(entries).unwrap_or(u16::MAX))
                .rev()
                .collect(),
            unpublished: Vec::new(),
        })
    }

    /// Opens the journal a previous instance left for this ring and reads what it says,
    /// given `shared_rsp_prod`, the `rsp_prod` index found in the shared ring now.
    pub fn recover(
        path: &Path,
        id: &RingIdentity,
        entries: u32,
        shared_rsp_prod: u32,
    ) -> Result<(Journal, Recovered), JournalError> {
        let file = MappedFile::open(path, len_for(entries), false).map_err(io_err(path))?;
        let mismatch = |why: String| JournalError::Mismatch {
            path: path.to_owned(),
            why,
        };
        let bad = |why: String| JournalError::Inconsistent {
            path: path.to_owned(),
            why,
        };
        let mem = file.mem();
        let r = |off: usize| mem.load_u32(off).map_err(oob(path));
        let mut magic = [0u8; 8];
        mem.read(0, &mut magic).map_err(oob(path))?;
        if &magic != MAGIC || r(H_VERSION)? != VERSION {
            return Err(mismatch("not a journal of this version".into()));
        }
        if r(H_ENTRIES)? != entries
            || r(H_ABI)? != abi_code(id.abi)
            || r(H_ORDER)? != u32::from(id.order)
        {
            return Err(mismatch("another ring geometry".into()));
        }
        if get_u64(&mem, H_RING).map_err(oob(path))? != id.hash() {
            return Err(mismatch(
                "another ring (the frontend's ring-ref or event-channel changed)".into(),
            ));
        }
        let req_cons = r(H_REQ_CONS)?;
        let rec_pvt = r(H_RSP_PVT)?;
        let rec_pub = r(H_PUBLISHED)?;
        let clean = r(H_FLAGS)? & FLAG_CLEAN != 0;
        // distances are taken from the recorded `published`, which everything else follows
        let from_pub = |v: u32| v.wrapping_sub(rec_pub);
        let mut taken = Vec::new();
        let mut answered = Vec::new();
        for e in 0..u16::try_from(entries).unwrap_or(u16::MAX) {
            let o = entry_off(e);
            match r(o + E_STATE)? {
                FREE => {}
                TAKEN => {
                    let index = r(o + E_INDEX)?;
                    // At or past the recorded req_cons: the batch being recorded when the
                    // process died, never consumed (taken again). Requests in flight can be
                    // far behind req_cons (answers come out of order), so only the span of
                    // one batch after it counts as "past".
                    if index.wrapping_sub(req_cons) >= entries {
                        let mut b = [0u8; MAX_SLOT_SIZE];
                        mem.read(o + E_SLOT, &mut b).map_err(oob(path))?;
                        taken.push((index, e, RequestSlot::from_bytes(id.abi, &b)));
                    }
                }
                ANSWERED => {
                    let pos = r(o + E_POS)?;
                    if from_pub(pos) >= entries {
                        // before the recorded `published`: published already, the process
                        // died while freeing the entries it covered (step 3)
                        continue;
                    }
                    let mut idb = [0u8; 8];
                    mem.read(o + E_ID, &mut idb).map_err(oob(path))?;
                    let status = i16::try_from(r(o + E_STATUS)? as i32).unwrap_or(-1);
                    let response = Response {
                        id: u64::from_le_bytes(idb),
                        operation: u8::try_from(r(o + E_OP)?).unwrap_or(0),
                        status: Status::from_code(status),
                    };
                    answered.push((pos, e, response));
                }
                s => return Err(bad(format!("entry {e} has state {s}"))),
            }
        }
        // The responses written: the recorded rsp_prod_pvt, or one past the last answered
        // entry if the process died between writing one and recording the index.
        let mut pvt = rec_pvt;
        for (pos, _, _) in &answered {
            if from_pub(*pos) >= from_pub(pvt) {
                pvt = pos.wrapping_add(1);
            }
        }
        // What the guest can see: a shared rsp_prod between the record and pvt; anything
        // else was not written by us (the frontend may write the shared page), so fall back
        // on the record, which is safe: those slots are ours until published.
        let published = if from_pub(shared_rsp_prod) <= from_pub(pvt) {
            shared_rsp_prod
        } else {
            rec_pub
        };
        let mut j = Journal {
            file,
            path: path.to_owned(),
            entries,
            free: Vec::new(),
            unpublished: Vec::new(),
        };
        let mut unpublished = Vec::new();
        let mut keep = vec![false; entries as usize];
        for (pos, e, response) in answered {
            if pos.wrapping_sub(published) < pvt.wrapping_sub(published) {
                keep[usize::from(e)] = true;
                j.unpublished.push((pos, e));
                unpublished.push(Written { pos, response });
            }
        }
        unpublished.sort_by_key(|w| w.pos.wrapping_sub(published));
        let expect = pvt.wrapping_sub(published) as usize;
        if unpublished.len() != expect
            || unpublished
                .iter()
                .zip(0u32..)
                .any(|(w, i)| w.pos != published.wrapping_add(i))
        {
            return Err(bad(format!(
                "{} responses recorded between rsp_prod {published} and {pvt}",
                unpublished.len()
            )));
        }
        // oldest first: every index is behind req_cons
        taken.sort_by_key(|(index, _, _)| index.wrapping_sub(req_cons));
        if req_cons.wrapping_sub(pvt) as usize != taken.len() {
            return Err(bad(format!(
                "{} requests in flight recorded, req_cons {req_cons} and rsp_prod_pvt {pvt} say {}",
                taken.len(),
                req_cons.wrapping_sub(pvt)
            )));
        }
        let unanswered = taken
            .into_iter()
            .map(|(index, entry, slot)| {
                keep[usize::from(entry)] = true;
                Unanswered { index, entry, slot }
            })
            .collect();
        // Everything else is free (and marked so, for the next crash).
        let m = j.file.mem();
        for (e, k) in keep.iter().enumerate().rev() {
            let e = u16::try_from(e).unwrap_or(u16::MAX);
            if !k {
                m.store_u32(entry_off(e) + E_STATE, FREE)
                    .map_err(oob(path))?;
                j.free.push(e);
            }
        }
        m.store_u32(H_RSP_PVT, pvt).map_err(oob(path))?;
        m.store_u32(H_PUBLISHED, published).map_err(oob(path))?;
        m.store_u32(H_FLAGS, 0).map_err(oob(path))?;
        Ok((
            j,
            Recovered {
                req_cons,
                rsp_prod_pvt: pvt,
                published,
                unanswered,
                unpublished,
                clean,
            },
        ))
    }

    /// Entries free for requests taken now.
    pub fn free_entries(&self) -> usize {
        self.free.len()
    }

    /// Records a request taken at ring `index`; `None` when no entry is free (publish the
    /// responses written so far: that frees their entries).
    pub fn take(&mut self, index: u32, slot: &RequestSlot) -> Option<u16> {
        let e = self.free.pop()?;
        let m = self.file.mem();
        let o = entry_off(e);
        let ok = m.store_u32(o + E_INDEX, index).is_ok()
            && m.write(o + E_SLOT, slot.bytes()).is_ok()
            && m.store_u32_release(o + E_STATE, TAKEN).is_ok();
        if ok {
            Some(e)
        } else {
            self.free.push(e);
            None
        }
    }

    /// Records `req_cons` after the requests before it were recorded with [`Self::take`].
    pub fn set_req_cons(&self, req_cons: u32) {
        let _ = self.file.mem().store_u32_release(H_REQ_CONS, req_cons);
    }

    /// Records that `entry`'s request is answered with `rsp` at response position `pos`:
    /// call before the response is written into the ring.
    pub fn answer(&mut self, entry: u16, pos: u32, rsp: &Response) {
        let m = self.file.mem();
        let o = entry_off(entry);
        let _ = m.store_u32(o + E_POS, pos);
        let _ = m.store_u32(o + E_STATUS, i32::from(rsp.status.code()) as u32);
        let _ = m.write(o + E_ID, &rsp.id.to_le_bytes());
        let _ = m.store_u32(o + E_OP, u32::from(rsp.operation));
        let _ = m.store_u32_release(o + E_STATE, ANSWERED);
        self.unpublished.push((pos, entry));
    }

    /// Records `rsp_prod_pvt` after a response was written into the ring.
    pub fn set_rsp_prod_pvt(&self, rsp_prod_pvt: u32) {
        let _ = self.file.mem().store_u32_release(H_RSP_PVT, rsp_prod_pvt);
    }

    /// Records that the ring's `rsp_prod` is now `rsp_prod` (call after publishing), and
    /// frees the entries of the responses it covers.
    pub fn published(&mut self, rsp_prod: u32) {
        let m = self.file.mem();
        let _ = m.store_u32_release(H_PUBLISHED, rsp_prod);
        // all positions recorded are below the new rsp_prod once it is published; a process
        // killed while freeing leaves answered entries behind `published` (recovery skips them)
        for (i, (_, e)) in self.unpublished.drain(..).enumerate() {
            if i == 1 {
                crate::device::crashpoint::hit("freeing");
            }
            let _ = m.store_u32(entry_off(e) + E_STATE, FREE);
            self.free.push(e);
        }
    }

    /// Marks (or unmarks) a stop on purpose with nothing in flight.
    pub fn set_clean(&self, clean: bool) {
        let _ = self
            .file
            .mem()
            .store_u32_release(H_FLAGS, if clean { FLAG_CLEAN } else { 0 });
    }

    /// Deletes the file (the ring is gone for good: the frontend closed it).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries of the journal (the ring's capacity).
    pub fn entries(&self) -> u32 {
        self.entries
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ring::front::WireRequest;
    use crate::ring::request::op;

    fn id() -> RingIdentity {
        RingIdentity {
            abi: Abi::X86_64,
            order: 0,
            refs: vec![8],
            event_channel: 3,
        }
    }

    fn slot(i: u64) -> RequestSlot {
        RequestSlot::from_bytes(Abi::X86_64, &WireRequest::flush(i).encode(Abi::X86_64))
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("rbdback-journal-{name}-{}", std::process::id()))
    }

    fn rsp(id: u64) -> Response {
        Response {
            id,
            operation: op::FLUSH_DISKCACHE,
            status: Status::Okay,
        }
    }

    #[test]
    fn a_journal_left_mid_flight_gives_back_what_was_unanswered_and_unpublished() {
        let p = tmp("mid");
        let mut j = Journal::create(&p, &id(), 32).unwrap();
        // take 0..4, answer 2 (at position 0) and 0 (at 1), publish 1, answer 3 (at 2)
        let e: Vec<u16> = (0..4)
            .map(|i| j.take(i, &slot(100 + u64::from(i))).unwrap())
            .collect();
        j.set_req_cons(4);
        j.answer(e[2], 0, &rsp(102));
        j.set_rsp_prod_pvt(1);
        j.answer(e[0], 1, &rsp(100));
        j.set_rsp_prod_pvt(2);
        j.published(2);
        j.answer(e[3], 2, &rsp(103));
        // killed here: rsp_prod_pvt 3 not recorded, nothing more published
        drop(j);
        let (_, r) = Journal::recover(&p, &id(), 32, 2).unwrap();
        assert_eq!((r.req_cons, r.rsp_prod_pvt, r.published), (4, 3, 2));
        assert_eq!(r.unanswered.len(), 1);
        assert_eq!(r.unanswered[0].index, 1);
        assert_eq!(r.unanswered[0].slot.id(), 101);
        assert_eq!(r.unpublished.len(), 1);
        assert_eq!(
            (r.unpublished[0].pos, r.unpublished[0].response.id),
            (2, 103)
        );
        assert!(!r.clean);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_death_while_freeing_published_entries_is_recovered() {
        let p = tmp("freeing");
        let mut j = Journal::create(&p, &id(), 32).unwrap();
        // a request still in flight far behind, so positions are well past 0
        let stuck = j.take(0, &slot(1000)).unwrap();
        j.set_req_cons(1);
        for i in 1..=40u32 {
            let e = j.take(i, &slot(u64::from(i))).unwrap();
            j.set_req_cons(i + 1);
            j.answer(e, i - 1, &rsp(u64::from(i)));
            j.set_rsp_prod_pvt(i);
            if i % 4 == 0 {
                j.published(i);
            }
        }
        // three taken and answered out of order (the lowest entry gets the last position,
        // which recovery meets first), published in the ring and recorded as such, then
        // killed after freeing only the first of their entries
        let mut e: Vec<u16> = (41..44u32)
            .map(|i| {
                let e = j.take(i, &slot(u64::from(i))).unwrap();
                j.set_req_cons(i + 1);
                e
            })
            .collect();
        e.sort_unstable();
        for (pos, &entry) in (40..43u32).zip(e.iter().rev()) {
            j.answer(entry, pos, &rsp(u64::from(pos)));
            j.set_rsp_prod_pvt(pos + 1);
        }
        let m = j.file.mem();
        m.store_u32(H_PUBLISHED, 43).unwrap();
        m.store_u32(entry_off(e[2]) + E_STATE, FREE).unwrap();
        drop(j);
        let (j, r) = Journal::recover(&p, &id(), 32, 43).unwrap();
        assert_eq!((r.req_cons, r.rsp_prod_pvt, r.published), (44, 43, 43));
        assert!(r.unpublished.is_empty());
        assert_eq!(r.unanswered.len(), 1);
        assert_eq!(
            (r.unanswered[0].entry, r.unanswered[0].slot.id()),
            (stuck, 1000)
        );
        assert_eq!(j.free_entries(), 31);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_publish_the_journal_did_not_record_is_read_from_the_ring() {
        let p = tmp("pub");
        let mut j = Journal::create(&p, &id(), 32).unwrap();
        let e = j.take(0, &slot(7)).unwrap();
        j.set_req_cons(1);
        j.answer(e, 0, &rsp(7));
        j.set_rsp_prod_pvt(1);
        // rsp_prod = 1 was stored in the ring, then the process died
        drop(j);
        let copy = tmp("pub-copy");
        std::fs::copy(&p, &copy).unwrap();
        let (_, r) = Journal::recover(&p, &id(), 32, 1).unwrap();
        assert_eq!((r.rsp_prod_pvt, r.published), (1, 1));
        assert!(r.unanswered.is_empty() && r.unpublished.is_empty());
        // a frontend that scribbles rsp_prod cannot make us skip our responses
        let (_, r) = Journal::recover(&copy, &id(), 32, 77).unwrap();
        assert_eq!(r.published, 0);
        assert_eq!(r.unpublished.len(), 1);
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&copy);
    }

    #[test]
    fn a_request_stuck_far_behind_req_cons_is_still_recovered() {
        let p = tmp("stuck");
        let mut j = Journal::create(&p, &id(), 32).unwrap();
        j.take(0, &slot(1000)).unwrap();
        j.set_req_cons(1);
        // 100 more requests come and go while request 0 waits (answers out of order)
        for i in 1..=100u32 {
            let e = j.take(i, &slot(u64::from(i))).unwrap();
            j.set_req_cons(i + 1);
            j.answer(e, i - 1, &rsp(u64::from(i)));
            j.set_rsp_prod_pvt(i);
            j.published(i);
        }
        drop(j);
        let (_, r) = Journal::recover(&p, &id(), 32, 100).unwrap();
        assert_eq!((r.req_cons, r.rsp_prod_pvt, r.published), (101, 100, 100));
        assert_eq!(r.unanswered.len(), 1);
        assert_eq!(
            (r.unanswered[0].index, r.unanswered[0].slot.id()),
            (0, 1000)
        );
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn entries_taken_past_the_recorded_req_cons_are_taken_again_not_replayed() {
        let p = tmp("cons");
        let mut j = Journal::create(&p, &id(), 32).unwrap();
        j.take(0, &slot(1)).unwrap();
        j.take(1, &slot(2)).unwrap();
        // killed before req_cons = 2 was recorded
        drop(j);
        let (j, r) = Journal::recover(&p, &id(), 32, 0).unwrap();
        assert_eq!(r.req_cons, 0);
        assert!(r.unanswered.is_empty());
        assert_eq!(j.free_entries(), 32);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn another_ring_or_garbage_is_refused() {
        let p = tmp("other");
        Journal::create(&p, &id(), 32).unwrap();
        let mut other = id();
        other.event_channel = 4;
        assert!(matches!(
            Journal::recover(&p, &other, 32, 0),
            Err(JournalError::Mismatch { .. })
        ));
        assert!(matches!(
            Journal::recover(&p, &id(), 64, 0),
            Err(JournalError::Io { .. })
        ));
        std::fs::write(&p, vec![0xabu8; len_for(32)]).unwrap();
        assert!(Journal::recover(&p, &id(), 32, 0).is_err());
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_full_journal_asks_for_a_publish() {
        let p = tmp("full");
        let mut j = Journal::create(&p, &id(), 2).unwrap();
        let a = j.take(0, &slot(1)).unwrap();
        j.take(1, &slot(2)).unwrap();
        assert!(j.take(2, &slot(3)).is_none());
        j.answer(a, 0, &rsp(1));
        assert!(j.take(2, &slot(3)).is_none(), "answered but not published");
        j.published(1);
        assert!(j.take(2, &slot(3)).is_some());
        let _ = std::fs::remove_file(&p);
    }
}
