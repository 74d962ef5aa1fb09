//! `chanserv ping NAME [BODY]`: joins the mesh, waits for the service, then posts BODY
//! `--count` times, one request after another from one node, and times each from the
//! post to the end of its last source. So it measures the request, not the start of a
//! process and its join, as a loop of `chanserv post` would.
//!
//! A failed request is counted, not fatal: the next one goes out on time, so a route
//! that fails over shows as a run of errors, then replies again. Lines on stdout, one
//! per request as it ends (key=value, for people and scripts alike; the error message
//! last, as it has spaces):
//! - `ping seq=<i> time_ms=<t> sources=<n> bytes=<n>`: every source completed;
//! - `ping seq=<i> time_ms=<t> error=<message>`: the request or a source failed, or
//!   no reply came within `--request-timeout`;
//! - `done sent=<n> ok=<n> failed=<n> min_ms=<t> median_ms=<t> max_ms=<t>` at the end
//!   (times of the replies; `-` with none), also after SIGINT or SIGTERM.
//!
//! Exit status: 0 every request completed, 2 some failed, 1 usage, connection error
//! or no such service within `--timeout`.

use std::time::{Duration, Instant};

use chanserv::{Bytes, Client};
use futures::StreamExt;

use crate::mesh::{describe, IdentArgs, JoinArgs, Plan, Signals};
use crate::post::{client_for, read_body};
use crate::tls::TlsArgs;
use crate::units::parse_duration;
use crate::Fail;

const EXAMPLES: &str = "\
Examples:
  chanserv ping echo hello --join 127.0.0.1:7000             # 10 requests, one a second
  chanserv ping echo hello --join 127.0.0.1:7000 --count 200 --interval 0
  chanserv ping files --join 127.0.0.1:7000 --count 3 --request-timeout 1m

Lines: `ping seq=<i> time_ms=<t> sources=<n> bytes=<n>` per reply, `ping seq=<i>
time_ms=<t> error=<message>` per failure, `done sent=<n> ok=<n> failed=<n> min_ms=<t>
median_ms=<t> max_ms=<t>` at the end (also on Ctrl-C). A time runs from the post to the
end of the request's last source. Exit status: 0 every request completed, 2 some failed,
1 usage, connection error or no such service within --timeout.";

/// `chanserv ping` flags.
#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The service to post to.
    #[arg(value_name = "NAME")]
    service: String,
    /// The request body; `-` reads it from stdin [default: empty].
    #[arg(value_name = "BODY")]
    body: Option<String>,
    /// How many requests.
    #[arg(long, short, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Time from the start of one request to the start of the next (at least: a
    /// request still running delays the next); 0 sends each as the last ends.
    #[arg(long, short, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Longest wait for one request's sources, all of them to their end.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Longest wait for the service's name to reach this node.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    join: JoinArgs,
    #[command(flatten)]
    ident: IdentArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Runs the requests and prints their times; the status says if all completed.
pub async fn run(args: Args) -> Result<u8, Fail> {
    let plan = Plan::client("ping", &args.ident, &args.join, &args.tls)?;
    if args.request_timeout.is_zero() {
        return Err(Fail::usage("--request-timeout must be above 0"));
    }
    let body = read_body(args.body.as_deref(), None).await?;
    let mut signals = Signals::new()?;
    let mesh = plan.start().await?;
    let r = async {
        let client = client_for(&mesh.node, &args.service, args.timeout).await?;
        Ok(ping(&client, &args, body, &mut signals).await)
    }
    .await;
    mesh.shutdown(Duration::from_secs(1)).await;
    r
}

/// Sends the requests until `--count` or a signal; prints the summary.
async fn ping(client: &Client, args: &Args, body: Bytes, signals: &mut Signals) -> u8 {
    let mut times = Vec::new();
    let mut sent = 0;
    let mut next = tokio::time::Instant::now();
    while sent < args.count {
        let r = tokio::select! {
            _ = signals.recv() => break,
            r = async {
                tokio::time::sleep_until(next).await;
                next = tokio::time::Instant::now() + args.interval;
                one(client, &args.service, body.clone(), args.request_timeout).await
            } => r,
        };
        let seq = sent;
        sent += 1;
        match r {
            Ok(reply) => {
                times.push(reply.time);
                say!(
                    "ping seq={seq} time_ms={:.3} sources={} bytes={}",
                    ms(reply.time),
                    reply.sources,
                    reply.bytes
                );
            }
            Err((time, e)) => say!(
                "ping seq={seq} time_ms={:.3} error={}",
                ms(time),
                crate::one_line(&e)
            ),
        }
    }
    let failed = sent - times.len() as u64;
    say!(
        "done sent={sent} ok={} failed={failed} {}",
        times.len(),
        summary(&mut times)
    );
    match failed {
        0 => 0,
        _ => 2,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `min_ms=.. median_ms=.. max_ms=..` of `times` (sorted here); `-` for none.
fn summary(times: &mut [Duration]) -> String {
    times.sort_unstable();
    let (min, max) = match (times.first(), times.last()) {
        (Some(a), Some(b)) => (*a, *b),
        _ => return "min_ms=- median_ms=- max_ms=-".to_owned(),
    };
    let n = times.len();
    let median = match n % 2 {
        1 => times[n / 2],
        _ => (times[n / 2 - 1] + times[n / 2]) / 2,
    };
    format!(
        "min_ms={:.3} median_ms={:.3} max_ms={:.3}",
        ms(min),
        ms(median),
        ms(max)
    )
}

/// What one completed request carried, and how long it took.
struct Reply {
    time: Duration,
    sources: usize,
    bytes: u64,
}

/// One request, every source read to its end, within `within`. Its error comes with
/// the time it took to fail.
async fn one(
    client: &Client,
    name: &str,
    body: Bytes,
    within: Duration,
) -> Result<Reply, (Duration, String)> {
    let start = Instant::now();
    let read = async {
        let mut sources = client
            .lookup_and_post(name, body, &[])
            .await
            .map_err(|e| format!("posting to {name}: {}", describe(&e)))?;
        let (mut count, mut bytes) = (0, 0);
        while let Some(source) = sources.next().await {
            let mut source = source.map_err(|e| e.to_string())?;
            count += 1;
            while let Some(frame) = source.next().await {
                let frame = frame.map_err(|e| format!("source {}: {e}", count - 1))?;
                bytes += frame.len() as u64;
            }
        }
        Ok((count, bytes))
    };
    // Dropped on timeout: the request is cancelled with it.
    match tokio::time::timeout(within, read).await {
        Ok(Ok((sources, bytes))) => Ok(Reply {
            time: start.elapsed(),
            sources,
            bytes,
        }),
        Ok(Err(e)) => Err((start.elapsed(), e)),
        Err(_) => Err((start.elapsed(), format!("no reply within {within:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_gives_min_median_and_max() {
        let ms = Duration::from_millis;
        assert_eq!(summary(&mut []), "min_ms=- median_ms=- max_ms=-");
        assert_eq!(
            summary(&mut [ms(3), ms(1), ms(2)]),
            "min_ms=1.000 median_ms=2.000 max_ms=3.000"
        );
        assert_eq!(
            summary(&mut [ms(4), ms(1), ms(2), ms(10)]),
            "min_ms=1.000 median_ms=3.000 max_ms=10.000"
        );
    }
}
