//! The CPU kernels' worker threads: started once, they spin briefly between jobs (a decode step calls the
//! kernels a few hundred times, microseconds apart) and then sleep. A job is `tasks` calls of one closure;
//! the caller takes tasks too and returns when every task has run. No allocation per job.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

/// How long an idle worker spins before it sleeps: long enough to catch a decode step's next kernel, short
/// enough not to take a core from candle's threads between our kernels (at 2^16 rounds, a 2-core LoRA
/// training step of SmolLM2 took 3.3 s, at 2^12 2.8–2.9 s, and prefill was no slower).
const SPIN_ROUNDS: u32 = 1 << 12;

type Job = *const (dyn Fn(usize) + Sync);

struct Published {
    job: Option<SendJob>,
    tasks: usize,
    generation: u32,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the closure is `Sync` and outlives every call made through this pointer (see `Pool::run`).
unsafe impl Send for SendJob {}

pub struct Pool {
    threads: usize,
    published: Mutex<Published>,
    wake: Condvar,
    /// The job's generation (high 32 bits) and its next unclaimed task (low 32 bits), claimed by CAS, so that
    /// a worker still holding an older job can never claim a task of a newer one.
    next: AtomicU64,
    /// Tasks of the current job that have finished.
    done: AtomicUsize,
    /// The generation workers watch while spinning.
    generation: AtomicU64,
    /// Serializes callers (a second thread calling the kernels waits for the first job to end).
    caller: Mutex<()>,
}

impl Pool {
    fn new(threads: usize) -> Self {
        Pool {
            threads: threads.max(1),
            published: Mutex::new(Published { job: None, tasks: 0, generation: 0 }),
            wake: Condvar::new(),
            next: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            caller: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Claims and runs tasks of generation `generation` until none are left.
    fn work(&self, generation: u32, tasks: usize, job: &(dyn Fn(usize) + Sync)) {
        loop {
            let cur = self.next.load(Ordering::Acquire);
            if (cur >> 32) as u32 != generation || (cur as u32 as usize) >= tasks {
                return;
            }
            if self.next.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                continue;
            }
            job(cur as u32 as usize);
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn worker(&'static self) {
        let mut seen = 0u32;
        loop {
            let mut spins = 0;
            while self.generation.load(Ordering::Acquire) as u32 == seen && spins < SPIN_ROUNDS {
                std::hint::spin_loop();
                spins += 1;
            }
            let (job, tasks, generation) = {
                let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
                while p.generation == seen {
                    p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                (p.job, p.tasks, p.generation)
            };
            seen = generation;
            if let Some(SendJob(job)) = job {
                // SAFETY: a task of this generation can only be claimed while its caller waits in `run`, so
                // the closure is alive whenever `work` calls it.
                self.work(generation, tasks, unsafe { &*job });
            }
        }
    }

    /// Runs `f(0..tasks)` across the pool's threads and the caller's; returns when all have run.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.threads == 1 || tasks == 1 {
            (0..tasks).for_each(f);
            return;
        }
        let _one_caller = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY (lifetime erasure): the pointer is only dereferenced for tasks of this generation, and this
        // function does not return before every one of them has finished.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        let generation = {
            let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
            p.generation = p.generation.wrapping_add(1).max(1);
            p.job = Some(SendJob(job));
            p.tasks = tasks;
            self.done.store(0, Ordering::Release);
            self.next.store((p.generation as u64) << 32, Ordering::Release);
            self.generation.store(p.generation as u64, Ordering::Release);
            p.generation
        };
        self.wake.notify_all();
        self.work(generation, tasks, f);
        while self.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
    }
}

/// Threads the CPU kernels use: `BILLION_THREADS`, else one per physical core (a second hardware thread
/// on a core adds no memory bandwidth to a product, only contention).
pub fn configured_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("BILLION_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| num_cpus::get_physical().max(1))
    })
}

/// Call at the start of `main`, before any thread exists: candle asks for its thread count on every CPU
/// matrix product and, unless `RAYON_NUM_THREADS` is set, answers by reading `/proc/cpuinfo` each time (a
/// visible share of a small model's decode step). Setting it once to our count answers for the process.
///
/// Candle's element-wise threads spin 25,000 rounds between ops before they sleep; with our workers and
/// candle's matrix threads on the same cores that spinning takes cycles from the work, so it is cut to 2,048
/// unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set.
pub fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", configured_threads().to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2048");
    }
}

/// The process's pool, started on first use.
pub fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(configured_threads())));
        for i in 1..pool.threads {
            let spawned = std::thread::Builder::new().name(format!("billion-cpu-{i}")).spawn(move || pool.worker());
            if spawned.is_err() {
                // Without that worker the caller and the others still run every task.
                break;
            }
        }
        pool
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Every task runs exactly once per job, over many jobs in a row (stale workers never run a newer job's
    /// tasks with an older closure).
    #[test]
    fn every_task_runs_once() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(3)));
        for _ in 1..pool.threads {
            std::thread::spawn(move || pool.worker());
        }
        for round in 0..2000usize {
            let tasks = 1 + round % 37;
            let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            pool.run(tasks, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "round {round}");
        }
    }
}
