//! What Bonfire's tests share; a dev-dependency only, never published.
//!
//! - [`free_port`], [`scratch_dir`]: a port and a folder of one's own.
//! - [`max_abs_diff`], [`abs_diff`]: the equivalence tests' comparison, in
//!   which a NaN or an infinity on one side only is a difference;
//!   [`write_values`], [`read_values`]: how worker processes hand their
//!   weights back; [`text`]: what a process printed.
//! - [`flat_values`], [`with_values`]: a module's float parameters as one
//!   vector, written apart from the code under test so the oracle does not
//!   share its mistakes.
//! - [`SelfWorkers`]: a test binary that runs itself as the worker
//!   processes of a job, with torchrun's variables.
//! - [`Captured`]: what `tracing` logged.
#![warn(missing_docs)]

mod log;
mod workers;

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

pub use log::Captured;
pub use workers::{torchrun_vars, SelfWorkers, LAUNCHER_VARS};

/// A loopback port nobody listens on (free when this returns; tests bind
/// it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The Python with torch that `BONFIRE_TORCH_PYTHON` names, for the tests
/// that run PyTorch's own torchrun or TCPStore; without one, says that
/// `test` did not run, straight to stderr (the harness hides what passing
/// tests print).
pub fn torch_python(test: &str) -> Option<String> {
    let python = std::env::var("BONFIRE_TORCH_PYTHON").ok().filter(|p| !p.is_empty());
    if python.is_none() {
        use std::io::Write;
        let _ =
            writeln!(std::io::stderr(), "\n*** {test}: NOT RUN: BONFIRE_TORCH_PYTHON names no Python with torch ***\n");
    }
    python
}

/// An empty folder `bonfire-NAME-PID` in the temporary directory, emptied
/// first if an earlier run of the same process id left it.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bonfire-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The largest element-wise difference; infinite when the lengths differ or
/// when one side has a NaN or an infinity where the other has something
/// else (`f32::max` would pass over a NaN difference and report 0).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter().zip(b).map(|(&x, &y)| abs_diff(x, y)).fold(0.0, f32::max)
}

/// |x - y|, with equal values (equal infinities too) 0 and any other pair
/// that involves a NaN or an infinity infinite: never NaN.
pub fn abs_diff(x: f32, y: f32) -> f32 {
    if x == y {
        return 0.0;
    }
    let d = (x - y).abs();
    if d.is_finite() {
        d
    } else {
        f32::INFINITY
    }
}

/// What a finished process printed: its stdout, then its stderr.
pub fn text(output: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Writes `values` as little-endian f32.
pub fn write_values(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Reads what [`write_values`] wrote.
pub fn read_values(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Every float parameter of `module`, in visiting order, as f32.
pub fn flat_values<B: Backend, M: Module<B>>(module: &M) -> Vec<f32> {
    struct Gather(Vec<f32>);
    impl<B: Backend> ModuleVisitor<B> for Gather {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.extend(param.val().into_data().convert::<f32>().iter::<f32>());
        }
    }
    let mut gather = Gather(Vec::new());
    module.visit(&mut gather);
    gather.0
}

/// `module` with its float parameters replaced, in visiting order, by
/// `values` (laid out as [`flat_values`] gives them); ids, devices, element
/// types and whether each needs a gradient are kept.
pub fn with_values<B: Backend, M: Module<B>>(module: M, values: &[f32]) -> M {
    struct Scatter<'a>(&'a [f32]);
    impl<B: Backend> ModuleMapper<B> for Scatter<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.map(|tensor| {
                let shape = tensor.dims();
                let (mine, rest) = self.0.split_at(shape.iter().product());
                self.0 = rest;
                let data = TensorData::new(mine.to_vec(), shape).convert_dtype(tensor.dtype());
                Tensor::from_data(data, &tensor.device()).set_require_grad(tensor.is_require_grad())
            })
        }
    }
    let mut scatter = Scatter(values);
    let module = module.map(&mut scatter);
    assert!(scatter.0.is_empty(), "{} values left over", scatter.0.len());
    module
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_or_an_infinity_on_one_side_is_an_infinite_difference() {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.0, 2.5]), 0.5);
        assert_eq!(max_abs_diff(&[1.0, nan], &[1.0, 2.0]), inf);
        assert_eq!(max_abs_diff(&[nan], &[nan]), inf, "NaN is not equal to NaN");
        assert_eq!(max_abs_diff(&[inf, -inf], &[inf, -inf]), 0.0);
        assert_eq!(max_abs_diff(&[inf], &[1e30]), inf);
        assert_eq!(max_abs_diff(&[inf], &[-inf]), inf);
        assert_eq!(max_abs_diff(&[1.0], &[1.0, 2.0]), inf);
    }
}
