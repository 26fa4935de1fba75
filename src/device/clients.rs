//! The RADOS clients that served a VBD's image, as its state directory records them for the
//! next instance (`<state-dir>/<vbd>/client`).
//!
//! Owns: the file's format and what each line lets a successor skip. A successor must fence
//! (blocklist) every recorded client that may still write before it writes itself; this
//! module says which ones need no fence, and it never claims one was fenced before the
//! engine said so.
//!
//! One line per client, oldest first: `<gid> <addr>` and a mark:
//! - none: may still write; fence it;
//! - `fenced@<unix seconds>`: blocklisted then; trusted for [`FENCE_TRUSTED`] only, because
//!   Ceph lifts a blocklisting after `mon_osd_blocklist_default_expire` (1 h): an older one is
//!   fenced again (blocklisting is idempotent);
//! - `gone`: its process closed the image and stopped with nothing in flight: it can never
//!   write again.
//!
//! Files written by earlier versions (a bare `fenced` mark, a last line `clean` meaning every
//! client above left cleanly) are read conservatively: a bare `fenced` is fenced again.
//!
//! Must never: fail a VBD because the file is missing or malformed (unreadable lines are
//! skipped; the worst outcome is a redundant fence).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::rados::ClientIdentity;

/// How long a recorded fence is trusted (Ceph's default blocklist expiry is 1 h).
pub const FENCE_TRUSTED: Duration = Duration::from_secs(45 * 60);

/// Clients the file keeps (the newest; one of them may still hold the lock).
pub const KEPT: usize = 16;

/// What a line says about its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// May still write.
    Unfenced,
    /// Blocklisted at this time (seconds since the epoch).
    Fenced(u64),
    /// Left cleanly: can never write again.
    Gone,
}

/// One recorded client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Its global id (`client.<gid>`).
    pub gid: u64,
    /// Its address (`ip:port/nonce`).
    pub addr: String,
    /// What is known of it.
    pub mark: Mark,
}

/// Seconds since the epoch now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Recorded {
    /// A client that may still write.
    pub fn new(c: &ClientIdentity) -> Recorded {
        Recorded {
            gid: c.gid,
            addr: c.addr.clone(),
            mark: Mark::Unfenced,
        }
    }

    /// Whether a successor starting at `now` may skip fencing it.
    pub fn needs_no_fence(&self, now: u64) -> bool {
        match self.mark {
            Mark::Gone => true,
            Mark::Fenced(at) => now.saturating_sub(at) < FENCE_TRUSTED.as_secs(),
            Mark::Unfenced => false,
        }
    }

    /// As the image open takes it.
    pub fn identity(&self, now: u64) -> ClientIdentity {
        ClientIdentity {
            addr: self.addr.clone(),
            gid: self.gid,
            fenced: self.needs_no_fence(now),
        }
    }
}

/// Reads the file's text; lines it cannot read are skipped.
pub fn parse(text: &str) -> Vec<Recorded> {
    let mut out: Vec<Recorded> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next(), words.next()) {
            // an earlier version's "every client above left cleanly"
            (Some("clean"), None, None, None) => {
                for r in &mut out {
                    r.mark = Mark::Gone;
                }
            }
            (Some(gid), Some(addr), mark, None) => {
                let Ok(gid) = gid.parse() else { continue };
                let mark = match mark {
                    None => Mark::Unfenced,
                    Some("gone") => Mark::Gone,
                    // an earlier version's bare mark: when is unknown, so fence again
                    Some("fenced") => Mark::Fenced(0),
                    Some(m) => match m.strip_prefix("fenced@").map(str::parse) {
                        Some(Ok(at)) => Mark::Fenced(at),
                        _ => Mark::Unfenced,
                    },
                };
                out.push(Recorded {
                    gid,
                    addr: addr.to_owned(),
                    mark,
                });
            }
            _ => {}
        }
    }
    out
}

/// The file's text for `clients`, keeping the newest [`KEPT`].
pub fn render(clients: &[Recorded]) -> String {
    let skip = clients.len().saturating_sub(KEPT);
    let mut text = String::new();
    for c in &clients[skip..] {
        text.push_str(&format!("{} {}", c.gid, c.addr));
        match c.mark {
            Mark::Unfenced => {}
            Mark::Fenced(at) => text.push_str(&format!(" fenced@{at}")),
            Mark::Gone => text.push_str(" gone"),
        }
        text.push('\n');
    }
    text
}

/// Marks the clients with a gid in `gids` that still needed a fence as fenced at `at`.
pub fn mark_fenced(clients: &mut [Recorded], gids: &[u64], at: u64) {
    for c in clients.iter_mut() {
        if gids.contains(&c.gid) && c.mark != Mark::Gone {
            c.mark = Mark::Fenced(at);
        }
    }
}

/// Marks the clients with a gid in `gids` as gone.
pub fn mark_gone(clients: &mut [Recorded], gids: &[u64]) {
    for c in clients.iter_mut() {
        if gids.contains(&c.gid) {
            c.mark = Mark::Gone;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(gid: u64, mark: Mark) -> Recorded {
        Recorded {
            gid,
            addr: format!("127.0.0.1:0/{gid}"),
            mark,
        }
    }

    #[test]
    fn lines_round_trip() {
        let clients = vec![
            rec(1, Mark::Gone),
            rec(2, Mark::Fenced(1_700_000_000)),
            rec(3, Mark::Unfenced),
        ];
        assert_eq!(parse(&render(&clients)), clients);
    }

    #[test]
    fn a_fence_is_trusted_until_the_blocklisting_may_have_expired() {
        let t = 1_700_000_000;
        let c = rec(2, Mark::Fenced(t));
        assert!(c.needs_no_fence(t + 60));
        assert!(!c.needs_no_fence(t + FENCE_TRUSTED.as_secs()));
        assert!(!c.needs_no_fence(t + 3600));
        assert!(rec(1, Mark::Gone).needs_no_fence(u64::MAX));
        assert!(!rec(3, Mark::Unfenced).needs_no_fence(t));
    }

    #[test]
    fn an_earlier_versions_file_is_read_conservatively() {
        let old = "1 127.0.0.1:0/1 fenced\n2 127.0.0.1:0/2\nclean\n";
        let got = parse(old);
        assert_eq!(got, vec![rec(1, Mark::Gone), rec(2, Mark::Gone)]);
        let old = "1 127.0.0.1:0/1 fenced\n2 127.0.0.1:0/2\n";
        let got = parse(old);
        assert_eq!(got, vec![rec(1, Mark::Fenced(0)), rec(2, Mark::Unfenced)]);
        assert!(!got[0].needs_no_fence(now()), "a bare mark is fenced again");
    }

    #[test]
    fn malformed_lines_are_skipped_and_unknown_marks_mean_unfenced() {
        let got = parse("x y\n\n7 a:1/2 fenced@soon\n8 a:1/3 fenced@12 extra\n9 a:1/4 gone\n");
        assert_eq!(
            got,
            vec![
                Recorded {
                    gid: 7,
                    addr: "a:1/2".into(),
                    mark: Mark::Unfenced
                },
                Recorded {
                    gid: 9,
                    addr: "a:1/4".into(),
                    mark: Mark::Gone
                },
            ]
        );
    }

    #[test]
    fn marks_apply_to_the_named_clients_only_and_gone_stays_gone() {
        let mut c = vec![
            rec(1, Mark::Gone),
            rec(2, Mark::Unfenced),
            rec(3, Mark::Unfenced),
        ];
        mark_fenced(&mut c, &[1, 2], 50);
        assert_eq!(c[0].mark, Mark::Gone);
        assert_eq!(c[1].mark, Mark::Fenced(50));
        assert_eq!(c[2].mark, Mark::Unfenced);
        mark_gone(&mut c, &[3]);
        assert_eq!(c[2].mark, Mark::Gone);
    }

    #[test]
    fn the_newest_clients_are_kept() {
        let many: Vec<Recorded> = (0..KEPT as u64 + 5)
            .map(|g| rec(g, Mark::Unfenced))
            .collect();
        let kept = parse(&render(&many));
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].gid, 5);
    }
}
