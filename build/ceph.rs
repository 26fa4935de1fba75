//! bindgen for librados and librbd (owned by `src/rados/`).

use std::path::PathBuf;

pub fn generate() {
    println!("cargo:rerun-if-changed=build/ceph.rs");
    println!("cargo:rustc-link-lib=rados");
    println!("cargo:rustc-link-lib=rbd");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let bindings = bindgen::Builder::default()
        .header_contents(
            "ceph_wrapper.h",
            "#include <rados/librados.h>\n#include <rbd/librbd.h>\n",
        )
        .allowlist_function("rados_.*")
        .allowlist_var("LIBRADOS_.*")
        .allowlist_function("rbd_(open|open_read_only|close|get_size|get_features|stat|is_exclusive_lock_owner|aio_create_completion|aio_release|aio_get_return_value|aio_read|aio_write|aio_discard|aio_write_zeroes|aio_flush|invalidate_cache|encryption_load|lock_get_owners|lock_get_owners_cleanup|lock_break)")
        .allowlist_type("rbd_lock_mode_t")
        .allowlist_type("rbd_image_info_t")
        .allowlist_type("rbd_encryption_luks[12]_format_options_t")
        .allowlist_var("RBD_FEATURE_.*")
        .layout_tests(false)
        .generate()
        .expect("bindgen: librados.h / librbd.h (install librados-dev, librbd-dev, libclang-dev)");
    bindings
        .write_to_file(out.join("ceph_bindings.rs"))
        .expect("write ceph bindings");
}
