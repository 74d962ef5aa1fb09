//! Links over stdio: to a child process over its stdin and stdout
//! ([`Node::spawn_child`], [`ChildNode`]), and this process's node over its own
//! ([`Node::serve_stdio`]). Together they let one node launch and drive others, over
//! `ssh` as well. This room owns the pipes, the child and the errors that name it; the
//! link on top is an ordinary one (`link`), its handshake bounded by
//! [`NodeConfig::handshake_timeout`](super::NodeConfig::handshake_timeout).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::link::hex;
use super::{Node, NodeId};
use crate::error::{Error, Result};

/// How long a child whose end of the pipes closed during the handshake may take to
/// exit, so that the error can carry its exit status. It normally takes microseconds:
/// a process's pipes close as it exits.
const EXIT_GRACE: Duration = Duration::from_millis(500);

impl Node {
    /// Spawns `command` and runs a link to it over its stdin and stdout, this side
    /// initiating: the child is expected to be a node serving on its stdio
    /// ([`serve_stdio`](Self::serve_stdio)); the command may as well be
    /// `ssh host some-node-program`. Its stderr is left as `command` says (inherited
    /// by default); its stdin and stdout are the link's. Returns once the handshake is
    /// done, with the handle that owns the child.
    ///
    /// The link is like one [`attach`](Self::attach)ed: plaintext (whatever
    /// [`NodeConfig::tls`](super::NodeConfig::tls) says; `ssh` secures its own pipe),
    /// no reconnection, a dead link (the child exited, was killed, or missed its
    /// keep-alive) fails the streams on it. Its address in events and stats is
    /// `child:<pid>`.
    ///
    /// Errors: [`Error::Io`] (its kind kept, the message naming the program) when the
    /// command cannot be spawned; [`Error::Io`] of kind `UnexpectedEof` when the child
    /// exits before the handshake, its exit status in the message;
    /// [`Error::Protocol`] when the child writes something else than a handshake on
    /// its stdout; [`Timeout::Handshake`](crate::Timeout::Handshake) when it writes
    /// nothing (or too little) within
    /// [`NodeConfig::handshake_timeout`](super::NodeConfig::handshake_timeout). The
    /// child is killed on every error.
    pub async fn spawn_child(&self, command: impl Into<Command>) -> Result<ChildNode> {
        let mut command = command.into();
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| {
            Error::Io(io::Error::new(
                e.kind(),
                format!("cannot spawn {program:?}: {e}"),
            ))
        })?;
        // `id` is `None` only once the child has been reaped, which only `wait` does.
        let pid = child.id().unwrap_or_default();
        let who = format!("child {program:?} (pid {pid})");
        let (Some(w), Some(r)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Io(io::Error::other(format!("{who} has no pipes"))));
        };
        let pipes = Pipes::new(r, w);
        let gone = pipes.gone.clone();
        let r = self
            .inner
            .establish(pipes, true, None, None, format!("child:{pid}"))
            .await;
        match r {
            Ok(up) => Ok(ChildNode {
                child,
                pid,
                peer: up.link.peer,
                link: up.link.cancel.clone(),
                closed: up.closed,
            }),
            Err(e) => Err(explain(e, &mut child, &who, gone.load(Ordering::Relaxed)).await),
        }
    }

    /// Serves this node on the process's own stdin and stdout: runs a link over them,
    /// this side accepting (the parent is a node that [`spawn_child`](Self::spawn_child)ed
    /// this process, or anything that runs a link over its pipes). Resolves when the
    /// link ends: the parent went away (stdin closed), it missed its keep-alive, or
    /// this node shut down. So a child process can `node.serve_stdio().await` and exit
    /// with its parent. The handshake's errors are those of [`attach`](Self::attach).
    /// Dropping the future once the link is up does not close the link (the node's
    /// shutdown does).
    ///
    /// Nothing else may write to stdout in a process serving on stdio: a stray
    /// `println!` corrupts the link (the parent sees a protocol error). Log to stderr.
    ///
    /// tokio reads stdin on a blocking thread that cannot be cancelled: when the link
    /// ended while stdin is still open (a keep-alive timeout), dropping the runtime
    /// waits for that read. Exit with [`std::process::exit`], or shut the runtime
    /// down with a timeout, rather than return from `main`.
    pub async fn serve_stdio(&self) -> Result<()> {
        let io = Pipes::new(tokio::io::stdin(), tokio::io::stdout());
        let up = self
            .inner
            .establish(io, false, None, None, "stdio".into())
            .await?;
        tracing::debug!(peer = %hex(up.link.peer), "serving on stdio");
        up.closed.cancelled().await;
        Ok(())
    }
}

/// A handshake error told in terms of the child: its exit status when it went away
/// (`gone`: its end of the pipes closed), a hint about stdout when it wrote garbage.
async fn explain(e: Error, child: &mut Child, who: &str, gone: bool) -> Error {
    if gone {
        if let Ok(Ok(status)) = tokio::time::timeout(EXIT_GRACE, child.wait()).await {
            return Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{who} exited before the link handshake ({status})"),
            ));
        }
        return match e {
            Error::Protocol(m) => Error::Protocol(format!("{m}: {who} closed its stdout")),
            Error::Io(io) => Error::Io(io::Error::new(
                io.kind(),
                format!("{io}: {who} closed its stdin"),
            )),
            other => other,
        };
    }
    match e {
        Error::Protocol(m) => Error::Protocol(format!(
            "{m} (read from the stdout of {who}: a node serving on stdio must write \
             nothing else there)"
        )),
        other => other,
    }
}

/// A node running in a child process, linked over its stdin and stdout
/// ([`Node::spawn_child`]).
///
/// Dropping the handle kills the child (SIGKILL on Unix) and closes the link: streams
/// on it fail as on any dead link, with [`Error::LinkClosed`] or [`Error::Reset`].
/// [`wait`](Self::wait) first to let a child that is done exit by itself.
#[must_use = "dropping the handle kills the child"]
pub struct ChildNode {
    child: Child,
    pid: u32,
    peer: NodeId,
    /// Cancels the link: dropping the handle closes it even when another process (a
    /// grandchild) still holds the child's pipes.
    link: CancellationToken,
    /// Cancelled once the link has closed.
    closed: CancellationToken,
}

impl fmt::Debug for ChildNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildNode")
            .field("pid", &self.pid)
            .field("peer", &format_args!("{}", hex(self.peer)))
            .finish()
    }
}

impl ChildNode {
    /// The child node's id.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to exit (cancel-safe). The link goes down once its pipes
    /// close: a child serving on stdio exits when its node shuts down, or when this
    /// node closes the link (its own shutdown).
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        Ok(self.child.wait().await?)
    }

    /// The child's exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Kills the child (SIGKILL on Unix), closes the link and waits for the child to
    /// exit. A child that had exited already gives its status.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        self.link.cancel();
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.child.start_kill()?;
        self.wait().await
    }

    /// Resolves once the link to the child has closed (however it died).
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        // The child itself is killed by `kill_on_drop`.
        self.link.cancel();
    }
}

/// A read half and a write half as one byte stream. `gone` is set once the reader
/// reaches its end or either half fails: the other end went away.
struct Pipes<R, W> {
    r: R,
    w: W,
    gone: Arc<AtomicBool>,
}

impl<R, W> Pipes<R, W> {
    fn new(r: R, w: W) -> Self {
        Pipes {
            r,
            w,
            gone: Arc::default(),
        }
    }

    fn watch<T>(&self, p: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &p {
            self.gone.store(true, Ordering::Relaxed);
        }
        p
    }
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Pipes<R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (before, room) = (buf.filled().len(), buf.remaining());
        let p = Pin::new(&mut this.r).poll_read(cx, buf);
        if matches!(p, Poll::Ready(Ok(()))) && room > 0 && buf.filled().len() == before {
            this.gone.store(true, Ordering::Relaxed);
        }
        this.watch(p)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Pipes<R, W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.w).poll_write(cx, b);
        this.watch(p)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.w).poll_flush(cx);
        this.watch(p)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.w).poll_shutdown(cx);
        this.watch(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn pipes_carry_both_ways_and_tell_when_the_other_end_went() {
        let (mut far_r, near_w) = tokio::io::duplex(64);
        let (near_r, mut far_w) = tokio::io::duplex(64);
        let mut p = Pipes::new(near_r, near_w);
        let gone = p.gone.clone();
        p.write_all(b"out").await.unwrap();
        p.flush().await.unwrap();
        let mut got = [0u8; 3];
        far_r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"out");
        far_w.write_all(b"in").await.unwrap();
        let mut got = [0u8; 2];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"in");
        assert!(!gone.load(Ordering::Relaxed));
        drop(far_w);
        assert_eq!(p.read(&mut [0u8; 4]).await.unwrap(), 0);
        assert!(gone.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_failed_write_means_the_other_end_went() {
        let (far, near_w) = tokio::io::duplex(64);
        let (near_r, _far_w) = tokio::io::duplex(64);
        let mut p = Pipes::new(near_r, near_w);
        drop(far);
        assert!(p.write_all(b"x").await.is_err());
        assert!(p.gone.load(Ordering::Relaxed));
    }
}
