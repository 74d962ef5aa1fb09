//! Durations (`250ms`, `5s`, `2m`) and byte sizes (`64KiB`, `1MiB`, `4096`) as the
//! command line and the config file write them. No I/O.

use std::time::Duration;

/// `<number><unit>` with unit `ms`, `s`, `m` or `h` (a bare number is seconds);
/// decimals allowed (`1.5s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 5s, 2m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {s:?} (ms, s, m, h)")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `<number><unit>` with unit `B`, `KiB`/`K`/`KB`, `MiB`/`M`/`MB` (powers of 1024; a
/// bare number is bytes).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64KiB, 1MiB)"))?;
    let mul: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        other => return Err(format!("unknown unit {other:?} in {s:?} (B, KiB, MiB)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

/// A node id: 1 to 16 hex digits, optionally after `0x`.
pub fn parse_node_id(s: &str) -> Result<u64, String> {
    let hex = s.strip_prefix("0x").unwrap_or(s);
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not a node id (1 to 16 hex digits)"));
    }
    u64::from_str_radix(hex, 16).map_err(|e| e.to_string())
}

/// A node id as the library prints it: 16 hex digits.
pub fn hex(id: u64) -> String {
    format!("{id:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "5x", "-1s", "1e999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        for bad in ["", "KiB", "1GiB", "1.5KiB", "99999999999999999999MiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_ids() {
        assert_eq!(parse_node_id("ff"), Ok(255));
        assert_eq!(parse_node_id("0x00000000000000ff"), Ok(255));
        assert_eq!(hex(255), "00000000000000ff");
        for bad in ["", "0x", "xyz", "00000000000000000"] {
            assert!(parse_node_id(bad).is_err(), "{bad}");
        }
    }
}
