//! A filtering xenstore proxy: one client connection (a socket pair's end, held by a
//! sandboxed backend) forwarded to xenstored, request by request, through a [`Policy`].
//!
//! Xen gives a dom0 process's xenstore connection every right (dom0 is privileged in
//! xenstored, and `XS_RESTRICT` is gone from Xen since 4.9), so a backend holding one could
//! read every guest's `params` and rewrite any node. The proxy keeps that connection in a
//! privileged process and lets through only the paths its policy names.
//!
//! Owns: the forwarding of one connection (two threads), the normalisation of request paths
//! (relative paths are made absolute under the connection's home, as xenstored does) and the
//! `EACCES` answers to what the policy refuses.
//! Trusts: nothing the client sends: every message is decoded with [`Msg::decode`]'s bounds,
//! and a request type the proxy does not know is refused.
//! Must never: forward a request whose path the policy did not allow (reads, directory
//! listings, permissions and watches need [`Access::Read`]; writes, `mkdir` and `rm` need
//! [`Access::Write`]); forward a permission change, a special (`@...`) watch or a control
//! message; or interleave two messages' bytes on the client's stream.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

use super::wire::{ty, Msg};
use super::{for_each_msg, open_raw, XsError};

/// What a request does to its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read a node, list a directory, read permissions or watch a subtree.
    Read,
    /// Write or remove a node, or make a directory.
    Write,
}

/// The paths a proxied connection may reach: called with an absolute, normalised path.
pub type Policy = Arc<dyn Fn(Access, &str) -> bool + Send + Sync>;

/// What the proxy does with one request.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Forward,
    Refuse(&'static str),
}

/// The path a request names (its first NUL-terminated string), absolute: xenstored resolves
/// a relative path under the connection's home (`/local/domain/<domid>`).
fn request_path(msg: &Msg, home: &str) -> Option<String> {
    let first = msg.payload.split(|&b| b == 0).next()?;
    let p = std::str::from_utf8(first).ok()?;
    if p.is_empty() {
        return None;
    }
    Some(if p.starts_with('/') || p.starts_with('@') {
        p.to_owned()
    } else {
        format!("{home}/{p}")
    })
}

/// The decision for one request from the client.
fn judge(msg: &Msg, home: &str, policy: &Policy) -> Verdict {
    let need = match msg.ty {
        ty::READ | ty::DIRECTORY | ty::DIRECTORY_PART | ty::GET_PERMS | ty::WATCH => Access::Read,
        ty::WRITE | ty::MKDIR | ty::RM => Access::Write,
        // they name no node, or only one the client registered before
        ty::TRANSACTION_START
        | ty::TRANSACTION_END
        | ty::UNWATCH
        | ty::RESET_WATCHES
        | ty::GET_DOMAIN_PATH => return Verdict::Forward,
        ty::SET_PERMS => return Verdict::Refuse("a proxied connection changes no permissions"),
        _ => return Verdict::Refuse("request type not allowed through the proxy"),
    };
    let Some(path) = request_path(msg, home) else {
        return Verdict::Refuse("no path");
    };
    if path.starts_with('@') {
        return Verdict::Refuse("special watches are not allowed through the proxy");
    }
    if policy(need, &path) {
        Verdict::Forward
    } else {
        Verdict::Refuse("path not allowed")
    }
}

/// The `XS_ERROR` answer to a refused request.
fn refusal(msg: &Msg) -> Msg {
    Msg::request(ty::ERROR, msg.req_id, msg.tx_id, &["EACCES"], None)
}

/// Writes one whole message to the client.
fn to_client(client: &Mutex<UnixStream>, msg: &Msg) -> bool {
    let Some(bytes) = msg.encode() else {
        return false;
    };
    let mut c = client
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    c.write_all(&bytes).is_ok()
}

/// Forwards `client` to the xenstored at `upstream` through `policy`, on two threads that
/// end when either side closes. `home` is the connection's domain path (`/local/domain/0`),
/// under which relative paths resolve.
pub fn spawn(
    client: UnixStream,
    upstream: &Path,
    home: &str,
    policy: Policy,
) -> Result<(), XsError> {
    let (up_r, mut up_w, up_shutdown) = open_raw(upstream)?;
    let client_r = client.try_clone()?;
    let client_shut = client.try_clone()?;
    let client_w = Arc::new(Mutex::new(client));
    let refused = Arc::new(AtomicU64::new(0));
    let (cw, home) = (Arc::clone(&client_w), home.to_owned());
    std::thread::Builder::new()
        .name("xs-proxy-req".into())
        .spawn(move || {
            for_each_msg(client_r, |msg| match judge(&msg, &home, &policy) {
                Verdict::Forward => msg.encode().is_some_and(|b| up_w.write_all(&b).is_ok()),
                Verdict::Refuse(why) => {
                    // a backend that asks for what it may not have is worth a line, but a
                    // compromised one must not flood the log: 1st, 2nd, 4th, 8th ...
                    let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                    let path = request_path(&msg, &home).unwrap_or_default();
                    if n.is_power_of_two() {
                        warn!(ty = msg.ty, path = %path, refused = n, "xenstore request refused: {why}");
                    } else {
                        debug!(ty = msg.ty, path = %path, "xenstore request refused: {why}");
                    }
                    to_client(&cw, &refusal(&msg))
                }
            });
            // the client is gone: so is the upstream connection (it ends the other thread)
            if let Some(s) = up_shutdown {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        })?;
    std::thread::Builder::new()
        .name("xs-proxy-rsp".into())
        .spawn(move || {
            for_each_msg(up_r, |msg| to_client(&client_w, &msg));
            let _ = client_shut.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only_under(prefix: &'static str, write: bool) -> Policy {
        Arc::new(move |a, p: &str| {
            (a == Access::Read || write) && (p == prefix || p.starts_with(&format!("{prefix}/")))
        })
    }

    fn req(t: u32, parts: &[&str]) -> Msg {
        Msg::request(t, 9, 0, parts, None)
    }

    #[test]
    fn requests_are_judged_by_their_absolute_path() {
        let p = only_under("/local/domain/0/backend/vbd/5", true);
        let home = "/local/domain/0";
        let ok = |m: &Msg| judge(m, home, &p) == Verdict::Forward;
        assert!(ok(&req(
            ty::READ,
            &["/local/domain/0/backend/vbd/5/51712/params"]
        )));
        assert!(
            ok(&req(ty::READ, &["backend/vbd/5/51712/state"])),
            "relative"
        );
        assert!(!ok(&req(
            ty::READ,
            &["/local/domain/0/backend/vbd/6/51712/params"]
        )));
        assert!(
            !ok(&req(ty::READ, &["/local/domain/0/backend/vbd/55"])),
            "prefix of a name"
        );
        assert!(!ok(&req(ty::DIRECTORY, &["/local/domain/0/backend/vbd"])));
        assert!(ok(&req(
            ty::WATCH,
            &["/local/domain/0/backend/vbd/5", "tok"]
        )));
        assert!(!ok(&req(ty::WATCH, &["@releaseDomain", "tok"])));
        assert!(!ok(&req(
            ty::SET_PERMS,
            &["/local/domain/0/backend/vbd/5", "n0"]
        )));
        assert!(!ok(&req(ty::INTRODUCE, &["7", "1", "2"])));
        assert!(!ok(&req(ty::CONTROL, &["sim-domid", "0"])));
        assert!(!ok(&req(ty::READ, &[])), "no path");
        assert!(ok(&req(ty::TRANSACTION_START, &[""])));
        let ro = only_under("/local/domain/5", false);
        let w = Msg::request(
            ty::WRITE,
            1,
            0,
            &["/local/domain/5/device/vbd/1/state"],
            Some(b"4"),
        );
        assert_eq!(judge(&w, home, &ro), Verdict::Refuse("path not allowed"));
        assert!(judge(&req(ty::READ, &["/local/domain/5/name"]), home, &ro) == Verdict::Forward);
    }

    #[test]
    fn a_refusal_answers_the_same_request_with_eacces() {
        let m = Msg::request(ty::WRITE, 42, 7, &["/x"], Some(b"v"));
        let r = refusal(&m);
        assert_eq!((r.ty, r.req_id, r.tx_id), (ty::ERROR, 42, 7));
        assert_eq!(r.text(), "EACCES");
    }
}
