//! Converts the Python strategy dataclasses (sent as dicts) into the core's `SearchSpec`, and
//! Python callables into core callbacks whose exceptions are kept to be re-raised as they are.

use std::sync::{Arc, Mutex};

use peftscale_core::logits::{ColdParams, SamplingParams};
use peftscale_core::lora::Verifier;
use peftscale_core::search::{
    AdaptiveParams, BeamParams, BestOfNParams, EarlyStopping, ExtractFn, Extractor, MctsParams,
    Ranking, Reward, Rollout, Scorer, SearchSpec, SelfConsistencyParams, ToTEvaluator, ToTGenerate,
    ToTParams, ToTSearch, VerifierSearchParams, Vote,
};
use peftscale_core::Engine;
use peftscale_core::Error;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::InvalidArgument;

/// The first exception a Python callback raised during a generation.
pub(crate) type CallbackError = Arc<Mutex<Option<PyErr>>>;

/// `(temperature, top_k, top_p, min_p, repetition_penalty, seed)`.
pub(crate) type SamplingTuple = (f32, usize, f32, f32, f32, u64);
type ColdTuple = (f32, f32, f32, bool, f32, u64, bool);

fn item<'py, T: FromPyObject<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    match d.get_item(key)? {
        Some(v) => v.extract().map_err(|e| {
            InvalidArgument::new_err(format!("invalid argument: strategy field `{key}`: {e}"))
        }),
        None => Err(InvalidArgument::new_err(format!(
            "invalid argument: strategy field `{key}` is missing"
        ))),
    }
}

pub(crate) fn sampling_params(
    (temperature, top_k, top_p, min_p, repetition_penalty, seed): SamplingTuple,
) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        seed,
    }
}

fn sampling(d: &Bound<'_, PyDict>) -> PyResult<SamplingParams> {
    item(d, "sampling").map(sampling_params)
}

pub(crate) fn cold(t: Option<ColdTuple>) -> Option<ColdParams> {
    t.map(
        |(alpha, beta, base_temperature, sample, temperature, seed, paired)| ColdParams {
            alpha,
            beta,
            base_temperature,
            sample,
            temperature,
            seed,
            paired,
        },
    )
}

pub(crate) fn remember(errors: &CallbackError, what: &str, err: PyErr) -> Error {
    let message = Python::with_gil(|py| err.value(py).to_string());
    let mut slot = errors.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(err);
    }
    Error::Callback {
        what: what.to_string(),
        message,
    }
}

fn scorer(f: PyObject, what: &'static str, errors: &CallbackError) -> Scorer {
    let errors = errors.clone();
    let batched = Python::with_gil(|py| {
        f.bind(py)
            .getattr("__peftscale_batch__")
            .and_then(|v| v.is_truthy())
            .unwrap_or(false)
    });
    if batched {
        // `peftscale.batched`: one call per step with every candidate.
        return Scorer::batch(move |prompt: &str, completions: &[&str]| {
            Python::with_gil(|py| {
                let value = f
                    .call1(py, (prompt, completions.to_vec()))
                    .map_err(|e| remember(&errors, what, e))?;
                let bound = value.bind(py);
                let items: Vec<Bound<'_, PyAny>> = bound
                    .try_iter()
                    .and_then(|it| it.collect::<PyResult<Vec<_>>>())
                    .map_err(|_| not_a_list(&errors, what, bound))?;
                items
                    .iter()
                    .map(|v| {
                        if v.is_instance_of::<pyo3::types::PyBool>() {
                            return Err(not_a_number(&errors, what, v));
                        }
                        v.extract::<f64>()
                            .map_err(|_| not_a_number(&errors, what, v))
                    })
                    .collect()
            })
        });
    }
    Scorer::new(move |prompt: &str, completion: &str| {
        Python::with_gil(|py| {
            let value = f
                .call1(py, (prompt, completion))
                .map_err(|e| remember(&errors, what, e))?;
            let bound = value.bind(py);
            if bound.is_instance_of::<pyo3::types::PyBool>() {
                return Err(not_a_number(&errors, what, bound));
            }
            bound
                .extract::<f64>()
                .map_err(|_| not_a_number(&errors, what, bound))
        })
    })
}

fn not_a_list(errors: &CallbackError, what: &str, value: &Bound<'_, PyAny>) -> Error {
    let shown = value
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into());
    remember(
        errors,
        what,
        PyTypeError::new_err(format!(
            "the batched {what} callback must return a list of numbers, one per completion, got \
             {shown}"
        )),
    )
}

fn not_a_number(errors: &CallbackError, what: &str, value: &Bound<'_, PyAny>) -> Error {
    let shown = value
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into());
    let kind = value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    remember(
        errors,
        what,
        PyTypeError::new_err(format!(
            "the {what} callback must return a number, got {shown} ({kind})"
        )),
    )
}

fn extractor(d: &Bound<'_, PyDict>, errors: &CallbackError) -> PyResult<Extractor> {
    let v = d
        .get_item("extract")?
        .ok_or_else(|| InvalidArgument::new_err("invalid argument: `extract` is missing"))?;
    if let Ok(name) = v.extract::<String>() {
        return crate::answers::named_extractor(&name);
    }
    if !v.is_callable() {
        return Err(InvalidArgument::new_err(format!(
            "invalid argument: extract must be 'last_number', 'boxed', 'choice_letter' or a \
             callable, got {v}"
        )));
    }
    let f: PyObject = v.unbind();
    let errors = errors.clone();
    Ok(Extractor::Callback(ExtractFn::new(move |text: &str| {
        Python::with_gil(|py| {
            let out = f
                .call1(py, (text,))
                .map_err(|e| remember(&errors, "extract", e))?;
            let out = out.bind(py);
            if out.is_none() {
                return Ok(None);
            }
            out.extract::<String>().map(Some).map_err(|_| {
                let shown = out.repr().map(|r| r.to_string()).unwrap_or_default();
                remember(
                    &errors,
                    "extract",
                    PyTypeError::new_err(format!(
                        "the extract callback must return a str or None, got {shown}"
                    )),
                )
            })
        })
    })))
}

/// A callable or the name of a built-in, from field `key`.
fn named_or_callable(d: &Bound<'_, PyDict>, key: &str) -> PyResult<Result<String, PyObject>> {
    let v = d
        .get_item(key)?
        .ok_or_else(|| InvalidArgument::new_err(format!("invalid argument: `{key}` is missing")))?;
    if let Ok(s) = v.extract::<String>() {
        return Ok(Ok(s));
    }
    if v.is_callable() {
        return Ok(Err(v.unbind()));
    }
    Err(InvalidArgument::new_err(format!(
        "invalid argument: {key} must be a name or a callable, got {v}"
    )))
}

fn bad(key: &str, allowed: &str, got: &str) -> PyErr {
    InvalidArgument::new_err(format!(
        "invalid argument: {key} must be {allowed}, got '{got}'"
    ))
}

/// The loaded verifier a strategy field names (`{"verifier": name}`), if it names one.
fn verifier_in(v: &Bound<'_, PyAny>, engine: &Engine) -> PyResult<Option<Arc<Verifier>>> {
    let Ok(d) = v.downcast::<PyDict>() else {
        return Ok(None);
    };
    let name: String = item(d, "verifier")?;
    engine.verifier(&name).map(Some).map_err(crate::to_py)
}

fn field_verifier(
    d: &Bound<'_, PyDict>,
    key: &str,
    engine: &Engine,
) -> PyResult<Option<Arc<Verifier>>> {
    match d.get_item(key)? {
        Some(v) => verifier_in(&v, engine),
        None => Ok(None),
    }
}

pub(crate) fn spec(
    d: &Bound<'_, PyDict>,
    errors: &CallbackError,
    engine: &Engine,
) -> PyResult<SearchSpec> {
    let kind: String = item(d, "kind")?;
    let cold_params = cold(item(d, "cold")?);
    Ok(match kind.as_str() {
        "beam" => {
            let early: String = item(d, "early_stopping")?;
            let early_stopping = match early.as_str() {
                "true" => EarlyStopping::True,
                "false" => EarlyStopping::False,
                "never" => EarlyStopping::Never,
                other => return Err(bad("early_stopping", "True, False or 'never'", other)),
            };
            SearchSpec::Beam(BeamParams {
                num_beams: item(d, "num_beams")?,
                length_penalty: item(d, "length_penalty")?,
                early_stopping,
                num_return_sequences: item(d, "num_return_sequences")?,
                cold: cold_params,
            })
        }
        "best_of_n" => {
            let ranking = match field_verifier(d, "scorer", engine)? {
                Some(v) => Ranking::Verifier(v),
                None => match named_or_callable(d, "scorer")? {
                    Ok(name) => match name.as_str() {
                        "mean_logprob" => Ranking::MeanLogprob,
                        "sum_logprob" => Ranking::SumLogprob,
                        other => {
                            return Err(bad(
                                "scorer",
                                "'mean_logprob', 'sum_logprob', a callable or a CoLD",
                                other,
                            ))
                        }
                    },
                    Err(f) => Ranking::Callback(scorer(f, "scorer", errors)),
                },
            };
            SearchSpec::BestOfN(BestOfNParams {
                n: item(d, "n")?,
                sampling: sampling(d)?,
                ranking,
                cold: cold_params,
            })
        }
        "self_consistency" => {
            let vote: String = item(d, "vote")?;
            let vote = match vote.as_str() {
                "majority" => Vote::Majority,
                "weighted" => Vote::Weighted,
                other => return Err(bad("vote", "'majority' or 'weighted'", other)),
            };
            let weight: Option<PyObject> = item(d, "weight")?;
            SearchSpec::SelfConsistency(SelfConsistencyParams {
                n: item(d, "n")?,
                sampling: sampling(d)?,
                extract: extractor(d, errors)?,
                vote,
                weight: weight.map(|f| scorer(f, "scorer", errors)),
                verifier: field_verifier(d, "verifier", engine)?,
                stop_when_confident: item(d, "stop_when_confident")?,
                round_size: item(d, "round_size")?,
                cold: cold_params,
            })
        }
        "tot" => {
            let generate: String = item(d, "generate")?;
            let generate = match generate.as_str() {
                "sample" => ToTGenerate::Sample,
                "propose" => ToTGenerate::Propose {
                    template: item(d, "propose_template")?,
                },
                other => return Err(bad("generate", "'sample' or 'propose'", other)),
            };
            let evaluator = match field_verifier(d, "evaluator", engine)? {
                Some(v) => ToTEvaluator::Verifier(v),
                None => match named_or_callable(d, "evaluator")? {
                    Ok(name) if name == "self" => ToTEvaluator::SelfValue {
                        template: item(d, "value_template")?,
                        samples: item(d, "value_samples")?,
                        max_tokens: item(d, "value_max_tokens")?,
                    },
                    Ok(other) => return Err(bad("evaluator", "'self' or a callable", &other)),
                    Err(f) => ToTEvaluator::Callback(scorer(f, "evaluator", errors)),
                },
            };
            let search: String = item(d, "search")?;
            let search = match search.as_str() {
                "bfs" => ToTSearch::Bfs,
                "dfs" => ToTSearch::Dfs,
                other => return Err(bad("search", "'bfs' or 'dfs'", other)),
            };
            SearchSpec::TreeOfThought(ToTParams {
                step_delimiter: item(d, "step_delimiter")?,
                proposals: item(d, "proposals")?,
                breadth: item(d, "breadth")?,
                depth: item(d, "depth")?,
                generate,
                evaluator,
                search,
                value_threshold: item(d, "value_threshold")?,
                max_step_tokens: item(d, "max_step_tokens")?,
                sampling: sampling(d)?,
                cold: cold_params,
                extract: match d.get_item("extract")? {
                    Some(v) if !v.is_none() => Some(extractor(d, errors)?),
                    _ => None,
                },
            })
        }
        "mcts" => {
            let reward = match field_verifier(d, "reward", engine)? {
                Some(v) => Reward::Verifier(v),
                None => match named_or_callable(d, "reward")? {
                    Ok(name) if name == "self_consistency" => Reward::SelfConsistency,
                    Ok(other) => {
                        return Err(bad("reward", "'self_consistency' or a callable", &other))
                    }
                    Err(f) => Reward::Callback(scorer(f, "reward", errors)),
                },
            };
            let rollout: String = item(d, "rollout")?;
            let rollout = match rollout.as_str() {
                "greedy" => Rollout::Greedy,
                "sample" => Rollout::Sample,
                other => return Err(bad("rollout", "'greedy' or 'sample'", other)),
            };
            SearchSpec::Mcts(MctsParams {
                iterations: item(d, "iterations")?,
                expansions: item(d, "expansions")?,
                c_puct: item(d, "c_puct")?,
                step_delimiter: item(d, "step_delimiter")?,
                max_depth: item(d, "max_depth")?,
                reward,
                rollout,
                extract: extractor(d, errors)?,
                max_step_tokens: item(d, "max_step_tokens")?,
                sampling: sampling(d)?,
                cold: cold_params,
            })
        }
        "verifier_beam" => {
            let verifier = field_verifier(d, "verifier", engine)?.ok_or_else(|| {
                InvalidArgument::new_err("invalid argument: `verifier` names no loaded verifier")
            })?;
            let delimiter: Option<String> = item(d, "step_delimiter")?;
            SearchSpec::VerifierSearch(VerifierSearchParams {
                n: item(d, "n")?,
                beam_width: item(d, "beam_width")?,
                subtrees: item(d, "subtrees")?,
                step_delimiter: delimiter.unwrap_or_else(|| verifier.step_tag.clone()),
                verifier,
                max_steps: item(d, "max_steps")?,
                max_step_tokens: item(d, "max_step_tokens")?,
                sampling: sampling(d)?,
                extract: extractor(d, errors)?,
                cold: cold_params,
            })
        }
        "adaptive" => SearchSpec::Adaptive(AdaptiveParams {
            budget_tokens: item(d, "budget_tokens")?,
            probe: item(d, "probe")?,
            min_n: item(d, "min_n")?,
            max_n: item(d, "max_n")?,
            bins: item(d, "bins")?,
            sampling: sampling(d)?,
            extract: extractor(d, errors)?,
            cold: cold_params,
        }),
        other => {
            return Err(InvalidArgument::new_err(format!(
                "invalid argument: unknown search strategy '{other}'"
            )))
        }
    })
}
