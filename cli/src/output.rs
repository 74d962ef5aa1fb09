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

use serde::Serialize;

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

    fn json(&mut self, v: Event) -> io::Result<()> {
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
            Mode::Json => self.json(Event {
                header: Some(String::from_utf8_lossy(header)),
                header_hex: std::str::from_utf8(header).is_err().then(|| hex(header)),
                ..Event::new("source", i)
            }),
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
                let text = std::str::from_utf8(data).ok();
                self.json(Event {
                    len: Some(data.len()),
                    text,
                    hex: text.is_none().then(|| hex(data)),
                    ..Event::new("frame", i)
                })
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
            Mode::Json => self.json(Event {
                frames: Some(s.frames),
                bytes: Some(s.bytes),
                file: file.map(|f| f.display().to_string()),
                ..Event::new("end", i)
            }),
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
            Mode::Json => self.json(Event {
                frames: Some(s.frames),
                bytes: Some(s.bytes),
                error: Some(msg),
                ..Event::new("error", i)
            }),
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
                self.json(
                    Event {
                        error: Some(e),
                        ..Event::default()
                    }
                    .named("request_error"),
                )?;
            }
            self.json(
                Event {
                    sources: Some(sources),
                    failed: Some(failed),
                    ..Event::default()
                }
                .named("done"),
            )?;
        } else {
            self.newline()?;
        }
        self.out.flush()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// One JSON line: the fields in this order, those that are `None` left out.
#[derive(Serialize, Default)]
struct Event<'a> {
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header_hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    len: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frames: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sources: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failed: Option<usize>,
}

impl Event<'_> {
    fn new(event: &'static str, source: usize) -> Self {
        Event {
            event,
            source: Some(source),
            ..Event::default()
        }
    }

    fn named(self, event: &'static str) -> Self {
        Event { event, ..self }
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
    fn json_lines_say_the_event_first_and_leave_out_what_is_absent() {
        let frame = Event {
            len: Some(2),
            text: Some("hi"),
            ..Event::new("frame", 0)
        };
        assert_eq!(
            serde_json::to_string(&frame).unwrap(),
            r#"{"event":"frame","source":0,"len":2,"text":"hi"}"#
        );
        let done = Event {
            sources: Some(1),
            failed: Some(0),
            ..Event::default()
        }
        .named("done");
        assert_eq!(
            serde_json::to_string(&done).unwrap(),
            r#"{"event":"done","sources":1,"failed":0}"#
        );
    }

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
