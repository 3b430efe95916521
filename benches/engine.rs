//! Criterion benches: one decode step of a real model, and the per-step scoring operations over a
//! 49,152-token vocabulary (SmolLM2's).
//!
//! `PEFTSCALE_GGUF=/path/to/model.gguf cargo bench` adds the decode-step bench; without it only the
//! scoring benches run. The packaged model's path:
//! `python -c "import peftscale as ps; print(ps.models.smollm2_135m_instruct())"`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use peftscale_core::logits::{self, Rng, SamplingParams};
use peftscale_core::model::{LogitsFor, RowInput};
use peftscale_core::search::tree::Tree;
use peftscale_core::{Engine, WeightDType};

const VOCAB: usize = 49_152;

fn fake_logits() -> Vec<f32> {
    let mut rng = Rng::new(1, 0);
    (0..VOCAB).map(|_| rng.next_f32() * 20.0 - 10.0).collect()
}

/// MCTS bookkeeping alone: each iteration selects a leaf by PUCT, adds three children and
/// back-propagates a value through every level. Reported per node update (each node whose
/// statistics change, plus each new node).
fn tree_bookkeeping(c: &mut Criterion) {
    // One run: `iterations` times select a leaf by PUCT, add three children, back-propagate a
    // value from each through every level.
    fn run(iterations: usize) -> u64 {
        let mut t = Tree::new();
        let mut rng = Rng::new(3, 0);
        let mut updates = 0u64;
        for _ in 0..iterations {
            let leaf = t.select(1.0);
            for _ in 0..3 {
                let child = t.add_child(leaf, 0.2 + rng.next_f32() as f64, false);
                // The new node, then each node on its path gets a visit.
                updates += 2 + t.nodes[child].depth as u64;
                t.backpropagate(child, rng.next_f32() as f64);
            }
        }
        updates
    }
    let iterations = 4096;
    let mut g = c.benchmark_group("mcts_tree");
    // Throughput in node updates (each new node, and each node a back-propagation visits).
    g.throughput(Throughput::Elements(run(iterations)));
    g.bench_function("select_expand3_backprop_x4096", |b| {
        b.iter(|| black_box(run(black_box(iterations))))
    });
    g.finish();
}

fn scoring(c: &mut Criterion) {
    let l = fake_logits();
    let mut rng = Rng::new(0, 0);
    let sample = SamplingParams {
        temperature: 0.7,
        top_k: 50,
        top_p: 0.9,
        min_p: 0.05,
        ..SamplingParams::greedy()
    };
    let full = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::greedy()
    };
    let mut g = c.benchmark_group("scoring_49152");
    g.bench_function("argmax", |b| b.iter(|| logits::argmax(black_box(&l))));
    g.bench_function("log_prob", |b| {
        b.iter(|| logits::log_prob(black_box(&l), 7))
    });
    g.bench_function("sample_top_k50_top_p0.9_min_p0.05", |b| {
        b.iter(|| logits::choose(black_box(&l), &sample, &mut rng))
    });
    g.bench_function("sample_full_softmax", |b| {
        b.iter(|| logits::choose(black_box(&l), &full, &mut rng))
    });
    g.bench_function("repetition_penalty_512_seen", |b| {
        let seen: Vec<u32> = (0..512).map(|i| (i * 97 % VOCAB) as u32).collect();
        b.iter(|| {
            let mut x = l.clone();
            logits::apply_repetition_penalty(&mut x, &seen, 1.2);
            x
        })
    });
    g.finish();
}

fn decode_step(c: &mut Criterion) {
    let Ok(path) = std::env::var("PEFTSCALE_GGUF") else {
        eprintln!("PEFTSCALE_GGUF not set: skipping the decode-step bench");
        return;
    };
    for (name, dtype) in [("q4_1", WeightDType::Auto), ("f32", WeightDType::F32)] {
        let eng = Engine::load(&path, dtype).expect("model loads");
        let mut store = eng.new_store();
        let seq = store.create();
        let prompt: Vec<u32> = (100..164).collect();
        let rows = [RowInput::new(seq, &prompt, LogitsFor::Last)];
        eng.forward(&mut store, &rows).expect("prefill");
        c.bench_function(&format!("decode_step_{name}_ctx64"), |b| {
            b.iter_batched(
                || {
                    let mut s = eng.new_store();
                    let q = s.create();
                    let r = [RowInput::new(q, &prompt, LogitsFor::Last)];
                    eng.forward(&mut s, &r).expect("prefill");
                    (s, q)
                },
                |(mut s, q)| {
                    let tok = [42u32];
                    let r = [RowInput::new(q, &tok, LogitsFor::Last)];
                    eng.forward(&mut s, &r).expect("step")
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
}

/// Quantized matrix products with one or two activation rows (a decode step of one sequence, or
/// of a CoLD pair or two beams), the kernels a decode step spends most of its time in: reported
/// as time per call; bytes / time is the bandwidth the kernel reaches.
fn matvec(c: &mut Criterion) {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use peftscale_core::model::Linear;
    use std::sync::Arc;
    let mut g = c.benchmark_group("matvec");
    for (name, dtype, rows, cols) in [
        ("q4_1_1536x576", GgmlDType::Q4_1, 1536, 576),
        ("q4_1_16384x2048", GgmlDType::Q4_1, 16384, 2048),
        ("q8_0_49152x576", GgmlDType::Q8_0, 49152, 576),
    ] {
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).expect("weights");
        let q = QTensor::quantize(&w, dtype).expect("quantize");
        let bytes = q.storage_size_in_bytes();
        let lin = Linear::quantized(Arc::new(q), None).expect("linear");
        g.throughput(criterion::Throughput::Bytes(bytes as u64));
        for m in [1, 2, 4, 16, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).expect("input");
            g.bench_function(format!("{name}_m{m}"), |b| {
                b.iter(|| lin.forward(black_box(&x)).expect("matvec"))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = tree_bookkeeping, scoring, matvec, decode_step
}
criterion_main!(benches);
