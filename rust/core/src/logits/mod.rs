//! Per-step scoring on the CPU: repetition penalty, temperature, top-k, top-p, min-p, seeded
//! sampling, argmax and log-probabilities over one row of logits.

mod cold;
mod picks;

pub use crate::kernels::cpu::Rng;
pub use cold::{cold_choose, cold_scores, cold_top_k, ColdParams};
pub use picks::{pick_tokens, Pick, Picked};

use crate::error::{Error, Result};
use crate::kernels::cpu::dense::exp_shifted_sum;
use crate::kernels::cpu::{exp_in_place, max_value};

/// How the next token is chosen from a row of logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's.
    pub min_p: f32,
    /// transformers' CTRL-style penalty on every token already in the sequence (1 = off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        check_param(
            "temperature",
            t,
            t.is_finite() && t >= 0.0,
            "a finite number >= 0",
        )?;
        let p = self.top_p;
        check_param("top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]")?;
        let m = self.min_p;
        check_param("min_p", m, (0.0..=1.0).contains(&m), "in [0, 1]")?;
        let r = self.repetition_penalty;
        check_param(
            "repetition_penalty",
            r,
            r.is_finite() && r > 0.0,
            "a finite number > 0",
        )
    }
}

/// `Ok` when `ok`, else the error "`name` must be `rule`, got `value`".
pub(crate) fn check_param(name: &str, value: f32, ok: bool, rule: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{name} must be {rule}, got {value}"
        )))
    }
}

/// Index of the largest value; the first one on ties, as `torch.argmax` does.
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(xs)[index]`, computed stably.
pub fn log_prob(xs: &[f32], index: usize) -> f32 {
    let (max, ln_sum) = log_normalizer(xs);
    xs[index] - max - ln_sum
}

/// `(max, ln(sum(exp(xs - max))))`: `log_softmax(xs)[i] = xs[i] - max - ln_sum`.
pub fn log_normalizer(xs: &[f32]) -> (f32, f32) {
    let max = max_value(xs);
    // Each chunk summed in f32, the chunks in f64, so a 50k-token vocabulary loses no precision.
    let sum: f64 = xs
        .chunks(1024)
        .map(|chunk| f64::from(exp_shifted_sum(chunk, max)))
        .sum();
    (max, sum.ln() as f32)
}

/// Indices of the `k` largest values, best first (the smaller index first on ties; NaN is never
/// chosen), in one scan that keeps a small sorted list. Once `k` values are held, a chunk with no
/// value above the `k`-th is passed over after one vectorised comparison: over a vocabulary
/// almost every chunk is.
pub fn top_k_indices(xs: &[f32], k: usize) -> Vec<usize> {
    const CHUNK: usize = 16;
    let mut top: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return Vec::new();
    }
    for (c, chunk) in xs.chunks(CHUNK).enumerate() {
        if top.len() == k {
            let bar = top[k - 1].0;
            // A fold, not `any`: no early exit, so it compiles to vector compares.
            if !chunk.iter().fold(false, |hit, &x| hit | (x > bar)) {
                continue;
            }
        }
        for (j, &x) in chunk.iter().enumerate() {
            if x.is_nan() || (top.len() == k && x <= top[k - 1].0) {
                continue;
            }
            // After the equal ones already held: they have smaller indices.
            let at = top.partition_point(|&(v, _)| v >= x);
            top.insert(at, (x, c * CHUNK + j));
            top.truncate(k);
        }
    }
    top.into_iter().map(|(_, i)| i).collect()
}

/// Divides positive logits and multiplies negative ones by `penalty` for every token in `seen`.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let i = t as usize;
        if i < logits.len() && !done[i] {
            done[i] = true;
            let x = logits[i];
            logits[i] = if x < 0.0 { x * penalty } else { x / penalty };
        }
    }
}

/// The normalised distribution sampling draws from: `(token, probability)` pairs, most likely
/// first, after temperature, top-k, top-p and min-p.
pub fn sampling_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let t = p.temperature;
    let mut cands: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, x / t))
        .filter(|(_, x)| *x > f32::NEG_INFINITY)
        .collect();
    let k = if p.top_k == 0 {
        cands.len()
    } else {
        p.top_k.min(cands.len())
    };
    if k < cands.len() {
        cands.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        cands.truncate(k);
    }
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = cands.first().map(|c| c.1).unwrap_or(0.0);
    let mut probs: Vec<(u32, f32)> = cands.iter().map(|&(i, x)| (i, (x - max).exp())).collect();
    normalise(&mut probs);
    if p.top_p < 1.0 {
        let mut before = 0.0f32;
        let mut keep = 0;
        for &(_, q) in &probs {
            if before >= p.top_p && keep > 0 {
                break;
            }
            before += q;
            keep += 1;
        }
        probs.truncate(keep);
        normalise(&mut probs);
    }
    if p.min_p > 0.0 {
        let cut = p.min_p * probs.first().map(|c| c.1).unwrap_or(0.0);
        probs.retain(|c| c.1 >= cut);
        normalise(&mut probs);
    }
    probs
}

fn normalise(probs: &mut [(u32, f32)]) {
    let sum: f32 = probs.iter().map(|c| c.1).sum();
    if sum > 0.0 {
        probs.iter_mut().for_each(|c| c.1 /= sum);
    }
}

/// Chooses the next token; `logits` must be finite (check with [`all_finite`] first).
pub fn choose(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.is_greedy() {
        return argmax(logits) as u32;
    }
    draw(logits, p, rng.next_f32())
}

/// Candidate tokens in sampling order (most likely first, the smaller id first on ties),
/// sorted only as far as a walk needs. Most of the probability mass usually sits in a few
/// tokens: the ones within [`HEAD_LOG_RATIO`] of the best are found by one scan, the rest of the
/// vocabulary is gathered only if a walk goes past them, and either is sorted chunk by chunk.
struct LazyOrder<'a> {
    /// Ordered by these (the scaled logits: their exponentials may round equal where they
    /// differ).
    keys: &'a [f32],
    cut: f32,
    ids: Vec<u32>,
    sorted: usize,
    rest_gathered: bool,
    limit: usize,
}

/// Tokens whose scaled logit is within this of the best one form the head sorted up front
/// (weights down to e^-9, about 1.2e-4 of the best token's).
const HEAD_LOG_RATIO: f32 = 9.0;
/// Times a top-k head is widened (doubling its log-ratio) before it takes the whole vocabulary.
const HEAD_WIDENINGS: u32 = 4;

impl<'a> LazyOrder<'a> {
    /// `head`: the tokens whose key is at least `max - HEAD_LOG_RATIO`, in id order.
    fn new(keys: &'a [f32], max: f32, head: Vec<u32>, top_k: usize) -> Self {
        let limit = if top_k == 0 {
            keys.len()
        } else {
            top_k.min(keys.len())
        };
        let mut cut = max - HEAD_LOG_RATIO;
        let mut ids = head;
        // A top-k walk never goes past its k candidates: widen the head until it holds them
        // all, so that the rest of the vocabulary is never gathered and sorted. One counting
        // pass says which widening that is; one more pass gathers it.
        if top_k > 0 && ids.len() < limit {
            let counts = count_above(
                keys,
                std::array::from_fn::<f32, { HEAD_WIDENINGS as usize - 1 }, _>(|w| {
                    widened_cut(max, w as u32 + 1)
                }),
            );
            let widen = (1..HEAD_WIDENINGS)
                .find(|&w| counts[w as usize - 1] >= limit)
                .unwrap_or(HEAD_WIDENINGS);
            cut = widened_cut(max, widen);
            ids = gather_above(keys, cut);
        }
        Self {
            keys,
            cut,
            ids,
            sorted: 0,
            rest_gathered: false,
            limit,
        }
    }

    fn cmp(w: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
        w[b as usize].total_cmp(&w[a as usize]).then(a.cmp(&b))
    }

    /// Number of candidates (all tokens, or the top k).
    fn len(&self) -> usize {
        self.limit
    }

    /// The `i`-th candidate in order (`i < len()`).
    fn get(&mut self, i: usize) -> u32 {
        if i >= self.ids.len() && !self.rest_gathered {
            let (keys, cut) = (self.keys, self.cut);
            self.ids
                .extend((0..keys.len() as u32).filter(|&j| keys[j as usize] < cut));
            self.rest_gathered = true;
        }
        if i >= self.sorted {
            let w = self.keys;
            let rest = &mut self.ids[self.sorted..];
            let take = (i + 1 - self.sorted)
                .max(self.sorted)
                .max(64)
                .min(rest.len());
            if take < rest.len() {
                rest.select_nth_unstable_by(take - 1, |&a, &b| Self::cmp(w, a, b));
            }
            rest[..take].sort_unstable_by(|&a, &b| Self::cmp(w, a, b));
            self.sorted += take;
        }
        self.ids[i]
    }
}

/// `sum(xs)`: eight f32 lanes per 1024-value chunk (vectorised), the chunks added in f64.
fn chunked_sum(xs: &[f32]) -> f64 {
    xs.chunks(1024)
        .map(|chunk| {
            let mut lanes = [0f32; 8];
            let mut it = chunk.chunks_exact(8);
            for c in &mut it {
                for (l, &x) in lanes.iter_mut().zip(c) {
                    *l += x;
                }
            }
            let tail: f32 = it.remainder().iter().sum();
            (lanes.iter().sum::<f32>() + tail) as f64
        })
        .sum()
}

/// The token that the uniform draw `u` in [0, 1) picks from [`sampling_distribution`]: the
/// same distribution walked in the same order, without building it.
pub fn draw(logits: &[f32], p: &SamplingParams, u: f32) -> u32 {
    SCALED.with_borrow_mut(|scaled| {
        // Division by a positive temperature keeps the order (rounding included), so the
        // scaled maximum is the scaled raw maximum.
        let max = max_value(logits) / p.temperature;
        let head = scale_and_gather(logits, p.temperature, max, scaled);
        draw_scaled(scaled, max, head, p, u)
    })
}

thread_local! {
    /// The scaled logits of [`draw`]: one vocabulary row (~200 kB) per thread, reused rather
    /// than allocated (and its pages faulted in) for every row of every step.
    static SCALED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The cut of a head widened `widen` times (`widen >= 1`): the log-ratio doubles each time, and
/// the last widening takes the whole vocabulary.
fn widened_cut(max: f32, widen: u32) -> f32 {
    if widen < HEAD_WIDENINGS {
        max - HEAD_LOG_RATIO * (1 << widen) as f32
    } else {
        f32::NEG_INFINITY
    }
}

/// Writes `logits / temperature` into `scaled` and returns the tokens whose scaled value is
/// within [`HEAD_LOG_RATIO`] of `max` (the scaled maximum), in id order.
fn scale_and_gather(logits: &[f32], temperature: f32, max: f32, scaled: &mut Vec<f32>) -> Vec<u32> {
    scaled.clear();
    scaled.extend(logits.iter().map(|&x| x / temperature));
    // A second simple pass over a row now in the core's cache: each loop vectorises, where
    // one fused loop did not.
    gather_above(scaled, max - HEAD_LOG_RATIO)
}

/// How many keys are at least each of `cuts`, in one pass.
fn count_above<const C: usize>(keys: &[f32], cuts: [f32; C]) -> [usize; C] {
    let mut counts = [0usize; C];
    for chunk in keys.chunks(1024) {
        for (count, &cut) in counts.iter_mut().zip(&cuts) {
            *count += chunk.iter().map(|&k| u32::from(k >= cut)).sum::<u32>() as usize;
        }
    }
    counts
}

/// The tokens whose key is at least `cut`, in id order.
fn gather_above(keys: &[f32], cut: f32) -> Vec<u32> {
    const LANES: usize = 16;
    let mut ids = Vec::new();
    for (c, chunk) in keys.chunks(LANES).enumerate() {
        if chunk.iter().fold(false, |any, &k| any | (k >= cut)) {
            ids.extend(
                (0..chunk.len())
                    .filter(|&j| chunk[j] >= cut)
                    .map(|j| (c * LANES + j) as u32),
            );
        }
    }
    ids
}

/// [`draw`] over logits already divided by the temperature, with `max` their maximum.
fn draw_scaled(scaled: &[f32], max: f32, head: Vec<u32>, p: &SamplingParams, u: f32) -> u32 {
    let mut order = LazyOrder::new(scaled, max, head, p.top_k);
    let n = order.len();
    // Weights relative to the most likely token, which gets 1: for the whole vocabulary when
    // every token is a candidate (the total needs them all), else only for the top k, by rank.
    let mut weights = CandidateWeights::new(scaled, max, n < scaled.len());
    let total = if n == scaled.len() {
        chunked_sum(&weights.all)
    } else {
        (0..n).map(|i| weights.get(&mut order, i) as f64).sum()
    };
    // The kept prefix: top-p (up to and including the token that reaches it), then min-p.
    let mut keep = n;
    let mut kept_mass = total;
    if p.top_p < 1.0 || p.min_p > 0.0 {
        let (mut before, mut len) = (0f64, 0);
        while len < n {
            let wi = weights.get(&mut order, len);
            let over_p = len > 0 && before >= p.top_p as f64 * total;
            if over_p || wi < p.min_p {
                break;
            }
            before += wi as f64;
            len += 1;
        }
        keep = len.max(1);
        kept_mass = before.max(weights.get(&mut order, 0) as f64);
    }
    let target = u as f64 * kept_mass;
    let mut acc = 0f64;
    for i in 0..keep {
        acc += weights.get(&mut order, i) as f64;
        if target < acc {
            return order.get(i);
        }
    }
    order.get(keep - 1)
}

/// `exp(scaled - max)` of the candidates: of every token up front, or of the candidates in
/// rank order as a walk reaches them. [`exp_in_place`] gives a value the same exponential
/// wherever it sits, so both forms weigh a token alike.
struct CandidateWeights<'a> {
    scaled: &'a [f32],
    max: f32,
    /// Indexed by token, when computed for the whole vocabulary.
    all: Vec<f32>,
    /// Indexed by rank otherwise.
    ranked: Vec<f32>,
}

impl<'a> CandidateWeights<'a> {
    fn new(scaled: &'a [f32], max: f32, by_rank: bool) -> Self {
        let mut all = Vec::new();
        if !by_rank {
            all = scaled.iter().map(|&x| x - max).collect();
            exp_in_place(&mut all);
        }
        Self {
            scaled,
            max,
            all,
            ranked: Vec::new(),
        }
    }

    /// The weight of the `i`-th candidate in `order`.
    fn get(&mut self, order: &mut LazyOrder<'_>, i: usize) -> f32 {
        if !self.all.is_empty() {
            return self.all[order.get(i) as usize];
        }
        if i >= self.ranked.len() {
            let from = self.ranked.len();
            let to = (i + 1).max(2 * from).max(64).min(order.len());
            let mut more: Vec<f32> = (from..to)
                .map(|r| self.scaled[order.get(r) as usize] - self.max)
                .collect();
            exp_in_place(&mut more);
            self.ranked.extend(more);
        }
        self.ranked[i]
    }
}

pub fn all_finite(xs: &[f32]) -> bool {
    !crate::kernels::cpu::dense::any_nan_or_pos_inf(xs)
}

/// `Ok` unless a row of `rows` (`[n, vocab]`, f32, on any device) holds NaN or +inf (-inf, a
/// masked token, is allowed): either makes the row's sum NaN or +inf, so only `n` sums leave
/// the device.
fn check_rows_finite(rows: &candle_core::Tensor, step: usize) -> Result<()> {
    let sums = rows.sum(1)?.to_vec1::<f32>()?;
    match sums.iter().position(|s| s.is_nan() || *s == f32::INFINITY) {
        Some(row) => Err(Error::NonFiniteLogits { row, step }),
        None => Ok(()),
    }
}

/// The token each row of `logits` (`[rows, vocab]`) draws with its number from `uniforms`
/// (one per row, in [0, 1)) after temperature, top-k, top-p and min-p, as [`draw`] does (the
/// argmax at temperature 0). Rows on a CUDA device run `cuda/sample.cu`, and only the token ids
/// leave the GPU. The repetition penalty needs each row's history and is not taken here.
pub fn sample_rows(
    logits: &candle_core::Tensor,
    p: &SamplingParams,
    uniforms: &[f32],
) -> Result<Vec<u32>> {
    p.validate()?;
    if p.repetition_penalty != 1.0 {
        return Err(Error::invalid(
            "sample_rows takes no repetition_penalty (it needs each row's history)",
        ));
    }
    let (rows, vocab) = logits.dims2()?;
    if uniforms.len() != rows || vocab == 0 {
        return Err(Error::invalid(format!(
            "{} uniform numbers for {rows} rows of {vocab} logits (one per row, and a non-empty \
             vocabulary)",
            uniforms.len()
        )));
    }
    if let Some(u) = uniforms.iter().find(|u| !(0.0..1.0).contains(*u)) {
        return Err(Error::invalid(format!(
            "uniform numbers must be in [0, 1), got {u}"
        )));
    }
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    if !logits.device().is_cpu() {
        check_rows_finite(&logits, 0)?;
        if p.is_greedy() {
            return Ok(logits.argmax(1)?.to_vec1::<u32>()?);
        }
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            return Ok(crate::kernels::cuda::sample_tokens(
                &logits,
                p.temperature,
                p.top_k,
                p.top_p,
                p.min_p,
                uniforms,
            )?);
        }
    }
    let rows_f32 = logits.to_vec2::<f32>()?;
    rows_f32
        .iter()
        .zip(uniforms)
        .enumerate()
        .map(|(row, (x, &u))| {
            if !all_finite(x) {
                return Err(Error::NonFiniteLogits { row, step: 0 });
            }
            Ok(if p.is_greedy() {
                argmax(x) as u32
            } else {
                draw(x, p, u)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k,
            top_p,
            min_p,
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn filters_follow_their_definitions() {
        let probs = [0.5f32, 0.25, 0.15, 0.1];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let ids = |d: Vec<(u32, f32)>| d.iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(
            ids(sampling_distribution(&logits, &params(2, 1.0, 0.0))),
            [0, 1]
        );
        // 0.5 < 0.7, 0.75 >= 0.7: the first two reach top_p.
        assert_eq!(
            ids(sampling_distribution(&logits, &params(0, 0.7, 0.0))),
            [0, 1]
        );
        assert_eq!(
            ids(sampling_distribution(&logits, &params(0, 0.5, 0.0))),
            [0]
        );
        // min_p 0.28 keeps tokens with p >= 0.14.
        assert_eq!(
            ids(sampling_distribution(&logits, &params(0, 1.0, 0.28))),
            [0, 1, 2]
        );
        let d = sampling_distribution(&logits, &params(0, 1.0, 0.0));
        for (c, p) in d.iter().zip(probs) {
            assert!((c.1 - p).abs() < 1e-6);
        }
    }

    #[test]
    fn draw_walks_the_reference_distribution() {
        let mut rng = Rng::new(9, 0);
        for case in 0..60 {
            let n = 500 + case * 37;
            let spread = 2.0 + (case % 5) as f32 * 3.0;
            let logits: Vec<f32> = (0..n).map(|_| spread * rng.next_f32()).collect();
            let p = SamplingParams {
                temperature: [0.5, 0.7, 1.0, 1.5][case % 4],
                top_k: [0, 0, 40, 3000][case % 4 / 2 + case % 3],
                top_p: [1.0, 0.9, 0.5][case % 3],
                min_p: [0.0, 0.0, 0.05, 0.2][case % 4],
                ..SamplingParams::greedy()
            };
            check_draw_against_reference(&logits, &p, case);
        }
    }

    /// Top-k over logits spread far wider than the sorted head (and some tokens at -inf):
    /// the head widens until it holds the k candidates, and the walk is unchanged.
    #[test]
    fn top_k_draw_is_unchanged_when_the_head_widens() {
        let mut rng = Rng::new(11, 0);
        for case in 0..24 {
            let n = 2000 + case * 101;
            let spread = [20.0, 60.0, 200.0, 1000.0][case % 4];
            let mut logits: Vec<f32> = (0..n).map(|_| spread * rng.next_f32()).collect();
            for x in logits.iter_mut().step_by(7) {
                *x = f32::NEG_INFINITY;
            }
            let p = SamplingParams {
                temperature: [0.3, 1.0, 2.0][case % 3],
                top_k: [5, 50, 400, n][case % 4],
                ..SamplingParams::greedy()
            };
            check_draw_against_reference(&logits, &p, case);
        }
    }

    /// Every token of the reference distribution with probability above 1e-5 is what `draw`
    /// picks at the middle of its interval.
    fn check_draw_against_reference(logits: &[f32], p: &SamplingParams, case: usize) {
        // The reference's order and kept set, with its probabilities recomputed in f64 (its
        // f32 normalisation drifts by ~1e-4 over thousands of tokens).
        let dist = sampling_distribution(logits, p);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weight = |tok: u32| ((logits[tok as usize] as f64 - max) / p.temperature as f64).exp();
        let total: f64 = dist.iter().map(|&(tok, _)| weight(tok)).sum();
        let mut lo = 0.0f64;
        for &(tok, _) in &dist {
            let q = weight(tok) / total;
            if q > 1e-5 {
                let mid = (lo + q / 2.0) as f32;
                assert_eq!(draw(logits, p, mid), tok, "case {case}");
            }
            lo += q;
        }
    }

    #[test]
    fn top_k_scan_matches_a_full_sort() {
        let mut rng = Rng::new(4, 0);
        for n in [1usize, 5, 300, 5000, 49_152] {
            // Coarse values, so that ties are common; the larger ones drift upwards, so that
            // later chunks keep replacing what is held.
            let drift = if n > 5000 { 0.002 } else { 0.0 };
            let xs: Vec<f32> = (0..n)
                .map(|i| (rng.next_f32() * 50.0 + drift * i as f32).floor())
                .collect();
            let mut all: Vec<usize> = (0..n).collect();
            all.sort_by(|&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
            for k in [1usize, 3, 16] {
                assert_eq!(top_k_indices(&xs, k), all[..k.min(n)].to_vec());
            }
        }
    }

    #[test]
    fn top_k_scan_passes_over_nan() {
        let mut xs = vec![1.0f32; 300];
        xs[7] = f32::NAN;
        xs[200] = 3.0;
        xs[250] = f32::NAN;
        assert_eq!(top_k_indices(&xs, 3), vec![200, 0, 1]);
    }

    #[test]
    fn repetition_penalty_matches_transformers_rule() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn log_prob_is_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((log_prob(&l, 2) - (3.0f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn invalid_params_are_rejected() {
        let mut p = SamplingParams::greedy();
        p.temperature = -1.0;
        assert!(p.validate().is_err());
        p.temperature = 1.0;
        p.top_p = 0.0;
        assert!(p.validate().is_err());
        p.top_p = 1.5;
        assert!(p.validate().is_err());
    }
}
