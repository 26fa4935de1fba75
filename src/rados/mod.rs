//! placeholder, replaced by the rados layer
