//! Build script: generates the FFI bindings the edges of rbdback need, and the CSI plugin's
//! gRPC service code.
//!
//! Each edge owns one file under `build/`: `xen.rs` (libxengnttab, libxenevtchn) and
//! `ceph.rs` (librados, librbd) run bindgen against the system headers installed by
//! `tools/install-deps` (libxen-dev, librados-dev, librbd-dev, libclang-dev); `csi.rs`
//! (feature `csi`) describes the CSI services to tonic-build, no protoc needed; `docs.rs` renders
//! the command line of `src/cli.rs` as man pages and shell completions; `syscalls.rs` the
//! system call names the sandbox uses to name a refused call.

#[path = "build/ceph.rs"]
mod ceph;
#[cfg(feature = "csi")]
#[path = "build/csi.rs"]
mod csi;
#[path = "build/docs.rs"]
mod docs;
#[path = "build/syscalls.rs"]
mod syscalls;
#[path = "build/xen.rs"]
mod xen;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    xen::generate();
    ceph::generate();
    docs::generate();
    syscalls::generate();
    #[cfg(feature = "csi")]
    csi::generate();
}
