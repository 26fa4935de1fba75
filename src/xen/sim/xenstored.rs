//! A small xenstored for the simulated Xen: the `xs_wire.h` subset rbdback and libxl-like
//! toolstacks use, served on a unix socket, so the production client is what tests exercise.
//!
//! Owns: an in-memory tree with per-node permissions and generations, transactions (a
//! snapshot per transaction; commit fails with `EAGAIN` if any node the transaction touched
//! changed meanwhile), watches (fired on registration and on every change at or below the
//! watched path, including removal of an ancestor).
//! Trusts: nothing a connection sends (lengths are bounded by the wire decoder, paths checked).
//! Must never: be used outside tests, benches and the demo. A connection identifies its domain
//! with a sim-only `XS_CONTROL` message (`sim-domid\0<N>\0`); without it, it is dom0.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::xen::xenstore::wire::{ty, Msg, Perm, HEADER_LEN, PAYLOAD_MAX};
use crate::xen::DomId;

#[derive(Debug, Clone)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
    gen: u64,
}

type Tree = BTreeMap<String, Node>;

struct Txn {
    tree: Tree,
    /// Path -> generation seen at first access (None: did not exist).
    seen: HashMap<String, Option<u64>>,
    /// Paths written or removed.
    changed: Vec<String>,
}

struct Conn {
    domid: DomId,
    out: Arc<Mutex<UnixStream>>,
    watches: Vec<(String, String)>,
}

struct State {
    tree: Tree,
    gen: u64,
    txns: HashMap<u32, (usize, Txn)>,
    next_tx: u32,
    conns: HashMap<usize, Conn>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => path.get(..i),
        None => None,
    }
}

fn valid_path(path: &str) -> bool {
    path.starts_with('/')
        && (path == "/" || !path.ends_with('/'))
        && !path.contains("//")
        && path.len() <= 3072
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-@.:".contains(&b))
}

/// Whether `path` is `base` or below it.
fn under(path: &str, base: &str) -> bool {
    base == "/"
        || path == base
        || (path.starts_with(base) && path.as_bytes().get(base.len()) == Some(&b'/'))
}

fn can(perms: &[Perm], domid: DomId, write: bool) -> bool {
    if domid == 0 {
        return true;
    }
    let Some(owner) = perms.first() else {
        return false;
    };
    if owner.domid == domid {
        return true;
    }
    let p = perms
        .iter()
        .skip(1)
        .find(|p| p.domid == domid)
        .unwrap_or(owner);
    if write {
        p.write
    } else {
        p.read
    }
}

/// Why an operation failed: the errno name sent back.
type Errno = &'static str;

struct View<'a> {
    tree: &'a mut Tree,
    gen: &'a mut u64,
    seen: Option<&'a mut HashMap<String, Option<u64>>>,
    changed: &'a mut Vec<String>,
    domid: DomId,
}

impl View<'_> {
    fn note(&mut self, path: &str) {
        let g = self.tree.get(path).map(|n| n.gen);
        if let Some(seen) = self.seen.as_deref_mut() {
            seen.entry(path.to_owned()).or_insert(g);
        }
    }

    fn read(&mut self, path: &str) -> Result<Vec<u8>, Errno> {
        self.note(path);
        let n = self.tree.get(path).ok_or("ENOENT")?;
        if !can(&n.perms, self.domid, false) {
            return Err("EACCES");
        }
        Ok(n.value.clone())
    }

    fn directory(&mut self, path: &str) -> Result<Vec<String>, Errno> {
        self.note(path);
        let n = self.tree.get(path).ok_or("ENOENT")?;
        if !can(&n.perms, self.domid, false) {
            return Err("EACCES");
        }
        let prefix = if path == "/" {
            "/".to_owned()
        } else {
            format!("{path}/")
        };
        Ok(self
            .tree
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, _)| {
                let rest = k.get(prefix.len()..)?;
                (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_owned())
            })
            .collect())
    }

    /// Creates `path` (and missing parents) if absent; checks write access on the nearest
    /// existing ancestor.
    fn create(&mut self, path: &str) -> Result<(), Errno> {
        if self.tree.contains_key(path) {
            return Ok(());
        }
        let mut missing = vec![path.to_owned()];
        let mut p = parent(path);
        let base_perms = loop {
            let Some(q) = p else { return Err("EINVAL") };
            self.note(q);
            if let Some(n) = self.tree.get(q) {
                break n.perms.clone();
            }
            missing.push(q.to_owned());
            p = parent(q);
        };
        if !can(&base_perms, self.domid, true) {
            return Err("EACCES");
        }
        let mut perms = base_perms;
        if self.domid != 0 {
            if let Some(o) = perms.first_mut() {
                o.domid = self.domid;
            }
        }
        for m in missing.into_iter().rev() {
            *self.gen += 1;
            self.note(&m);
            self.tree.insert(
                m.clone(),
                Node {
                    value: Vec::new(),
                    perms: perms.clone(),
                    gen: *self.gen,
                },
            );
            self.changed.push(m);
        }
        Ok(())
    }

    fn write(&mut self, path: &str, value: &[u8]) -> Result<(), Errno> {
        self.note(path);
        match self.tree.get(path) {
            Some(n) if !can(&n.perms, self.domid, true) => return Err("EACCES"),
            Some(_) => {}
            None => self.create(path)?,
        }
        *self.gen += 1;
        let g = *self.gen;
        if let Some(n) = self.tree.get_mut(path) {
            n.value = value.to_vec();
            n.gen = g;
        }
        self.changed.push(path.to_owned());
        Ok(())
    }

    fn rm(&mut self, path: &str) -> Result<(), Errno> {
        self.note(path);
        let n = self.tree.get(path).ok_or("ENOENT")?;
        if path == "/" || !can(&n.perms, self.domid, true) {
            return Err("EACCES");
        }
        let doomed: Vec<String> = self
            .tree
            .keys()
            .filter(|k| under(k, path))
            .cloned()
            .collect();
        for d in doomed {
            self.note(&d);
            self.tree.remove(&d);
        }
        *self.gen += 1;
        self.changed.push(path.to_owned());
        Ok(())
    }

    fn set_perms(&mut self, path: &str, perms: Vec<Perm>) -> Result<(), Errno> {
        self.note(path);
        let n = self.tree.get(path).ok_or("ENOENT")?;
        if perms.is_empty() {
            return Err("EINVAL");
        }
        let owner = n.perms.first().map(|p| p.domid);
        if self.domid != 0 && owner != Some(self.domid) {
            return Err("EACCES");
        }
        *self.gen += 1;
        let g = *self.gen;
        if let Some(n) = self.tree.get_mut(path) {
            n.perms = perms;
            n.gen = g;
        }
        self.changed.push(path.to_owned());
        Ok(())
    }
}

/// The simulated xenstored; dropping it leaves the socket thread running until the process
/// ends (tests and the demo are short-lived).
#[derive(Clone)]
pub struct SimXenstored {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SimXenstored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimXenstored")
    }
}

fn send(out: &Mutex<UnixStream>, msg: &Msg) {
    if let Some(b) = msg.encode() {
        let _ = lock(out).write_all(&b);
    }
}

impl SimXenstored {
    /// Serves on a new socket at `path`.
    pub fn start(path: &Path) -> std::io::Result<SimXenstored> {
        let listener = UnixListener::bind(path)?;
        let mut tree = Tree::new();
        let root_perms = vec![Perm {
            domid: 0,
            read: false,
            write: false,
        }];
        for p in ["/", "/local", "/local/domain", "/local/domain/0"] {
            tree.insert(
                p.to_owned(),
                Node {
                    value: Vec::new(),
                    perms: root_perms.clone(),
                    gen: 0,
                },
            );
        }
        let state = Arc::new(Mutex::new(State {
            tree,
            gen: 1,
            txns: HashMap::new(),
            next_tx: 1,
            conns: HashMap::new(),
        }));
        let st = Arc::clone(&state);
        std::thread::Builder::new()
            .name("sim-xenstored".into())
            .spawn(move || {
                let mut next = 1usize;
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let id = next;
                    next += 1;
                    let st = Arc::clone(&st);
                    let _ = std::thread::Builder::new()
                        .name(format!("sim-xs-conn{id}"))
                        .spawn(move || serve_conn(&st, id, stream));
                }
            })?;
        Ok(SimXenstored { state })
    }

    /// Creates a domain's home (`/local/domain/<domid>`, owned by it) as the toolstack does.
    pub fn introduce(&self, domid: DomId) {
        let mut st = lock(&self.state);
        let path = format!("/local/domain/{domid}");
        st.gen += 1;
        let gen = st.gen;
        st.tree.insert(
            path,
            Node {
                value: Vec::new(),
                perms: vec![
                    Perm {
                        domid: 0,
                        read: false,
                        write: false,
                    },
                    Perm {
                        domid,
                        read: true,
                        write: false,
                    },
                ],
                gen,
            },
        );
    }
}

fn serve_conn(state: &Mutex<State>, id: usize, stream: UnixStream) {
    let Ok(out) = stream.try_clone() else { return };
    let out = Arc::new(Mutex::new(out));
    lock(state).conns.insert(
        id,
        Conn {
            domid: 0,
            out: Arc::clone(&out),
            watches: Vec::new(),
        },
    );
    let mut r = stream;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; HEADER_LEN + PAYLOAD_MAX];
    'outer: loop {
        loop {
            match Msg::decode(&buf) {
                Ok(Some((msg, used))) => {
                    buf.drain(..used);
                    handle(state, id, &out, msg);
                }
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
        match r.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
        }
    }
    let mut st = lock(state);
    st.conns.remove(&id);
    st.txns.retain(|_, (c, _)| *c != id);
}

fn reply(out: &Mutex<UnixStream>, req: &Msg, ty: u32, payload: Vec<u8>) {
    send(
        out,
        &Msg {
            ty,
            req_id: req.req_id,
            tx_id: req.tx_id,
            payload,
        },
    );
}

fn error(out: &Mutex<UnixStream>, req: &Msg, errno: &str) {
    let mut p = errno.as_bytes().to_vec();
    p.push(0);
    reply(out, req, ty::ERROR, p);
}

fn ok(out: &Mutex<UnixStream>, req: &Msg) {
    reply(out, req, req.ty, b"OK\0".to_vec());
}

/// Sends watch events for the changed paths to every connection watching them.
fn fire(st: &State, changed: &[String]) {
    for conn in st.conns.values() {
        for (wpath, token) in &conn.watches {
            for c in changed {
                let hit = under(c, wpath) || under(wpath, c);
                if hit {
                    let ev_path = if under(c, wpath) { c } else { wpath };
                    let msg = Msg::request(ty::WATCH_EVENT, 0, 0, &[ev_path, token], None);
                    send(&conn.out, &msg);
                }
            }
        }
    }
}

fn handle(state: &Mutex<State>, id: usize, out: &Mutex<UnixStream>, msg: Msg) {
    let parts = msg.strings();
    let mut path = parts.first().cloned().unwrap_or_default();
    // where a WRITE's value starts in the payload (after the path as sent, and its NUL)
    let value_at = path.len() + 1;
    let mut st = lock(state);
    let domid = st.conns.get(&id).map_or(0, |c| c.domid);
    // A relative path is relative to the caller's home, /local/domain/<domid> (how the
    // hotplug scripts' `xenstore-read backend/vbd/...` reach dom0's nodes).
    let names_a_path = matches!(
        msg.ty,
        ty::READ
            | ty::WRITE
            | ty::MKDIR
            | ty::RM
            | ty::DIRECTORY
            | ty::GET_PERMS
            | ty::SET_PERMS
            | ty::WATCH
            | ty::UNWATCH
    );
    if names_a_path && !path.is_empty() && !path.starts_with('/') && !path.starts_with('@') {
        path = format!("/local/domain/{domid}/{path}");
    }
    match msg.ty {
        ty::CONTROL => {
            if parts.first().map(String::as_str) == Some("sim-domid") {
                if let Some(d) = parts.get(1).and_then(|d| d.parse().ok()) {
                    if let Some(c) = st.conns.get_mut(&id) {
                        c.domid = d;
                    }
                    return ok(out, &msg);
                }
            }
            error(out, &msg, "EINVAL")
        }
        ty::WATCH => {
            let token = parts.get(1).cloned().unwrap_or_default();
            if !valid_path(&path) {
                return error(out, &msg, "EINVAL");
            }
            if let Some(c) = st.conns.get_mut(&id) {
                c.watches.push((path.clone(), token.clone()));
            }
            ok(out, &msg);
            let ev = Msg::request(ty::WATCH_EVENT, 0, 0, &[&path, &token], None);
            send(out, &ev);
        }
        ty::UNWATCH => {
            let token = parts.get(1).cloned().unwrap_or_default();
            if let Some(c) = st.conns.get_mut(&id) {
                c.watches.retain(|(p, t)| !(p == &path && t == &token));
            }
            ok(out, &msg)
        }
        ty::TRANSACTION_START => {
            let tx = st.next_tx;
            st.next_tx += 1;
            let snap = st.tree.clone();
            st.txns.insert(
                tx,
                (
                    id,
                    Txn {
                        tree: snap,
                        seen: HashMap::new(),
                        changed: Vec::new(),
                    },
                ),
            );
            let mut p = tx.to_string().into_bytes();
            p.push(0);
            reply(out, &msg, ty::TRANSACTION_START, p)
        }
        ty::TRANSACTION_END => {
            let Some((_, txn)) = st.txns.remove(&msg.tx_id) else {
                return error(out, &msg, "ENOENT");
            };
            if path != "T" {
                return ok(out, &msg);
            }
            let conflict = txn
                .seen
                .iter()
                .any(|(p, g)| st.tree.get(p).map(|n| n.gen) != *g);
            if conflict {
                return error(out, &msg, "EAGAIN");
            }
            let State { tree, gen, .. } = &mut *st;
            for c in &txn.changed {
                *gen += 1;
                match txn.tree.get(c) {
                    Some(n) => {
                        let mut n = n.clone();
                        n.gen = *gen;
                        tree.insert(c.clone(), n);
                    }
                    None => {
                        // Removed inside the transaction: remove it and what is below it.
                        let doomed: Vec<String> =
                            tree.keys().filter(|k| under(k, c)).cloned().collect();
                        for d in doomed {
                            tree.remove(&d);
                        }
                    }
                }
            }
            ok(out, &msg);
            fire(&st, &txn.changed);
        }
        t => {
            if !valid_path(&path) {
                return error(out, &msg, "EINVAL");
            }
            let mut changed = Vec::new();
            let result: Result<Option<Vec<u8>>, Errno> = {
                let State {
                    tree, gen, txns, ..
                } = &mut *st;
                let mut view = if msg.tx_id != 0 {
                    match txns.get_mut(&msg.tx_id) {
                        Some((owner, txn)) if *owner == id => View {
                            tree: &mut txn.tree,
                            gen,
                            seen: Some(&mut txn.seen),
                            changed: &mut txn.changed,
                            domid,
                        },
                        _ => return error(out, &msg, "ENOENT"),
                    }
                } else {
                    View {
                        tree,
                        gen,
                        seen: None,
                        changed: &mut changed,
                        domid,
                    }
                };
                match t {
                    ty::READ => view.read(&path).map(Some),
                    ty::DIRECTORY => view.directory(&path).map(|names| {
                        let mut p = Vec::new();
                        for n in names {
                            p.extend_from_slice(n.as_bytes());
                            p.push(0);
                        }
                        Some(p)
                    }),
                    ty::WRITE => {
                        let value = msg.payload.get(value_at..).unwrap_or(&[]);
                        view.write(&path, value).map(|()| None)
                    }
                    ty::MKDIR => view.create(&path).map(|()| None),
                    ty::RM => view.rm(&path).map(|()| None),
                    ty::GET_PERMS => view.read(&path).and_then(|_| {
                        let n = view.tree.get(&path).ok_or("ENOENT")?;
                        let mut p = Vec::new();
                        for perm in &n.perms {
                            p.extend_from_slice(perm.encode().as_bytes());
                            p.push(0);
                        }
                        Ok(Some(p))
                    }),
                    ty::SET_PERMS => {
                        let perms: Option<Vec<Perm>> =
                            parts.iter().skip(1).map(|s| Perm::parse(s)).collect();
                        match perms {
                            Some(p) => view.set_perms(&path, p).map(|()| None),
                            None => Err("EINVAL"),
                        }
                    }
                    _ => Err("ENOSYS"),
                }
            };
            match result {
                Ok(Some(payload)) => reply(out, &msg, msg.ty, payload),
                Ok(None) => ok(out, &msg),
                Err(e) => error(out, &msg, e),
            }
            if !changed.is_empty() {
                fire(&st, &changed);
            }
        }
    }
}
