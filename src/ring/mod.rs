//! placeholder, replaced by the ring layer
