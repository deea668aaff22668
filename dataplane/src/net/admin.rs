//! Admin sockets: a daemon's local control channel (`cbcr agent --admin-socket PATH`), and the
//! client `cbcr admin PATH COMMAND [ARG]`.
//!
//! A Unix socket of mode 0600, and a peer is also checked by its credentials: only the
//! daemon's own user (or root) is answered, so a socket made group-writable by hand, or
//! reached through a directory of looser mode, is still closed to others. One JSON request per
//! line (`{"command": "throttle", "arg": "50MiB"}`), one JSON answer per line with `"ok"`:
//! true and what was asked, or false and an `"error"`. The daemon's loop answers; the socket's
//! threads only carry requests to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::limits;

/// One request: a command and its argument, if it takes one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arg: Option<String>,
}

/// A request on its way to the daemon's loop, with where its answer goes.
pub struct Asked {
    pub request: Request,
    pub answer: crossbeam_channel::Sender<Value>,
}

/// How long a connection waits for the loop's answer before it says the daemon is busy.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// An answer that says what was wrong.
pub fn refusal(error: impl Into<String>) -> Value {
    json!({"ok": false, "error": error.into()})
}

/// The listening socket; the file is removed when it is dropped.
pub struct AdminSocket {
    path: PathBuf,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` and sends every request to `requests`. A socket file left by a daemon
/// that died is replaced; a live one (another daemon answers), or anything at `path` that is
/// not a socket (a planted file or link), is an error, and nothing there is touched.
pub fn serve(path: &Path, requests: crossbeam_channel::Sender<Asked>) -> Result<AdminSocket> {
    let io = |e: std::io::Error| Error::Io { path: path.to_owned(), source: e };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(Error::Usage(format!(
                "--admin-socket {}: exists and is not a socket; refusing to replace it",
                path.display()
            )))
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(Error::Usage(format!("--admin-socket {}: another daemon is answering on it", path.display())))
        }
        Ok(_) => std::fs::remove_file(path).map_err(io)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    let socket = AdminSocket { path: path.to_owned() };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("cbcr-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if open.fetch_add(1, Ordering::SeqCst) >= limits::ADMIN_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = answer_line(&stream, &refusal("too many admin connections"));
                    continue;
                }
                let (open, requests) = (Arc::clone(&open), requests.clone());
                std::thread::spawn(move || {
                    connection(stream, &requests);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })
        .expect("threads can be spawned");
    Ok(socket)
}

/// The uid of the process at the other end.
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the buffer is a ucred and its length is passed.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

fn answer_line(mut stream: &UnixStream, answer: &Value) -> std::io::Result<()> {
    writeln!(stream, "{answer}")?;
    stream.flush()
}

fn connection(stream: UnixStream, requests: &crossbeam_channel::Sender<Asked>) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !peer_uid(&stream).is_some_and(|uid| uid == me || uid == 0) {
        let _ = answer_line(&stream, &refusal("only the daemon's own user or root may use its admin socket"));
        return;
    }
    let reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    for line in reader.take(limits::ADMIN_REQUEST_BYTES).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Err(e) => refusal(format!("not a request ({e}): send {{\"command\": \"help\"}}")),
            Ok(request) => {
                let (tx, rx) = crossbeam_channel::bounded(1);
                if requests.send(Asked { request, answer: tx }).is_err() {
                    refusal("the daemon is stopping")
                } else {
                    rx.recv_timeout(ANSWER_WAIT).unwrap_or_else(|_| refusal("the daemon did not answer in time"))
                }
            }
        };
        if answer_line(&stream, &answer).is_err() {
            return;
        }
    }
}

/// Sends one request to the daemon at `path` and returns its answer; an answer that says
/// `"ok": false` is a usage error carrying the daemon's words.
pub fn call(path: &Path, request: &Request) -> Result<Value> {
    let unreachable = |e: std::io::Error| {
        Error::Network(format!(
            "{}: cannot reach a daemon there ({e}); is it running with --admin-socket?",
            path.display()
        ))
    };
    let mut stream = UnixStream::connect(path).map_err(unreachable)?;
    stream.set_read_timeout(Some(ANSWER_WAIT + Duration::from_secs(2))).map_err(unreachable)?;
    let line = serde_json::to_string(request).expect("a request serialises");
    writeln!(stream, "{line}").map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(unreachable)?;
    let value: Value = serde_json::from_str(&answer)
        .map_err(|e| Error::Network(format!("{}: not an admin answer ({e}): {answer:?}", path.display())))?;
    match value["ok"].as_bool() {
        Some(true) => Ok(value),
        _ => Err(Error::Usage(value["error"].as_str().unwrap_or("refused").to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop that answers `echo` with its argument and refuses the rest.
    fn echo_daemon(path: &Path) -> AdminSocket {
        let (tx, rx) = crossbeam_channel::bounded::<Asked>(4);
        let socket = serve(path, tx).unwrap();
        std::thread::spawn(move || {
            for asked in rx {
                let answer = match asked.request.command.as_str() {
                    "echo" => json!({"ok": true, "said": asked.request.arg}),
                    other => refusal(format!("unknown command {other:?}")),
                };
                let _ = asked.answer.send(answer);
            }
        });
        socket
    }

    #[test]
    fn a_request_gets_its_answer_and_the_socket_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let socket = echo_daemon(&path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let answer = call(&path, &Request { command: "echo".into(), arg: Some("hi".into()) }).unwrap();
        assert_eq!(answer["said"], "hi");
        let err = call(&path, &Request { command: "nope".into(), arg: None }).unwrap_err();
        assert!(matches!(err, Error::Usage(ref m) if m.contains("unknown command")), "{err}");
        // Garbage on the line is answered, not fatal.
        let mut s = UnixStream::connect(&path).unwrap();
        writeln!(s, "status please").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("not a request"), "{line}");
        drop(socket);
        assert!(!path.exists(), "removed when the daemon stops");
        assert!(matches!(call(&path, &Request { command: "echo".into(), arg: None }), Err(Error::Network(_))));
    }

    #[test]
    fn a_live_socket_a_planted_file_and_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let _live = echo_daemon(&path);
        let (tx, _rx) = crossbeam_channel::bounded(1);
        assert!(matches!(serve(&path, tx.clone()), Err(Error::Usage(m)) if m.contains("another daemon")));
        let planted = dir.path().join("planted");
        std::fs::write(&planted, "keep me").unwrap();
        assert!(matches!(serve(&planted, tx.clone()), Err(Error::Usage(m)) if m.contains("not a socket")));
        assert_eq!(std::fs::read_to_string(&planted).unwrap(), "keep me");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&planted, &link).unwrap();
        assert!(matches!(serve(&link, tx.clone()), Err(Error::Usage(m)) if m.contains("not a socket")));
        // A socket whose daemon died (bound, never served) is taken over.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let _taken = serve(&stale, tx).unwrap();
    }
}
