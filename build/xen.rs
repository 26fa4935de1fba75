//! bindgen for Xen's libxengnttab and libxenevtchn (owned by `src/xen/`).

use std::path::PathBuf;

pub fn generate() {
    println!("cargo:rerun-if-changed=build/xen.rs");
    println!("cargo:rustc-link-lib=xengnttab");
    println!("cargo:rustc-link-lib=xenevtchn");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let bindings = bindgen::Builder::default()
        .header_contents(
            "xen_wrapper.h",
            "#include <stdint.h>\n#include <xengnttab.h>\n#include <xenevtchn.h>\n",
        )
        .allowlist_function(
            "xengnttab_(open|close|fd|map_domain_grant_refs|unmap|grant_copy|set_max_grants)",
        )
        .allowlist_function(
            "xenevtchn_(open|close|fd|notify|bind_interdomain|unbind|pending|unmask)",
        )
        .allowlist_type("xengnttab_grant_copy_segment_t")
        .clang_arg("-D__XEN_TOOLS__")
        .layout_tests(false)
        .generate()
        .expect("bindgen: xengnttab.h / xenevtchn.h (install libxen-dev and libclang-dev)");
    bindings
        .write_to_file(out.join("xen_bindings.rs"))
        .expect("write xen bindings");
}
