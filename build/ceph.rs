//! bindgen for librados and librbd (owned by `src/rados/`).

pub fn generate() {}
