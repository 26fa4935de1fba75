//! placeholder, replaced by the xen layer
