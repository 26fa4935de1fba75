//! Where image bytes live: Ceph's file layout (object size, stripe unit, stripe count) maps an
//! image byte range to pieces of `rbd_data` objects, and back.
//!
//! Owns: arithmetic only. Pure, total: ranges are validated by the caller against the image
//! size, and no input can make it panic or loop without bound; a layout whose sizes do not
//! fit the arithmetic (a crafted header's) is refused by [`Layout::new`], naming why.

use thiserror::Error;

/// An image's striping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Object size in bytes (a power of two).
    pub object_size: u64,
    /// Stripe unit (divides the object size).
    pub stripe_unit: u64,
    /// Objects per stripe.
    pub stripe_count: u64,
}

/// A piece of an object: `len` bytes at `obj_off` of object `objno`, holding the bytes at
/// `buf_off` of the range that was mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub objno: u64,
    pub obj_off: u64,
    pub len: u64,
    pub buf_off: u64,
}

/// A layout the arithmetic cannot use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LayoutError {
    /// Not a power of two of at least 4 KiB.
    #[error("object size {0} is not a power of two of at least 4096 bytes")]
    ObjectSize(u64),
    /// Zero, or not a divisor of the object size.
    #[error("stripe unit {stripe_unit} does not divide the object size {object_size}")]
    StripeUnit {
        /// The stripe unit.
        stripe_unit: u64,
        /// The object size.
        object_size: u64,
    },
    /// Zero, or more objects per stripe than Ceph makes.
    #[error("stripe count {0} is not between 1 and 65536")]
    StripeCount(u64),
    /// One object set (object size × stripe count) does not fit in 64 bits.
    #[error("object size {object_size} times stripe count {stripe_count} overflows 64 bits")]
    Period {
        /// The object size.
        object_size: u64,
        /// The stripe count.
        stripe_count: u64,
    },
}

impl Layout {
    /// Checks what the header said.
    pub fn new(
        object_size: u64,
        stripe_unit: u64,
        stripe_count: u64,
    ) -> Result<Layout, LayoutError> {
        if !object_size.is_power_of_two() || object_size < 4096 {
            return Err(LayoutError::ObjectSize(object_size));
        }
        if stripe_unit == 0 || object_size % stripe_unit != 0 {
            return Err(LayoutError::StripeUnit {
                stripe_unit,
                object_size,
            });
        }
        if stripe_count == 0 || stripe_count > 1 << 16 {
            return Err(LayoutError::StripeCount(stripe_count));
        }
        // num_objects divides by the period: it must not wrap (order 63 over 2 objects did)
        if object_size.checked_mul(stripe_count).is_none() {
            return Err(LayoutError::Period {
                object_size,
                stripe_count,
            });
        }
        Ok(Layout {
            object_size,
            stripe_unit,
            stripe_count,
        })
    }

    /// True for the default layout (stripe unit = object size, one object per stripe).
    pub fn is_simple(&self) -> bool {
        self.stripe_count == 1 || self.stripe_unit == self.object_size
    }

    /// The pieces of `len` bytes at image offset `off`, in image order; adjacent pieces of
    /// one object that are also adjacent in the range are merged.
    pub fn map(&self, off: u64, len: u64) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        let (su, sc, os) = (self.stripe_unit, self.stripe_count, self.object_size);
        let per_obj = os / su;
        let mut done = 0u64;
        while done < len {
            let cur = off + done;
            let block = cur / su;
            let stripe = block / sc;
            let pos = block % sc;
            let objset = stripe / per_obj;
            let objno = objset * sc + pos;
            let in_block = cur % su;
            let obj_off = (stripe % per_obj) * su + in_block;
            let n = (su - in_block).min(len - done);
            match out.last_mut() {
                Some(p)
                    if p.objno == objno
                        && p.obj_off + p.len == obj_off
                        && p.buf_off + p.len == done =>
                {
                    p.len += n
                }
                _ => out.push(Piece {
                    objno,
                    obj_off,
                    len: n,
                    buf_off: done,
                }),
            }
            done += n;
        }
        out
    }

    /// The image ranges (offset, length) that `len` bytes at `obj_off` of object `objno`
    /// hold, in object order.
    pub fn unmap(&self, objno: u64, obj_off: u64, len: u64) -> Vec<(u64, u64)> {
        let (su, sc, os) = (self.stripe_unit, self.stripe_count, self.object_size);
        let per_obj = os / su;
        let objset = objno / sc;
        let pos = objno % sc;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut done = 0u64;
        while done < len {
            let o = obj_off + done;
            let su_in_obj = o / su;
            let in_block = o % su;
            let stripe = objset * per_obj + su_in_obj;
            let block = stripe * sc + pos;
            let img = block * su + in_block;
            let n = (su - in_block).min(len - done);
            match out.last_mut() {
                Some(r) if r.0 + r.1 == img => r.1 += n,
                _ => out.push((img, n)),
            }
            done += n;
        }
        out
    }

    /// Objects an image of `size` bytes spans (Ceph's `Striper::get_num_objects`).
    pub fn num_objects(&self, size: u64) -> u64 {
        let period = self.object_size * self.stripe_count;
        let full = size / period;
        let rem = size % period;
        let tail = if rem == 0 {
            0
        } else {
            rem.div_ceil(self.stripe_unit).min(self.stripe_count)
        };
        full * self.stripe_count + tail
    }
}

/// `rbd_data.<id>.<objno as %016x>` (or the header's own prefix).
pub fn data_object(prefix: &str, objno: u64) -> String {
    // one per object request: built by hand (the formatter pads char by char), with room
    // for the NUL the C call adds
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(prefix.len() + 18);
    s.push_str(prefix);
    s.push('.');
    for b in objno.to_be_bytes() {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_object_names_are_zero_padded_hex() {
        assert_eq!(
            data_object("rbd_data.1a2b", 0),
            "rbd_data.1a2b.0000000000000000"
        );
        assert_eq!(data_object("p", 0xfe), "p.00000000000000fe");
        assert_eq!(data_object("p", u64::MAX), "p.ffffffffffffffff");
        assert_eq!(
            data_object("p", 0x0123_4567_89ab_cdef),
            format!("p.{:016x}", 0x0123_4567_89ab_cdefu64)
        );
    }

    #[test]
    fn simple_layout_splits_at_object_boundaries() {
        let l = Layout::new(4 << 20, 4 << 20, 1).unwrap();
        let p = l.map((4 << 20) - 512, 1024);
        assert_eq!(
            p,
            vec![
                Piece {
                    objno: 0,
                    obj_off: (4 << 20) - 512,
                    len: 512,
                    buf_off: 0
                },
                Piece {
                    objno: 1,
                    obj_off: 0,
                    len: 512,
                    buf_off: 512
                },
            ]
        );
        assert_eq!(l.unmap(1, 0, 512), vec![(4 << 20, 512)]);
        assert_eq!(l.num_objects((8 << 20) + 1), 3);
        assert_eq!(
            data_object("rbd_data.abc", 10),
            "rbd_data.abc.000000000000000a"
        );
    }

    #[test]
    fn striping_v2_round_trips() {
        // 64 KiB stripe unit over 4 objects of 1 MiB (Ceph's example layout).
        let l = Layout::new(1 << 20, 64 << 10, 4).unwrap();
        assert!(!l.is_simple());
        let (off, len) = (100_000u64, 5_000_000u64);
        let pieces = l.map(off, len);
        let mut covered = 0;
        for p in &pieces {
            assert!(p.obj_off + p.len <= l.object_size);
            let back = l.unmap(p.objno, p.obj_off, p.len);
            // every piece maps back onto the image range it came from
            let mut at = off + p.buf_off;
            for (img, n) in back {
                assert_eq!(img, at);
                at += n;
            }
            covered += p.len;
        }
        assert_eq!(covered, len);
        // the second stripe unit of the image is object 1's first
        assert_eq!(l.map(64 << 10, 1)[0].objno, 1);
        // the fifth goes back to object 0, at 64 KiB
        assert_eq!(
            l.map(4 * (64 << 10), 1)[0],
            Piece {
                objno: 0,
                obj_off: 64 << 10,
                len: 1,
                buf_off: 0
            }
        );
        assert_eq!(l.num_objects(4 << 20), 4);
        assert_eq!(l.num_objects((4 << 20) + (64 << 10) + 1), 6);
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert_eq!(
            Layout::new(3 << 20, 1 << 20, 1),
            Err(LayoutError::ObjectSize(3 << 20))
        );
        assert!(matches!(
            Layout::new(4 << 20, 3 << 20, 1),
            Err(LayoutError::StripeUnit { .. })
        ));
        assert_eq!(
            Layout::new(4 << 20, 4 << 20, 0),
            Err(LayoutError::StripeCount(0))
        );
        assert_eq!(Layout::new(0, 0, 1), Err(LayoutError::ObjectSize(0)));
    }

    #[test]
    fn a_layout_whose_object_set_overflows_is_refused_by_name() {
        // order 63 striped over 2 objects: 2^63 * 2 wraps to 0, and num_objects divided by it
        let e = Layout::new(1 << 63, 1 << 63, 2).unwrap_err();
        assert_eq!(
            e,
            LayoutError::Period {
                object_size: 1 << 63,
                stripe_count: 2
            }
        );
        assert!(e.to_string().contains("overflows"), "{e}");
        assert!(matches!(
            Layout::new(1 << 62, 1 << 62, 4),
            Err(LayoutError::Period { .. })
        ));
        // what fits is usable end to end
        let l = Layout::new(1 << 61, 1 << 61, 4).unwrap();
        assert_eq!(l.num_objects(u64::MAX), 8);
        assert_eq!(Layout::new(1 << 63, 1 << 63, 1).unwrap().num_objects(1), 1);
    }
}
