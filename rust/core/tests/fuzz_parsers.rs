//! Mutation fuzzing of every file the engine parses: GGUF models (a tiny one, and the packaged
//! model's tokenizer and chat template on tiny weights), safetensors models and adapters,
//! `config.json`, `adapter_config.json`, `tokenizer.json` and chat templates.
//!
//! Each case mutates a valid seed (truncation, bit flips, length and count fields set to huge or
//! negative values, wrong tensor offsets and shapes, NaN and infinite weights, JSON values replaced)
//! and loads it. A case passes when it ends in a valid load (which is then used: tokenize, render
//! the chat template, decode a few tokens) or in a typed error. It fails on a panic, on a case that
//! runs past a deadline, on a single allocation above a hard cap (the process aborts naming the
//! case), or on memory growth far beyond the input's size.
//!
//! `cargo test --release --test fuzz_parsers` runs a fixed seed and case count. Longer runs:
//! `PEFTSCALE_FUZZ_SECONDS=600` (keeps drawing cases until then), `PEFTSCALE_FUZZ_SEED=n`,
//! `PEFTSCALE_FUZZ_FORMATS=gguf,tokenizer.json` (only those formats). The input of a failing
//! case is written to the temporary folder (`peftscale-fuzz-*.bin`, named in the message).
//! `PEFTSCALE_PACKAGED_GGUF` names the packaged model's GGUF (`scripts/test.sh` sets it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Value as GgufValue;
use peftscale_core::text::{ChatMessage, ChatTemplate};
use peftscale_core::{Engine, Error, GenerateOptions, WeightDType};
use serde_json::Value;

mod common;
use common::*;

// ---------------------------------------------------------------------------------------------
// Guards: allocation accounting, hard allocation cap, per-case deadline.

/// No parser should ever ask for one block this large from inputs of a few megabytes.
const HARD_ALLOCATION_CAP: usize = 1 << 30;
const CASE_DEADLINE: Duration = Duration::from_secs(30);

struct Accounting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static REFUSING: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for Accounting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HARD_ALLOCATION_CAP && REFUSING.load(Ordering::Relaxed) {
            report_refusal(layout.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > HARD_ALLOCATION_CAP && REFUSING.load(Ordering::Relaxed) {
            report_refusal(new_size);
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Accounting = Accounting;

/// The case now running, as text, for the messages printed when the process must abort.
static CASE_LABEL: Mutex<[u8; 160]> = Mutex::new([b' '; 160]);
static CASE_STARTED_MS: AtomicU64 = AtomicU64::new(0);
/// The input of the case now running, kept for the report of a hang.
static CASE_INPUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Writes a failing case's input where it can be replayed; returns the path.
fn save_input(kind: &str, bytes: &[u8]) -> String {
    static SAVED: AtomicUsize = AtomicUsize::new(0);
    let n = SAVED.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("peftscale-fuzz-{kind}-{n}.bin"));
    match std::fs::write(&path, bytes) {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("(not saved: {e})"),
    }
}

fn set_case_label(label: &str) {
    let mut buf = CASE_LABEL.lock().unwrap_or_else(|e| e.into_inner());
    buf.fill(b' ');
    let n = label.len().min(buf.len());
    buf[..n].copy_from_slice(&label.as_bytes()[..n]);
}

/// Writes without allocating: the refusal path runs inside the allocator.
fn write_case_label(prefix: &[u8]) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(prefix);
    if let Ok(buf) = CASE_LABEL.try_lock() {
        let _ = err.write_all(&buf[..]);
    }
    let _ = err.write_all(b"\n");
}

fn report_refusal(size: usize) {
    let mut digits = [0u8; 24];
    let mut n = size;
    let mut i = digits.len();
    while n > 0 || i == digits.len() {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"fuzz: refused an allocation of ");
    let _ = err.write_all(&digits[i..]);
    drop(err);
    write_case_label(b" bytes; case: ");
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn start_watchdog() {
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(500));
        let started = CASE_STARTED_MS.load(Ordering::Relaxed);
        if started != 0 && epoch_ms().saturating_sub(started) > CASE_DEADLINE.as_millis() as u64 {
            write_case_label(b"fuzz: a case ran past its deadline (a hang); case: ");
            if let Ok(input) = CASE_INPUT.try_lock() {
                eprintln!("fuzz: its input is in {}", save_input("hang", &input));
            }
            std::process::abort();
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Random numbers and byte-level mutations.

struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A fixed-width integer inside a file: a length, count, type tag, dimension or offset.
#[derive(Clone, Copy)]
struct Field {
    at: usize,
    width: usize,
}

fn interesting(rng: &mut Rand, width: usize, file_len: usize, old: u64) -> u64 {
    let values: [u64; 16] = [
        0,
        1,
        2,
        3,
        4,
        7,
        8,
        31,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        0xffff_fffe,
        file_len as u64,
        file_len as u64 + 1,
        u64::MAX,
        i64::MIN as u64,
    ];
    let v = match rng.below(4) {
        0 => old.wrapping_add(1 + rng.below(8) as u64),
        1 => old.wrapping_sub(1 + rng.below(8) as u64),
        2 => rng.next(),
        _ => *rng.pick(&values),
    };
    if width == 8 {
        v
    } else {
        v & 0xffff_ffff
    }
}

fn read_le(data: &[u8], f: Field) -> u64 {
    let mut b = [0u8; 8];
    b[..f.width].copy_from_slice(&data[f.at..f.at + f.width]);
    u64::from_le_bytes(b)
}

fn write_le(data: &mut [u8], f: Field, v: u64) {
    data[f.at..f.at + f.width].copy_from_slice(&v.to_le_bytes()[..f.width]);
}

/// One to three mutations of `seed`; `fields` are the structural integers the format knows of,
/// `floats` the byte ranges holding f32 weights. Returns the mutated bytes and what was done.
fn mutate_bytes(
    rng: &mut Rand,
    seed: &[u8],
    fields: &[Field],
    floats: &[(usize, usize)],
) -> (Vec<u8>, String) {
    let mut data = seed.to_vec();
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(3) {
        if data.is_empty() {
            break;
        }
        let len = data.len();
        match rng.below(8) {
            0 | 1 if !fields.is_empty() => {
                let f = *rng.pick(fields);
                if f.at + f.width <= len {
                    let v = interesting(rng, f.width, len, read_le(&data, f));
                    write_le(&mut data, f, v);
                    what.push(format!("field@{}={v:#x}", f.at));
                }
            }
            2 => {
                // Truncation, biased towards the header.
                let cut = if rng.chance(2) {
                    rng.below(len.min(4096))
                } else {
                    rng.below(len)
                };
                data.truncate(cut);
                what.push(format!("truncate@{cut}"));
            }
            3 => {
                let at = rng.below(len);
                let bits = 1 + rng.below(8);
                for _ in 0..bits {
                    let i = (at + rng.below(16)).min(len - 1);
                    data[i] ^= 1 << rng.below(8);
                }
                what.push(format!("flip{bits}@{at}"));
            }
            4 if !floats.is_empty() => {
                let (start, end) = *rng.pick(floats);
                if end.min(len) >= start + 4 {
                    let i = start + rng.below((end.min(len) - start) / 4) * 4;
                    let v = *rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX]);
                    data[i..i + 4].copy_from_slice(&v.to_le_bytes());
                    what.push(format!("weight@{i}={v}"));
                }
            }
            5 => {
                let at = rng.below(len);
                let n = 1 + rng.below(64.min(len - at));
                data.drain(at..at + n);
                what.push(format!("delete{n}@{at}"));
            }
            6 => {
                let at = rng.below(len);
                let n = 1 + rng.below(64.min(len - at));
                let chunk: Vec<u8> = data[at..at + n].to_vec();
                let to = rng.below(len);
                data.splice(to..to, chunk);
                what.push(format!("dup{n}@{at}->{to}"));
            }
            _ => {
                let at = rng.below(len.saturating_sub(8).max(1));
                let width = if rng.chance(2) { 4 } else { 8 }.min(len - at);
                let f = Field { at, width };
                let v = interesting(rng, width.max(4), len, read_le(&data, f));
                data[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
                what.push(format!("int@{at}={v:#x}"));
            }
        }
    }
    (data, what.join(","))
}

// ---------------------------------------------------------------------------------------------
// Where the structural integers of each format lie.

/// Walks a GGUF file's header, recording every length, count, type tag, dimension and offset,
/// and the byte ranges of its F32 tensors. `every_nth_string` thins out the string lengths of
/// big vocabularies so that their fields do not drown the rest.
fn gguf_fields(data: &[u8], every_nth_string: usize) -> (Vec<Field>, Vec<(usize, usize)>) {
    struct Walk<'a> {
        data: &'a [u8],
        pos: usize,
        fields: Vec<Field>,
        strings: usize,
        nth: usize,
    }
    impl Walk<'_> {
        fn int(&mut self, width: usize, record: bool) -> u64 {
            let f = Field {
                at: self.pos,
                width,
            };
            self.pos += width;
            if record {
                self.fields.push(f);
            }
            read_le(self.data, f)
        }
        fn string(&mut self) {
            self.strings += 1;
            let record = self.strings.is_multiple_of(self.nth) || self.strings < 64;
            let n = self.int(8, record) as usize;
            self.pos += n;
        }
        fn value(&mut self, ty: u32) {
            match ty {
                0 | 1 | 7 => self.pos += 1,
                2 | 3 => self.pos += 2,
                4..=6 => self.pos += 4,
                8 => self.string(),
                9 => {
                    let elem = self.int(4, true) as u32;
                    let count = self.int(8, true);
                    for _ in 0..count {
                        self.value(elem);
                    }
                }
                _ => self.pos += 8,
            }
        }
    }
    let mut w = Walk {
        data,
        pos: 8,
        fields: Vec::new(),
        strings: 0,
        nth: every_nth_string,
    };
    let tensors = w.int(8, true);
    let kvs = w.int(8, true);
    for _ in 0..kvs {
        w.string();
        let ty = w.int(4, true) as u32;
        w.value(ty);
    }
    let mut f32_tensors = Vec::new();
    for _ in 0..tensors {
        w.strings = 0; // every tensor name length is recorded
        w.string();
        let dims = w.int(4, true);
        let mut elems = 1u64;
        for _ in 0..dims {
            elems *= w.int(8, true);
        }
        let dtype = w.int(4, true);
        let offset = w.int(8, true);
        if dtype == 0 {
            f32_tensors.push((offset as usize, (offset + elems * 4) as usize));
        }
    }
    let data_start = w.pos.div_ceil(32) * 32;
    let floats = f32_tensors
        .into_iter()
        .map(|(a, b)| (data_start + a, data_start + b))
        .collect();
    (w.fields, floats)
}

/// The safetensors header length and the f32 data region.
fn safetensors_fields(data: &[u8]) -> (Vec<Field>, Vec<(usize, usize)>) {
    let n = read_le(data, Field { at: 0, width: 8 }) as usize;
    (vec![Field { at: 0, width: 8 }], vec![(8 + n, data.len())])
}

// ---------------------------------------------------------------------------------------------
// Structure-aware JSON mutations.

fn json_paths(v: &Value, here: Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let mut p = here.clone();
                p.push(k.clone());
                json_paths(child, p, out);
            }
        }
        Value::Array(a) => {
            // Long arrays (vocabularies, merges): a handful of their elements.
            let step = (a.len() / 16).max(1);
            for (i, child) in a.iter().enumerate().step_by(step) {
                let mut p = here.clone();
                p.push(i.to_string());
                json_paths(child, p, out);
            }
        }
        _ => {}
    }
}

fn json_at<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |node, key| match node {
        Value::Object(m) => m.get_mut(key),
        Value::Array(a) => a.get_mut(key.parse::<usize>().ok()?),
        _ => None,
    })
}

fn weird_json(rng: &mut Rand) -> Value {
    let deep = (0..200).fold(Value::Null, |v, _| Value::Array(vec![v]));
    let choices = [
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(1),
        serde_json::json!(4294967296u64),
        serde_json::json!(u64::MAX),
        serde_json::json!(i64::MIN),
        serde_json::json!(1e308),
        serde_json::json!(-1e308),
        serde_json::json!(0.5),
        serde_json::json!(""),
        serde_json::json!("x"),
        Value::String("\u{0}\u{ffff}🙂".repeat(rng.below(4) + 1)),
        Value::String("a".repeat(100_000)),
        Value::Null,
        serde_json::json!(true),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!([1, 2, 3]),
        deep,
    ];
    rng.pick(&choices).clone()
}

/// One to three value replacements, removals or duplications in a JSON document, then
/// sometimes a byte-level mutation of the text.
fn mutate_json(rng: &mut Rand, seed: &Value) -> (Vec<u8>, String) {
    let mut doc = seed.clone();
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let mut paths = Vec::new();
        json_paths(&doc, Vec::new(), &mut paths);
        let path = rng.pick(&paths).clone();
        let name = path.join(".");
        match rng.below(3) {
            0 if !path.is_empty() => {
                let (parent, last) = path.split_at(path.len() - 1);
                if let Some(node) = json_at(&mut doc, parent) {
                    match node {
                        Value::Object(m) => {
                            m.remove(&last[0]);
                        }
                        Value::Array(a) => {
                            let i: usize = last[0].parse().unwrap_or(0);
                            if i < a.len() {
                                a.remove(i);
                            }
                        }
                        _ => {}
                    }
                }
                what.push(format!("remove {name}"));
            }
            1 => {
                if let Some(Value::Array(a)) = json_at(&mut doc, &path) {
                    if let Some(first) = a.first().cloned() {
                        a.push(first);
                    }
                }
                what.push(format!("grow {name}"));
            }
            _ => {
                let v = weird_json(rng);
                if let Some(node) = json_at(&mut doc, &path) {
                    *node = v;
                }
                what.push(format!("set {name}"));
            }
        }
    }
    let text = serde_json::to_vec(&doc).unwrap_or_default();
    if rng.chance(4) {
        let (bytes, how) = mutate_bytes(rng, &text, &[], &[]);
        what.push(how);
        return (bytes, what.join(";"));
    }
    (text, what.join(";"))
}

/// Safetensors with its JSON header mutated structurally (shapes, dtypes, offsets, entries); the
/// length prefix is rewritten to match, or sometimes left stale.
fn mutate_safetensors(rng: &mut Rand, seed: &[u8]) -> (Vec<u8>, String) {
    let n = read_le(seed, Field { at: 0, width: 8 }) as usize;
    let header: Value = serde_json::from_slice(&seed[8..8 + n]).unwrap();
    let (text, what) = mutate_json(rng, &header);
    let mut out = Vec::with_capacity(seed.len());
    let len = if rng.chance(8) {
        n as u64
    } else {
        text.len() as u64
    };
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&seed[8 + n..]);
    (out, format!("header: {what}"))
}

// ---------------------------------------------------------------------------------------------
// Cases.

#[derive(Default)]
struct Tally {
    cases: usize,
    loaded: usize,
    errors: BTreeMap<&'static str, usize>,
    failures: Vec<String>,
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::ModelLoad { .. } => "ModelLoad",
        Error::AdapterLoad { .. } => "AdapterLoad",
        Error::InvalidArgument(_) => "InvalidArgument",
        Error::ContextOverflow { .. } => "ContextOverflow",
        Error::DeviceUnavailable { .. } => "DeviceUnavailable",
        Error::Tokenizer(_) => "Tokenizer",
        Error::ChatTemplate(_) => "ChatTemplate",
        Error::NonFiniteLogits { .. } => "NonFiniteLogits",
        Error::Callback { .. } => "Callback",
        Error::Tensor(_) => "Tensor",
    }
}

/// Uses a loaded engine the way an app would; every error it meets must be typed.
fn exercise(eng: &Engine, adapter: Option<&str>) -> Result<(), Error> {
    if let Ok(tok) = eng.tokenizer() {
        let ids = tok.encode("hello there, the end")?;
        tok.decode(&ids, false)?;
    }
    let messages = [ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    match eng.apply_chat_template(&messages, true) {
        Ok(_) | Err(Error::ChatTemplate(_)) => {}
        Err(e) => return Err(e),
    }
    let vocab = eng.config().vocab_size as u32;
    let opts = GenerateOptions {
        max_new_tokens: 3,
        adapters: vec![adapter.map(str::to_string)],
        ..Default::default()
    };
    eng.generate(vec![vec![1 % vocab, 2 % vocab, 3 % vocab]], &opts)?;
    Ok(())
}

struct Runner {
    tallies: BTreeMap<&'static str, Tally>,
    rng: Rand,
}

impl Runner {
    /// Runs one case: `body` loads the mutated input; `Ok(())` is a valid load, `Err` a typed
    /// error. A panic, a deadline overrun, an untyped error or memory growth beyond `limit`
    /// bytes fails the case.
    fn case(
        &mut self,
        format: &'static str,
        what: &str,
        input: &[u8],
        body: impl FnOnce() -> Result<(), Error>,
    ) {
        let label = format!("{format}: {what}");
        set_case_label(&label);
        let input_bytes = input.len();
        {
            let mut kept = CASE_INPUT.lock().unwrap_or_else(|e| e.into_inner());
            kept.clear();
            kept.extend_from_slice(input);
        }
        let live_before = LIVE.load(Ordering::Relaxed);
        PEAK.store(live_before, Ordering::Relaxed);
        CASE_STARTED_MS.store(epoch_ms(), Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(body));
        CASE_STARTED_MS.store(0, Ordering::Relaxed);
        let grew = PEAK.load(Ordering::Relaxed).saturating_sub(live_before);
        // Loading builds tensors, tokenizer tables and caches: allow a generous multiple of the
        // input, never gigabytes.
        let limit = 256 * (1 << 20) + 64 * input_bytes;
        let tally = self.tallies.entry(format).or_default();
        tally.cases += 1;
        match outcome {
            Ok(Ok(())) => tally.loaded += 1,
            Ok(Err(e)) => {
                *tally.errors.entry(kind(&e)).or_default() += 1;
                if matches!(e, Error::Tensor(_)) {
                    let saved = save_input("untyped", input);
                    tally
                        .failures
                        .push(format!("{label}: untyped error: {e} (input: {saved})"));
                }
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let saved = save_input("panic", input);
                tally
                    .failures
                    .push(format!("{label}: panic: {msg} (input: {saved})"));
            }
        }
        if grew > limit {
            tally.failures.push(format!(
                "{label}: memory grew by {grew} bytes for {input_bytes} bytes of input"
            ));
        }
    }
}

fn packaged_gguf() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("PEFTSCALE_PACKAGED_GGUF")?);
    assert!(
        path.is_file(),
        "PEFTSCALE_PACKAGED_GGUF={} is not a file",
        path.display()
    );
    Some(path)
}

/// The packaged model's tokenizer and chat template (its whole metadata but the architecture's
/// hyper-parameters) on the tiny model's weights, with an embedding as wide as its vocabulary.
fn packaged_header_on_tiny_weights(path: &Path) -> Vec<u8> {
    let mut f = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
        Some(GgufValue::Array(a)) => a.len(),
        _ => panic!("the packaged GGUF has no vocabulary"),
    };
    let meta: Vec<(String, GgufValue)> = content
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer.") || k.starts_with("general.name"))
        .collect();
    tiny_gguf(meta, vocab)
}

const TEMPLATES: [&str; 10] = [
    CHATML,
    "{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}",
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}{% else %}[{{ m.role | upper }}] {{ m['content'] }}{% endif %}{% endfor %}{{ eos_token }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ raise_exception('no system messages here') }}",
    "{% for i in range(100000) %}{{ 'abcdefgh' * 1000000 }}{% endfor %}",
    "{{ nothing.here }}{{ messages[99].content }}{% for m in messages %}{{ m.role[5:] }}{% endfor %}",
    "{{ messages[0]['content'].startswith('h') }}{{ messages | length }}{{ (messages | last).content.strip() }}",
    "{% if messages[0].role == 'user' %}{{ messages[0].content * 3 }}{% endif %}",
];

#[test]
fn malformed_inputs_give_typed_errors_never_panics_hangs_or_huge_allocations() {
    start_watchdog();
    let seed = std::env::var("PEFTSCALE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261204u64);
    let seconds: Option<u64> = std::env::var("PEFTSCALE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut run = Runner {
        tallies: BTreeMap::new(),
        rng: Rand(seed),
    };

    // Seeds.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    write_tiny_llama(&base);
    write_tiny_tokenizer(&base);
    let adapter_seed = dir.path().join("adapter-seed");
    std::fs::create_dir(&adapter_seed).unwrap();
    write_tiny_adapter(&adapter_seed);
    let read = |p: &Path| std::fs::read(p).unwrap();
    let json = |p: &Path| -> Value { serde_json::from_slice(&read(p)).unwrap() };
    let tiny_gguf_seed = tiny_gguf(Vec::new(), VOCAB);
    let packaged_seed = packaged_gguf().map(|p| packaged_header_on_tiny_weights(&p));
    let model_st = read(&base.join("model.safetensors"));
    let config = json(&base.join("config.json"));
    let tokenizer = json(&base.join("tokenizer.json"));
    let adapter_config = json(&adapter_seed.join("adapter_config.json"));
    let adapter_st = read(&adapter_seed.join("adapter_model.safetensors"));
    let mut eng = Engine::load(&base, WeightDType::F32).expect("the tiny seed model loads");
    exercise(&eng, None).expect("the tiny seed model decodes");
    let gguf_path = dir.path().join("fuzz.gguf");
    std::fs::write(&gguf_path, &tiny_gguf_seed).unwrap();
    let gguf_eng = Engine::load(&gguf_path, WeightDType::Auto).expect("the tiny GGUF seed loads");
    exercise(&gguf_eng, None).expect("the tiny GGUF seed decodes");
    drop(gguf_eng);

    // A scratch folder per format, holding valid copies of every file but the mutated one.
    let folder = dir.path().join("model");
    let adapter = dir.path().join("adapter");
    let reset = |src: &Path, dst: &Path| {
        let _ = std::fs::remove_dir_all(dst);
        std::fs::create_dir(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    };
    reset(&base, &folder);
    reset(&adapter_seed, &adapter);

    let (gguf_f, gguf_floats) = gguf_fields(&tiny_gguf_seed, 1);
    let packaged_fields = packaged_seed.as_ref().map(|s| gguf_fields(s, 997));
    let (st_f, st_floats) = safetensors_fields(&model_st);
    let (ast_f, ast_floats) = safetensors_fields(&adapter_st);

    // Cases per format per round; a round is ~5,700 cases.
    let plan: [(&str, usize); 8] = [
        ("gguf", 1500),
        (
            "gguf-packaged-header",
            if packaged_seed.is_some() { 100 } else { 0 },
        ),
        ("safetensors", 1000),
        ("config.json", 700),
        ("adapter_config.json", 600),
        ("adapter safetensors", 800),
        ("tokenizer.json", 400),
        ("chat template", 600),
    ];
    let only: Option<Vec<String>> = std::env::var("PEFTSCALE_FUZZ_FORMATS")
        .ok()
        .map(|s| s.split(',').map(|f| f.trim().to_string()).collect());
    let plan: Vec<(&str, usize)> = plan
        .into_iter()
        .filter(|(f, _)| only.as_ref().is_none_or(|o| o.iter().any(|x| x == f)))
        .collect();
    REFUSING.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut rounds = 0;
    loop {
        for &(format, count) in &plan {
            for _ in 0..count {
                let rng = &mut run.rng;
                match format {
                    "gguf" | "gguf-packaged-header" => {
                        let (seed, (fields, floats)) = if format == "gguf" {
                            (&tiny_gguf_seed, (&gguf_f, &gguf_floats))
                        } else {
                            let (f, fl) = packaged_fields.as_ref().unwrap();
                            (packaged_seed.as_ref().unwrap(), (f, fl))
                        };
                        let (bytes, what) = mutate_bytes(rng, seed, fields, floats);
                        std::fs::write(&gguf_path, &bytes).unwrap();
                        let dtype = if rng.chance(3) {
                            WeightDType::F32
                        } else {
                            WeightDType::Auto
                        };
                        run.case(format, &what, &bytes, || {
                            exercise(&Engine::load(&gguf_path, dtype)?, None)
                        });
                    }
                    "safetensors" | "config.json" | "tokenizer.json" => {
                        let (file, (bytes, what)) = match format {
                            "safetensors" => (
                                "model.safetensors",
                                if rng.chance(2) {
                                    mutate_bytes(rng, &model_st, &st_f, &st_floats)
                                } else {
                                    mutate_safetensors(rng, &model_st)
                                },
                            ),
                            "config.json" => ("config.json", mutate_json(rng, &config)),
                            _ => ("tokenizer.json", mutate_json(rng, &tokenizer)),
                        };
                        std::fs::write(folder.join(file), &bytes).unwrap();
                        run.case(format, &what, &bytes, || {
                            exercise(&Engine::load(&folder, WeightDType::F32)?, None)
                        });
                        std::fs::copy(base.join(file), folder.join(file)).unwrap();
                    }
                    "adapter_config.json" | "adapter safetensors" => {
                        let (file, (bytes, what)) = if format == "adapter_config.json" {
                            ("adapter_config.json", mutate_json(rng, &adapter_config))
                        } else if rng.chance(2) {
                            (
                                "adapter_model.safetensors",
                                mutate_bytes(rng, &adapter_st, &ast_f, &ast_floats),
                            )
                        } else {
                            (
                                "adapter_model.safetensors",
                                mutate_safetensors(rng, &adapter_st),
                            )
                        };
                        std::fs::write(adapter.join(file), &bytes).unwrap();
                        let eng = &mut eng;
                        run.case(format, &what, &bytes, || {
                            eng.load_adapter(&adapter, "fuzz")?;
                            let used = exercise(eng, Some("fuzz"));
                            eng.unload_adapter("fuzz")?;
                            used
                        });
                        std::fs::copy(adapter_seed.join(file), adapter.join(file)).unwrap();
                    }
                    _ => {
                        let source = *rng.pick(&TEMPLATES);
                        let (bytes, what) = if rng.chance(4) {
                            (source.as_bytes().to_vec(), "as written".to_string())
                        } else {
                            mutate_bytes(rng, source.as_bytes(), &[], &[])
                        };
                        let text = String::from_utf8_lossy(&bytes).into_owned();
                        let messages: Vec<ChatMessage> = ["system", "user", "assistant"]
                            .iter()
                            .take(1 + rng.below(3))
                            .map(|r| ChatMessage {
                                role: r.to_string(),
                                content: "hello there".into(),
                            })
                            .collect();
                        run.case(format, &what, &bytes, || {
                            let t = ChatTemplate::new(&text, Some("<s>"), Some("</s>"))?;
                            t.render(&messages, true).map(|_| ())
                        });
                    }
                }
            }
        }
        rounds += 1;
        if seconds.is_none_or(|s| started.elapsed().as_secs() >= s) {
            break;
        }
    }
    REFUSING.store(false, Ordering::Relaxed);

    let mut failures = Vec::new();
    println!(
        "fuzz: seed {seed}, {rounds} round(s), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for (format, t) in &run.tallies {
        println!(
            "  {format:<22} {:>6} cases  {:>5} valid loads  errors {:?}  failures {}",
            t.cases,
            t.loaded,
            t.errors,
            t.failures.len()
        );
        failures.extend(t.failures.iter().cloned());
    }
    if packaged_seed.is_none() {
        println!("  (PEFTSCALE_PACKAGED_GGUF not set: the packaged model's header was not fuzzed)");
    }
    let total: usize = run.tallies.values().map(|t| t.cases).sum();
    if only.is_none() {
        assert!(total >= 5000, "only {total} cases ran");
    }
    assert!(
        failures.is_empty(),
        "{} failing cases:\n{}",
        failures.len(),
        failures
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
