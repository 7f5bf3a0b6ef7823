//! A safe face on the `gemm` crate's f32 matrix product, for matrices read
//! through any pair of strides: row-major, transposed, or a window of a
//! larger array (a convolution's shifted image planes).

/// A matrix operand: `rows x cols`, entry `(r, c)` at
/// `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    /// The stored values.
    pub data: &'a [f32],
    /// Rows as used.
    pub rows: usize,
    /// Columns as used.
    pub cols: usize,
    /// Elements between consecutive rows.
    pub row_stride: usize,
    /// Elements between consecutive columns.
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// `data` as a row-major `rows x cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose of `data` read as a row-major `cols x rows` matrix.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, row_stride: 1, col_stride: rows }
    }

    /// `rows x cols` with the given strides.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Self {
        Mat { data, rows, cols, row_stride, col_stride }
    }
}

/// One past the last element a `rows x cols` matrix with these strides reads.
fn extent(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    }
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`), `dst` row-major
/// `a.rows x b.cols`, on the calling thread.
pub fn matmul(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    matmul_strided(dst, (b.cols, 1), a, b, accumulate)
}

/// [`matmul`] into a `dst` whose entry `(r, c)` sits at
/// `r·strides.0 + c·strides.1`.
pub fn matmul_strided(dst: &mut [f32], strides: (usize, usize), a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert!(
        a.data.len() >= extent(m, k, a.row_stride, a.col_stride)
            && b.data.len() >= extent(k, n, b.row_stride, b.col_stride)
            && dst.len() >= extent(m, n, strides.0, strides.1),
        "a matrix is shorter than its shape"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    dst[r * strides.0 + c * strides.1] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: every index the product touches lies inside the slices, whose
    // lengths were checked against the shapes and strides above; `dst` does
    // not alias `a` or `b` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            strides.1 as isize,
            strides.0 as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &Mat<'_>, b: &Mat<'_>) -> Vec<f32> {
        let at = |m: &Mat<'_>, r: usize, c: usize| m.data[r * m.row_stride + c * m.col_stride];
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols).map(|p| at(a, i, p) * at(b, p, j)).sum();
            }
        }
        out
    }

    #[test]
    fn every_transposition_matches_the_definition() {
        let values: Vec<f32> = (0..64).map(|i| ((i * 37 % 17) as f32 - 8.0) / 4.0).collect();
        let (m, k, n) = (3, 5, 4);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let pick = |data, rows, cols, t: bool| {
                if t {
                    Mat::transposed(data, rows, cols)
                } else {
                    Mat::new(data, rows, cols)
                }
            };
            let a = pick(&values[..m * k], m, k, ta);
            let b = pick(&values[7..7 + k * n], k, n, tb);
            let mut dst = vec![1.0; m * n];
            matmul(&mut dst, a, b, false);
            assert_eq!(dst, naive(&a, &b));
            matmul(&mut dst, a, b, true);
            let twice: Vec<f32> = naive(&a, &b).iter().map(|x| 2.0 * x).collect();
            assert_eq!(dst, twice);
        }
    }

    #[test]
    fn windows_of_a_larger_array_into_a_strided_destination_match_the_definition() {
        let values: Vec<f32> = (0..200).map(|i| ((i * 37 % 17) as f32 - 8.0) / 4.0).collect();
        // a: every third value from 5 on, rows 11 apart; b: rows 20 apart.
        let a = Mat::strided(&values[5..], 3, 4, 11, 3);
        let b = Mat::strided(&values[2..], 4, 6, 20, 1);
        let mut dst = vec![7.0f32; 3 * 6 * 2 * 4];
        matmul_strided(&mut dst, (6 * 2 * 4, 4), a, b, false);
        let want = naive(&a, &b);
        for r in 0..3 {
            for c in 0..6 {
                assert_eq!(dst[r * 48 + c * 4], want[r * 6 + c]);
                assert_eq!(dst[r * 48 + c * 4 + 1], 7.0, "values between the strides are left alone");
            }
        }
    }
}
