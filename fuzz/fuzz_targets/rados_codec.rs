//! Fuzz the direct engine's decoders with arbitrary bytes (what a broken cluster or a hostile
//! client's notify could carry) and its layout arithmetic with arbitrary layouts: nothing
//! panics, decoded lock notifies re-encode to what they decoded from, and every mapped piece
//! stays inside its object and maps back onto the range it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbdback::rados::direct::codec;
use rbdback::rados::direct::layout::Layout;

fuzz_target!(|data: &[u8]| {
    let _ = codec::size_reply(data);
    let _ = codec::features_reply(data);
    let _ = codec::string_reply(data, "fuzz");
    let _ = codec::snapcontext_reply(data);
    let _ = codec::stripe_reply(data);
    let _ = codec::parent_get_reply(data);
    let _ = codec::parent_overlap_reply(data);
    let _ = codec::get_parent_reply(data);
    if let Ok(map) = codec::object_map_reply(data) {
        assert!(map.iter().all(|s| *s < 4));
    }
    if let Ok(n) = codec::decode_notify(data) {
        if matches!(
            n.op,
            codec::notify_op::ACQUIRED_LOCK
                | codec::notify_op::RELEASED_LOCK
                | codec::notify_op::REQUEST_LOCK
        ) && n.client != codec::ClientId::default()
        {
            let again = codec::decode_notify(&codec::lock_notify(n.op, n.client)).unwrap();
            assert_eq!(again, n);
        }
    }
    if let Ok(acks) = codec::notify_acks(data) {
        let _ = codec::owner_response(&acks);
    }
    // layouts: order 12..=26, stripe unit a divisor, up to 16 objects per stripe
    if data.len() >= 20 {
        let order = 12 + u32::from(data[0] % 15);
        let os = 1u64 << order;
        let su = os >> (data[1] % 6).min(order as u8 - 9);
        let sc = 1 + u64::from(data[2] % 16);
        let Ok(l) = Layout::new(os, su, sc) else {
            return;
        };
        let off = u64::from_le_bytes(data[3..11].try_into().unwrap()) % (1 << 40);
        let len = u64::from(u32::from_le_bytes(data[11..15].try_into().unwrap())) % (8 << 20);
        let mut covered = 0;
        for p in l.map(off, len) {
            assert!(p.obj_off + p.len <= os);
            let mut at = off + p.buf_off;
            for (img, n) in l.unmap(p.objno, p.obj_off, p.len) {
                assert_eq!(img, at);
                at += n;
            }
            covered += p.len;
        }
        assert_eq!(covered, len);
    }
});
