//! A module's parameters as Bonfire sees them: names, shapes, values on the host.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// One float parameter, in module visiting order.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Its path in the module, e.g. `conv1.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// False for frozen parameters, which get no gradient.
    pub trainable: bool,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The float parameters of `module`, in visiting order.
pub fn param_infos<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    struct Collect {
        path: Vec<String>,
        out: Vec<ParamInfo>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            self.out.push(ParamInfo {
                name: self.path.join("."),
                shape: value.dims().to_vec(),
                trainable: value.is_require_grad(),
            });
        }
    }
    let mut c = Collect { path: Vec::new(), out: Vec::new() };
    module.visit(&mut c);
    c.out
}

/// All float parameter values, flattened in visiting order, as f32.
pub fn values_to_host<B: Backend, M: Module<B>>(module: &M) -> Vec<f32> {
    struct Gather(Vec<f32>);
    impl<B: Backend> ModuleVisitor<B> for Gather {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.extend_from_slice(data.as_slice::<f32>().expect("converted to f32"));
        }
    }
    let mut g = Gather(Vec::new());
    module.visit(&mut g);
    g.0
}

/// Replaces every float parameter value by the next values of `flat` (as
/// [`values_to_host`] laid them out), keeping ids, devices and whether each
/// parameter requires a gradient.
pub fn values_from_host<B: Backend, M: Module<B>>(module: M, flat: &[f32]) -> M {
    struct Scatter<'a> {
        flat: &'a [f32],
        offset: usize,
    }
    impl<B: Backend> ModuleMapper<B> for Scatter<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let offset = &mut self.offset;
            let flat = self.flat;
            param.map(|tensor| {
                let shape = tensor.dims();
                let n: usize = shape.iter().product();
                let values = flat[*offset..*offset + n].to_vec();
                *offset += n;
                let dtype = tensor.dtype();
                let data = TensorData::new(values, shape).convert_dtype(dtype);
                let fresh = Tensor::<B, D>::from_data(data, &tensor.device());
                fresh.set_require_grad(tensor.is_require_grad())
            })
        }
    }
    module.map(&mut Scatter { flat, offset: 0 })
}

/// `[count, (ndims, dims...) per parameter]`.
pub(crate) fn encode_layout(infos: &[ParamInfo]) -> Vec<f32> {
    let mut out = vec![infos.len() as f32];
    for p in infos {
        out.push(p.shape.len() as f32);
        out.extend(p.shape.iter().map(|&d| d as f32));
    }
    out
}

/// Index of the first parameter whose encoded shape differs (or the shorter count).
pub(crate) fn first_difference(a: &[f32], b: &[f32]) -> Option<usize> {
    let (mut i, mut j, mut index) = (1usize, 1usize, 0usize);
    let count = |v: &[f32]| v.first().copied().unwrap_or(0.0) as usize;
    loop {
        let (left, right) = (index < count(a), index < count(b));
        if !left && !right {
            return None;
        }
        if left != right {
            return Some(index);
        }
        let (na, nb) = (a[i] as usize, b[j] as usize);
        if a[i..=i + na] != b[j..=j + nb] {
            return Some(index);
        }
        i += na + 1;
        j += nb + 1;
        index += 1;
    }
}

/// What parameter #`index` of an encoded layout is, in words.
pub(crate) fn describe(encoded: &[f32], index: usize) -> String {
    let mut i = 1;
    for k in 0..encoded.first().copied().unwrap_or(0.0) as usize {
        let n = encoded[i] as usize;
        if k == index {
            let dims: Vec<usize> = encoded[i + 1..=i + n].iter().map(|&d| d as usize).collect();
            return format!("shape {dims:?} there");
        }
        i += n + 1;
    }
    format!("only {} parameters", encoded.first().copied().unwrap_or(0.0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(shape: &[usize]) -> ParamInfo {
        ParamInfo { name: String::new(), shape: shape.to_vec(), trainable: true }
    }

    #[test]
    fn first_difference_finds_shapes_ranks_and_counts() {
        let a = encode_layout(&[info(&[2, 3]), info(&[3])]);
        assert_eq!(first_difference(&a, &a), None);
        assert_eq!(first_difference(&a, &encode_layout(&[info(&[2, 3]), info(&[4])])), Some(1));
        assert_eq!(first_difference(&a, &encode_layout(&[info(&[6]), info(&[3])])), Some(0));
        assert_eq!(first_difference(&a, &encode_layout(&[info(&[2, 3])])), Some(1));
        assert_eq!(first_difference(&a, &encode_layout(&[info(&[2, 3]), info(&[3]), info(&[1])])), Some(2));
        assert_eq!(describe(&a, 1), "shape [3] there");
        assert_eq!(describe(&a, 5), "only 2 parameters");
    }
}
