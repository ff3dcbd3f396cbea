//! The keep-alive policy: how long an idle function instance stays loaded,
//! and when one is loaded again ahead of the next call.
//!
//! Each function keeps a histogram of its idle times (from the end of one
//! call to the start of the next, for the function as a whole). While the
//! histogram has too few samples, or too many idle times fall beyond its
//! range, the policy is a fixed keep-alive. Otherwise the histogram's head
//! and tail give two windows: the microVM is unloaded as soon as the
//! function goes idle and loaded again ("pre-warmed") shortly before the
//! head of the idle-time distribution, then kept until past its tail. A
//! function called in bursts keeps its instances; one called every few
//! minutes holds memory only around the moments it is likely to be called.
//! This is the hybrid-histogram idea from the serverless literature (Shahrad
//! et al., "Serverless in the Wild", ATC 2020), sized here by configuration.

use std::time::Duration;

/// Policy settings (per host; every function learns its own histogram).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    /// Width of one histogram bin.
    pub bin: Duration,
    /// Number of bins; idle times beyond `bin * bins` are out of range.
    pub bins: usize,
    /// Percentile of the idle times where pre-warming aims (0–100).
    pub head_percentile: f64,
    /// Percentile of the idle times the keep-alive must cover (0–100).
    pub tail_percentile: f64,
    /// Samples needed before the histogram is trusted.
    pub min_samples: u64,
    /// Largest share of out-of-range idle times the histogram tolerates.
    pub max_out_of_range: f64,
    /// Safety margin applied to both windows (0.1 = 10 %).
    pub margin: f64,
    /// Keep-alive while the histogram is not trusted.
    pub fixed_keep_alive: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            bin: Duration::from_secs(60),
            bins: 240,
            head_percentile: 5.0,
            tail_percentile: 99.0,
            min_samples: 10,
            max_out_of_range: 0.5,
            margin: 0.1,
            fixed_keep_alive: Duration::from_secs(600),
        }
    }
}

/// Where a window came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// Too few samples: the fixed keep-alive.
    Fixed,
    /// Idle times mostly beyond the histogram's range: the fixed keep-alive.
    OutOfRange,
    /// Learned from the histogram.
    Histogram,
}

/// What to do once a function goes idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Unload at once and load again after this long (zero: stay loaded).
    pub prewarm: Duration,
    /// Then keep the instance for this long.
    pub keep_alive: Duration,
    /// Why.
    pub basis: Basis,
}

/// A function's idle-time histogram.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: Vec<u64>,
    in_range: u64,
    out_of_range: u64,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one idle time.
    pub fn record(&mut self, cfg: &PolicyConfig, idle: Duration) {
        let bins = cfg.bins.max(1);
        if self.counts.len() != bins {
            self.counts.resize(bins, 0);
        }
        let bin = cfg.bin.max(Duration::from_millis(1));
        let i = (idle.as_nanos() / bin.as_nanos()) as usize;
        match self.counts.get_mut(i) {
            Some(c) => {
                *c += 1;
                self.in_range += 1;
            }
            None => self.out_of_range += 1,
        }
    }

    /// Idle times recorded.
    pub fn samples(&self) -> u64 {
        self.in_range + self.out_of_range
    }

    /// The bin holding percentile `p` of the in-range samples.
    fn percentile_bin(&self, p: f64) -> usize {
        let want = ((p / 100.0) * self.in_range as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return i;
            }
        }
        self.counts.len().saturating_sub(1)
    }

    /// The window the histogram gives now.
    pub fn window(&self, cfg: &PolicyConfig) -> Window {
        let fixed = |basis| Window {
            prewarm: Duration::ZERO,
            keep_alive: cfg.fixed_keep_alive,
            basis,
        };
        if self.samples() < cfg.min_samples.max(1) || self.in_range == 0 {
            return fixed(Basis::Fixed);
        }
        if self.out_of_range as f64 > cfg.max_out_of_range * self.samples() as f64 {
            return fixed(Basis::OutOfRange);
        }
        let head = self.percentile_bin(cfg.head_percentile);
        let tail = self.percentile_bin(cfg.tail_percentile).max(head);
        // The head bin's lower edge, less the margin; the tail bin's upper
        // edge, plus the margin.
        let scaled = |k: f64| {
            Duration::try_from_secs_f64(cfg.bin.as_secs_f64() * k).unwrap_or(Duration::MAX)
        };
        let prewarm = scaled(head as f64 * (1.0 - cfg.margin).max(0.0));
        let end = scaled((tail + 1) as f64 * (1.0 + cfg.margin));
        Window {
            prewarm,
            keep_alive: end.saturating_sub(prewarm),
            basis: Basis::Histogram,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            bin: Duration::from_secs(1),
            bins: 100,
            min_samples: 5,
            fixed_keep_alive: Duration::from_secs(7),
            ..PolicyConfig::default()
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn too_few_samples_keep_the_fixed_window() {
        let c = cfg();
        let mut h = Histogram::new();
        assert_eq!(h.window(&c).basis, Basis::Fixed);
        for _ in 0..4 {
            h.record(&c, secs(30));
        }
        let w = h.window(&c);
        assert_eq!(
            (w.prewarm, w.keep_alive, w.basis),
            (Duration::ZERO, secs(7), Basis::Fixed)
        );
    }

    #[test]
    fn regular_calls_unload_and_prewarm_before_the_next() {
        let c = cfg();
        let mut h = Histogram::new();
        for i in 0..20 {
            h.record(&c, secs(30) + Duration::from_millis(i * 10));
        }
        let w = h.window(&c);
        assert_eq!(w.basis, Basis::Histogram);
        // Loaded again before 30 s, kept past 31 s.
        assert_eq!(w.prewarm, secs(27));
        assert!(w.prewarm + w.keep_alive >= secs(31), "{w:?}");
        assert!(w.prewarm + w.keep_alive <= secs(35), "{w:?}");
    }

    #[test]
    fn bursts_stay_loaded_and_the_tail_sets_the_keep_alive() {
        let c = cfg();
        let mut h = Histogram::new();
        for _ in 0..95 {
            h.record(&c, Duration::from_millis(200));
        }
        for _ in 0..5 {
            h.record(&c, secs(40));
        }
        let w = h.window(&c);
        assert_eq!(w.prewarm, Duration::ZERO);
        // The 99th percentile is in the 40 s bin: kept ~45 s.
        assert!(
            w.keep_alive >= secs(41) && w.keep_alive <= secs(46),
            "{w:?}"
        );
    }

    #[test]
    fn mostly_out_of_range_falls_back_to_fixed() {
        let c = cfg();
        let mut h = Histogram::new();
        for _ in 0..6 {
            h.record(&c, secs(1000));
        }
        for _ in 0..4 {
            h.record(&c, secs(3));
        }
        assert_eq!(h.samples(), 10);
        let w = h.window(&c);
        assert_eq!((w.basis, w.keep_alive), (Basis::OutOfRange, secs(7)));
    }

    #[test]
    fn huge_settings_saturate_instead_of_panicking() {
        let c = PolicyConfig {
            bin: Duration::MAX,
            min_samples: 1,
            ..cfg()
        };
        let mut h = Histogram::new();
        h.record(&c, secs(1));
        let w = h.window(&c);
        assert_eq!(w.basis, Basis::Histogram);
        assert_eq!(w.prewarm, Duration::ZERO);
        assert_eq!(w.keep_alive, Duration::MAX);
    }

    #[test]
    fn a_zero_bin_width_does_not_divide_by_zero() {
        let c = PolicyConfig {
            bin: Duration::ZERO,
            ..cfg()
        };
        let mut h = Histogram::new();
        h.record(&c, secs(1));
        assert_eq!(h.samples(), 1);
    }
}
