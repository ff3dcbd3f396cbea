//! Token-bucket I/O rate limiters for the virtio devices, with Firecracker's
//! semantics (a bandwidth bucket counting bytes and an ops bucket counting
//! requests, each with a size, a one-time burst and a refill time).
//!
//! # Semantics
//!
//! A [`TokenBucket`] starts full (`size` tokens) plus `one_time_burst` extra
//! tokens that can be spent once and are never refilled; the burst is spent
//! first. The bucket refills linearly: `size` tokens every `refill_time`
//! (so an empty bucket is full again after `refill_time`), never beyond
//! `size`. The arithmetic is exact (integers scaled by the refill time), so no
//! token is lost or created by rounding however often the bucket is polled.
//!
//! A request that needs more tokens than the bucket holds (`size`, after the
//! burst) can never be served from the budget alone. Kiln lets such a
//! request through **only when the bucket is full**, and the bucket goes into
//! debt: it must refill past zero before anything else is served, so the
//! long-run rate still holds (a 3×`size` request costs 3 refill times of
//! silence). Firecracker also lets oversized requests through; waiting for a
//! full bucket first keeps them from starving smaller ones behind them.
//!
//! A [`RateLimiter`] combines an optional bandwidth bucket and an optional
//! ops bucket. When a request cannot be served, the limiter becomes
//! *blocked*: it arms its timerfd for the moment enough tokens will be there
//! and refuses everything until [`RateLimiter::event_handler`] runs on that
//! timer's expiry. Devices add the timerfd to their worker's epoll, stop
//! taking requests from the throttled queue (putting the refused request
//! back, in order) and resume when the timer fires: no busy loop, and other
//! queues are not held up.
//!
//! A bucket with `size` 0 or `refill_time` 0 is no limit at all (as in
//! Firecracker's API); the CLI parser refuses such values as likely mistakes.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// Shortest timer the limiter arms: waking more often than this only costs
/// CPU; tokens keep accruing meanwhile, so the rate is unaffected.
const MIN_WAIT: Duration = Duration::from_millis(1);
/// Longest refill time honoured (about 35 years); keeps the scaled integer
/// arithmetic far from overflow.
const MAX_REFILL_MS: u64 = 1 << 40;
const NS_PER_MS: u128 = 1_000_000;

/// One token bucket's parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full (bytes or operations).
    pub size: u64,
    /// Extra tokens available once, at the start.
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// Whether this bucket limits anything (size and refill time non-zero).
    pub fn is_limited(&self) -> bool {
        self.size > 0 && self.refill_time_ms > 0
    }
}

/// A rate limiter's parameters: either bucket may be absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiterConfig {
    /// Bucket whose tokens are bytes.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Bucket whose tokens are operations (requests, frames).
    pub ops: Option<TokenBucketConfig>,
}

/// Errors parsing a rate limiter option string.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateLimiterParseError {
    /// Nothing to parse, or an empty item between commas.
    #[error("empty rate limiter option (expected bw=SIZE[:BURST]/MS or ops=N[:BURST]/MS)")]
    Empty,
    /// A key other than `bw` or `ops`.
    #[error("unknown rate limiter option {0:?} (expected bw=SIZE[:BURST]/MS or ops=N[:BURST]/MS)")]
    UnknownKey(String),
    /// The same key twice.
    #[error("rate limiter option {0} given twice")]
    Duplicate(String),
    /// A value that is not `N[:BURST]/MS`.
    #[error("rate limiter option {key}={value:?}: {reason} (expected {key}=N[:BURST]/MS, e.g. {key}=1000/1000)")]
    Value {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl RateLimiterConfig {
    /// Parses comma-separated options: `bw=SIZE[:BURST]/MS` (a bandwidth
    /// bucket of SIZE bytes refilled in MS milliseconds, with BURST extra
    /// bytes once) and `ops=N[:BURST]/MS` (the same in operations). E.g.
    /// `bw=10485760/1000,ops=500/1000` is 10 MiB/s and 500 requests/s.
    /// Numbers are decimal; SIZE, N and MS must be non-zero.
    pub fn parse_opts(s: &str) -> Result<Self, RateLimiterParseError> {
        if s.trim().is_empty() {
            return Err(RateLimiterParseError::Empty);
        }
        let mut cfg = Self::default();
        for item in s.split(',') {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                if item.is_empty() {
                    RateLimiterParseError::Empty
                } else {
                    RateLimiterParseError::UnknownKey(item.to_string())
                }
            })?;
            cfg.apply_opt(key, value)?;
        }
        Ok(cfg)
    }

    /// Applies one `key=value` option (`bw` or `ops`), for callers that split
    /// a larger option string themselves.
    pub fn apply_opt(&mut self, key: &str, value: &str) -> Result<(), RateLimiterParseError> {
        let slot = match key {
            "bw" => &mut self.bandwidth,
            "ops" => &mut self.ops,
            _ => return Err(RateLimiterParseError::UnknownKey(key.to_string())),
        };
        if slot.is_some() {
            return Err(RateLimiterParseError::Duplicate(key.to_string()));
        }
        *slot = Some(parse_bucket(key, value)?);
        Ok(())
    }

    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        !self.bandwidth.is_some_and(|b| b.is_limited()) && !self.ops.is_some_and(|b| b.is_limited())
    }
}

/// How a run-time update changes one bucket (Firecracker's semantics for
/// `PATCH` bodies: an absent bucket is kept, a bucket with `size` 0 or
/// `refill_time` 0 is removed, any other replaces it, full).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Keep the bucket as it is (tokens included).
    #[default]
    Keep,
    /// Remove the bucket: that kind is no longer limited.
    Disable,
    /// Replace the bucket by a new, full one.
    Set(TokenBucketConfig),
}

impl BucketUpdate {
    /// The update a `PATCH` body's bucket means: `None` keeps it.
    pub fn from_patch(bucket: Option<TokenBucketConfig>) -> Self {
        match bucket {
            None => Self::Keep,
            Some(b) if !b.is_limited() => Self::Disable,
            Some(b) => Self::Set(b),
        }
    }

    fn apply(self, slot: &mut Option<TokenBucketConfig>) {
        match self {
            Self::Keep => {}
            Self::Disable => *slot = None,
            Self::Set(b) => *slot = Some(b),
        }
    }
}

/// A run-time change of a rate limiter: one [`BucketUpdate`] per bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiterUpdate {
    /// The bandwidth (bytes) bucket.
    pub bandwidth: BucketUpdate,
    /// The ops bucket.
    pub ops: BucketUpdate,
}

impl RateLimiterUpdate {
    /// The update a `PATCH` body's rate limiter means.
    pub fn from_patch(cfg: &RateLimiterConfig) -> Self {
        Self {
            bandwidth: BucketUpdate::from_patch(cfg.bandwidth),
            ops: BucketUpdate::from_patch(cfg.ops),
        }
    }

    /// The update that turns a limiter configured as `old` into one
    /// configured as `new`: changed buckets are replaced (or removed),
    /// unchanged ones keep their tokens.
    pub fn between(old: &RateLimiterConfig, new: &RateLimiterConfig) -> Self {
        let diff = |o: Option<TokenBucketConfig>, n: Option<TokenBucketConfig>| match n
            .filter(TokenBucketConfig::is_limited)
        {
            _ if o == n => BucketUpdate::Keep,
            Some(b) => BucketUpdate::Set(b),
            None => BucketUpdate::Disable,
        };
        Self {
            bandwidth: diff(old.bandwidth, new.bandwidth),
            ops: diff(old.ops, new.ops),
        }
    }

    /// Whether the update changes nothing.
    pub fn is_noop(&self) -> bool {
        self.bandwidth == BucketUpdate::Keep && self.ops == BucketUpdate::Keep
    }
}

impl RateLimiterConfig {
    /// Applies `update` to this configuration.
    pub fn apply_update(&mut self, update: &RateLimiterUpdate) {
        update.bandwidth.apply(&mut self.bandwidth);
        update.ops.apply(&mut self.ops);
    }
}

fn parse_bucket(key: &str, value: &str) -> Result<TokenBucketConfig, RateLimiterParseError> {
    let err = |reason: &str| RateLimiterParseError::Value {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let num = |s: &str, what: &str| -> Result<u64, RateLimiterParseError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(&format!("{what} {s:?} is not a decimal number")));
        }
        s.parse::<u64>()
            .map_err(|_| err(&format!("{what} {s} is too large")))
    };
    let (amount, ms) = value
        .split_once('/')
        .ok_or_else(|| err("missing /MS (the refill time in milliseconds)"))?;
    let (size, burst) = match amount.split_once(':') {
        Some((s, b)) => (num(s, "size")?, num(b, "burst")?),
        None => (num(amount, "size")?, 0),
    };
    let refill_time_ms = num(ms, "refill time")?;
    if size == 0 {
        return Err(err("the size must be at least 1"));
    }
    if refill_time_ms == 0 {
        return Err(err("the refill time must be at least 1 ms"));
    }
    Ok(TokenBucketConfig {
        size,
        one_time_burst: burst,
        refill_time_ms,
    })
}

impl fmt::Display for TokenBucketConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.size)?;
        if self.one_time_burst > 0 {
            write!(f, ":{}", self.one_time_burst)?;
        }
        write!(f, "/{}", self.refill_time_ms)
    }
}

impl fmt::Display for RateLimiterConfig {
    /// The option string [`RateLimiterConfig::parse_opts`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = [("bw", self.bandwidth), ("ops", self.ops)]
            .into_iter()
            .filter_map(|(k, b)| b.map(|b| format!("{k}={b}")))
            .collect();
        write!(f, "{}", items.join(","))
    }
}

/// A token bucket with an explicit clock: every operation takes `now`.
///
/// Internally the budget is kept in "token × nanosecond" units (tokens
/// multiplied by the refill time in ns), so refilling adds exactly
/// `elapsed_ns × size` and nothing is rounded. The budget goes negative after
/// an oversized request (the debt described in the module docs).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    refill_ns: i128,
    /// Budget in scaled units; at most `capacity`.
    budget: i128,
    capacity: i128,
    one_time_burst: u64,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket as of `now`; `None` when `cfg` limits nothing.
    pub fn new(cfg: &TokenBucketConfig, now: Instant) -> Option<Self> {
        if !cfg.is_limited() {
            return None;
        }
        let refill_ns = (u128::from(cfg.refill_time_ms.min(MAX_REFILL_MS)) * NS_PER_MS) as i128;
        let capacity = i128::from(cfg.size) * refill_ns;
        Some(Self {
            size: cfg.size,
            refill_ns,
            budget: capacity,
            capacity,
            one_time_burst: cfg.one_time_burst,
            last_update: now,
        })
    }

    /// Whole tokens available now, one-time burst included (0 while in debt).
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        let whole = (self.budget.max(0) / self.refill_ns) as u64;
        whole.saturating_add(self.one_time_burst)
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        if now > self.last_update {
            self.last_update = now;
        }
        let room = (self.capacity - self.budget) as u128; // >= 0: budget <= capacity
        let add = elapsed.saturating_mul(u128::from(self.size)).min(room);
        self.budget += add as i128;
    }

    /// Tokens to take from the burst and scaled cost to take from the
    /// budget for `tokens`, if they can be taken now (after a refill).
    fn plan(&self, tokens: u64) -> Option<(u64, i128)> {
        let from_burst = tokens.min(self.one_time_burst);
        let rest = tokens - from_burst;
        let cost = i128::from(rest) * self.refill_ns;
        let fits = cost <= self.budget;
        let oversized_on_full = rest > self.size && self.budget >= self.capacity;
        (fits || oversized_on_full).then_some((from_burst, cost))
    }

    fn commit(&mut self, (from_burst, cost): (u64, i128)) {
        self.one_time_burst -= from_burst;
        self.budget -= cost;
    }

    /// Takes `tokens` if possible (see the module docs for oversized
    /// requests); returns whether it did. Nothing is taken on failure.
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        match self.plan(tokens) {
            Some(p) => {
                self.commit(p);
                true
            }
            None => false,
        }
    }

    /// How long from `now` until [`Self::reduce`] of `tokens` succeeds, if
    /// nothing else is taken meanwhile (zero if it would succeed now).
    pub fn time_until(&mut self, tokens: u64, now: Instant) -> Duration {
        self.refill(now);
        if self.plan(tokens).is_some() {
            return Duration::ZERO;
        }
        let rest = tokens - tokens.min(self.one_time_burst);
        // Oversized requests wait for a full bucket.
        let target = if rest > self.size {
            self.capacity
        } else {
            i128::from(rest) * self.refill_ns
        };
        let deficit = (target - self.budget) as u128; // > 0: plan failed
        let size = u128::from(self.size);
        let ns = deficit.div_ceil(size);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// What a token counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes (the bandwidth bucket).
    Bytes,
    /// Operations (the ops bucket).
    Ops,
}

/// A bandwidth bucket and an ops bucket, and the timer that says when a
/// refused request can be retried. See the module docs.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter with full buckets. Fails only if the timerfd cannot be
    /// created.
    pub fn new(cfg: &RateLimiterConfig) -> io::Result<Self> {
        let now = Instant::now();
        let timer = TimerFd::new()?;
        // The worker reads the timer only after epoll reports it; non-blocking
        // so that a stale report can never stall the worker.
        // SAFETY: fcntl(F_SETFL) on a timerfd we own; it changes only the
        // file status flags and the result is checked.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            bandwidth: cfg.bandwidth.and_then(|b| TokenBucket::new(&b, now)),
            ops: cfg.ops.and_then(|b| TokenBucket::new(&b, now)),
            timer,
            blocked: false,
        })
    }

    /// Whether the limiter refuses everything until its timer fires.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes `tokens` of one kind; on failure the limiter blocks and arms its
    /// timer. A kind without a bucket is unlimited.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        let (bytes, ops) = match kind {
            TokenType::Bytes => (tokens, 0),
            TokenType::Ops => (0, tokens),
        };
        self.consume_at(ops, bytes, Instant::now())
    }

    /// Takes `ops` operations and `bytes` bytes, both or neither; on failure
    /// the limiter blocks and arms its timer for when both will be there.
    pub fn consume_request(&mut self, ops: u64, bytes: u64) -> bool {
        self.consume_at(ops, bytes, Instant::now())
    }

    fn consume_at(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let mut plans = [None, None];
        let mut ok = true;
        for (slot, bucket, n) in [
            (0, self.bandwidth.as_mut(), bytes),
            (1, self.ops.as_mut(), ops),
        ] {
            if let Some(b) = bucket.filter(|_| n > 0) {
                b.refill(now);
                plans[slot] = b.plan(n);
                ok &= plans[slot].is_some();
            }
        }
        if ok {
            for (b, p) in [
                (self.bandwidth.as_mut(), plans[0]),
                (self.ops.as_mut(), plans[1]),
            ] {
                if let (Some(b), Some(p)) = (b, p) {
                    b.commit(p);
                }
            }
            return true;
        }
        let wait = [(self.bandwidth.as_mut(), bytes), (self.ops.as_mut(), ops)]
            .into_iter()
            .filter_map(|(b, n)| b.map(|b| b.time_until(n, now)))
            .max()
            .unwrap_or(Duration::ZERO)
            .max(MIN_WAIT);
        match self.timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            // Without a timer nothing would wake the device: refuse this
            // once and let the next kick retry.
            Err(e) => log::error!("rate limiter: cannot arm timer: {e}"),
        }
        false
    }

    /// Applies a run-time `update`: replaced buckets start full, kept ones
    /// keep their tokens. A blocked limiter is unblocked (its timer
    /// disarmed) so the device re-checks its queue under the new limits.
    pub fn update(&mut self, update: &RateLimiterUpdate) {
        let now = Instant::now();
        for (slot, u) in [
            (&mut self.bandwidth, update.bandwidth),
            (&mut self.ops, update.ops),
        ] {
            match u {
                BucketUpdate::Keep => {}
                BucketUpdate::Disable => *slot = None,
                BucketUpdate::Set(cfg) => *slot = TokenBucket::new(&cfg, now),
            }
        }
        if self.blocked && !update.is_noop() {
            // A zero expiry disarms the timer; a failure only means an
            // extra (harmless) wake-up later.
            let _ = self.timer.reset(Duration::ZERO, None);
            self.blocked = false;
        }
    }

    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Call when the timer fd is readable: unblocks the limiter.
    pub fn event_handler(&mut self) {
        // Non-blocking: EAGAIN (already read) is harmless.
        let _ = self.timer.wait();
        self.blocked = false;
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd to wait on (readable when a blocked limiter may retry).
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

/// For devices: whether a request of `ops` operations and `bytes` bytes may
/// be served now (always, without a limiter). When this request is the one
/// that blocks the limiter, counts one throttling episode in `throttled`;
/// requests refused while already blocked are not counted again.
pub fn admit(
    limiter: Option<&mut RateLimiter>,
    ops: u64,
    bytes: u64,
    throttled: &AtomicU64,
) -> bool {
    let Some(rl) = limiter.filter(|l| !l.is_unlimited()) else {
        return true;
    };
    if rl.is_blocked() {
        return false;
    }
    let ok = rl.consume_request(ops, bytes);
    if !ok {
        throttled.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

/// Builds a limiter when `cfg` limits anything; `None` otherwise.
pub fn build(cfg: Option<&RateLimiterConfig>) -> io::Result<Option<RateLimiter>> {
    match cfg {
        Some(c) if !c.is_unlimited() => RateLimiter::new(c).map(Some),
        _ => Ok(None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, ms: u64, t0: Instant) -> TokenBucket {
        let cfg = TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: ms,
        };
        TokenBucket::new(&cfg, t0).unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Waits (at most 2 s) for the limiter's timer, then lets it resume.
    pub(crate) fn wait_for_timer(rl: &mut RateLimiter) {
        let mut p = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and the count says one.
        let ready = unsafe { libc::poll(&mut p, 1, 2000) };
        assert_eq!(ready, 1, "timer never fired");
        rl.event_handler();
        assert!(!rl.is_blocked());
    }

    #[test]
    fn starts_full_and_refills_linearly() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 100, t0);
        assert_eq!(b.available(t0), 1000);
        assert!(b.reduce(1000, t0));
        assert!(!b.reduce(1, t0));
        // 10 tokens per ms.
        assert_eq!(b.available(t0 + ms(1)), 10);
        assert_eq!(b.available(t0 + ms(25)), 250);
        assert!(!b.reduce(251, t0 + ms(25)), "failure takes nothing");
        assert!(b.reduce(250, t0 + ms(25)));
        assert_eq!(b.available(t0 + ms(25)), 0);
        // Never beyond the size.
        assert_eq!(b.available(t0 + ms(10_000)), 1000);
        // A clock that goes backwards changes nothing.
        assert_eq!(b.available(t0), 1000);
    }

    #[test]
    fn no_token_lost_to_rounding() {
        // 3 tokens per 1000 ms: a third of a token every 111 ms.
        let t0 = Instant::now();
        let mut b = bucket(3, 0, 1000, t0);
        assert!(b.reduce(3, t0));
        let mut t = t0;
        for _ in 0..9 {
            t += Duration::from_nanos(111_111_111);
            b.refill(t);
        }
        // 999_999_999 ns: just short of 3 tokens.
        assert_eq!(b.available(t), 2);
        assert_eq!(b.available(t + Duration::from_nanos(1)), 3);
    }

    #[test]
    fn time_until_is_exact() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 100, t0);
        assert_eq!(b.time_until(1000, t0), Duration::ZERO);
        assert!(b.reduce(1000, t0));
        assert_eq!(b.time_until(500, t0), ms(50));
        assert_eq!(b.time_until(1, t0), Duration::from_micros(100));
        let t = t0 + ms(50);
        assert_eq!(b.time_until(500, t), Duration::ZERO);
        assert!(b.reduce(500, t));
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut b = bucket(100, 250, 1000, t0);
        assert_eq!(b.available(t0), 350);
        assert!(b.reduce(200, t0));
        assert_eq!(b.one_time_burst(), 50);
        assert_eq!(b.available(t0), 150);
        // 50 from the burst, 100 from the budget.
        assert!(b.reduce(150, t0));
        assert_eq!((b.one_time_burst(), b.available(t0)), (0, 0));
        // Only the size comes back.
        assert_eq!(b.available(t0 + ms(60_000)), 100);
        // size + burst fits exactly, from a full bucket.
        let mut b = bucket(100, 50, 1000, t0);
        assert!(b.reduce(150, t0));
        assert_eq!(b.available(t0), 0);
    }

    #[test]
    fn oversized_requests_pass_on_a_full_bucket_and_leave_a_debt() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 100, t0);
        assert!(b.reduce(10, t0));
        // Not full: the oversized request waits until it is.
        assert!(!b.reduce(250, t0));
        assert_eq!(b.time_until(250, t0), ms(10));
        let t = t0 + ms(10);
        assert!(b.reduce(250, t));
        // 150 tokens of debt, then 10 more: 160 ms.
        assert_eq!(b.time_until(10, t), ms(160));
        assert_eq!(b.available(t + ms(100)), 0);
        assert!(!b.reduce(10, t + ms(159)));
        assert!(b.reduce(10, t + ms(160)));
    }

    fn limiter(cfg: &str) -> RateLimiter {
        RateLimiter::new(&RateLimiterConfig::parse_opts(cfg).unwrap()).unwrap()
    }

    #[test]
    fn limiter_takes_both_buckets_or_neither() {
        let t0 = Instant::now();
        let mut rl = limiter("bw=1000/1000,ops=2/1000");
        // Replace the buckets' clocks with ours.
        rl.bandwidth = Some(bucket(1000, 0, 1000, t0));
        rl.ops = Some(bucket(2, 0, 1000, t0));
        assert!(rl.consume_at(1, 600, t0));
        // Bandwidth refuses: the op is not taken either.
        assert!(!rl.consume_at(1, 600, t0));
        assert!(rl.is_blocked());
        assert_eq!(rl.ops.as_mut().unwrap().available(t0), 1);
        assert_eq!(rl.bandwidth.as_mut().unwrap().available(t0), 400);
        // Blocked: even a request that would fit is refused until the timer.
        assert!(!rl.consume_at(1, 1, t0));
        rl.blocked = false;
        assert!(rl.consume_at(1, 400, t0));
        assert!(!rl.consume_at(1, 0, t0), "ops bucket empty");
    }

    #[test]
    fn limiter_timer_fires_when_tokens_are_back() {
        let mut rl = limiter("ops=1/60");
        assert!(rl.consume(1, TokenType::Ops));
        assert!(
            rl.consume(5, TokenType::Bytes),
            "no bandwidth bucket: unlimited"
        );
        let start = Instant::now();
        assert!(!rl.consume(1, TokenType::Ops));
        assert!(rl.is_blocked());
        wait_for_timer(&mut rl);
        let waited = start.elapsed();
        assert!(waited >= ms(50), "{waited:?}");
        assert!(rl.consume(1, TokenType::Ops));
        // A spurious event handler call does not block on the timerfd.
        rl.event_handler();
    }

    #[test]
    fn unlimited_configs_build_no_limiter() {
        assert!(build(None).unwrap().is_none());
        let zero = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 0,
                one_time_burst: 5,
                refill_time_ms: 100,
            }),
            ops: Some(TokenBucketConfig {
                size: 5,
                one_time_burst: 0,
                refill_time_ms: 0,
            }),
        };
        assert!(zero.is_unlimited());
        assert!(build(Some(&zero)).unwrap().is_none());
        assert!(build(Some(&RateLimiterConfig::default()))
            .unwrap()
            .is_none());
        let cfg = RateLimiterConfig::parse_opts("ops=1/1").unwrap();
        assert!(build(Some(&cfg)).unwrap().is_some());
    }

    #[test]
    fn parses_options() {
        let c = RateLimiterConfig::parse_opts("bw=10485760/1000,ops=500:100/250").unwrap();
        assert_eq!(
            c,
            RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig {
                    size: 10485760,
                    one_time_burst: 0,
                    refill_time_ms: 1000
                }),
                ops: Some(TokenBucketConfig {
                    size: 500,
                    one_time_burst: 100,
                    refill_time_ms: 250
                }),
            }
        );
        assert_eq!(c.to_string(), "bw=10485760/1000,ops=500:100/250");
        let c = RateLimiterConfig::parse_opts("ops=5/10").unwrap();
        assert_eq!(c.bandwidth, None);
        assert_eq!(RateLimiterConfig::parse_opts(&c.to_string()), Ok(c));
        let mut c = RateLimiterConfig::default();
        c.apply_opt("bw", "1:2/3").unwrap();
        assert_eq!(c.bandwidth.unwrap().one_time_burst, 2);
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        use RateLimiterParseError as E;
        let p = RateLimiterConfig::parse_opts;
        assert_eq!(p(""), Err(E::Empty));
        assert_eq!(p("bw=1/1,"), Err(E::Empty));
        assert_eq!(p("iops=1/1"), Err(E::UnknownKey("iops".into())));
        assert_eq!(p("bw"), Err(E::UnknownKey("bw".into())));
        assert_eq!(p("ops=1/1,ops=2/2"), Err(E::Duplicate("ops".into())));
        for (bad, needle) in [
            ("bw=100", "missing /MS"),
            ("bw=/100", "size \"\" is not a decimal number"),
            ("bw=1M/100", "size \"1M\" is not a decimal number"),
            ("bw=-1/100", "is not a decimal number"),
            ("bw=100:/100", "burst \"\" is not"),
            ("bw=100:x/100", "burst \"x\" is not"),
            ("ops=100/1.5", "refill time \"1.5\" is not"),
            ("ops=100/", "refill time \"\" is not"),
            ("ops=0/100", "size must be at least 1"),
            ("ops=10/0", "refill time must be at least 1 ms"),
            ("bw=99999999999999999999/1", "too large"),
        ] {
            let e = p(bad).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, E::Value { .. }), "{bad}: {e:?}");
            assert!(msg.contains(needle), "{bad}: {msg}");
            assert!(msg.contains("N[:BURST]/MS"), "{bad}: {msg}");
        }
    }

    #[test]
    fn runtime_updates_replace_keep_or_remove_buckets() {
        let bw = |size, ms| TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: ms,
        };
        // The PATCH meaning of each bucket.
        assert_eq!(BucketUpdate::from_patch(None), BucketUpdate::Keep);
        assert_eq!(
            BucketUpdate::from_patch(Some(bw(0, 100))),
            BucketUpdate::Disable
        );
        assert_eq!(
            BucketUpdate::from_patch(Some(bw(10, 0))),
            BucketUpdate::Disable
        );
        assert_eq!(
            BucketUpdate::from_patch(Some(bw(10, 100))),
            BucketUpdate::Set(bw(10, 100))
        );
        let mut cfg = RateLimiterConfig {
            bandwidth: Some(bw(100, 1000)),
            ops: Some(bw(5, 1000)),
        };
        let upd = RateLimiterUpdate::from_patch(&RateLimiterConfig {
            bandwidth: Some(bw(50, 10)),
            ops: None,
        });
        cfg.apply_update(&upd);
        assert_eq!(cfg.bandwidth, Some(bw(50, 10)));
        assert_eq!(cfg.ops, Some(bw(5, 1000)), "an absent bucket is kept");

        // An unlimited limiter admits everything, and an update limits it.
        let mut rl = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        let n = AtomicU64::new(0);
        assert!(rl.is_unlimited());
        assert!(admit(Some(&mut rl), 1, u64::MAX / 2, &n));
        rl.update(&RateLimiterUpdate {
            bandwidth: BucketUpdate::Set(bw(1000, 60_000)),
            ops: BucketUpdate::Keep,
        });
        assert!(!rl.is_unlimited());
        assert!(admit(Some(&mut rl), 1, 1000, &n));
        assert!(!admit(Some(&mut rl), 1, 1, &n), "the new bucket is spent");
        assert!(rl.is_blocked());
        assert_eq!(n.load(Ordering::Relaxed), 1);
        // A kept bucket stays spent (still blocked after a no-op update).
        rl.update(&RateLimiterUpdate::default());
        assert!(rl.is_blocked());
        // Removing the bucket unblocks at once.
        rl.update(&RateLimiterUpdate {
            bandwidth: BucketUpdate::Disable,
            ops: BucketUpdate::Keep,
        });
        assert!(!rl.is_blocked());
        assert!(rl.is_unlimited());
        assert!(admit(Some(&mut rl), 1, 1 << 40, &n));
        // Replacing a spent bucket gives a full one.
        rl.update(&RateLimiterUpdate {
            bandwidth: BucketUpdate::Keep,
            ops: BucketUpdate::Set(bw(2, 60_000)),
        });
        assert!(admit(Some(&mut rl), 1, 0, &n));
        assert!(admit(Some(&mut rl), 1, 0, &n));
        assert!(!admit(Some(&mut rl), 1, 0, &n));
        rl.update(&RateLimiterUpdate {
            bandwidth: BucketUpdate::Keep,
            ops: BucketUpdate::Set(bw(2, 60_000)),
        });
        assert!(!rl.is_blocked());
        assert!(admit(Some(&mut rl), 1, 0, &n));
    }
}
