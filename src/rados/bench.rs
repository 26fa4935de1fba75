//! The engine benchmark's driver: one queue on an image kept at a fixed depth of reads or
//! writes for a fixed time, with per-request latency. `rbdback engine-bench` runs it;
//! `tools/bench-engines` runs it beside fio's rbd and rados engines and prints ratios.
//!
//! Owns: the request loop and its statistics. Writes only inside `span` bytes of the image
//! it is pointed at (benchmark images only).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{BlockOp, Completion, Image, ImageSpec, RadosError};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

impl Pattern {
    /// fio's names.
    pub fn parse(s: &str) -> Option<Pattern> {
        Some(match s {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            _ => return None,
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The image.
    pub spec: ImageSpec,
    /// Pattern.
    pub pattern: Pattern,
    /// Request size.
    pub bs: usize,
    /// Requests in flight.
    pub qd: usize,
    /// Run time.
    pub duration: Duration,
    /// Bytes of the image used, from offset 0.
    pub span: u64,
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Requests completed.
    pub ios: u64,
    /// Seconds of the measured run.
    pub secs: f64,
    /// Request size.
    pub bs: usize,
    /// Latencies in microseconds, sorted.
    pub lat_us: Vec<f64>,
}

impl BenchReport {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.secs.max(1e-9)
    }
    /// MiB per second.
    pub fn mib_s(&self) -> f64 {
        self.iops() * self.bs as f64 / f64::from(1u32 << 20)
    }
    /// Mean latency.
    pub fn mean_us(&self) -> f64 {
        self.lat_us.iter().sum::<f64>() / self.lat_us.len().max(1) as f64
    }
    /// A percentile (0-100) of the latency.
    pub fn pct_us(&self, p: usize) -> f64 {
        let n = self.lat_us.len();
        if n == 0 {
            return 0.0;
        }
        self.lat_us[((n - 1) * p.min(100)).div_ceil(100).min(n - 1)]
    }
}

/// Runs the benchmark; any failed request ends it with that error.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, RadosError> {
    let img = Image::open(&cfg.spec)?;
    let mut q = img.queue()?;
    let bs = cfg.bs.max(512);
    let blocks = (cfg.span.min(img.size()) / bs as u64).max(1);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut seq = 0u64;
    let mut next_offset = || -> u64 {
        let b = match cfg.pattern {
            Pattern::RandRead | Pattern::RandWrite => {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % blocks
            }
            Pattern::Read | Pattern::Write => {
                seq += 1;
                (seq - 1) % blocks
            }
        };
        b * bs as u64
    };
    let write = matches!(cfg.pattern, Pattern::RandWrite | Pattern::Write);
    let mut started: Vec<Instant> = vec![Instant::now(); cfg.qd.max(1)];
    let mut lat = Vec::new();
    let mut done: Vec<Completion> = Vec::new();
    let mut free: Vec<Vec<u8>> = (0..cfg.qd.max(1))
        .map(|i| vec![u8::try_from(i % 251).unwrap_or(1) | 1; bs])
        .collect();
    let t0 = Instant::now();
    let end = t0 + cfg.duration;
    let mut inflight = 0usize;
    let mut slots: Vec<usize> = (0..cfg.qd.max(1)).rev().collect();
    loop {
        while Instant::now() < end {
            let (Some(slot), Some(buf)) = (slots.pop(), free.pop()) else {
                break;
            };
            let offset = next_offset();
            let op = if write {
                BlockOp::Write { offset, buf }
            } else {
                BlockOp::Read { offset, buf }
            };
            started[slot] = Instant::now();
            q.submit(slot as u64, op).map_err(|e| e.error)?;
            inflight += 1;
        }
        if inflight == 0 {
            break;
        }
        let ready = {
            let mut fds = [PollFd::new(q.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0)
        };
        if ready == 0 {
            continue;
        }
        q.reap(&mut done);
        for c in done.drain(..) {
            c.result?;
            let slot = usize::try_from(c.tag).unwrap_or(0);
            lat.push(started[slot].elapsed().as_secs_f64() * 1e6);
            slots.push(slot);
            free.push(c.buf.unwrap_or_else(|| vec![0; bs]));
            inflight -= 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok(BenchReport {
        ios: lat.len() as u64,
        secs,
        bs,
        lat_us: lat,
    })
}
