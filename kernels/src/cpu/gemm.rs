//! A safe face on the `gemm` crate's f32 matrix product, for row-major
//! matrices that are either stored as they are used or transposed.

/// A matrix operand: `rows x cols`, read from `data` either as stored
/// (row-major) or as the transpose of a stored `cols x rows` matrix.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    /// The stored values.
    pub data: &'a [f32],
    /// Rows as used.
    pub rows: usize,
    /// Columns as used.
    pub cols: usize,
    /// Whether `data` holds the transpose.
    pub transposed: bool,
}

impl<'a> Mat<'a> {
    /// `data` as a row-major `rows x cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, transposed: false }
    }

    /// The transpose of `data` read as a row-major `cols x rows` matrix.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, transposed: true }
    }

    /// (row stride, column stride) in elements.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.rows as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`), `dst` row-major
/// `a.rows x b.cols`, on the calling thread.
pub fn matmul(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert!(a.data.len() >= m * k && b.data.len() >= k * n && dst.len() >= m * n, "a matrix is shorter than its shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let ((a_rs, a_cs), (b_rs, b_cs)) = (a.strides(), b.strides());
    // SAFETY: every index the product touches lies inside the slices, whose
    // lengths were checked against the shapes above; `dst` does not alias
    // `a` or `b` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
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
        let at = |m: &Mat<'_>, r: usize, c: usize| {
            if m.transposed {
                m.data[c * m.rows + r]
            } else {
                m.data[r * m.cols + c]
            }
        };
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
            let a = Mat { data: &values[..m * k], rows: m, cols: k, transposed: ta };
            let b = Mat { data: &values[7..7 + k * n], rows: k, cols: n, transposed: tb };
            let mut dst = vec![1.0; m * n];
            matmul(&mut dst, a, b, false);
            assert_eq!(dst, naive(&a, &b));
            matmul(&mut dst, a, b, true);
            let twice: Vec<f32> = naive(&a, &b).iter().map(|x| 2.0 * x).collect();
            assert_eq!(dst, twice);
        }
    }
}
