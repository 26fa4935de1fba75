//! bindgen for Xen's libxengnttab and libxenevtchn (owned by `src/xen/`).

pub fn generate() {}
