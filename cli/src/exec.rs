//! `chanserv serve --exec CMD [ARGS..]`: one process per request. The body goes to
//! its stdin; its stdout becomes the frames of one source, a frame per read (so
//! output flows as it is written); its exit decides how the source ends. The last
//! [`STDERR_TAIL`] bytes of stderr are kept for the error message.
//!
//! The child belongs to the source's frame stream: when the client drops the source
//! or the request, the library drops the stream, and with it the [`Run`], which
//! kills the child's process group: the command runs in a group of its own, so
//! what it started (`sh -c 'a | b'`, a background job) goes with it. A command that
//! ended is not killed: processes it left behind in the background live on.

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use bytes::BytesMut;
use chanserv::{BoxError, Bytes, ServeHandle, Server, Source};
use futures::stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

/// How much of the end of stderr a failed source's message carries.
pub const STDERR_TAIL: usize = 1024;

/// Binds `name`, running `cmd` per request.
pub fn serve(
    server: &Server,
    name: &str,
    cmd: Arc<Vec<String>>,
    chunk: usize,
) -> chanserv::Result<ServeHandle> {
    server.listen_and_serve_async(name, move |req| {
        let cmd = cmd.clone();
        async move {
            let run = Run::spawn(&cmd, req.body, chunk)?;
            let frames = stream::try_unfold(run, Run::next_frame);
            Ok(stream::iter([Source::try_new("stdout", frames)]))
        }
    })
}

/// One running command.
struct Run {
    /// The program's name, for messages.
    program: String,
    child: Child,
    stdout: ChildStdout,
    stderr: JoinHandle<Vec<u8>>,
    chunk: usize,
}

impl Run {
    /// Starts `cmd` with `body` on its stdin. A command that cannot start fails the
    /// request (there is no source yet to fail).
    fn spawn(cmd: &[String], body: Bytes, chunk: usize) -> Result<Run, BoxError> {
        let (program, args) = cmd.split_first().ok_or("--exec needs a command")?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group (its id is the child's pid), killed on drop.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("the command's pipes are missing".into());
        };
        // A command that does not read its stdin, or exits early, is fine: the write
        // fails and the pipe closes. Either way the child gets EOF.
        tokio::spawn(async move {
            if let Err(e) = stdin.write_all(&body).await {
                tracing::debug!("exec stdin: {e}");
            }
        });
        Ok(Run {
            program: program.clone(),
            child,
            stdout,
            stderr: tokio::spawn(tail(stderr, STDERR_TAIL)),
            chunk,
        })
    }

    /// The next read of stdout; at its end, how the command exited.
    async fn next_frame(mut self) -> Result<Option<(Bytes, Run)>, String> {
        let mut buf = BytesMut::with_capacity(self.chunk);
        let n = (&mut self.stdout)
            .take(self.chunk as u64)
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("reading the output of {}: {e}", self.program))?;
        if n > 0 {
            return Ok(Some((buf.freeze(), self)));
        }
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| format!("waiting for {}: {e}", self.program))?;
        let stderr = (&mut self.stderr).await.unwrap_or_default();
        match failure(&self.program, status, &stderr) {
            None => Ok(None),
            Some(msg) => Err(msg),
        }
    }
}

impl Drop for Run {
    /// Kills the process group while the child has not been reaped (so its pid, the
    /// group's id, cannot have been reused): it runs, or ended unwaited-for.
    fn drop(&mut self) {
        let group = self.child.id().and_then(|pid| i32::try_from(pid).ok());
        if let Some(pid) = group.and_then(rustix::process::Pid::from_raw) {
            use rustix::process::{kill_process_group, Signal};
            if let Err(e) = kill_process_group(pid, Signal::KILL) {
                // ESRCH: every process of the group ended already.
                tracing::debug!("killing the process group of {}: {e}", self.program);
            }
        }
    }
}

/// The last `keep` bytes `r` yields before its end.
async fn tail(mut r: impl AsyncRead + Unpin, keep: usize) -> Vec<u8> {
    let mut kept = Vec::with_capacity(2 * keep);
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > keep {
                    kept.drain(..kept.len() - keep);
                }
            }
        }
    }
}

/// Why the command failed, or `None` if it succeeded.
fn failure(program: &str, status: ExitStatus, stderr: &[u8]) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (Some(0), _) => return None,
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("ended with {status}"),
    };
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    Some(if text.is_empty() {
        format!("{program} {how}")
    } else {
        format!("{program} {how}: {text}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exits_say_how_and_carry_stderr() {
        assert_eq!(failure("sh", ExitStatus::from_raw(0), b"noise"), None);
        assert_eq!(
            failure("sh", ExitStatus::from_raw(3 << 8), b"oops\n").as_deref(),
            Some("sh exited with status 3: oops")
        );
        assert_eq!(
            failure("sh", ExitStatus::from_raw(9), b"").as_deref(),
            Some("sh killed by signal 9")
        );
    }

    #[tokio::test]
    async fn only_the_tail_is_kept() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        assert_eq!(tail(&data[..], 1024).await, &data[data.len() - 1024..]);
        assert_eq!(tail(&b"short"[..], 1024).await, b"short");
    }
}
