//! Crash points for the crash-recovery tests: a test build of `serve` can be told to kill
//! itself (SIGKILL, as an operator's `kill -9` would) at a named instant of the dataplane, so
//! that the tests reach every window of the journal protocol on purpose rather than by chance.
//!
//! Owns: the armed point (`<run dir>/crash-next`, read and deleted once when `serve` starts:
//! `<point>:<n>` kills the process at the n-th time the point is reached).
//! Points: `take` (a batch half recorded), `pushed` (a response written, not published),
//! `published` (rsp_prod stored, the journal not told), `freeing` (the journal told, the
//! entries it covers half freed), `flush` (a flush in flight), `indirect` (an indirect
//! request admitted).
//! Must never: exist in production builds (without the `test-utils` feature [`hit`] is empty).

#[cfg(feature = "test-utils")]
mod armed {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;

    static POINT: OnceLock<(String, AtomicU32)> = OnceLock::new();

    /// Arms the point named in `file` (then deleted), if there is one.
    pub fn arm_from(file: &std::path::Path) {
        let Ok(text) = std::fs::read_to_string(file) else {
            return;
        };
        let _ = std::fs::remove_file(file);
        if let Some((name, n)) = text.trim().split_once(':') {
            if let Ok(n) = n.parse::<u32>() {
                tracing::warn!(point = name, n, "test crash point armed");
                let _ = POINT.set((name.to_owned(), AtomicU32::new(n.max(1))));
            }
        }
    }

    /// The dataplane passed point `name`.
    pub fn hit(name: &str) {
        let Some((armed, left)) = POINT.get() else {
            return;
        };
        if armed == name && left.fetch_sub(1, Ordering::Relaxed) == 1 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGKILL);
        }
    }
}

#[cfg(feature = "test-utils")]
pub use armed::{arm_from, hit};

/// The dataplane passed point `name` (nothing in production builds).
#[cfg(not(feature = "test-utils"))]
#[inline(always)]
pub fn hit(_name: &str) {}
