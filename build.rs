//! Build script: generates the FFI bindings the edges of rbdback need.
//!
//! Each edge owns one file under `build/`: `xen.rs` (libxengnttab, libxenevtchn) and
//! `ceph.rs` (librados, librbd). Both run bindgen against the system headers installed
//! by `tools/install-deps` (libxen-dev, librados-dev, librbd-dev, libclang-dev).

#[path = "build/ceph.rs"]
mod ceph;
#[path = "build/xen.rs"]
mod xen;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    xen::generate();
    ceph::generate();
}
