//! `verimail-bench http-load`: wrk against any `/confirm/<token>` server (the
//! gateway, or the reference), and reading what wrk reports.

use std::path::Path;

use anyhow::{Context as _, Result, bail};

use crate::results::*;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WrkArgs {
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    pub(crate) threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    pub(crate) connections: u32,
    /// Seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration: u64,
}

/// What wrk reported.
#[derive(Debug, Default)]
pub(crate) struct Load {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) requests: u64,
    pub(crate) ok: u64,
    pub(crate) already: u64,
    pub(crate) other: u64,
    pub(crate) socket_errors: String,
}

impl Load {
    pub(crate) fn record(&self, out: &Results, label: &str) -> Result<()> {
        println!(
            "  {label}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms; {} requests: {} confirmed, {} already, {} other{}",
            self.rps,
            self.p50_ms,
            self.p99_ms,
            self.requests,
            self.ok,
            self.already,
            self.other,
            if self.socket_errors.is_empty() {
                String::new()
            } else {
                format!("; {}", self.socket_errors)
            }
        );
        out.put(&format!("{label}_rps"), format!("{:.0}", self.rps))?;
        out.put(&format!("{label}_p50_ms"), format!("{:.2}", self.p50_ms))?;
        out.put(&format!("{label}_p99_ms"), format!("{:.2}", self.p99_ms))?;
        out.put(&format!("{label}_ok"), self.ok)?;
        out.put(&format!("{label}_already"), self.already)?;
        out.put(&format!("{label}_other"), self.other)?;
        Ok(())
    }
}

pub(crate) async fn run_wrk(
    url: &str,
    tokens: &Path,
    lua: &Path,
    w: &WrkArgs,
    mode: &str,
) -> Result<Load> {
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{}", w.threads))
        .arg(format!("-c{}", w.connections))
        .arg(format!("-d{}s", w.duration))
        .arg("--latency")
        .arg("-s")
        .arg(lua)
        .arg(url)
        .arg("--")
        .arg(tokens)
        .arg(mode)
        .arg(w.threads.to_string())
        .output()
        .await
        .context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    for l in text.lines() {
        println!("    | {l}");
    }
    if !output.status.success() {
        bail!(
            "wrk failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_wrk(&text)
}

pub(crate) fn parse_wrk(text: &str) -> Result<Load> {
    let mut load = Load::default();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            load.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("50%") {
            load.p50_ms = wrk_ms(v.trim()).unwrap_or(f64::NAN);
        } else if let Some(v) = line.strip_prefix("99%") {
            load.p99_ms = wrk_ms(v.trim()).unwrap_or(f64::NAN);
        } else if line.contains(" requests in ") {
            load.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if line.starts_with("Socket errors") {
            line.clone_into(&mut load.socket_errors);
        } else if let Some(rest) = line.strip_prefix("status 200:") {
            // "status 200: A, already: B, other: C (first other status S)"
            let nums: Vec<u64> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|s| s.parse().ok())
                .collect();
            if let [ok, already, other, ..] = nums[..] {
                load.ok = ok;
                load.already = already;
                load.other = other;
            }
        }
    }
    if load.rps == 0.0 {
        bail!("could not read wrk's Requests/sec");
    }
    Ok(load)
}

/// wrk's `1.23ms`, `456.00us`, `1.02s`, `1.50m` in milliseconds.
pub(crate) fn wrk_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => num / 1e3,
        "ms" => num,
        "s" => num * 1e3,
        "m" => num * 60e3,
        "h" => num * 3600e3,
        _ => return None,
    })
}
