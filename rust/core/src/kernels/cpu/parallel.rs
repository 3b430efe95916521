//! A small team of persistent worker threads for the CPU forward pass.
//!
//! One decode step of a small model is a few hundred short parallel regions (each projection,
//! each attention layer), most of them well under 100 µs. A general task pool pays a wake-up per
//! region; here the workers spin between regions for a short while (as llama.cpp's do), so
//! handing out a region costs well under a microsecond while the model is decoding, and they
//! sleep on a condition variable once the engine goes quiet.
//!
//! Work is split into numbered tasks that the calling thread and the workers claim one at a time;
//! every task's result depends only on its number, so outputs do not depend on the thread count.

use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it goes to sleep.
const SPIN: Duration = Duration::from_micros(300);

type Job<'a> = dyn Fn(usize) + Sync + 'a;

struct Shared {
    /// The region's number, its task count and the next task to claim, packed so that one
    /// compare-and-swap both checks and claims (see [`pack`]).
    state: AtomicU64,
    /// The current region's job, replaced only while no task is claimable.
    job: Mutex<Option<&'static Job<'static>>>,
    done: AtomicUsize,
    sleepers: AtomicUsize,
    worker_panicked: AtomicBool,
    wake_lock: Mutex<()>,
    wake: Condvar,
}

pub(crate) struct Team {
    shared: Arc<Shared>,
    threads: usize,
    /// Serialises regions: engines used from several threads take turns.
    busy: Mutex<()>,
}

impl Team {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: Mutex::new(None),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            worker_panicked: AtomicBool::new(false),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut started = 1;
        for i in 1..threads {
            let s = shared.clone();
            let spawned = thread::Builder::new()
                .name(format!("peftscale-{i}"))
                .spawn(move || worker(&s));
            if spawned.is_ok() {
                started += 1;
            }
        }
        Self {
            shared,
            threads: started,
            busy: Mutex::new(()),
        }
    }

    /// Threads that share the work, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job(0) .. job(tasks - 1)` across the team and returns when all have finished.
    pub fn run(&self, tasks: usize, job: &Job<'_>) {
        if tasks == 0 {
            return;
        }
        if tasks == 1 || self.threads == 1 || tasks > MAX_TASKS {
            (0..tasks).for_each(job);
            return;
        }
        let _turn = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the reference is cleared below before this function returns, and workers only
        // call it for tasks claimed in this region, all of which finish before `done` reaches
        // `tasks`; so it is never used after `job`'s lifetime ends.
        let job_static: &'static Job<'static> =
            unsafe { std::mem::transmute::<&Job<'_>, &'static Job<'static>>(job) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job_static);
        s.done.store(0, Ordering::Relaxed);
        let region = (region_of(s.state.load(Ordering::Relaxed)) + 1) & REGION_MASK;
        s.state
            .store(pack(region, tasks as u64, 0), Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| claim_tasks(s, region, job)));
        while s.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // A task that panicked is a bug; it surfaces on the caller, never as a hang.
        if let Err(panic) = mine {
            resume_unwind(panic);
        }
        if s.worker_panicked.swap(false, Ordering::AcqRel) {
            panic!("a peftscale worker thread panicked during a parallel region");
        }
    }
}

const TASK_BITS: u32 = 20;
const MAX_TASKS: usize = (1 << TASK_BITS) - 1;
const REGION_MASK: u64 = (1 << (64 - 2 * TASK_BITS)) - 1;

fn pack(region: u64, tasks: u64, next: u64) -> u64 {
    (region << (2 * TASK_BITS)) | (tasks << TASK_BITS) | next
}

fn region_of(state: u64) -> u64 {
    state >> (2 * TASK_BITS)
}

/// Claims and runs tasks of region `region` until none are left.
fn claim_tasks(s: &Shared, region: u64, run: impl Fn(usize)) {
    let low = (1u64 << TASK_BITS) - 1;
    let mut cur = s.state.load(Ordering::Acquire);
    while region_of(cur) == region && (cur & low) < ((cur >> TASK_BITS) & low) {
        match s
            .state
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // Counted as done even when it panics, so the caller never waits forever.
                let ran = catch_unwind(AssertUnwindSafe(|| run((cur & low) as usize)));
                s.done.fetch_add(1, Ordering::Release);
                if let Err(panic) = ran {
                    resume_unwind(panic);
                }
                cur = s.state.load(Ordering::Acquire);
            }
            Err(now) => cur = now,
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let spin_start = Instant::now();
        let mut spins = 0u32;
        let region = loop {
            let region = region_of(s.state.load(Ordering::Acquire));
            if region != seen {
                break region;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && spin_start.elapsed() > SPIN {
                let mut g = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while region_of(s.state.load(Ordering::SeqCst)) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(g);
            }
            std::hint::spin_loop();
        };
        seen = region;
        // The job is read only once a task of this region is claimed: until every claimed task
        // has finished, the caller keeps the region's job in place.
        let ran = catch_unwind(AssertUnwindSafe(|| {
            claim_tasks(s, region, |i| {
                let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(job) = job {
                    job(i);
                }
            })
        }));
        if ran.is_err() {
            s.worker_panicked.store(true, Ordering::Release);
        }
    }
}

/// An output buffer that the tasks of one region fill at disjoint positions.
pub(crate) struct DisjointOut<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks write through it only at positions no other task touches (see `set`).
unsafe impl Send for DisjointOut<'_> {}
unsafe impl Sync for DisjointOut<'_> {}

impl<'a> DisjointOut<'a> {
    pub fn new(buf: &'a mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// # Safety
    /// No other task of the same region reads or writes position `i`.
    #[inline]
    pub unsafe fn set(&self, i: usize, v: f32) {
        assert!(
            i < self.len,
            "output position {i} outside a buffer of {}",
            self.len
        );
        *self.ptr.add(i) = v;
    }

    fn check_range(&self, start: usize, len: usize) {
        assert!(
            start + len <= self.len,
            "positions {start}..{} outside a buffer of {}",
            start + len,
            self.len
        );
    }

    /// Writes `values` at positions `start..start + values.len()`.
    ///
    /// # Safety
    /// No other task of the same region reads or writes those positions.
    #[inline]
    pub unsafe fn set_slice(&self, start: usize, values: &[f32]) {
        self.check_range(start, values.len());
        std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(start), values.len());
    }

    /// A pointer to positions `start..start + len`, checked to lie in the buffer.
    ///
    /// # Safety
    /// Writes through it follow [`Self::set_slice`]'s rule.
    #[inline]
    pub unsafe fn ptr_at(&self, start: usize, len: usize) -> *mut f32 {
        self.check_range(start, len);
        self.ptr.add(start)
    }

    /// The values at positions `start..start + len`.
    ///
    /// # Safety
    /// No task writes those positions while the returned slice lives.
    #[inline]
    pub unsafe fn read(&self, start: usize, len: usize) -> &[f32] {
        self.check_range(start, len);
        std::slice::from_raw_parts(self.ptr.add(start), len)
    }

    /// Adds `values` to positions `start..start + values.len()`.
    ///
    /// # Safety
    /// No other task of the same region reads or writes those positions.
    #[inline]
    pub unsafe fn add_slice(&self, start: usize, values: &[f32]) {
        self.check_range(start, values.len());
        let out = std::slice::from_raw_parts_mut(self.ptr.add(start), values.len());
        out.iter_mut().zip(values).for_each(|(o, v)| *o += v);
    }
}

/// Splits `rows` output rows into `parts` contiguous ranges (fewer for small matrices) on whole
/// pairs of groups of the quantized kernels' interleaved rows (the tile kernels take two groups
/// at a time). For one input row, one range per thread: each thread then streams its part of
/// the weights in one run, which the hardware prefetcher rewards (eight smaller ranges per
/// thread, claimed dynamically, made a one-row decode step's projections about 40% slower).
pub(crate) fn row_chunks(rows: usize, parts: usize) -> Vec<Range<usize>> {
    let per = rows
        .div_ceil(parts)
        .max(16)
        .next_multiple_of(2 * super::qmatmul::GROUP);
    (0..rows)
        .step_by(per)
        .map(|r| r..(r + per).min(rows))
        .collect()
}

/// Items `0..n` split into one contiguous home run per thread. A thread takes its own run from
/// the front, in order (its weights stream as one run, as [`row_chunks`] gives it); once that is
/// done it takes items from the back of the run with the most left. On a shared machine two
/// cores often run the same work at different speeds, and a fixed split leaves the faster one
/// waiting out the slower one's remainder.
pub(crate) struct StealingRuns {
    /// Per home run, `front << 32 | back`: the items `front..back` are still unclaimed.
    runs: Vec<AtomicU64>,
}

impl StealingRuns {
    pub fn new(n: usize, homes: usize) -> Self {
        let homes = homes.clamp(1, n.max(1));
        let runs = (0..homes)
            .map(|h| {
                let (front, back) = (n * h / homes, n * (h + 1) / homes);
                AtomicU64::new(((front as u64) << 32) | back as u64)
            })
            .collect();
        Self { runs }
    }

    pub fn homes(&self) -> usize {
        self.runs.len()
    }

    /// The next item for the thread working on home run `home`, or `None` when every run is
    /// empty.
    pub fn next(&self, home: usize) -> Option<usize> {
        if let Some(item) = self.take(home, true) {
            return Some(item);
        }
        loop {
            let fullest = (0..self.runs.len())
                .map(|h| (Self::left(self.runs[h].load(Ordering::Relaxed)), h))
                .max()?;
            if fullest.0 == 0 {
                return None;
            }
            if let Some(item) = self.take(fullest.1, false) {
                return Some(item);
            }
        }
    }

    fn left(state: u64) -> u64 {
        (state & 0xFFFF_FFFF).saturating_sub(state >> 32)
    }

    /// Claims the front (or back) item of run `h`, if any is left.
    fn take(&self, h: usize, front: bool) -> Option<usize> {
        let run = &self.runs[h];
        let mut cur = run.load(Ordering::Relaxed);
        loop {
            let (f, b) = (cur >> 32, cur & 0xFFFF_FFFF);
            if f >= b {
                return None;
            }
            let (next, item) = if front {
                (((f + 1) << 32) | b, f)
            } else {
                ((f << 32) | (b - 1), b - 1)
            };
            match run.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(item as usize),
                Err(now) => cur = now,
            }
        }
    }
}

/// Runs `f(index, chunk)` over consecutive chunks of `chunk` elements of `data` on the
/// process-wide team, at least `min_per_task` elements per task (fewer tasks for small inputs,
/// where a hand-off would cost more than the work).
pub(crate) fn par_chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    min_per_task: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let chunks = data.len().div_ceil(chunk);
    let per_task = min_per_task.div_ceil(chunk).max(1);
    let tasks = chunks.div_ceil(per_task);
    struct Base<T>(*mut T);
    // SAFETY: tasks touch disjoint ranges of the buffer (below).
    unsafe impl<T: Send> Sync for Base<T> {}
    let (base, len) = (Base(data.as_mut_ptr()), data.len());
    let base = &base;
    team().run(tasks, &|t| {
        for c in t * per_task..((t + 1) * per_task).min(chunks) {
            let start = c * chunk;
            let n = chunk.min(len - start);
            // SAFETY: chunk `c` belongs to task `t` alone and lies inside the buffer.
            let part = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), n) };
            f(c, part);
        }
    });
}

/// `f` applied to every item on the process-wide team, results in the items' order.
pub(crate) fn map_parallel<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let slots: Vec<Mutex<(Option<T>, Option<R>)>> = items
        .into_iter()
        .map(|item| Mutex::new((Some(item), None)))
        .collect();
    team().run(slots.len(), &|i| {
        let mut slot = slots[i].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(item) = slot.0.take() {
            slot.1 = Some(f(item));
        }
    });
    slots
        .into_iter()
        .filter_map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner()).1)
        .collect()
}

/// The process-wide team: one thread per core, or `PEFTSCALE_NUM_THREADS`.
pub(crate) fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let threads = std::env::var("PEFTSCALE_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()));
        Team::new(threads)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_per_region() {
        let team = Team::new(3);
        for tasks in [1usize, 2, 7, 64] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                team.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_survives() {
        let team = Team::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            team.run(8, &|i| {
                if i == 5 {
                    panic!("task 5");
                }
            })
        }));
        assert!(result.is_err());
        let count = AtomicUsize::new(0);
        team.run(8, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let team = Team::new(2);
        thread::sleep(SPIN * 4);
        let sum = AtomicUsize::new(0);
        team.run(10, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }

    #[test]
    fn stealing_runs_hand_out_every_item_once() {
        for (n, homes) in [(0, 2), (1, 2), (7, 2), (100, 3), (5, 8)] {
            let runs = StealingRuns::new(n, homes);
            // One thread drains the last home first, then steals the rest.
            let mut seen = Vec::new();
            let last = runs.homes() - 1;
            while let Some(i) = runs.next(last) {
                seen.push(i);
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n {n}, homes {homes}");
        }
        // Several threads at once.
        let runs = StealingRuns::new(10_000, 4);
        let taken: Vec<AtomicUsize> = (0..10_000).map(|_| AtomicUsize::new(0)).collect();
        team().run(4, &|h| {
            while let Some(i) = runs.next(h % runs.homes()) {
                taken[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(taken.iter().all(|t| t.load(Ordering::Relaxed) == 1));
    }
}
