//! The host-side plans of the two Ascend operations: which aclnn operators run, in what order,
//! on tensors of what shapes. A plan is plain data, so it is checked without an NPU: `describe`
//! lists it, and [`Plan::run_on_host`] executes each step with the operator's documented
//! semantics on the CPU, which the tests compare with the CPU scorer and the LoRA definition.

use crate::error::{Error, Result};
use crate::logits::ColdParams;

/// ACL's element types used here (`aclDataType` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclDType {
    Float = 0,
    Int64 = 9,
    Bool = 12,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorDesc {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub dtype: AclDType,
}

/// A tensor of the plan, by position in [`Plan::tensors`].
pub type TensorId = usize;

/// One aclnn operator call (each has its `...GetWorkspaceSize` phase, then runs on the stream).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `aclnnLogSoftmax(input, dim, out)`.
    LogSoftmax { input: TensorId, out: TensorId },
    /// `aclnnAmax(input, dims = [-1], keepDim = true, out)`.
    AmaxLast { input: TensorId, out: TensorId },
    /// `aclnnAdds(input, scalar, alpha = 1, out)`.
    Adds {
        input: TensorId,
        scalar: f32,
        out: TensorId,
    },
    /// `aclnnMuls(input, scalar, out)`.
    Muls {
        input: TensorId,
        scalar: f32,
        out: TensorId,
    },
    /// `aclnnSub(a, b, alpha = 1, out)`, `b` broadcast.
    Sub {
        a: TensorId,
        b: TensorId,
        out: TensorId,
    },
    /// `aclnnMul(a, b, out)`, `b` broadcast.
    Mul {
        a: TensorId,
        b: TensorId,
        out: TensorId,
    },
    /// `aclnnAdd(a, b, alpha = 1, out)`, `b` broadcast.
    Add {
        a: TensorId,
        b: TensorId,
        out: TensorId,
    },
    /// `aclnnLtTensor(a, b, out)`: `a < b` elementwise, `b` broadcast.
    LtTensor {
        a: TensorId,
        b: TensorId,
        out: TensorId,
    },
    /// `aclnnInplaceMaskedFillScalar(target, mask, value)`: `value` where `mask`.
    MaskedFill {
        target: TensorId,
        mask: TensorId,
        value: f32,
    },
    /// `aclnnTopk(input, k, dim = -1, largest = true, sorted = true, values, indices)`.
    TopK {
        input: TensorId,
        k: usize,
        values: TensorId,
        indices: TensorId,
    },
    /// `aclnnIndexSelect(input, dim = 0, index, out)`.
    IndexSelect {
        input: TensorId,
        index: TensorId,
        out: TensorId,
    },
    /// `aclnnBatchMatMul(a, b, out)`: `[n, i, j] x [n, j, l] -> [n, i, l]`.
    BatchMatMul {
        a: TensorId,
        b: TensorId,
        out: TensorId,
    },
}

impl Step {
    pub fn operator(&self) -> &'static str {
        match self {
            Step::LogSoftmax { .. } => "aclnnLogSoftmax",
            Step::AmaxLast { .. } => "aclnnAmax",
            Step::Adds { .. } => "aclnnAdds",
            Step::Muls { .. } => "aclnnMuls",
            Step::Sub { .. } => "aclnnSub",
            Step::Mul { .. } => "aclnnMul",
            Step::Add { .. } => "aclnnAdd",
            Step::LtTensor { .. } => "aclnnLtTensor",
            Step::MaskedFill { .. } => "aclnnInplaceMaskedFillScalar",
            Step::TopK { .. } => "aclnnTopk",
            Step::IndexSelect { .. } => "aclnnIndexSelect",
            Step::BatchMatMul { .. } => "aclnnBatchMatMul",
        }
    }

    fn operands(&self) -> (Vec<TensorId>, Vec<TensorId>) {
        match *self {
            Step::LogSoftmax { input, out }
            | Step::AmaxLast { input, out }
            | Step::Adds { input, out, .. }
            | Step::Muls { input, out, .. } => (vec![input], vec![out]),
            Step::Sub { a, b, out }
            | Step::Mul { a, b, out }
            | Step::Add { a, b, out }
            | Step::LtTensor { a, b, out }
            | Step::BatchMatMul { a, b, out } => (vec![a, b], vec![out]),
            Step::MaskedFill { target, mask, .. } => (vec![target, mask], vec![target]),
            Step::TopK {
                input,
                values,
                indices,
                ..
            } => (vec![input], vec![values, indices]),
            Step::IndexSelect { input, index, out } => (vec![input, index], vec![out]),
        }
    }
}

/// Tensors (inputs first, then intermediates and outputs) and the steps over them.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub tensors: Vec<TensorDesc>,
    pub steps: Vec<Step>,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
}

struct Builder {
    tensors: Vec<TensorDesc>,
}

impl Builder {
    fn tensor(&mut self, name: &'static str, shape: &[usize], dtype: AclDType) -> TensorId {
        self.tensors.push(TensorDesc {
            name,
            shape: shape.to_vec(),
            dtype,
        });
        self.tensors.len() - 1
    }
}

/// CoLD over `pairs` (expert, base) rows of `vocab` logits: the scores of the CPU scorer
/// (`rust/core/src/logits/cold.rs`) on log-softmaxed rows, and their best `k`, best first.
pub fn cold_plan(pairs: usize, vocab: usize, k: usize, p: &ColdParams) -> Result<Plan> {
    p.validate()?;
    if pairs == 0 || vocab == 0 || k == 0 || k > vocab {
        return Err(Error::invalid(format!(
            "a CoLD plan needs pairs, vocab >= 1 and 1 <= k <= vocab (got {pairs}, {vocab}, {k})"
        )));
    }
    let f = AclDType::Float;
    let mut b = Builder { tensors: vec![] };
    let row = [pairs, vocab];
    let col = [pairs, 1];
    let expert = b.tensor("expert", &row, f);
    let base = b.tensor("base", &row, f);
    let s_e = b.tensor("s_e", &row, f);
    let s_b = b.tensor("s_b", &row, f);
    let max_e = b.tensor("max_e", &col, f);
    let cut = b.tensor("cut", &col, f);
    let below = b.tensor("below_cut", &row, AclDType::Bool);
    let kept = b.tensor("kept", &row, f);
    let contrast = b.tensor("contrast", &row, f);
    let score = b.tensor("score", &row, f);
    let values = b.tensor("values", &[pairs, k], f);
    let indices = b.tensor("indices", &[pairs, k], AclDType::Int64);
    let steps = vec![
        Step::LogSoftmax {
            input: expert,
            out: s_e,
        },
        Step::LogSoftmax {
            input: base,
            out: s_b,
        },
        Step::AmaxLast {
            input: s_e,
            out: max_e,
        },
        Step::Adds {
            input: max_e,
            scalar: p.alpha.ln(),
            out: cut,
        },
        Step::LtTensor {
            a: s_e,
            b: cut,
            out: below,
        },
        Step::Muls {
            input: s_e,
            scalar: 1.0 + p.beta,
            out: kept,
        },
        Step::Muls {
            input: s_b,
            scalar: p.beta / p.base_temperature,
            out: contrast,
        },
        Step::Sub {
            a: kept,
            b: contrast,
            out: score,
        },
        Step::MaskedFill {
            target: score,
            mask: below,
            value: f32::NEG_INFINITY,
        },
        Step::TopK {
            input: score,
            k,
            values,
            indices,
        },
    ];
    let plan = Plan {
        tensors: b.tensors,
        steps,
        inputs: vec![expert, base],
        outputs: vec![values, indices],
    };
    plan.check_shapes()?;
    Ok(plan)
}

/// The batched LoRA delta for `rows` rows: `y + scale[s]·B[s]·(A[s]·x)` with each row's slot
/// `s`. Stacks hold `slots + 1` adapters, the last all zeros: the host maps a row without an
/// adapter to it (aclnn has no per-row skip), and `scales` is `[slots + 1, 1, 1]`.
pub fn lora_plan(
    rows: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    slots: usize,
) -> Result<Plan> {
    if [rows, d_in, d_out, rank].contains(&0) {
        return Err(Error::invalid(format!(
            "a LoRA plan needs rows, d_in, d_out and rank >= 1 (got {rows}, {d_in}, {d_out}, {rank})"
        )));
    }
    let f = AclDType::Float;
    let mut b = Builder { tensors: vec![] };
    let x = b.tensor("x", &[rows, d_in, 1], f);
    let y = b.tensor("y", &[rows, d_out, 1], f);
    let a_stack = b.tensor("a_stack", &[slots + 1, rank, d_in], f);
    let b_stack = b.tensor("b_stack", &[slots + 1, d_out, rank], f);
    let scales = b.tensor("scales", &[slots + 1, 1, 1], f);
    let slot = b.tensor("slot", &[rows], AclDType::Int64);
    let a_rows = b.tensor("a_rows", &[rows, rank, d_in], f);
    let b_rows = b.tensor("b_rows", &[rows, d_out, rank], f);
    let scale_rows = b.tensor("scale_rows", &[rows, 1, 1], f);
    let u = b.tensor("u", &[rows, rank, 1], f);
    let delta = b.tensor("delta", &[rows, d_out, 1], f);
    let scaled = b.tensor("scaled", &[rows, d_out, 1], f);
    let out = b.tensor("y_out", &[rows, d_out, 1], f);
    let steps = vec![
        Step::IndexSelect {
            input: a_stack,
            index: slot,
            out: a_rows,
        },
        Step::IndexSelect {
            input: b_stack,
            index: slot,
            out: b_rows,
        },
        Step::IndexSelect {
            input: scales,
            index: slot,
            out: scale_rows,
        },
        Step::BatchMatMul {
            a: a_rows,
            b: x,
            out: u,
        },
        Step::BatchMatMul {
            a: b_rows,
            b: u,
            out: delta,
        },
        Step::Mul {
            a: delta,
            b: scale_rows,
            out: scaled,
        },
        Step::Add {
            a: y,
            b: scaled,
            out,
        },
    ];
    let plan = Plan {
        tensors: b.tensors,
        steps,
        inputs: vec![x, y, a_stack, b_stack, scales, slot],
        outputs: vec![out],
    };
    plan.check_shapes()?;
    Ok(plan)
}

fn broadcasts(from: &[usize], to: &[usize]) -> bool {
    from.len() == to.len() && from.iter().zip(to).all(|(&f, &t)| f == t || f == 1)
}

impl Plan {
    /// One line per step: the operator and its operands with their shapes.
    pub fn describe(&self) -> Vec<String> {
        let show = |ids: &[TensorId]| {
            ids.iter()
                .map(|&t| format!("{}{:?}", self.tensors[t].name, self.tensors[t].shape))
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.steps
            .iter()
            .map(|s| {
                let (ins, outs) = s.operands();
                format!("{}({}) -> {}", s.operator(), show(&ins), show(&outs))
            })
            .collect()
    }

    /// Each step's operand shapes and types are what its operator accepts, and every tensor a
    /// step reads is an input or written by an earlier step.
    pub fn check_shapes(&self) -> Result<()> {
        let mut ready: Vec<bool> = (0..self.tensors.len())
            .map(|t| self.inputs.contains(&t))
            .collect();
        for step in &self.steps {
            let (ins, outs) = step.operands();
            let shape = |t: TensorId| self.tensors[t].shape.as_slice();
            let dtype = |t: TensorId| self.tensors[t].dtype;
            let fail = |why: &str| Err(Error::invalid(format!("{}: {why}", step.operator())));
            if let Some(&t) = ins.iter().find(|&&t| !ready[t]) {
                return fail(&format!(
                    "reads {} before it is written",
                    self.tensors[t].name
                ));
            }
            let ok = match *step {
                Step::LogSoftmax { input, out }
                | Step::Adds { input, out, .. }
                | Step::Muls { input, out, .. } => shape(input) == shape(out),
                Step::AmaxLast { input, out } => {
                    let s = shape(input);
                    shape(out) == [&s[..s.len() - 1], &[1]].concat().as_slice()
                }
                Step::Sub { a, b, out } | Step::Mul { a, b, out } | Step::Add { a, b, out } => {
                    shape(a) == shape(out) && broadcasts(shape(b), shape(a))
                }
                Step::LtTensor { a, b, out } => {
                    shape(a) == shape(out)
                        && broadcasts(shape(b), shape(a))
                        && dtype(out) == AclDType::Bool
                }
                Step::MaskedFill { target, mask, .. } => {
                    shape(target) == shape(mask) && dtype(mask) == AclDType::Bool
                }
                Step::TopK {
                    input,
                    k,
                    values,
                    indices,
                } => {
                    let s = shape(input);
                    let want = [&s[..s.len() - 1], &[k]].concat();
                    k <= s[s.len() - 1]
                        && shape(values) == want.as_slice()
                        && shape(indices) == want.as_slice()
                        && dtype(indices) == AclDType::Int64
                }
                Step::IndexSelect { input, index, out } => {
                    let (s, i) = (shape(input), shape(index));
                    i.len() == 1
                        && dtype(index) == AclDType::Int64
                        && shape(out) == [i, &s[1..]].concat().as_slice()
                }
                Step::BatchMatMul { a, b, out } => {
                    let (sa, sb, so) = (shape(a), shape(b), shape(out));
                    sa.len() == 3
                        && sb.len() == 3
                        && sa[0] == sb[0]
                        && sa[2] == sb[1]
                        && so == [sa[0], sa[1], sb[2]]
                }
            };
            if !ok {
                return fail(&format!(
                    "operand shapes do not fit: {}",
                    self.describe_step(step)
                ));
            }
            for t in outs {
                ready[t] = true;
            }
        }
        match self.outputs.iter().find(|&&t| !ready[t]) {
            Some(&t) => Err(Error::invalid(format!(
                "output {} is never written",
                self.tensors[t].name
            ))),
            None => Ok(()),
        }
    }

    fn describe_step(&self, step: &Step) -> String {
        let i = self.steps.iter().position(|s| s == step).unwrap_or(0);
        self.describe().swap_remove(i)
    }

    /// Runs the plan on the CPU, each step with its operator's semantics (f32 arithmetic; Bool
    /// as 0/1, Int64 as exact small integers in f32), and returns the outputs.
    pub fn run_on_host(&self, inputs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::invalid(format!(
                "the plan takes {} inputs",
                self.inputs.len()
            )));
        }
        let mut data: Vec<Vec<f32>> = self
            .tensors
            .iter()
            .map(|t| vec![0.0; t.shape.iter().product()])
            .collect();
        for (&t, v) in self.inputs.iter().zip(inputs) {
            if v.len() != data[t].len() {
                return Err(Error::invalid(format!(
                    "input {} has the wrong size",
                    self.tensors[t].name
                )));
            }
            data[t].clone_from(v);
        }
        for step in &self.steps {
            host::run(self, step, &mut data);
        }
        Ok(self.outputs.iter().map(|&t| data[t].clone()).collect())
    }
}

/// The operators' semantics on the host, for [`Plan::run_on_host`].
mod host {
    use super::{Plan, Step, TensorId};

    fn last(plan: &Plan, t: TensorId) -> usize {
        *plan.tensors[t].shape.last().unwrap_or(&1)
    }

    /// `a op b` with `b` broadcast over `a`'s shape.
    fn binary(
        plan: &Plan,
        data: &mut [Vec<f32>],
        a: TensorId,
        b: TensorId,
        out: TensorId,
        op: fn(f32, f32) -> f32,
    ) {
        let (sa, sb) = (&plan.tensors[a].shape, &plan.tensors[b].shape);
        let result: Vec<f32> = (0..data[a].len())
            .map(|flat| {
                let (mut rest, mut at, mut stride) = (flat, 0, 1);
                for d in (0..sa.len()).rev() {
                    let i = rest % sa[d];
                    rest /= sa[d];
                    if sb[d] != 1 {
                        at += i * stride;
                    }
                    stride *= sb[d];
                }
                op(data[a][flat], data[b][at])
            })
            .collect();
        data[out] = result;
    }

    pub(super) fn run(plan: &Plan, step: &Step, data: &mut [Vec<f32>]) {
        match *step {
            Step::LogSoftmax { input, out } => {
                let n = last(plan, input);
                data[out] = data[input]
                    .chunks(n)
                    .flat_map(|row| {
                        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let lse = m + row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
                        row.iter().map(move |&x| x - lse)
                    })
                    .collect();
            }
            Step::AmaxLast { input, out } => {
                let n = last(plan, input);
                data[out] = data[input]
                    .chunks(n)
                    .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                    .collect();
            }
            Step::Adds { input, scalar, out } => {
                data[out] = data[input].iter().map(|&x| x + scalar).collect()
            }
            Step::Muls { input, scalar, out } => {
                data[out] = data[input].iter().map(|&x| x * scalar).collect()
            }
            Step::Sub { a, b, out } => binary(plan, data, a, b, out, |x, y| x - y),
            Step::Mul { a, b, out } => binary(plan, data, a, b, out, |x, y| x * y),
            Step::Add { a, b, out } => binary(plan, data, a, b, out, |x, y| x + y),
            Step::LtTensor { a, b, out } => {
                binary(plan, data, a, b, out, |x, y| f32::from(u8::from(x < y)))
            }
            Step::MaskedFill {
                target,
                mask,
                value,
            } => {
                let mask = data[mask].clone();
                for (x, &m) in data[target].iter_mut().zip(&mask) {
                    if m != 0.0 {
                        *x = value;
                    }
                }
            }
            Step::TopK {
                input,
                k,
                values,
                indices,
            } => {
                let n = last(plan, input);
                let (mut vs, mut is) = (Vec::new(), Vec::new());
                for row in data[input].chunks(n) {
                    let mut order: Vec<usize> = (0..n).collect();
                    // Largest first; equal values keep the lower index first (a stable sort).
                    order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
                    for &i in &order[..k] {
                        vs.push(row[i]);
                        is.push(i as f32);
                    }
                }
                data[values] = vs;
                data[indices] = is;
            }
            Step::IndexSelect { input, index, out } => {
                let per: usize = plan.tensors[input].shape[1..].iter().product();
                data[out] = data[index]
                    .iter()
                    .flat_map(|&s| data[input][s as usize * per..(s as usize + 1) * per].to_vec())
                    .collect();
            }
            Step::BatchMatMul { a, b, out } => {
                let (sa, sb) = (&plan.tensors[a].shape, &plan.tensors[b].shape);
                let (n, i, j, l) = (sa[0], sa[1], sa[2], sb[2]);
                let mut o = vec![0.0f32; n * i * l];
                for batch in 0..n {
                    for r in 0..i {
                        for c in 0..l {
                            o[(batch * i + r) * l + c] = (0..j)
                                .map(|t| {
                                    data[a][(batch * i + r) * j + t]
                                        * data[b][(batch * j + t) * l + c]
                                })
                                .sum();
                        }
                    }
                }
                data[out] = o;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::Rng;
    use crate::logits::{cold_choose, cold_scores};

    fn random(n: usize, scale: f32, rng: &mut Rng) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
            .collect()
    }

    #[test]
    fn the_cold_plan_is_this_sequence_of_operators() {
        let plan = cold_plan(2, 5, 3, &ColdParams::default()).map_err(|e| e.to_string());
        assert_eq!(
            plan.map(|p| p.describe()),
            Ok(vec![
                "aclnnLogSoftmax(expert[2, 5]) -> s_e[2, 5]".to_string(),
                "aclnnLogSoftmax(base[2, 5]) -> s_b[2, 5]".into(),
                "aclnnAmax(s_e[2, 5]) -> max_e[2, 1]".into(),
                "aclnnAdds(max_e[2, 1]) -> cut[2, 1]".into(),
                "aclnnLtTensor(s_e[2, 5], cut[2, 1]) -> below_cut[2, 5]".into(),
                "aclnnMuls(s_e[2, 5]) -> kept[2, 5]".into(),
                "aclnnMuls(s_b[2, 5]) -> contrast[2, 5]".into(),
                "aclnnSub(kept[2, 5], contrast[2, 5]) -> score[2, 5]".into(),
                "aclnnInplaceMaskedFillScalar(score[2, 5], below_cut[2, 5]) -> score[2, 5]".into(),
                "aclnnTopk(score[2, 5]) -> values[2, 3], indices[2, 3]".into(),
            ])
        );
    }

    /// The plan's picks are the CPU scorer's, best first, and its scores differ from the CPU's
    /// (raw-logit) scores by one constant per row: the log-sum-exps the plan subtracts.
    #[test]
    fn the_cold_plan_picks_what_the_cpu_scorer_picks() {
        let mut rng = Rng::new(7, 0);
        for (pairs, vocab, k, scale) in [
            (1, 10, 1, 1.0),
            (3, 257, 5, 8.0),
            (4, 1000, 16, 3.0),
            (2, 64, 64, 0.5),
        ] {
            for p in [
                ColdParams::default(),
                ColdParams {
                    alpha: 0.5,
                    beta: 2.0,
                    base_temperature: 0.7,
                    ..Default::default()
                },
                ColdParams {
                    alpha: 1e-3,
                    beta: 0.0,
                    ..Default::default()
                },
            ] {
                let expert = random(pairs * vocab, scale, &mut rng);
                let base = random(pairs * vocab, scale, &mut rng);
                let plan = cold_plan(pairs, vocab, k, &p).expect("plan");
                let out = plan
                    .run_on_host(&[expert.clone(), base.clone()])
                    .expect("run");
                let (values, indices) = (&out[0], &out[1]);
                for r in 0..pairs {
                    let (e, b) = (&expert[r * vocab..][..vocab], &base[r * vocab..][..vocab]);
                    let cpu = cold_scores(e, b, &p);
                    let mut order: Vec<usize> = (0..vocab).collect();
                    order.sort_by(|&i, &j| cpu[j].total_cmp(&cpu[i]));
                    let greedy = cold_choose(e, b, &p, &mut Rng::new(0, 0)) as f32;
                    assert_eq!(indices[r * k], greedy, "row {r}");
                    let mut shift = None;
                    for j in 0..k {
                        let (v, i) = (values[r * k + j], indices[r * k + j] as usize);
                        if cpu[order[j]].is_finite() {
                            assert_eq!(i, order[j], "row {r}, rank {j}");
                            let d = cpu[i] - v;
                            let s = *shift.get_or_insert(d);
                            assert!(
                                (d - s).abs() <= 1e-3 * (1.0 + s.abs()),
                                "row {r}: {d} vs {s}"
                            );
                        } else {
                            assert_eq!(v, f32::NEG_INFINITY, "row {r}, rank {j}: implausible");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_lora_plan_adds_each_rows_own_delta() {
        let (rows, d_in, d_out, rank, slots) = (5, 7, 6, 3, 2);
        let mut rng = Rng::new(11, 0);
        let plan = lora_plan(rows, d_in, d_out, rank, slots).expect("plan");
        assert_eq!(plan.steps.len(), 7);
        let x = random(rows * d_in, 1.0, &mut rng);
        let y = random(rows * d_out, 1.0, &mut rng);
        let mut a = random((slots + 1) * rank * d_in, 1.0, &mut rng);
        let mut b = random((slots + 1) * d_out * rank, 1.0, &mut rng);
        // The last slot is the zero adapter rows without one are mapped to.
        a[slots * rank * d_in..].fill(0.0);
        b[slots * d_out * rank..].fill(0.0);
        let scales = vec![0.5, 2.0, 0.0];
        let slot_of = [0usize, 1, 2, 1, 0];
        let slot: Vec<f32> = slot_of.iter().map(|&s| s as f32).collect();
        let out = plan
            .run_on_host(&[
                x.clone(),
                y.clone(),
                a.clone(),
                b.clone(),
                scales.clone(),
                slot,
            ])
            .expect("run");
        for (r, &s) in slot_of.iter().enumerate() {
            let u: Vec<f32> = (0..rank)
                .map(|j| {
                    (0..d_in)
                        .map(|d| a[(s * rank + j) * d_in + d] * x[r * d_in + d])
                        .sum()
                })
                .collect();
            for o in 0..d_out {
                let delta: f32 = (0..rank)
                    .map(|j| b[(s * d_out + o) * rank + j] * u[j])
                    .sum();
                let want = y[r * d_out + o] + scales[s] * delta;
                assert!(
                    (out[0][r * d_out + o] - want).abs() < 1e-4,
                    "row {r}, output {o}"
                );
            }
        }
    }

    #[test]
    fn shape_checks_catch_a_broken_plan() {
        let mut plan = cold_plan(2, 8, 2, &ColdParams::default()).expect("plan");
        plan.tensors[4].shape = vec![2, 8]; // max_e must be [2, 1]
        assert!(plan.check_shapes().is_err());
        let mut plan = lora_plan(3, 4, 5, 2, 1).expect("plan");
        plan.steps.swap(0, 3); // a batched matmul before the rows it reads are gathered
        let err = plan.check_shapes().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("before it is written")));
        assert!(cold_plan(1, 4, 5, &ColdParams::default()).is_err());
        assert!(lora_plan(1, 0, 4, 2, 1).is_err());
    }
}
