//! Functions, their instances and the keep-alive loop.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::agent::CallResult;
use crate::policy::{Basis, Histogram};
use crate::vm::{build_template, Instance, Spawner, Template};
use crate::{validate_name, FunctionSpec, ServeConfig, ServeError};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a call got its instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Restored from the snapshot for this call.
    Cold,
    /// An instance left idle by an earlier call.
    Warm,
    /// An instance the policy restored ahead of the call.
    Prewarmed,
}

impl Start {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Start::Cold => "cold",
            Start::Warm => "warm",
            Start::Prewarmed => "prewarmed",
        }
    }
}

/// An instance counted against the host's limit while it lives.
struct Live {
    inst: Instance,
    prewarmed: bool,
    count: Arc<AtomicUsize>,
}

impl Drop for Live {
    fn drop(&mut self) {
        // The VMM is gone before its slot is free again.
        self.inst.stop();
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `now + d`, or a year from now if that overflows.
fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

struct Idle {
    live: Live,
    expires: Instant,
}

#[derive(Default)]
struct FnState {
    idle: Vec<Idle>,
    busy: usize,
    went_idle: Option<Instant>,
    hist: Histogram,
    prewarm_at: Option<Instant>,
    prewarming: bool,
    deleted: bool,
    invocations: u64,
    cold_starts: u64,
    warm_starts: u64,
    prewarms: u64,
    unloads: u64,
    errors: u64,
    last_cold_start_ms: Option<f64>,
}

struct Function {
    name: String,
    spec: FunctionSpec,
    dir: PathBuf,
    template: Template,
    snapshot_ms: f64,
    st: Mutex<FnState>,
}

/// The keep-alive window now in force for a function.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KeepAliveStats {
    /// Fixed, out_of_range or histogram.
    pub basis: Basis,
    /// Unload at once and pre-warm after this long (0: stay loaded).
    pub prewarm_ms: u64,
    /// Then keep the instance this long.
    pub keep_alive_ms: u64,
    /// Idle times learned.
    pub samples: u64,
}

/// What `GET /functions/{name}` shows.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FunctionStats {
    /// The name.
    pub name: String,
    /// The definition.
    #[serde(flatten)]
    pub spec: FunctionSpec,
    /// Instances waiting for a call.
    pub idle_instances: usize,
    /// Instances running a call.
    pub busy_instances: usize,
    /// VMM process ids of the idle instances.
    pub idle_pids: Vec<u32>,
    /// Calls so far.
    pub invocations: u64,
    /// Calls that restored an instance.
    pub cold_starts: u64,
    /// Calls that found an instance loaded (by an earlier call or the policy).
    pub warm_starts: u64,
    /// Instances the policy restored ahead of a call.
    pub prewarms: u64,
    /// Idle instances the policy stopped.
    pub unloads: u64,
    /// Calls answered 502, 503 or 504 (not counting non-zero exits).
    pub errors: u64,
    /// Boot-to-snapshot time of the template, ms.
    pub snapshot_ms: f64,
    /// Restore-to-agent-answer time of the latest cold start, ms.
    pub last_cold_start_ms: Option<f64>,
    /// The policy's current window.
    pub keep_alive: KeepAliveStats,
}

/// A finished call.
#[derive(Debug)]
pub struct Invocation {
    /// What the command returned.
    pub result: CallResult,
    /// How the instance was found.
    pub start: Start,
    /// The instance's VMM pid.
    pub pid: u32,
}

/// The function runtime.
pub struct Runtime {
    cfg: ServeConfig,
    spawner: Spawner,
    functions: Mutex<HashMap<String, Arc<Function>>>,
    creating: Mutex<HashSet<String>>,
    live: Arc<AtomicUsize>,
    next_id: AtomicU64,
}

impl Runtime {
    /// Creates the state directory and starts the keep-alive thread.
    pub fn new(cfg: ServeConfig) -> Result<Arc<Self>, ServeError> {
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| ServeError::Io(format!("creating {}: {e}", cfg.dir.display())))?;
        let spawner = Spawner::new().map_err(|e| ServeError::Io(format!("spawner: {e}")))?;
        let rt = Arc::new(Self {
            cfg,
            spawner,
            functions: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            live: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&rt);
        let tick = rt.cfg.tick;
        std::thread::Builder::new()
            .name("kiln_serve_keepalive".into())
            .spawn(move || keep_alive_loop(weak, tick))
            .map_err(|e| ServeError::Io(format!("keep-alive thread: {e}")))?;
        Ok(rt)
    }

    /// Running instances, all functions together.
    pub fn live_instances(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    fn get(&self, name: &str) -> Result<Arc<Function>, ServeError> {
        lock(&self.functions)
            .get(name)
            .cloned()
            .ok_or_else(|| ServeError::NoFunction(name.to_string()))
    }

    /// Registers `name`: boots its template VM and snapshots it.
    pub fn register(&self, name: &str, spec: FunctionSpec) -> Result<(), ServeError> {
        validate_name(name)?;
        spec.validate()?;
        {
            let functions = lock(&self.functions);
            let mut creating = lock(&self.creating);
            if functions.contains_key(name) || !creating.insert(name.to_string()) {
                return Err(ServeError::BadRequest(format!(
                    "Function '{name}' exists: DELETE it first."
                )));
            }
        }
        let result = self.create(name, &spec);
        let mut functions = lock(&self.functions);
        lock(&self.creating).remove(name);
        functions.insert(name.to_string(), Arc::new(result?));
        drop(functions);
        log::info!("function {name} ready");
        Ok(())
    }

    fn create(&self, name: &str, spec: &FunctionSpec) -> Result<Function, ServeError> {
        // A directory per registration: a function deleted and registered
        // again never shares files with the old one's instances.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dir = self.cfg.dir.join(format!("{name}.{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServeError::Io(format!("creating {}: {e}", dir.display())))?;
        let t = Instant::now();
        let template = build_template(
            &self.spawner,
            &self.cfg.vm,
            &dir,
            spec.vcpu_count,
            spec.mem_size_mib,
            spec.setup.as_deref(),
            spec.rootfs.as_deref(),
        )
        .map_err(|e| {
            let _ = std::fs::remove_dir_all(&dir);
            match e {
                ServeError::BadRequest(m) => {
                    ServeError::BadRequest(format!("Function '{name}': {m}"))
                }
                e => ServeError::Vm(format!("Function '{name}': {e}")),
            }
        })?;
        Ok(Function {
            name: name.to_string(),
            spec: spec.clone(),
            dir,
            template,
            snapshot_ms: t.elapsed().as_secs_f64() * 1e3,
            st: Mutex::new(FnState::default()),
        })
    }

    /// Removes `name`, stopping its idle instances (busy ones stop when
    /// their call ends).
    pub fn delete(&self, name: &str) -> Result<(), ServeError> {
        let f = lock(&self.functions)
            .remove(name)
            .ok_or_else(|| ServeError::NoFunction(name.to_string()))?;
        let idle = {
            let mut st = lock(&f.st);
            st.deleted = true;
            st.prewarm_at = None;
            std::mem::take(&mut st.idle)
        };
        drop(idle);
        let _ = std::fs::remove_dir_all(&f.dir);
        Ok(())
    }

    /// Stops every instance and forgets every function (files stay).
    pub fn shutdown(&self) {
        let all: Vec<_> = lock(&self.functions).drain().map(|(_, f)| f).collect();
        for f in all {
            let idle = {
                let mut st = lock(&f.st);
                st.deleted = true;
                std::mem::take(&mut st.idle)
            };
            drop(idle);
        }
    }

    /// Stops the idle instance (of any function) closest to its expiry;
    /// false when none is idle.
    fn evict_one(&self) -> bool {
        let functions: Vec<Arc<Function>> = lock(&self.functions).values().cloned().collect();
        let oldest = functions
            .iter()
            .filter_map(|f| {
                let st = lock(&f.st);
                st.idle.iter().map(|i| i.expires).min().map(|e| (e, f))
            })
            .min_by_key(|(e, _)| *e);
        let Some((_, f)) = oldest else {
            return false;
        };
        let victim = {
            let mut st = lock(&f.st);
            let i = st
                .idle
                .iter()
                .enumerate()
                .min_by_key(|(_, i)| i.expires)
                .map(|(i, _)| i);
            i.map(|i| {
                st.unloads += 1;
                st.idle.remove(i)
            })
        };
        // Another call may have taken it meanwhile: then try again.
        victim.is_some() || self.live_instances() < self.cfg.max_instances
    }

    fn start_instance(&self, f: &Function, prewarmed: bool) -> Result<Live, ServeError> {
        let mut tries = 0;
        while self.live.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_instances {
            self.live.fetch_sub(1, Ordering::SeqCst);
            tries += 1;
            // A pre-warm never pushes out another function's instance.
            if prewarmed || tries > 8 || !self.evict_one() {
                return Err(ServeError::Busy(format!(
                    "All {} instances this host allows are busy.",
                    self.cfg.max_instances
                )));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match Instance::restore(&self.spawner, &self.cfg.vm, &f.template, &f.dir, id) {
            Ok(inst) => Ok(Live {
                inst,
                prewarmed,
                count: self.live.clone(),
            }),
            Err(e) => {
                self.live.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Calls `name` with `input`.
    pub fn invoke(&self, name: &str, input: &[u8]) -> Result<Invocation, ServeError> {
        let f = self.get(name)?;
        let now = Instant::now();
        let taken = {
            let mut st = lock(&f.st);
            if st.busy == 0 {
                if let Some(t) = st.went_idle.take() {
                    st.hist.record(&self.cfg.policy, now.duration_since(t));
                }
            }
            st.prewarm_at = None;
            st.busy += 1;
            st.invocations += 1;
            let taken = st.idle.pop().map(|i| i.live);
            if taken.is_some() {
                st.warm_starts += 1;
            } else {
                st.cold_starts += 1;
            }
            taken
        };
        let (mut live, start) = match taken {
            Some(l) if l.prewarmed => (l, Start::Prewarmed),
            Some(l) => (l, Start::Warm),
            None => {
                let t = Instant::now();
                match self.start_instance(&f, false) {
                    Ok(l) => {
                        lock(&f.st).last_cold_start_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                        (l, Start::Cold)
                    }
                    Err(e) => {
                        self.finish(&f, None, true);
                        return Err(e);
                    }
                }
            }
        };
        live.prewarmed = false;
        let timeout = Duration::from_millis(f.spec.timeout_ms);
        let pid = live.inst.pid();
        match live.inst.conn.call(&f.spec.command, input, timeout) {
            Ok(result) => {
                self.finish(&f, Some(live), false);
                Ok(Invocation { result, start, pid })
            }
            Err(e) => {
                let note = live.inst.exit_note();
                drop(live);
                self.finish(&f, None, true);
                let timed_out = matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
                if timed_out {
                    Err(ServeError::Timeout(format!(
                        "Function '{name}' did not answer within {} ms; its instance was stopped.",
                        f.spec.timeout_ms
                    )))
                } else {
                    Err(ServeError::Vm(format!(
                        "Function '{name}': the instance failed ({e}){}{note}; it was stopped.",
                        if note.is_empty() { "" } else { ": " }
                    )))
                }
            }
        }
    }

    /// A call ended: return its instance (if still usable) and apply the
    /// policy when the function goes idle.
    fn finish(&self, f: &Function, live: Option<Live>, failed: bool) {
        let now = Instant::now();
        let mut stop = Vec::new();
        {
            let mut st = lock(&f.st);
            st.busy -= 1;
            if failed {
                st.errors += 1;
            }
            let w = st.hist.window(&self.cfg.policy);
            match live {
                Some(l) if !st.deleted => st.idle.push(Idle {
                    live: l,
                    expires: deadline(now, w.keep_alive),
                }),
                other => stop.extend(other),
            }
            if st.busy == 0 && !st.deleted {
                st.went_idle = Some(now);
                if !w.prewarm.is_zero() {
                    let n = st.idle.len() as u64;
                    st.unloads += n;
                    stop.extend(st.idle.drain(..).map(|i| i.live));
                    st.prewarm_at = Some(deadline(now, w.prewarm));
                }
            }
        }
        drop(stop);
    }

    /// Statistics of `name`.
    pub fn stats(&self, name: &str) -> Result<FunctionStats, ServeError> {
        let f = self.get(name)?;
        let st = lock(&f.st);
        let w = st.hist.window(&self.cfg.policy);
        Ok(FunctionStats {
            name: f.name.clone(),
            spec: f.spec.clone(),
            idle_instances: st.idle.len(),
            busy_instances: st.busy,
            idle_pids: st.idle.iter().map(|i| i.live.inst.pid()).collect(),
            invocations: st.invocations,
            cold_starts: st.cold_starts,
            warm_starts: st.warm_starts,
            prewarms: st.prewarms,
            unloads: st.unloads,
            errors: st.errors,
            snapshot_ms: f.snapshot_ms,
            last_cold_start_ms: st.last_cold_start_ms,
            keep_alive: KeepAliveStats {
                basis: w.basis,
                prewarm_ms: w.prewarm.as_millis() as u64,
                keep_alive_ms: w.keep_alive.as_millis() as u64,
                samples: st.hist.samples(),
            },
        })
    }

    /// Statistics of every function, by name.
    pub fn list(&self) -> Vec<FunctionStats> {
        let mut names: Vec<String> = lock(&self.functions).keys().cloned().collect();
        names.sort();
        names.iter().filter_map(|n| self.stats(n).ok()).collect()
    }

    /// One pass of the keep-alive loop.
    fn tick(self: &Arc<Self>) {
        let now = Instant::now();
        let functions: Vec<Arc<Function>> = lock(&self.functions).values().cloned().collect();
        for f in functions {
            let mut stop = Vec::new();
            let mut prewarm = false;
            {
                let mut st = lock(&f.st);
                let (expired, keep): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut st.idle)
                    .into_iter()
                    .partition(|i| i.expires <= now);
                st.idle = keep;
                st.unloads += expired.len() as u64;
                stop.extend(expired);
                if let Some(at) = st.prewarm_at {
                    if at <= now && st.idle.is_empty() && st.busy == 0 && !st.prewarming {
                        st.prewarm_at = None;
                        st.prewarming = true;
                        prewarm = true;
                    }
                }
            }
            drop(stop);
            if prewarm {
                let rt = self.clone();
                let f2 = f.clone();
                let spawned = std::thread::Builder::new()
                    .name("kiln_serve_prewarm".into())
                    .spawn(move || rt.prewarm(&f2));
                if let Err(e) = spawned {
                    log::warn!("pre-warm thread: {e}");
                    lock(&f.st).prewarming = false;
                }
            }
        }
    }

    fn prewarm(&self, f: &Function) {
        let r = self.start_instance(f, true);
        let mut st = lock(&f.st);
        st.prewarming = false;
        let unused = match r {
            Ok(l) if !st.deleted => {
                let w = st.hist.window(&self.cfg.policy);
                st.prewarms += 1;
                st.idle.push(Idle {
                    live: l,
                    expires: deadline(Instant::now(), w.keep_alive),
                });
                None
            }
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("pre-warming {}: {e}", f.name);
                None
            }
        };
        drop(st);
        drop(unused);
    }
}

fn keep_alive_loop(rt: Weak<Runtime>, tick: Duration) {
    loop {
        std::thread::sleep(tick);
        match rt.upgrade() {
            Some(rt) => rt.tick(),
            None => return,
        }
    }
}
