//! Engine-level tests on a tiny random llama written to a temporary Hugging Face folder.

use candle_core::DType;
use peftscale_core::kv::SeqStore;
use peftscale_core::model::{LogitsFor, RowInput};
use peftscale_core::{Engine, GenerateOptions, SamplingParams, WeightDType};

mod common;
use common::*;

fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_llama(dir.path());
    let eng = Engine::load(dir.path(), WeightDType::F32).unwrap();
    (dir, eng)
}

/// [`engine`] with the tiny adapter loaded as `"a"`.
fn engine_with_adapter() -> (tempfile::TempDir, Engine) {
    let (dir, mut eng) = engine();
    let adapter_dir = dir.path().join("adapter");
    std::fs::create_dir(&adapter_dir).unwrap();
    write_tiny_adapter(&adapter_dir);
    eng.load_adapter(&adapter_dir, "a").unwrap();
    (dir, eng)
}

fn last_logits(eng: &Engine, store: &mut SeqStore, seq: u64, tokens: &[u32]) -> Vec<f32> {
    let rows = [RowInput::new(seq, tokens, LogitsFor::Last)];
    let out = eng.forward(store, &rows).unwrap();
    out[0].squeeze(0).unwrap().to_vec1().unwrap()
}

fn argmax(x: &[f32]) -> u32 {
    peftscale_core::logits::argmax(x) as u32
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn forked_sequence_continues_like_a_recomputed_prefix() {
    let (_dir, eng) = engine();
    let prefix: Vec<u32> = (10..30).collect();
    let mut store = eng.new_store();
    let parent = store.create();
    last_logits(&eng, &mut store, parent, &prefix);
    let child = store.fork(parent).unwrap();
    let sibling = store.fork(parent).unwrap();

    // Greedy continuation of the fork, one token per step, against a fresh full recompute.
    let mut fresh_ids = prefix.clone();
    let mut next = 42u32;
    for _ in 0..12 {
        let forked = last_logits(&eng, &mut store, child, &[next]);
        fresh_ids.push(next);
        let full = eng.logits(&fresh_ids).unwrap();
        let row = full
            .get(fresh_ids.len() - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(max_abs_diff(&forked, &row) < 1e-4);
        next = argmax(&forked);
    }
    // The parent and a sibling are untouched by the child's progress.
    let from_parent = last_logits(&eng, &mut store, parent, &[7]);
    let from_sibling = last_logits(&eng, &mut store, sibling, &[7]);
    assert!(max_abs_diff(&from_parent, &from_sibling) < 1e-6);
    let mut direct = prefix.clone();
    direct.push(7);
    let full = eng.logits(&direct).unwrap();
    let row = full
        .get(direct.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(max_abs_diff(&from_parent, &row) < 1e-4);
    store.free(child);
    assert_eq!(store.num_sequences(), 2);
}

#[test]
fn rows_of_one_forward_equal_rows_alone() {
    let (_dir, eng) = engine();
    let a: Vec<u32> = vec![5, 6, 7];
    let b: Vec<u32> = (100..140).collect();
    let mut store = eng.new_store();
    let (sa, sb) = (store.create(), store.create());
    let rows = [
        RowInput::new(sa, &a, LogitsFor::All),
        RowInput::new(sb, &b, LogitsFor::Last),
    ];
    let out = eng.forward(&mut store, &rows).unwrap();
    let alone_a = eng.logits(&a).unwrap();
    let alone_b = eng.logits(&b).unwrap();
    let diff_a = (&out[0] - &alone_a)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff_a.to_scalar::<f32>().unwrap() < 1e-5);
    let last_b = alone_b.narrow(0, b.len() - 1, 1).unwrap();
    let diff_b = (&out[1] - &last_b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff_b.to_scalar::<f32>().unwrap() < 1e-5);
}

#[test]
fn generate_without_tokenizer_returns_ids_and_stats() {
    let (_dir, eng) = engine();
    let opts = GenerateOptions {
        max_new_tokens: 5,
        ..Default::default()
    };
    let outs = eng.generate(vec![vec![1, 2, 3], vec![4]], &opts).unwrap();
    assert_eq!(outs.len(), 2);
    assert!(outs
        .iter()
        .all(|o| o.row.token_ids.len() == 5 && o.row.text.is_none()));
    // 4 prompt tokens + 4 decode steps of 2 rows.
    assert_eq!(outs[0].stats.tokens_forwarded, 4 + 2 * 4);
    assert!(eng.tokenizer().is_err());
}

#[test]
fn invalid_requests_are_errors_not_panics() {
    let (_dir, eng) = engine();
    let zero = GenerateOptions {
        max_new_tokens: 0,
        ..Default::default()
    };
    assert!(eng.generate(vec![vec![1]], &zero).is_err());
    assert!(eng
        .generate(vec![vec![]], &GenerateOptions::default())
        .is_err());
    // A prompt longer than the context (512 positions).
    let too_long: Vec<u32> = (0..600).map(|i| i % VOCAB as u32).collect();
    assert!(eng
        .generate(vec![too_long], &GenerateOptions::default())
        .is_err());
    assert!(eng.logits(&[VOCAB as u32]).is_err());
}

/// With either cache dtype, and with rows through an adapter beside base rows (the tensor
/// pass's unmerged LoRA against the host pass's). The paths' keys differ by f32 rounding before
/// they are stored, so a half-precision cache may round a few of them to neighbouring f16 values
/// (2^-11 apart): its tolerance is ten times wider.
#[test]
fn host_forward_matches_the_tensor_forward() {
    let (_dir, mut eng) = engine_with_adapter();
    let adapter = eng.adapter("a").unwrap();
    for (kv, tolerance) in [(DType::F32, 1e-4), (DType::F16, 1e-3)] {
        eng.set_kv_dtype(kv).unwrap();
        // Base rows only; then the adapter on some rows (its tokens gathered), then on all.
        for adapters in [
            [None, None, None],
            [Some(&*adapter), None, Some(&*adapter)],
            [Some(&*adapter); 3],
        ] {
            host_and_tensor_paths_agree(&eng, adapters, tolerance);
        }
    }
}

fn host_and_tensor_paths_agree(
    eng: &Engine,
    adapters: [Option<&peftscale_core::lora::LoraAdapter>; 3],
    tolerance: f32,
) {
    let prompts: [Vec<u32>; 3] = [vec![5, 6, 7, 8, 9], (100..123).collect(), vec![3, 1, 4]];
    // Prefill rows of different lengths, then decode them for six steps on each path.
    let (mut host, mut tensors) = (eng.new_store(), eng.new_store());
    let host_seqs: Vec<u64> = (0..3).map(|_| host.create()).collect();
    let tensor_seqs: Vec<u64> = (0..3).map(|_| tensors.create()).collect();
    let mut steps: Vec<[Vec<u32>; 3]> = vec![prompts];
    steps.extend((0..6).map(|i| [vec![20 + i], vec![40 + i], vec![60 + i]]));
    for tokens in &steps {
        let make = |seqs: &[u64]| -> Vec<RowInput<'_>> {
            (0..3)
                .map(|r| {
                    let logits = if r == 0 {
                        LogitsFor::All
                    } else {
                        LogitsFor::Last
                    };
                    RowInput::new(seqs[r], &tokens[r], logits).with_adapter(adapters[r])
                })
                .collect()
        };
        let fast = eng.forward(&mut host, &make(&host_seqs)).unwrap();
        let reference = eng
            .model()
            .forward_with_tensors(&mut tensors, &make(&tensor_seqs))
            .unwrap();
        for (f, r) in fast.iter().zip(&reference) {
            assert_eq!(f.dims(), r.dims());
            let f = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let r = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Relative to the row's scale: an adapter's rows carry larger logits.
            let scale = r.iter().fold(1f32, |m, x| m.max(x.abs()));
            let diff = max_abs_diff(&f, &r) / scale;
            assert!(
                diff < tolerance,
                "relative diff {diff} (tolerance {tolerance}, scale {scale})"
            );
        }
    }
}

/// The tensor pass (the GPU's) over forks and adapters: a parent prefilled past the fork-copy
/// limit, so that its children read a shared frozen block and their own tails (attention over
/// several pieces), a grandchild forked mid-decode (three pieces), every row through the adapter
/// or none, each step against a fresh host-pass recompute of the row's whole sequence.
#[test]
fn tensor_forward_over_forks_and_adapters_equals_a_recompute() {
    let (_dir, eng) = engine_with_adapter();
    let lora = eng.adapter("a").unwrap();
    let prefix: Vec<u32> = (0..40).map(|i| 10 + (i * 7) % 200).collect();
    for name in [None, Some("a")] {
        let adapter = name.map(|_| &*lora);
        let mut store = eng.new_store();
        let parent = store.create();
        let rows = [RowInput::new(parent, &prefix, LogitsFor::Last).with_adapter(adapter)];
        eng.model().forward_with_tensors(&mut store, &rows).unwrap();
        let mut seqs: Vec<(u64, Vec<u32>)> = vec![(parent, prefix.clone())];
        for _ in 0..2 {
            seqs.push((store.fork(parent).unwrap(), prefix.clone()));
        }
        for step in 0..6u32 {
            if step == 3 {
                let (child, tokens) = seqs[1].clone();
                seqs.push((store.fork(child).unwrap(), tokens));
            }
            let fed: Vec<Vec<u32>> = (0..seqs.len() as u32)
                .map(|r| vec![50 + r * 11 + step * 3])
                .collect();
            let rows: Vec<RowInput<'_>> = seqs
                .iter()
                .zip(&fed)
                .map(|((seq, _), f)| RowInput::new(*seq, f, LogitsFor::Last).with_adapter(adapter))
                .collect();
            let out = eng.model().forward_with_tensors(&mut store, &rows).unwrap();
            for (((_, tokens), f), got) in seqs.iter_mut().zip(&fed).zip(&out) {
                tokens.extend(f);
                let alone = all_logits(&eng, tokens, name);
                let want = &alone[(tokens.len() - 1) * VOCAB..];
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                let err = max_abs_diff(&got, want) / scale;
                assert!(
                    err < 1e-4,
                    "adapter {name:?}, step {step}: relative error {err}"
                );
            }
        }
    }
}

/// A half-precision cache changes the logits by its rounding only: prefill, a fork and decode
/// steps against the same calls on an f32 cache.
#[test]
fn a_half_precision_cache_stays_close_to_the_f32_one() {
    let (dir, eng) = engine();
    let mut half = Engine::load(dir.path(), WeightDType::F32).unwrap();
    half.set_kv_dtype(DType::F16).unwrap();
    assert_eq!(eng.kv_dtype(), DType::F32);
    let prompt: Vec<u32> = (30..90).collect();
    let run = |e: &Engine| -> Vec<Vec<f32>> {
        let mut store = e.new_store();
        let parent = store.create();
        let mut out = vec![last_logits(e, &mut store, parent, &prompt)];
        let child = store.fork(parent).unwrap();
        for t in 0..8 {
            out.push(last_logits(e, &mut store, child, &[200 + t]));
        }
        out
    };
    let (exact, rounded) = (run(&eng), run(&half));
    let mut worst = 0f32;
    for (a, b) in exact.iter().zip(&rounded) {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        worst = worst.max(max_abs_diff(a, b) / scale);
    }
    // f16 keeps 11 significant bits (relative rounding 2^-11 ≈ 5e-4).
    assert!(worst < 5e-3, "relative error {worst}");
    assert!(worst > 0.0, "the cache was not rounded");
}

fn all_logits(eng: &Engine, tokens: &[u32], adapter: Option<&str>) -> Vec<f32> {
    let out = eng.logits_batch(&[(tokens, adapter)]).unwrap();
    let logits = out[0].to_dtype(DType::F32).unwrap();
    logits.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn merged_adapter_equals_the_unmerged_one() {
    let (dir, mut eng) = engine();
    let adapter = tempfile::tempdir().unwrap();
    write_tiny_adapter(adapter.path());
    let tokens: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
    eng.load_adapter(adapter.path(), "tiny").unwrap();
    let unmerged = all_logits(&eng, &tokens, Some("tiny"));
    let base = all_logits(&eng, &tokens, None);
    assert!(
        max_abs_diff(&unmerged, &base) > 0.1,
        "the adapter changes nothing"
    );

    eng.merge_adapter(adapter.path()).unwrap();
    assert_eq!(eng.merged_adapters(), [adapter.path().to_path_buf()]);
    let merged = all_logits(&eng, &tokens, None);
    assert!(
        max_abs_diff(&merged, &unmerged) < 1e-4,
        "diff {}",
        max_abs_diff(&merged, &unmerged)
    );

    // A half-precision model (the tensor pass) runs the adapter unmerged and merged alike.
    let mut half = Engine::load(dir.path(), WeightDType::F16).unwrap();
    half.load_adapter(adapter.path(), "tiny").unwrap();
    let unmerged_half = all_logits(&half, &tokens, Some("tiny"));
    half.merge_adapter(adapter.path()).unwrap();
    let merged_half = all_logits(&half, &tokens, None);
    // f16 rounding stays; the adapter's change must be there: far closer than the base model.
    let base_gap = max_abs_diff(&base, &unmerged);
    for got in [&unmerged_half, &merged_half] {
        let diff = max_abs_diff(got, &unmerged);
        assert!(
            diff < 0.1 * base_gap,
            "diff {diff}, base model {base_gap} away"
        );
    }
}

#[test]
fn a_failed_merge_leaves_the_weights_alone() {
    let (dir, mut eng) = engine();
    let tokens: Vec<u32> = vec![1, 2, 3, 4];
    let before = all_logits(&eng, &tokens, None);
    // The model folder itself is not an adapter folder.
    assert!(eng.merge_adapter(dir.path()).is_err());
    assert!(eng.merged_adapters().is_empty());
    assert_eq!(all_logits(&eng, &tokens, None), before);
}

type PlannedRow<'a> = (u64, Vec<u32>, Vec<u32>, Option<&'a str>);

/// Rows of one forward pass (fresh prompts of different lengths, forks of a shared prefix fed one
/// or several tokens, with and without an adapter) give the logits each row gives alone, from a
/// fresh recompute of its whole sequence, at batch sizes 1, 3, 8 and 17; head size 64, so that
/// attention runs its vector paths, in tiles shared between the forks or (one-token rows that
/// share little) one task per row.
#[test]
fn batched_rows_with_forks_and_adapters_equal_rows_alone() {
    let dims = Dims {
        hidden: 128,
        heads: 2,
        kv_heads: 1,
    };
    let dir = tempfile::tempdir().unwrap();
    write_llama(dir.path(), dims);
    let adapter = tempfile::tempdir().unwrap();
    write_adapter(adapter.path(), dims);
    let mut eng = Engine::load(dir.path(), WeightDType::F32).unwrap();
    eng.load_adapter(adapter.path(), "a").unwrap();
    for kv in [DType::F32, DType::F16] {
        eng.set_kv_dtype(kv).unwrap();
        // Several tokens per row, then one (a decode step: up to eight rows, attention takes
        // each row's pieces in one task; above, one task per shared run).
        for one_token in [false, true] {
            batched_rows_equal_rows_alone(&eng, kv, one_token);
        }
    }
}

fn batched_rows_equal_rows_alone(eng: &Engine, kv: DType, one_token: bool) {
    let lora = eng.adapter("a").unwrap();
    let lora_for = |name: Option<&str>| name.map(|_| &*lora);
    // Long enough that at 17 one-token rows the forks would read the prefix again ~4,000 times
    // per KV head, past the per-row layout's limit (3,000): attention then runs one task per
    // shared run; at 1, 3 and 8 rows it runs one task per row.
    let prefix: Vec<u32> = (0..400).map(|i| 40 + (i * 7) % 250).collect();
    for batch in [1usize, 3, 8, 17] {
        let mut store = eng.new_store();
        // One prefilled parent per adapter choice: a fork continues with its parent's adapter.
        let parents: Vec<u64> = [None, Some("a")]
            .into_iter()
            .map(|a| {
                let seq = store.create();
                let rows = [RowInput::new(seq, &prefix, LogitsFor::Last).with_adapter(lora_for(a))];
                eng.forward(&mut store, &rows).unwrap();
                seq
            })
            .collect();
        // (sequence, tokens already in its cache, tokens fed now, adapter)
        let mut plan: Vec<PlannedRow<'_>> = Vec::new();
        for i in 0..batch {
            let adapter = (i % 2 == 1).then_some("a");
            let count = if one_token { 1 } else { 1 + (i * 7) % 5 };
            let fed: Vec<u32> = (0..count).map(|t| (i * 13 + t * 3) as u32 % 300).collect();
            if i % 3 == 2 {
                // A fresh prompt of its own length.
                let seq = store.create();
                plan.push((seq, Vec::new(), fed, adapter));
            } else {
                let seq = store.fork(parents[usize::from(adapter.is_some())]).unwrap();
                plan.push((seq, prefix.clone(), fed, adapter));
            }
        }
        let rows: Vec<RowInput<'_>> = plan
            .iter()
            .map(|(seq, _, fed, a)| {
                RowInput::new(*seq, fed, LogitsFor::All).with_adapter(lora_for(*a))
            })
            .collect();
        let out = eng.forward(&mut store, &rows).unwrap();
        for (i, ((_, before, fed, a), got)) in plan.iter().zip(&out).enumerate() {
            let whole: Vec<u32> = before.iter().chain(fed).copied().collect();
            let alone = all_logits(eng, &whole, *a);
            let want = &alone[before.len() * VOCAB..];
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = max_abs_diff(&got, want) / scale;
            assert!(
                err < 1e-4,
                "{kv:?} cache, batch {batch} row {i} (one token: {one_token}): relative error {err}"
            );
        }
    }
}

#[test]
fn long_inputs_run_in_chunks_with_the_logits_of_one_pass() {
    let (_dir, eng) = engine();
    let ids: Vec<u32> = (0..400).map(|i| (i * 7 % VOCAB) as u32).collect();
    let chunked = all_logits(&eng, &ids, None);
    let mut store = eng.new_store();
    let seq = store.create();
    let one = eng
        .forward(&mut store, &[RowInput::new(seq, &ids, LogitsFor::All)])
        .unwrap();
    let one: Vec<f32> = one[0].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(chunked.len(), 400 * VOCAB);
    assert!(max_abs_diff(&chunked, &one) < 1e-4);

    // The hook runs between passes; its error ends the call.
    let mut calls = 0;
    let result = eng.logits_batch_with(&[(&ids, None)], &mut || {
        calls += 1;
        Err(peftscale_core::Error::InvalidArgument("stop".into()))
    });
    assert!(result.is_err());
    assert_eq!(calls, 1);
}

/// Choosing tokens where the logits are (the GPU's path, here on the CPU) chooses exactly what
/// the per-row host scorers choose: greedy, sampling with every filter, greedy CoLD, rows that
/// share a prompt (their first draw from the leader's logits), rows with and without an adapter;
/// the log-probabilities agree to rounding. Strategies that need whole rows (a repetition
/// penalty, sampled CoLD) keep the host path on both.
#[test]
fn picks_where_the_logits_are_equal_the_host_choices() {
    let (_dir, eng) = engine_with_adapter();
    let (a, b, c): (Vec<u32>, Vec<u32>, Vec<u32>) =
        ((3..15).collect(), vec![7, 9, 11], (40..60).collect());
    let sampled = SamplingParams {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        min_p: 0.02,
        seed: 3,
        ..SamplingParams::greedy()
    };
    let some = |v: &[&str]| {
        v.iter()
            .map(|s| (!s.is_empty()).then(|| s.to_string()))
            .collect()
    };
    let cases: Vec<(&str, Vec<Vec<u32>>, GenerateOptions)> = vec![
        (
            "greedy",
            vec![a.clone(), b.clone(), a.clone()],
            GenerateOptions::default(),
        ),
        (
            "sampling",
            vec![a.clone(), a.clone(), b.clone(), c.clone()],
            GenerateOptions {
                sampling: sampled,
                adapters: some(&["a", "", "a", ""]),
                ..GenerateOptions::default()
            },
        ),
        (
            "plain sampling",
            vec![c.clone(), c.clone()],
            GenerateOptions {
                sampling: SamplingParams {
                    temperature: 1.0,
                    seed: 11,
                    ..SamplingParams::greedy()
                },
                ..GenerateOptions::default()
            },
        ),
        (
            "greedy CoLD",
            vec![a.clone(), b.clone(), a.clone()],
            GenerateOptions {
                adapters: some(&["a"]),
                cold: Some(peftscale_core::logits::ColdParams::default()),
                ..GenerateOptions::default()
            },
        ),
        (
            "repetition penalty (host path)",
            vec![a.clone(), b.clone()],
            GenerateOptions {
                sampling: SamplingParams {
                    repetition_penalty: 1.3,
                    ..sampled
                },
                ..GenerateOptions::default()
            },
        ),
    ];
    for (name, prompts, mut opts) in cases {
        opts.max_new_tokens = 12;
        opts.ignore_eos = true;
        let host = eng.generate(prompts.clone(), &opts).unwrap();
        let mut generation = eng.start(prompts, &opts).unwrap();
        generation.set_picks_where_logits_are(true);
        while !generation.is_done() {
            generation.step().unwrap();
        }
        let picked = generation.outputs();
        assert_eq!(host.len(), picked.len());
        for (i, (h, p)) in host.iter().zip(&picked).enumerate() {
            assert_eq!(h.row.token_ids, p.row.token_ids, "{name}, row {i}");
            assert_eq!(h.row.token_ids.len(), 12, "{name}, row {i}");
            for (x, y) in h.row.logprobs.iter().zip(&p.row.logprobs) {
                assert!(
                    (x - y).abs() < 1e-4,
                    "{name}, row {i}: log-probs {x} and {y}"
                );
            }
        }
    }
}
