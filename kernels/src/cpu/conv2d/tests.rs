use super::*;

/// The definition, one multiply-add at a time.
fn naive(s: &Conv2dShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; s.batch * s.out_image()];
    for n in 0..s.batch {
        for oc in 0..s.out_channels {
            for oh in 0..s.out_height {
                for ow in 0..s.out_width {
                    let mut acc = 0.0;
                    for c in 0..s.in_channels {
                        for i in 0..s.kernel[0] {
                            for j in 0..s.kernel[1] {
                                let ih = (oh * s.stride[0] + i * s.dilation[0]) as isize - s.padding[0] as isize;
                                let iw = (ow * s.stride[1] + j * s.dilation[1]) as isize - s.padding[1] as isize;
                                if ih >= 0 && iw >= 0 && (ih as usize) < s.height && (iw as usize) < s.width {
                                    acc += x
                                        [((n * s.in_channels + c) * s.height + ih as usize) * s.width + iw as usize]
                                        * w[((oc * s.in_channels + c) * s.kernel[0] + i) * s.kernel[1] + j];
                                }
                            }
                        }
                    }
                    y[((n * s.out_channels + oc) * s.out_height + oh) * s.out_width + ow] = acc;
                }
            }
        }
    }
    y
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104729) % 23) as f32 / 8.0 - 1.375).collect()
}

#[test]
fn forward_and_the_adjoint_of_im2col_match_the_definition() {
    for (x, w, stride, pad, pad_end, dil) in [
        ([2, 3, 7, 6], [4, 3, 3, 3], [1, 1], [1, 1], [1, 1], [1, 1]),
        ([1, 2, 9, 8], [3, 2, 3, 2], [2, 3], [2, 0], [1, 2], [1, 2]),
        ([3, 4, 5, 5], [2, 4, 1, 1], [1, 1], [0, 0], [0, 0], [1, 1]),
        ([2, 4, 5, 6], [3, 4, 1, 1], [1, 1], [0, 0], [1, 2], [1, 1]),
        ([2, 1, 6, 6], [2, 1, 5, 5], [1, 1], [2, 2], [2, 2], [1, 1]),
        // Stride 1 with output rows as wide as input rows: im2col's shifted copies.
        ([1, 2, 6, 7], [2, 2, 3, 3], [1, 1], [2, 2], [2, 2], [2, 2]),
        ([1, 2, 5, 6], [3, 2, 2, 3], [1, 1], [0, 2], [1, 0], [1, 1]),
        ([1, 1, 2, 1], [1, 1, 5, 5], [1, 1], [2, 2], [2, 2], [1, 1]),
        ([2, 3, 3, 4], [2, 3, 3, 3], [1, 1], [3, 1], [0, 1], [1, 1]),
    ] {
        let s = Conv2dShape::new(x, w, stride, pad, pad_end, dil).unwrap();
        let (xv, wv) = (values(s.batch * s.image(), 1), values(s.out_channels * s.patch(), 2));
        let got = forward(&s, &xv, &wv, None);
        let want = naive(&s, &xv, &wv);
        let worst = bonfire_testkit::max_abs_diff(&got, &want);
        assert!(worst < 1e-4, "{s:?}: {worst}");
        // <im2col(x), c> == <x, col2im(c)> for any c.
        let c = values(s.patch() * s.positions(), 3);
        let mut col = vec![0.0; c.len()];
        im2col(&s, &xv[..s.image()], &mut col);
        let mut back = vec![0.0; s.image()];
        col2im(&s, &c, &mut back);
        let lhs: f64 = col.iter().zip(&c).map(|(a, b)| (a * b) as f64).sum();
        let rhs: f64 = xv[..s.image()].iter().zip(&back).map(|(a, b)| (a * b) as f64).sum();
        assert!((lhs - rhs).abs() < 1e-6 * lhs.abs().max(1.0), "{s:?}: {lhs} vs {rhs}");
    }
}

#[test]
fn a_kernel_wider_than_the_padded_image_has_no_shape() {
    assert_eq!(Conv2dShape::new([1, 1, 2, 2], [1, 1, 5, 5], [1, 1], [1, 1], [1, 1], [1, 1]), None);
    assert_eq!(Conv2dShape::new([1, 2, 8, 8], [1, 1, 3, 3], [1, 1], [0, 0], [0, 0], [1, 1]), None);
}

#[test]
fn the_shifted_weight_gradient_matches_im2cols() {
    for (x, w, pad, pad_end, dil) in [
        ([2, 3, 7, 6], [4, 3, 3, 3], [1, 1], [1, 1], [1, 1]),
        ([1, 2, 6, 7], [2, 2, 3, 3], [2, 2], [2, 2], [2, 2]),
        ([1, 2, 5, 6], [3, 2, 2, 3], [0, 2], [1, 0], [1, 1]),
        ([2, 3, 3, 4], [2, 3, 3, 3], [3, 1], [0, 1], [1, 1]),
        ([1, 2, 6, 5], [2, 2, 3, 3], [0, 0], [0, 0], [1, 1]),
        ([2, 3, 4, 4], [2, 3, 1, 1], [1, 0], [0, 2], [1, 1]),
        ([1, 1, 2, 1], [1, 1, 5, 5], [2, 2], [2, 2], [1, 1]),
    ] {
        let s = Conv2dShape::new(x, w, [1, 1], pad, pad_end, dil).unwrap();
        let g = Padded::new(&s).unwrap();
        let (xv, wv) = (values(s.batch * s.image(), 1), values(s.out_channels * s.patch(), 2));
        let dy = values(s.batch * s.out_image(), 3);
        let mut dw = vec![f32::NAN; wv.len()];
        for (n, (x_n, dy_n)) in xv.chunks_exact(s.image()).zip(dy.chunks_exact(s.out_image())).enumerate() {
            shifted::weight_grad_image(&s, &g, x_n, dy_n, &mut dw, n > 0);
        }
        assert!(Padded::where_it_pays(&s).is_none(), "the reference below must be im2col's");
        let want = backward(&s, &xv, &wv, &dy, false, false).weight;
        let worst = bonfire_testkit::max_abs_diff(&dw, &want);
        assert!(worst < 1e-4, "weight gradient {s:?}: {worst}");
    }
}

#[test]
fn only_stride_one_has_a_shifted_form_and_it_is_picked_for_wide_images_with_many_channels() {
    let shape = |c: usize, width: usize, k: usize, stride: usize, pad: usize| {
        Conv2dShape::new([1, c, 8, width], [c, c, k, k], [stride; 2], [pad; 2], [pad; 2], [1, 1]).unwrap()
    };
    assert!(Padded::new(&shape(4, 8, 3, 2, 1)).is_none());
    assert!(Padded::where_it_pays(&shape(16, 28, 3, 1, 1)).is_some());
    assert!(Padded::where_it_pays(&shape(8, 28, 3, 1, 1)).is_none(), "few channels");
    assert!(Padded::where_it_pays(&shape(64, 14, 3, 1, 1)).is_none(), "narrow rows");
    assert!(Padded::where_it_pays(&shape(16, 28, 1, 1, 0)).is_none(), "a 1x1 kernel needs no copy at all");
}
