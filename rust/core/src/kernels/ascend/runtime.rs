//! The ACL runtime, opened at run time with `dlopen`: `libascendcl.so` (initialisation, devices,
//! streams, memory) and the operator libraries `libnnopbase.so` (tensors) and `libopapi.so`
//! (the aclnn operators), as CANN's `set_env.sh` puts them on the library path.
//!
//! Declarations checked against CANN 8.0.0's documents: "AscendCL API Reference" (`aclInit`,
//! `aclrtGetDeviceCount`, `aclrtSetDevice`, streams, `aclrtMalloc`, `aclrtMemcpy`), "aclnn API
//! Reference" (`aclCreateTensor`, `aclCreateScalar`, `aclCreateIntArray` and each operator's
//! two-phase `aclnnXxxGetWorkspaceSize` / `aclnnXxx` prototype) on hiascend.com
//! (canncommercial/800/apiref/aolapi). [`Runtime::run`] executes a [`Plan`] with them; it has not
//! run on an NPU yet (none was available), so its first run there is its test.

use std::ffi::{c_char, c_void};
use std::ptr::null_mut;

use libloading::Library;

use super::plan::{AclDType, Plan, Step, TensorId};

type AclError = i32;
const ACL_SUCCESS: AclError = 0;
/// `ACL_ERROR_REPEAT_INITIALIZE`: `aclInit` was already called in this process.
const ACL_ERROR_REPEAT_INITIALIZE: AclError = 100_002;

/// The loaded runtime and how many NPUs it sees.
pub struct Runtime {
    acl: Library,
    /// `libnnopbase.so` (tensors, scalars) and `libopapi.so` (operators).
    operators: [Library; 2],
    pub device_count: u32,
}

fn open(name: &str) -> Result<Library, String> {
    // SAFETY: loading a shared library runs its initialisers; the CANN libraries have none that
    // depend on the caller.
    unsafe { Library::new(name) }.map_err(|e| {
        format!(
            "no Ascend runtime found: {name} could not be loaded ({e}); install the CANN toolkit \
             and source its set_env.sh"
        )
    })
}

impl Runtime {
    /// Loads the libraries and initialises ACL; the error says which library or call failed.
    pub fn open() -> Result<Self, String> {
        let acl = open("libascendcl.so")?;
        let operators = [open("libnnopbase.so")?, open("libopapi.so")?];
        let symbol_error =
            |name: &str, e: libloading::Error| format!("libascendcl.so has no {name}: {e}");
        // SAFETY: the signatures are those of acl.h (see the module comment); the pointers passed
        // are null (no configuration file) or point to a live local.
        let device_count = unsafe {
            let init = acl
                .get::<unsafe extern "C" fn(*const c_char) -> AclError>(b"aclInit\0")
                .map_err(|e| symbol_error("aclInit", e))?;
            let rc = init(std::ptr::null());
            if rc != ACL_SUCCESS && rc != ACL_ERROR_REPEAT_INITIALIZE {
                return Err(format!("aclInit failed with ACL error {rc}"));
            }
            let count = acl
                .get::<unsafe extern "C" fn(*mut u32) -> AclError>(b"aclrtGetDeviceCount\0")
                .map_err(|e| symbol_error("aclrtGetDeviceCount", e))?;
            let mut n = 0u32;
            let rc = count(&mut n);
            if rc != ACL_SUCCESS {
                return Err(format!(
                    "aclrtGetDeviceCount failed with ACL error {rc}: no Ascend device found"
                ));
            }
            n
        };
        Ok(Self {
            acl,
            operators,
            device_count,
        })
    }

    /// Runs `plan` on NPU `ordinal`: inputs in, outputs back, as [`Plan::run_on_host`] does on
    /// the CPU (Bool as 0/1 and Int64 as whole numbers in f32).
    pub fn run(
        &self,
        ordinal: usize,
        plan: &Plan,
        inputs: &[Vec<f32>],
    ) -> Result<Vec<Vec<f32>>, String> {
        if inputs.len() != plan.inputs.len() {
            return Err(format!(
                "the plan takes {} inputs, got {}",
                plan.inputs.len(),
                inputs.len()
            ));
        }
        let device = i32::try_from(ordinal).map_err(|_| format!("no Ascend device {ordinal}"))?;
        let mut session = Session::open(self, device)?;
        for (t, desc) in plan.tensors.iter().enumerate() {
            session.tensor(t, &desc.shape, desc.dtype)?;
        }
        for (&t, values) in plan.inputs.iter().zip(inputs) {
            session.upload(t, values)?;
        }
        for step in &plan.steps {
            session.step(step)?;
        }
        plan.outputs.iter().map(|&t| session.download(t)).collect()
    }
}

const ACL_FORMAT_ND: i32 = 2;
const ACL_MEM_MALLOC_HUGE_FIRST: i32 = 0;
const ACL_MEMCPY_HOST_TO_DEVICE: i32 = 1;
const ACL_MEMCPY_DEVICE_TO_HOST: i32 = 2;
/// `cubeMathType` 1, ALLOW_FP32_DOWN_PRECISION: the only value every Ascend product accepts for
/// f32 matrix products (the training and inference series refuse 0, KEEP_DTYPE).
const CUBE_MATH_ALLOW_DOWN_PRECISION: i8 = 1;

type Raw = *mut c_void;
type GetWorkspace3 = unsafe extern "C" fn(Raw, Raw, Raw, *mut u64, *mut Raw) -> i32;
type GetWorkspace4 = unsafe extern "C" fn(Raw, Raw, Raw, Raw, *mut u64, *mut Raw) -> i32;
type Launch = unsafe extern "C" fn(Raw, u64, Raw, Raw) -> i32;

fn element_bytes(dtype: AclDType) -> usize {
    match dtype {
        AclDType::Float => 4,
        AclDType::Int64 => 8,
        AclDType::Bool => 1,
    }
}

/// One run's stream, device buffers, aclTensors and aclScalars, released on drop.
struct Session<'r> {
    rt: &'r Runtime,
    stream: Raw,
    buffers: Vec<(Raw, usize, AclDType)>,
    tensors: Vec<Raw>,
    scalars: Vec<Raw>,
    int_arrays: Vec<Raw>,
}

impl<'r> Session<'r> {
    /// The symbol `name` from the ACL library (`lib` 0), nnopbase (1) or opapi (2).
    fn symbol<T: Copy>(&self, lib: usize, name: &str) -> Result<T, String> {
        let library = match lib {
            0 => &self.rt.acl,
            n => &self.rt.operators[n - 1],
        };
        let c_name = format!("{name}\0");
        // SAFETY: `T` is the function type declared for `name` in this module (checked against
        // the CANN documents above); the library outlives the session.
        unsafe { library.get::<T>(c_name.as_bytes()) }
            .map(|f| *f)
            .map_err(|e| format!("the CANN libraries have no {name}: {e}"))
    }

    fn check(rc: i32, what: &str) -> Result<(), String> {
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("{what} failed with status {rc}"))
        }
    }

    fn open(rt: &'r Runtime, device: i32) -> Result<Self, String> {
        let mut session = Session {
            rt,
            stream: null_mut(),
            buffers: vec![],
            tensors: vec![],
            scalars: vec![],
            int_arrays: vec![],
        };
        let set_device: unsafe extern "C" fn(i32) -> i32 = session.symbol(0, "aclrtSetDevice")?;
        let create_stream: unsafe extern "C" fn(*mut Raw) -> i32 =
            session.symbol(0, "aclrtCreateStream")?;
        // SAFETY: plain calls with a live out-pointer.
        unsafe {
            Self::check(set_device(device), "aclrtSetDevice")?;
            let mut stream = null_mut();
            Self::check(create_stream(&mut stream), "aclrtCreateStream")?;
            session.stream = stream;
        }
        Ok(session)
    }

    fn tensor(&mut self, id: TensorId, shape: &[usize], dtype: AclDType) -> Result<(), String> {
        debug_assert_eq!(id, self.tensors.len());
        let bytes = shape.iter().product::<usize>() * element_bytes(dtype);
        let malloc: unsafe extern "C" fn(*mut Raw, usize, i32) -> i32 =
            self.symbol(0, "aclrtMalloc")?;
        let create: unsafe extern "C" fn(
            *const i64,
            u64,
            i32,
            *const i64,
            i64,
            i32,
            *const i64,
            u64,
            Raw,
        ) -> Raw = self.symbol(1, "aclCreateTensor")?;
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let mut strides = vec![1i64; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1];
        }
        // SAFETY: `dims` and `strides` live across the call; the buffer is the tensor's storage.
        unsafe {
            let mut buffer = null_mut();
            Self::check(
                malloc(&mut buffer, bytes.max(32), ACL_MEM_MALLOC_HUGE_FIRST),
                "aclrtMalloc",
            )?;
            self.buffers.push((buffer, bytes, dtype));
            let n = dims.len() as u64;
            let tensor = create(
                dims.as_ptr(),
                n,
                dtype as i32,
                strides.as_ptr(),
                0,
                ACL_FORMAT_ND,
                dims.as_ptr(),
                n,
                buffer,
            );
            if tensor.is_null() {
                return Err(format!(
                    "aclCreateTensor failed for a tensor of shape {shape:?}"
                ));
            }
            self.tensors.push(tensor);
        }
        Ok(())
    }

    fn upload(&mut self, id: TensorId, values: &[f32]) -> Result<(), String> {
        let (buffer, bytes, dtype) = self.buffers[id];
        let host: Vec<u8> = match dtype {
            AclDType::Float => values.iter().flat_map(|v| v.to_ne_bytes()).collect(),
            AclDType::Int64 => values
                .iter()
                .flat_map(|&v| (v as i64).to_ne_bytes())
                .collect(),
            AclDType::Bool => values.iter().map(|&v| u8::from(v != 0.0)).collect(),
        };
        if host.len() != bytes {
            return Err(format!(
                "input {id} has {} values, the plan wants {}",
                values.len(),
                bytes / element_bytes(dtype)
            ));
        }
        let memcpy: unsafe extern "C" fn(Raw, usize, *const c_void, usize, i32) -> i32 =
            self.symbol(0, "aclrtMemcpy")?;
        // SAFETY: `buffer` holds `bytes` (at least), `host` is `bytes` long.
        unsafe {
            Self::check(
                memcpy(
                    buffer,
                    bytes,
                    host.as_ptr().cast(),
                    bytes,
                    ACL_MEMCPY_HOST_TO_DEVICE,
                ),
                "aclrtMemcpy to the device",
            )
        }
    }

    fn download(&mut self, id: TensorId) -> Result<Vec<f32>, String> {
        let (buffer, bytes, dtype) = self.buffers[id];
        let mut host = vec![0u8; bytes];
        let memcpy: unsafe extern "C" fn(Raw, usize, *const c_void, usize, i32) -> i32 =
            self.symbol(0, "aclrtMemcpy")?;
        // SAFETY: as in `upload`, the other way.
        unsafe {
            Self::check(
                memcpy(
                    host.as_mut_ptr().cast(),
                    bytes,
                    buffer,
                    bytes,
                    ACL_MEMCPY_DEVICE_TO_HOST,
                ),
                "aclrtMemcpy to the host",
            )?;
        }
        Ok(match dtype {
            AclDType::Float => host
                .chunks_exact(4)
                .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            AclDType::Int64 => host
                .chunks_exact(8)
                .map(|b| {
                    i64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            AclDType::Bool => host.iter().map(|&b| f32::from(b)).collect(),
        })
    }

    fn scalar(&mut self, value: f32) -> Result<Raw, String> {
        let create: unsafe extern "C" fn(Raw, i32) -> Raw = self.symbol(1, "aclCreateScalar")?;
        let mut v = value;
        // SAFETY: aclCreateScalar copies the value it points to.
        let s = unsafe { create((&mut v as *mut f32).cast(), AclDType::Float as i32) };
        if s.is_null() {
            return Err("aclCreateScalar failed".into());
        }
        self.scalars.push(s);
        Ok(s)
    }

    /// Phase one through `prepare`, then phase two on the stream with its workspace, waited for.
    fn launch(
        &mut self,
        op: &str,
        prepare: impl FnOnce(*mut u64, *mut Raw) -> i32,
    ) -> Result<(), String> {
        let run: Launch = self.symbol(2, op)?;
        let malloc: unsafe extern "C" fn(*mut Raw, usize, i32) -> i32 =
            self.symbol(0, "aclrtMalloc")?;
        let free: unsafe extern "C" fn(Raw) -> i32 = self.symbol(0, "aclrtFree")?;
        let sync: unsafe extern "C" fn(Raw) -> i32 = self.symbol(0, "aclrtSynchronizeStream")?;
        let (mut size, mut executor) = (0u64, null_mut());
        Self::check(
            prepare(&mut size, &mut executor),
            &format!("{op}GetWorkspaceSize"),
        )?;
        // SAFETY: the workspace is allocated for `size` bytes and freed only after the stream
        // has finished with it.
        unsafe {
            let mut workspace = null_mut();
            if size > 0 {
                Self::check(
                    malloc(&mut workspace, size as usize, ACL_MEM_MALLOC_HUGE_FIRST),
                    "aclrtMalloc",
                )?;
            }
            let rc = run(workspace, size, executor, self.stream);
            let synced = sync(self.stream);
            if !workspace.is_null() {
                free(workspace);
            }
            Self::check(rc, op)?;
            Self::check(synced, "aclrtSynchronizeStream")
        }
    }

    fn step(&mut self, step: &Step) -> Result<(), String> {
        let t = |id: TensorId| self.tensors[id];
        let op = step.operator();
        let prepare = format!("{op}GetWorkspaceSize");
        // SAFETY (every call below): the prototypes are the documented ones for each operator;
        // every tensor, scalar and array passed is live until the session drops.
        match *step {
            Step::LogSoftmax { input, out } => {
                let f: unsafe extern "C" fn(Raw, i64, Raw, *mut u64, *mut Raw) -> i32 =
                    self.symbol(2, &prepare)?;
                let (a, o) = (t(input), t(out));
                self.launch(op, |w, e| unsafe { f(a, -1, o, w, e) })
            }
            Step::AmaxLast { input, out } => {
                let f: unsafe extern "C" fn(Raw, Raw, bool, Raw, *mut u64, *mut Raw) -> i32 =
                    self.symbol(2, &prepare)?;
                let create: unsafe extern "C" fn(*const i64, u64) -> Raw =
                    self.symbol(1, "aclCreateIntArray")?;
                let last = [-1i64];
                let dims = unsafe { create(last.as_ptr(), 1) };
                if dims.is_null() {
                    return Err("aclCreateIntArray failed".into());
                }
                self.int_arrays.push(dims);
                let (a, o) = (t(input), t(out));
                self.launch(op, |w, e| unsafe { f(a, dims, true, o, w, e) })
            }
            Step::Adds { input, scalar, out } => {
                let f: GetWorkspace4 = self.symbol(2, &prepare)?;
                let (a, o) = (t(input), t(out));
                let (s, one) = (self.scalar(scalar)?, self.scalar(1.0)?);
                self.launch(op, |w, e| unsafe { f(a, s, one, o, w, e) })
            }
            Step::Muls { input, scalar, out } => {
                let f: GetWorkspace3 = self.symbol(2, &prepare)?;
                let (a, o) = (t(input), t(out));
                let s = self.scalar(scalar)?;
                self.launch(op, |w, e| unsafe { f(a, s, o, w, e) })
            }
            Step::Sub { a, b, out } | Step::Add { a, b, out } => {
                let f: GetWorkspace4 = self.symbol(2, &prepare)?;
                let (x, y, o) = (t(a), t(b), t(out));
                let one = self.scalar(1.0)?;
                self.launch(op, |w, e| unsafe { f(x, y, one, o, w, e) })
            }
            Step::Mul { a, b, out } | Step::LtTensor { a, b, out } => {
                let f: GetWorkspace3 = self.symbol(2, &prepare)?;
                let (x, y, o) = (t(a), t(b), t(out));
                self.launch(op, |w, e| unsafe { f(x, y, o, w, e) })
            }
            Step::MaskedFill {
                target,
                mask,
                value,
            } => {
                let f: GetWorkspace3 = self.symbol(2, &prepare)?;
                let (x, m) = (t(target), t(mask));
                let v = self.scalar(value)?;
                self.launch(op, |w, e| unsafe { f(x, m, v, w, e) })
            }
            Step::TopK {
                input,
                k,
                values,
                indices,
            } => {
                let f: unsafe extern "C" fn(
                    Raw,
                    i64,
                    i64,
                    bool,
                    bool,
                    Raw,
                    Raw,
                    *mut u64,
                    *mut Raw,
                ) -> i32 = self.symbol(2, &prepare)?;
                let (x, v, i) = (t(input), t(values), t(indices));
                self.launch(op, |w, e| unsafe {
                    f(x, k as i64, -1, true, true, v, i, w, e)
                })
            }
            Step::IndexSelect { input, index, out } => {
                let f: unsafe extern "C" fn(Raw, i64, Raw, Raw, *mut u64, *mut Raw) -> i32 =
                    self.symbol(2, &prepare)?;
                let (x, i, o) = (t(input), t(index), t(out));
                self.launch(op, |w, e| unsafe { f(x, 0, i, o, w, e) })
            }
            Step::BatchMatMul { a, b, out } => {
                let f: unsafe extern "C" fn(Raw, Raw, Raw, i8, *mut u64, *mut Raw) -> i32 =
                    self.symbol(2, &prepare)?;
                let (x, y, o) = (t(a), t(b), t(out));
                self.launch(op, |w, e| unsafe {
                    f(x, y, o, CUBE_MATH_ALLOW_DOWN_PRECISION, w, e)
                })
            }
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // Best effort: a failure to release at the end of a run has nothing left to report to.
        let release = |lib: usize, name: &str, items: &[Raw]| {
            if let Ok(f) = self.symbol::<unsafe extern "C" fn(Raw) -> i32>(lib, name) {
                for &item in items {
                    // SAFETY: each item was created by the matching create call and is released once.
                    unsafe { f(item) };
                }
            }
        };
        release(1, "aclDestroyTensor", &self.tensors);
        release(1, "aclDestroyScalar", &self.scalars);
        release(1, "aclDestroyIntArray", &self.int_arrays);
        let buffers: Vec<Raw> = self.buffers.iter().map(|b| b.0).collect();
        release(0, "aclrtFree", &buffers);
        if !self.stream.is_null() {
            release(0, "aclrtDestroyStream", &[self.stream]);
        }
    }
}

/// `Ok` when the runtime loads and NPU `ordinal` exists; otherwise what is missing.
pub fn check_device(ordinal: usize) -> Result<(), String> {
    let runtime = Runtime::open()?;
    if ordinal >= runtime.device_count as usize {
        return Err(format!(
            "no Ascend device {ordinal}: the runtime sees {} NPU(s)",
            runtime.device_count
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// On a machine without CANN (CI), the error names the runtime library that is missing.
    #[test]
    fn without_cann_the_error_names_the_missing_runtime() {
        if let Err(e) = super::Runtime::open() {
            assert!(
                e.contains("no Ascend runtime found") || e.contains("ACL error"),
                "{e}"
            );
        }
    }
}
