//! The local control socket of a `serve` process: one JSON request per line in, one JSON
//! response per line out, over a unix socket `<run dir>/serve-<domid>.sock`.
//!
//! Owns: the socket (created 0600 in a 0700 run directory, which a sandboxed `serve` makes
//! 0711 to reach its state; removed when the server is dropped, except by a sandboxed `serve`,
//! which may not: its supervisor removes it; and only while it is still the file this server
//! bound: a socket another process bound at the path since is left alone), the line protocol and the dispatch of commands to handlers ([`Commands`]); the
//! client side ([`call`], [`serve_sockets`]) that `rbdback status` and the metrics exporter use.
//! Trusts: only root reaches the socket (its mode: root's, bound before a sandboxed `serve`
//! drops); still, every request is
//! parsed as untrusted input: a bounded line, a JSON object, a known command, or an error
//! answer. Must never: block a VBD or a dataplane thread (handlers only read snapshots), or
//! let one bad client stop the server (every line has a time limit and a size limit, and a
//! connection is served on the control thread only while it keeps sending).
//!
//! Request: `{"cmd": "status", "args": {...}}` (`args` optional). Response: `{"ok": true,
//! "result": ...}` or `{"ok": false, "error": "..."}`. `serve` registers `status` and
//! `metrics`; other work adds its commands to the same [`Commands`] table.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;
use tracing::{debug, info, warn};

/// Where `serve` processes put their sockets unless `--run-dir` says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/rbdback";

/// The longest request or response line accepted.
const MAX_LINE: u64 = 1 << 20;

/// How long one connection may take per line.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A control socket could not be served or asked.
#[derive(Debug, Error)]
pub enum ControlError {
    /// A file-system or socket operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The other side sent something that is not the protocol.
    #[error("{}: bad response: {reason}", path.display())]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{}: {message}", path.display())]
    Refused {
        /// The socket.
        path: PathBuf,
        /// The server's message.
        message: String,
    },
}

/// A command handler: the request's `args` (`null` when absent) in, a result or an error
/// message out. Handlers run on the control thread; they must answer quickly.
pub type Handler = Box<dyn Fn(&Value) -> Result<Value, String> + Send + Sync>;

/// The commands a control socket answers, by name.
#[derive(Default)]
pub struct Commands {
    handlers: BTreeMap<String, Handler>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}

impl Commands {
    /// Answers `name` with `handler` (a later registration of the same name replaces it).
    pub fn add(
        &mut self,
        name: &str,
        handler: impl Fn(&Value) -> Result<Value, String> + Send + Sync + 'static,
    ) {
        self.handlers.insert(name.to_owned(), Box::new(handler));
    }

    /// The answer to one request line.
    pub fn dispatch(&self, line: &str) -> Value {
        let req: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return json!({"ok": false, "error": format!("not JSON: {e}")}),
        };
        let Some(cmd) = req.get("cmd").and_then(Value::as_str) else {
            return json!({"ok": false, "error": "the request has no \"cmd\" string"});
        };
        let Some(h) = self.handlers.get(cmd) else {
            let known: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
            return json!({"ok": false,
                "error": format!("unknown command {cmd:?} (known: {})", known.join(", "))});
        };
        match h(req.get("args").unwrap_or(&Value::Null)) {
            Ok(result) => json!({"ok": true, "result": result}),
            Err(e) => json!({"ok": false, "error": e}),
        }
    }
}

/// The socket of guest `domid`'s `serve` process in `run_dir`.
pub fn socket_path(run_dir: &Path, domid: u16) -> PathBuf {
    run_dir.join(format!("serve-{domid}.sock"))
}

/// Every `serve` socket in `run_dir`, by guest domid (none if the directory does not exist).
pub fn serve_sockets(run_dir: &Path) -> Result<Vec<(u16, PathBuf)>, ControlError> {
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ControlError::Io {
                what: "cannot list",
                path: run_dir.to_owned(),
                source,
            })
        }
    };
    let mut v: Vec<(u16, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let domid = name
                .strip_prefix("serve-")?
                .strip_suffix(".sock")?
                .parse()
                .ok()?;
            Some((domid, e.path()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// A running control socket; dropping it stops the server and removes the socket.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// The listening socket, to wake the accept with `shutdown` (a sandboxed process may not
    /// be able to connect to its own socket's path).
    wake: Option<UnixListener>,
    thread: Option<JoinHandle<()>>,
    /// The socket file this server bound (device, inode): only that file is removed.
    file: FileId,
}

/// A file's identity: its device and inode numbers.
type FileId = (u64, u64);

/// The identity of the file at `path` itself (a symlink is not followed).
fn file_id(path: &Path) -> std::io::Result<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// A control socket bound and listening, not served yet: a sandboxed `serve` binds it as root,
/// before it drops, and serves it after ([`Bound::serve`]).
#[derive(Debug)]
pub struct Bound {
    path: PathBuf,
    listener: UnixListener,
    file: FileId,
}

impl Server {
    /// Creates `run_dir` (0700) if needed and serves `commands` on `run_dir/name` (0600). A
    /// socket left behind by a process that is gone is replaced.
    pub fn start(run_dir: &Path, name: &str, commands: Commands) -> Result<Server, ControlError> {
        Server::bind(run_dir, name)?.serve(commands)
    }

    /// [`Server::start`]'s first half: the directory and the listening socket.
    pub fn bind(run_dir: &Path, name: &str) -> Result<Bound, ControlError> {
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| ControlError::Io { what, path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(run_dir)
            .map_err(io("cannot create", run_dir))?;
        let path = run_dir.join(name);
        if UnixStream::connect(&path).is_ok() {
            warn!(socket = %path.display(), "another process answers on this control socket; taking it over");
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("cannot remove the old socket", &path)(e))
            }
            _ => {}
        }
        let listener = UnixListener::bind(&path).map_err(io("cannot listen on", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("cannot set the mode of", &path))?;
        let file = file_id(&path).map_err(io("cannot stat", &path))?;
        Ok(Bound {
            path,
            listener,
            file,
        })
    }
}

impl Bound {
    /// Serves `commands` on a thread of its own.
    pub fn serve(self, commands: Commands) -> Result<Server, ControlError> {
        let Bound {
            path,
            listener,
            file,
        } = self;
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| ControlError::Io { what, path, source }
        };
        let wake = listener
            .try_clone()
            .map_err(io("cannot use the socket", &path))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, p2) = (Arc::clone(&stop), path.clone());
        let thread = std::thread::Builder::new()
            .name("rbdback-control".into())
            .spawn(move || accept_loop(&listener, &commands, &stop2, &p2))
            .map_err(io("cannot start the control thread for", &path))?;
        info!(socket = %path.display(), "control socket listening");
        Ok(Server {
            path,
            stop,
            wake: Some(wake),
            thread: Some(thread),
            file,
        })
    }
}

impl Server {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // wake the accept: shutting the listening socket down makes it fail at once (Linux)
        if let Some(l) = self.wake.take() {
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // only our own socket file: a newer process (a hand-over's successor, a second
        // instance) may have bound its own at the path meanwhile. The look and the unlink are
        // two steps (there is no unlink-if-inode): one binding just between them would still
        // lose its socket; a `serve` holds its instance lock until it exits, so its successor
        // cannot bind then.
        match file_id(&self.path) {
            Ok(id) if id == self.file => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => {
                debug!(socket = %self.path.display(), "the control socket is another process's now; left in place");
            }
            Err(_) => {}
        }
    }
}

fn accept_loop(listener: &UnixListener, commands: &Commands, stop: &AtomicBool, path: &Path) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match conn {
            Ok(s) => {
                if let Err(e) = handle(s, commands) {
                    debug!(socket = %path.display(), error = %e, "control connection ended");
                }
            }
            Err(e) => {
                warn!(socket = %path.display(), error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Answers the requests of one connection until it closes, breaks a limit or times out.
fn handle(stream: UnixStream, commands: &Commands) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            let e = json!({"ok": false, "error": "request line too long"});
            writeln!(out, "{e}")?;
            return Ok(());
        }
        let answer = commands.dispatch(line.trim_end());
        writeln!(out, "{answer}")?;
    }
}

/// Sends one request to the socket at `path` and returns its result.
pub fn call(path: &Path, cmd: &str, args: Value) -> Result<Value, ControlError> {
    call_within(path, cmd, args, IO_TIMEOUT)
}

/// [`call`], waiting up to `timeout` for the answer (a command that takes long: `upgrade`).
pub fn call_within(
    path: &Path,
    cmd: &str,
    args: Value,
    timeout: Duration,
) -> Result<Value, ControlError> {
    let io = |what| {
        let path = path.to_owned();
        move |source| ControlError::Io { what, path, source }
    };
    let stream = UnixStream::connect(path).map_err(io("cannot connect to"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("cannot set a timeout on"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(io("cannot set a timeout on"))?;
    let mut w = stream.try_clone().map_err(io("cannot use"))?;
    writeln!(w, "{}", json!({"cmd": cmd, "args": args})).map_err(io("cannot write to"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(MAX_LINE)
        .read_line(&mut line)
        .map_err(io("cannot read from"))?;
    let protocol = |reason: String| ControlError::Protocol {
        path: path.to_owned(),
        reason,
    };
    let v: Value = serde_json::from_str(&line).map_err(|e| protocol(e.to_string()))?;
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
        Some(false) => Err(ControlError::Refused {
            path: path.to_owned(),
            message: v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no message")
                .to_owned(),
        }),
        None => Err(protocol(format!("no \"ok\" in {line:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "rbdback-control-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn requests_are_dispatched_and_bad_ones_answered_with_an_error() {
        let d = dir();
        let mut c = Commands::default();
        c.add("echo", |a| Ok(a.clone()));
        c.add("fail", |_| Err("it failed".into()));
        let s = Server::start(&d, "serve-7.sock", c).unwrap();
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            call(s.path(), "echo", json!({"x": 1})).unwrap(),
            json!({"x": 1})
        );
        let e = call(s.path(), "fail", Value::Null).unwrap_err().to_string();
        assert!(e.ends_with("it failed"), "{e}");
        let e = call(s.path(), "nosuch", Value::Null)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown command \"nosuch\" (known: echo, fail)"),
            "{e}"
        );
        // not JSON, then a good request on the same connection
        let mut st = UnixStream::connect(s.path()).unwrap();
        st.write_all(b"hello\n{\"cmd\":\"echo\",\"args\":2}\n")
            .unwrap();
        let mut r = BufReader::new(st);
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("\"ok\":false") && l.contains("not JSON"), "{l}");
        l.clear();
        r.read_line(&mut l).unwrap();
        assert_eq!(l.trim(), r#"{"ok":true,"result":2}"#);
        assert_eq!(serve_sockets(&d).unwrap(), vec![(7, s.path().to_owned())]);
        let p = s.path().to_owned();
        drop(s);
        assert!(!p.exists(), "the socket is removed with the server");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_dropped_server_leaves_a_newer_servers_socket_in_place() {
        let d = dir();
        let mut a = Commands::default();
        a.add("who", |_| Ok(json!("a")));
        let old = Server::start(&d, "serve-8.sock", a).unwrap();
        let p = old.path().to_owned();
        assert_eq!(call(&p, "who", Value::Null).unwrap(), json!("a"));
        // a newer process replaces the socket at the same path (as `bind` does: unlink, bind)
        let mut b = Commands::default();
        b.add("who", |_| Ok(json!("b")));
        let new = Server::start(&d, "serve-8.sock", b).unwrap();
        drop(old);
        assert!(p.exists(), "the old server removed the newer one's socket");
        assert_eq!(call(&p, "who", Value::Null).unwrap(), json!("b"));
        drop(new);
        assert!(!p.exists(), "the newer server removes its own socket");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
