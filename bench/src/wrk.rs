//! The field's own tools beside the harness's generator, since harnesses disagree: `wrk`
//! (Debian) closed loop with 50 connections, the way most published proxy comparisons run, and
//! `oha` (crates.io) open loop at fixed rates with latency measured from each request's intended
//! send time (`--latency-correction`). Both run on the harness's core, as the generator does.

use std::process::Command;
use std::time::Duration;

/// What one run of a tool reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ToolRun {
    pub tool: String,
    pub connections: u32,
    /// The fixed rate (open loop), or `None` for closed loop.
    pub rate: Option<u32>,
    pub throughput_rps: f64,
    pub requests: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Requests that failed or got a status other than 2xx/3xx.
    pub errors: u64,
}

/// The `wrk` on PATH (or /usr/bin), if installed.
pub fn wrk_bin() -> Option<String> {
    which("wrk")
}

/// The `oha` on PATH (or ~/.cargo/bin), if installed.
pub fn oha_bin() -> Option<String> {
    which("oha")
}

fn which(name: &str) -> Option<String> {
    let home = std::env::var("HOME").unwrap_or_default();
    let mut dirs: Vec<std::path::PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.push(std::path::Path::new(&home).join(".cargo/bin"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file()).map(|p| p.display().to_string())
}

pub fn version(bin: &str, arg: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// `wrk -t1 -c<connections> -d<duration> --latency <url>`: closed loop, one thread.
pub async fn wrk(bin: &str, url: &str, connections: u32, duration: Duration) -> anyhow::Result<ToolRun> {
    let (bin, url) = (bin.to_string(), url.to_string());
    let secs = duration.as_secs().max(1);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin).args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s"), "--latency", &url]).output()
    })
    .await??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    parse_wrk(&text, connections).ok_or_else(|| anyhow::anyhow!("cannot read wrk's output:\n{text}"))
}

fn parse_wrk(text: &str, connections: u32) -> Option<ToolRun> {
    let mut run = ToolRun {
        tool: "wrk".into(),
        connections,
        rate: None,
        throughput_rps: 0.0,
        requests: 0,
        p50_us: 0,
        p99_us: 0,
        errors: 0,
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => run.throughput_rps = v.parse().ok()?,
            [n, "requests", "in", ..] => run.requests = n.parse().ok()?,
            ["50%", v] => run.p50_us = duration_us(v)?,
            ["99%", v] => run.p99_us = duration_us(v)?,
            ["Non-2xx", "or", "3xx", "responses:", n] => run.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                run.errors += rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum::<u64>();
            }
            _ => {}
        }
    }
    (run.requests > 0).then_some(run)
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.01s`.
fn duration_us(v: &str) -> Option<u64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some((num.parse::<f64>().ok()? * scale).round() as u64)
}

/// `oha` open loop at `rate` requests per second for `duration`, latency corrected.
pub async fn oha(bin: &str, url: &str, rate: u32, connections: u32, duration: Duration) -> anyhow::Result<ToolRun> {
    let (bin, url) = (bin.to_string(), url.to_string());
    let secs = duration.as_secs().max(1);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args([
                "--no-tui",
                "--output-format",
                "json",
                "--latency-correction",
                "-z",
                &format!("{secs}s"),
                "-q",
                &rate.to_string(),
                "-c",
                &connections.to_string(),
                &url,
            ])
            .output()
    })
    .await??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "oha failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("oha's JSON: {e}: {text}"))?;
    let pct = |k: &str| (j["latencyPercentiles"][k].as_f64().unwrap_or(0.0) * 1e6).round() as u64;
    let ok: u64 = j["statusCodeDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(code, _)| code.starts_with('2') || code.starts_with('3'))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0);
    let all: u64 =
        j["statusCodeDistribution"].as_object().map(|m| m.values().filter_map(|n| n.as_u64()).sum()).unwrap_or(0);
    // Requests still in flight when the run's time is up are cut, not failed.
    let failed: u64 = j["errorDistribution"]
        .as_object()
        .map(|m| m.iter().filter(|(e, _)| !e.contains("aborted due to deadline")).filter_map(|(_, n)| n.as_u64()).sum())
        .unwrap_or(0);
    Ok(ToolRun {
        tool: "oha".into(),
        connections,
        rate: Some(rate),
        throughput_rps: j["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        requests: all + failed,
        p50_us: pct("p50"),
        p99_us: pct("p99"),
        errors: all - ok + failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 5s test @ http://127.0.0.1:8080/\n  1 threads and 50 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     2.10ms  300.00us   9.00ms   90.00%\n    Req/Sec    23.90k     1.00k   25.00k    80.00%\n  Latency Distribution\n     50%    2.05ms\n     75%    2.20ms\n     90%    2.40ms\n     99%  812.00us\n  119500 requests in 5.00s, 130.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  23900.12\nTransfer/sec:     26.00MB\n";
        let r = parse_wrk(text, 50).expect("parsed");
        assert_eq!(r.requests, 119_500);
        assert_eq!(r.p50_us, 2050);
        assert_eq!(r.p99_us, 812);
        assert_eq!(r.errors, 7);
        assert!((r.throughput_rps - 23900.12).abs() < 0.01);
    }
}
