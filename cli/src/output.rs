//! How `chanserv post` shows what it receives: a [`Printer`] per output mode on stdout,
//! and a [`Saver`] that writes each source to a file under `--out DIR`. No network.
//!
//! Modes (`--output`):
//! - `text`: `source <i> "<header>"`, the frames as UTF-8 (invalid bytes replaced),
//!   then `end <i> "<header>" frames=<n> bytes=<n>` or `error <i> "<header>"
//!   frames=<n> bytes=<n>: <message>`;
//! - `hex`: the same, with a line `frame <i> <len> <hex>` per frame;
//! - `raw`: the frames' bytes and nothing else;
//! - `json`: one object per line, `event` = `source` | `frame` | `end` | `error` |
//!   `request_error` | `done`; a frame has `text` when it is UTF-8, else `hex`.
//!
//! With `--out`, frames go to the files, not to stdout; `end` lines name the file.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::json;

/// `--output`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Text,
    Hex,
    Raw,
    Json,
}

/// What one source carried.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub frames: u64,
    pub bytes: u64,
}

/// Writes events to stdout in one mode. Lines are whole: callers serialise events.
pub struct Printer {
    mode: Mode,
    out: io::BufWriter<io::Stdout>,
    /// Whether the last byte of text mode's output ended a line.
    at_line_start: bool,
}

fn quoted(header: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(header))
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

impl Printer {
    pub fn new(mode: Mode) -> Self {
        Printer {
            mode,
            out: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
            at_line_start: true,
        }
    }

    fn json(&mut self, v: serde_json::Value) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, &v)?;
        self.out.write_all(b"\n")
    }

    /// Ends a text line left open by frames, so the next line starts clean.
    fn newline(&mut self) -> io::Result<()> {
        if !self.at_line_start {
            self.out.write_all(b"\n")?;
            self.at_line_start = true;
        }
        Ok(())
    }

    pub fn source(&mut self, i: usize, header: &[u8]) -> io::Result<()> {
        match self.mode {
            Mode::Text | Mode::Hex => {
                self.newline()?;
                writeln!(self.out, "source {i} {}", quoted(header))
            }
            Mode::Raw => Ok(()),
            Mode::Json => {
                let mut v = json!({"event": "source", "source": i,
                    "header": String::from_utf8_lossy(header)});
                if std::str::from_utf8(header).is_err() {
                    v["header_hex"] = hex(header).into();
                }
                self.json(v)
            }
        }
    }

    pub fn frame(&mut self, i: usize, data: &[u8]) -> io::Result<()> {
        match self.mode {
            Mode::Text => {
                if !data.is_empty() {
                    self.out
                        .write_all(String::from_utf8_lossy(data).as_bytes())?;
                    self.at_line_start = data.ends_with(b"\n");
                }
                Ok(())
            }
            Mode::Hex if data.is_empty() => writeln!(self.out, "frame {i} 0"),
            Mode::Hex => writeln!(self.out, "frame {i} {} {}", data.len(), hex(data)),
            Mode::Raw => self.out.write_all(data),
            Mode::Json => {
                let mut v = json!({"event": "frame", "source": i, "len": data.len()});
                match std::str::from_utf8(data) {
                    Ok(s) => v["text"] = s.into(),
                    Err(_) => v["hex"] = hex(data).into(),
                }
                self.json(v)
            }
        }
    }

    /// A source completed; `file` is where `--out` saved it.
    pub fn end(
        &mut self,
        i: usize,
        header: &[u8],
        s: Stats,
        file: Option<&Path>,
    ) -> io::Result<()> {
        match self.mode {
            Mode::Text | Mode::Hex => {
                self.newline()?;
                write!(
                    self.out,
                    "end {i} {} frames={} bytes={}",
                    quoted(header),
                    s.frames,
                    s.bytes
                )?;
                if let Some(f) = file {
                    write!(self.out, " file={}", f.display())?;
                }
                writeln!(self.out)
            }
            Mode::Raw => Ok(()),
            Mode::Json => {
                let mut v =
                    json!({"event": "end", "source": i, "frames": s.frames, "bytes": s.bytes});
                if let Some(f) = file {
                    v["file"] = f.display().to_string().into();
                }
                self.json(v)
            }
        }
    }

    /// A source failed after `s`.
    pub fn error(&mut self, i: usize, header: &[u8], s: Stats, msg: &str) -> io::Result<()> {
        match self.mode {
            Mode::Text | Mode::Hex => {
                self.newline()?;
                writeln!(
                    self.out,
                    "error {i} {} frames={} bytes={}: {}",
                    quoted(header),
                    s.frames,
                    s.bytes,
                    crate::one_line(msg)
                )
            }
            Mode::Raw => Ok(()),
            Mode::Json => self.json(json!({"event": "error", "source": i, "error": msg,
                "frames": s.frames, "bytes": s.bytes})),
        }
    }

    /// The end of the request: JSON says how it went (other modes leave it to the
    /// exit status and stderr).
    pub fn done(
        &mut self,
        sources: usize,
        failed: usize,
        request_error: Option<&str>,
    ) -> io::Result<()> {
        if self.mode == Mode::Json {
            if let Some(e) = request_error {
                self.json(json!({"event": "request_error", "error": e}))?;
            }
            self.json(json!({"event": "done", "sources": sources, "failed": failed}))?;
        } else {
            self.newline()?;
        }
        self.out.flush()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A source's header as a file name: no path separators, no control characters, at
/// most 200 bytes; empty, `.` and `..` become `source-<i>`.
pub fn safe_name(header: &[u8], i: usize) -> String {
    let lossy = String::from_utf8_lossy(header);
    let mut name = String::new();
    for c in lossy.chars() {
        let c = if c == '/' || c == '\\' || c.is_control() {
            '_'
        } else {
            c
        };
        if name.len() + c.len_utf8() > 200 {
            break;
        }
        name.push(c);
    }
    match name.as_str() {
        "" | "." | ".." => format!("source-{i}"),
        _ => name,
    }
}

/// `--out DIR`: one file per source, named by its header ([`safe_name`]); a header
/// seen before in this request gets `.1`, `.2`, ... appended.
pub struct Saver {
    dir: PathBuf,
    used: Mutex<HashSet<String>>,
}

impl Saver {
    pub fn new(dir: PathBuf) -> Self {
        Saver {
            dir,
            used: Mutex::new(HashSet::new()),
        }
    }

    /// Creates the file for source `i`. It never writes through a symbolic link, so
    /// a link planted in DIR cannot send a source elsewhere.
    pub async fn create(&self, i: usize, header: &[u8]) -> io::Result<(PathBuf, tokio::fs::File)> {
        let path = {
            let base = safe_name(header, i);
            let mut used = self.used.lock().unwrap();
            let mut name = base.clone();
            let mut n = 0;
            while !used.insert(name.clone()) {
                n += 1;
                name = format!("{base}.{n}");
            }
            self.dir.join(name)
        };
        if let Ok(m) = tokio::fs::symlink_metadata(&path).await {
            if m.file_type().is_symlink() {
                return Err(io::Error::other(format!(
                    "{} is a symbolic link: not followed",
                    path.display()
                )));
            }
        }
        let file = tokio::fs::File::create(&path).await?;
        Ok((path, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_in_their_directory() {
        assert_eq!(safe_name(b"a.txt", 0), "a.txt");
        assert_eq!(safe_name(b"../../etc/passwd", 0), ".._.._etc_passwd");
        assert_eq!(safe_name(b"/abs", 0), "_abs");
        assert_eq!(safe_name(b"a\\b\nc", 0), "a_b_c");
        for special in [&b""[..], b".", b".."] {
            assert_eq!(safe_name(special, 7), "source-7");
        }
        assert_eq!(safe_name(&[b'x'; 300], 0).len(), 200);
        assert_eq!(safe_name("é".repeat(150).as_bytes(), 0).len(), 200);
        assert_eq!(safe_name(&[0xff, b'a'], 0), "\u{fffd}a");
    }
}
