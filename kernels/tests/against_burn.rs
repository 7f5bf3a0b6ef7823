//! Every kernel against Burn's own operation on the same inputs: forward
//! values and every gradient, over a grid of shapes. Burn's ops run on Flex
//! too (its own kernels), so that ties in max pooling break the same way.

use bonfire_kernels::nn::{BatchNorm, BatchNormConfig};
use bonfire_kernels::ops::{self, Window2d};
use bonfire_testkit::max_abs_diff;
use burn::backend::{Autodiff, Flex, NdArray};
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::ops::PaddedConvOptions;
use burn::tensor::{Tensor, TensorData};

type B = Autodiff<Flex>;

/// Deterministic values in [-1, 1), with `levels` distinct values when
/// given (to force ties).
fn values(n: usize, seed: u64, levels: Option<u64>) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut x = (seed.wrapping_mul(0x9E3779B97F4A7C15)) ^ i.wrapping_mul(0xBF58476D1CE4E5B9);
            x ^= x >> 31;
            x = x.wrapping_mul(0x94D049BB133111EB);
            x ^= x >> 29;
            match levels {
                Some(l) => (x % l) as f32 / l as f32 * 2.0 - 1.0,
                None => (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0,
            }
        })
        .collect()
}

fn tensor<Bk: Backend, const D: usize>(dims: [usize; D], seed: u64, levels: Option<u64>) -> Tensor<Bk, D> {
    let n = dims.iter().product();
    Tensor::from_data(TensorData::new(values(n, seed, levels), dims), &Default::default())
}

/// max |a - b| / max(max |b|, 1e-6): the error relative to the reference's
/// scale; infinite where one side has a NaN or an infinity the other lacks.
fn relative<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    max_abs_diff(&a, &b) / scale
}

/// One convolution through the kernel and through Burn: the forward values
/// and the input, weight and bias gradients agree within 1e-4 of scale.
fn check_conv(x: [usize; 4], weight: [usize; 4], window: Window2d, bias: bool, seed: u64) {
    let case = format!("x {x:?}, weight {weight:?}, {window:?}, bias {bias}");
    let x = tensor::<B, 4>(x, seed, None).require_grad();
    let wt = tensor::<B, 4>(weight, seed + 100, None).require_grad();
    let b = bias.then(|| tensor::<B, 1>([weight[0]], seed + 200, None).require_grad());
    let ours = ops::conv2d(x.clone(), wt.clone(), b.clone(), window, 1);
    let Window2d { stride, padding, padding_end, dilation } = window;
    let options = PaddedConvOptions::asymmetric(stride, padding, padding_end, dilation, 1);
    let theirs = burn::tensor::module::conv2d(x.clone(), wt.clone(), b.clone(), options);
    assert!(relative(ours.clone().inner(), theirs.clone().inner()) <= 1e-4, "forward, {case}");
    // A weighted sum, so that every output gets its own gradient.
    let weights = tensor::<B, 4>(ours.dims(), seed + 300, None);
    let g_ours = (ours * weights.clone()).sum().backward();
    let g_theirs = (theirs * weights).sum().backward();
    let pairs = [
        ("input", x.grad(&g_ours).unwrap(), x.grad(&g_theirs).unwrap()),
        ("weight", wt.grad(&g_ours).unwrap(), wt.grad(&g_theirs).unwrap()),
    ];
    for (what, a, b) in pairs {
        let e = relative(a, b);
        assert!(e <= 1e-4, "{what} gradient, {case}: relative error {e}");
    }
    if let Some(b) = &b {
        let e = relative(b.grad(&g_ours).unwrap(), b.grad(&g_theirs).unwrap());
        assert!(e <= 1e-4, "bias gradient, {case}: relative error {e}");
    }
}

/// The grid covers both input-gradient paths: channel pairs with fewer
/// inputs than outputs (col2im) and with at least as many (at stride 1, a
/// convolution with the flipped kernel).
#[test]
fn conv2d_forward_and_every_gradient_match_burn_over_a_grid_of_shapes() {
    let mut cases = 0;
    for batch in [1, 3] {
        for (cin, cout) in [(1, 2), (4, 5), (4, 4), (5, 3)] {
            for kernel in [1, 3, 5] {
                for stride in [1, 2] {
                    for pad in [0, 1, 2] {
                        for (dilation, bias) in [(1, true), (2, false)] {
                            let (h, w) = (7, 9);
                            if h + 2 * pad < dilation * (kernel - 1) + 1 {
                                continue;
                            }
                            cases += 1;
                            let window = Window2d {
                                stride: [stride, stride],
                                padding: [pad, pad],
                                padding_end: [pad, pad],
                                dilation: [dilation, dilation],
                            };
                            check_conv([batch, cin, h, w], [cout, cin, kernel, kernel], window, bias, cases);
                        }
                    }
                }
            }
        }
    }
    assert!(cases > 200, "{cases} cases");
}

/// Padding that differs before and after (Burn's `Explicit(top, left,
/// bottom, right)`), among them a 1x1 stride-1 convolution padded at the end
/// only, which is not an image's own column matrix.
#[test]
fn conv2d_with_asymmetric_padding_matches_burn() {
    let window = |stride: usize, padding: [usize; 2], padding_end: [usize; 2]| Window2d {
        stride: [stride; 2],
        padding,
        padding_end,
        dilation: [1, 1],
    };
    let cases = [
        ([2, 3, 6, 7], [2, 3, 1, 1], window(1, [0, 0], [1, 1])),
        ([2, 3, 6, 7], [4, 3, 1, 1], window(1, [1, 0], [0, 2])),
        ([1, 4, 7, 6], [3, 4, 3, 3], window(1, [0, 1], [2, 0])),
        ([1, 2, 7, 6], [3, 2, 3, 3], window(1, [2, 0], [0, 1])),
        ([2, 3, 8, 9], [2, 3, 3, 2], window(2, [0, 1], [1, 0])),
        ([1, 2, 5, 5], [2, 2, 1, 1], window(2, [0, 0], [1, 1])),
    ];
    for (i, (x, weight, window)) in cases.into_iter().enumerate() {
        check_conv(x, weight, window, i % 2 == 0, 1000 + i as u64);
    }
}

/// Wide images with at least 16 input channels take the shifted form (one
/// GEMM per tap, no column matrix) for the weight gradient at stride 1.
#[test]
fn conv2d_on_wide_images_with_many_channels_matches_burn() {
    let window = |padding: [usize; 2], padding_end: [usize; 2], dilation: usize| Window2d {
        stride: [1, 1],
        padding,
        padding_end,
        dilation: [dilation; 2],
    };
    let cases = [
        ([2, 16, 5, 26], [16, 16, 3, 3], window([1, 1], [1, 1], 1)),
        ([1, 16, 4, 25], [20, 16, 3, 3], window([1, 0], [1, 2], 1)),
        ([1, 17, 6, 28], [12, 17, 3, 3], window([2, 2], [2, 2], 2)),
        ([1, 16, 3, 30], [8, 16, 3, 2], window([0, 1], [0, 0], 1)),
    ];
    for (i, (x, weight, window)) in cases.into_iter().enumerate() {
        check_conv(x, weight, window, i % 2 == 0, 2000 + i as u64);
    }
}

#[test]
fn max_pool2d_matches_burn_with_ties_forward_and_backward() {
    for (dims, kernel, stride, pad) in
        [([2, 3, 8, 8], 2, 2, 0), ([1, 2, 7, 9], 2, 2, 0), ([2, 2, 7, 9], 3, 2, 1), ([1, 1, 6, 5], 3, 1, 1)]
    {
        for levels in [None, Some(3)] {
            let x = tensor::<B, 4>(dims, 5, levels).require_grad();
            let window = Window2d { stride: [stride; 2], padding: [pad; 2], padding_end: [pad; 2], dilation: [1, 1] };
            let ours = ops::max_pool2d(x.clone(), [kernel; 2], window, false);
            let theirs = burn::tensor::module::max_pool2d(x.clone(), [kernel; 2], [stride; 2], [pad; 2], [1, 1], false);
            let case = format!("{dims:?}, kernel {kernel}, stride {stride}, pad {pad}, levels {levels:?}");
            assert_eq!(relative(ours.clone().inner(), theirs.clone().inner()), 0.0, "forward, {case}");
            let weights = tensor::<B, 4>(ours.dims(), 9, None);
            let (a, b) = ((ours * weights.clone()).sum().backward(), (theirs * weights).sum().backward());
            assert_eq!(relative(x.grad(&a).unwrap(), x.grad(&b).unwrap()), 0.0, "backward, {case}");
        }
    }
}

#[test]
fn batch_norm_matches_burn_in_training_and_inference() {
    for dims in [[4, 3, 5, 6], [1, 2, 3, 3], [5, 8, 1, 1]] {
        let device = Default::default();
        let burn_bn = burn::nn::BatchNormConfig::new(dims[1]).init::<B>(&device);
        let gamma = tensor::<B, 1>([dims[1]], 3, None).add_scalar(1.5);
        let beta = tensor::<B, 1>([dims[1]], 4, None);
        let burn_bn = burn::nn::BatchNorm {
            gamma: burn_bn.gamma.map(|_| gamma.clone().require_grad()),
            beta: burn_bn.beta.map(|_| beta.clone().require_grad()),
            ..burn_bn
        };
        let ours: BatchNorm<B> = BatchNormConfig::new(dims[1]).init(&device);
        let ours = BatchNorm {
            gamma: ours.gamma.map(|_| gamma.clone().require_grad()),
            beta: ours.beta.map(|_| beta.clone().require_grad()),
            ..ours
        };
        // Inputs far from zero mean, as activations are.
        let x = tensor::<B, 4>(dims, 7, None).mul_scalar(3.0).add_scalar(2.0).require_grad();
        let (y_ours, y_theirs) = (ours.forward(x.clone()), burn_bn.forward(x.clone()));
        assert!(relative(y_ours.clone().inner(), y_theirs.clone().inner()) <= 1e-4, "forward {dims:?}");
        let weights = tensor::<B, 4>(dims, 8, None);
        let (a, b) = ((y_ours * weights.clone()).sum().backward(), (y_theirs * weights).sum().backward());
        assert!(relative(x.grad(&a).unwrap(), x.grad(&b).unwrap()) <= 1e-4, "input gradient {dims:?}");
        let (ga, gb) = (ours.gamma.val().grad(&a).unwrap(), burn_bn.gamma.val().grad(&b).unwrap());
        assert!(relative(ga, gb) <= 1e-4, "gamma gradient {dims:?}");
        let (ba, bb) = (ours.beta.val().grad(&a).unwrap(), burn_bn.beta.val().grad(&b).unwrap());
        assert!(relative(ba, bb) <= 1e-4, "beta gradient {dims:?}");

        // Running statistics: the same mean; the variance unbiased (n / (n - 1)) where Burn's is biased.
        let (ours, theirs) = (ours.valid(), burn_bn.valid());
        assert!(relative(ours.running_mean.value(), theirs.running_mean.value()) <= 1e-5, "running mean {dims:?}");
        let n = (dims[0] * dims[2] * dims[3]) as f64;
        let m = 0.1;
        let biased = theirs.running_var.value().sub_scalar(1.0 - m).div_scalar(m);
        let expected = biased.mul_scalar(n / (n - 1.0)).mul_scalar(m).add_scalar(1.0 - m);
        assert!(relative(ours.running_var.value(), expected) <= 1e-5, "running variance {dims:?}");

        // Inference uses the running statistics, on any backend.
        let x = tensor::<Flex, 4>(dims, 11, None);
        let burn_inference =
            burn::nn::BatchNorm { running_var: burn::module::RunningState::new(ours.running_var.value()), ..theirs };
        assert!(relative(ours.forward(x.clone()), burn_inference.forward(x)) <= 1e-5, "inference {dims:?}");
    }
}

/// On a backend without the kernels, the operations are Burn's own.
#[test]
fn other_backends_get_burns_operations() {
    type Nd = Autodiff<NdArray>;
    let x = tensor::<Nd, 4>([2, 2, 6, 6], 1, None);
    let w = tensor::<Nd, 4>([3, 2, 3, 3], 2, None);
    let window = Window2d { stride: [1, 1], padding: [1, 1], padding_end: [1, 1], dilation: [1, 1] };
    let ours = ops::conv2d(x.clone(), w.clone(), None, window, 1);
    let theirs =
        burn::tensor::module::conv2d(x, w, None, PaddedConvOptions::asymmetric([1, 1], [1, 1], [1, 1], [1, 1], 1));
    assert_eq!(ours.into_data(), theirs.into_data());
}
