//! Fuzz the xenstore wire decoder with arbitrary byte streams (what a hostile or broken
//! daemon could send): decoding never panics, never claims more bytes than it was given, never
//! returns a payload over the limit, and whatever it decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbdback::xen::xenstore::wire::{Msg, Perm, HEADER_LEN, PAYLOAD_MAX};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((msg, used))) = Msg::decode(rest) {
        assert!(used >= HEADER_LEN && used <= rest.len());
        assert!(msg.payload.len() <= PAYLOAD_MAX);
        let again = msg.encode().expect("a decoded message re-encodes");
        assert_eq!(&again[..], &rest[..used]);
        for s in msg.strings() {
            if let Some(p) = Perm::parse(&s) {
                assert_eq!(Perm::parse(&p.encode()), Some(p));
            }
        }
        let _ = msg.text();
        rest = &rest[used..];
    }
});
