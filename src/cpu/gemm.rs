//! The one place the CPU backend calls a BLAS-style kernel: `matrixmultiply`'s packed,
//! SIMD-dispatched sgemm/dgemm behind a safe, bounds-checked wrapper.

/// A row-major or transposed view of a matrix in a slice: element (i, j) is at
/// `i * row_stride + j * col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A dense row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Whether the largest offset of the view lies inside `data` (checked: a wrapped offset
    /// would pass a bound check it should fail).
    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .zip((self.cols - 1).checked_mul(self.col_stride))
            .and_then(|(r, c)| r.checked_add(c));
        last.is_some_and(|offset| offset < self.data.len())
    }
}

/// Float types with a GEMM.
pub trait Gemm: Copy {
    /// `c = alpha * a * b + beta * c` with `c` dense row-major (`a.rows x b.cols`).
    ///
    /// Panics only on a programming error inside the crate (mismatched views); callers pass
    /// shapes they have already validated.
    fn gemm(alpha: Self, a: MatRef<'_, Self>, b: MatRef<'_, Self>, beta: Self, c: &mut [Self]);
}

macro_rules! impl_gemm {
    ($t:ty, $f:path) => {
        impl Gemm for $t {
            fn gemm(
                alpha: Self,
                a: MatRef<'_, Self>,
                b: MatRef<'_, Self>,
                beta: Self,
                c: &mut [Self],
            ) {
                let (m, k, n) = (a.rows, a.cols, b.cols);
                assert!(
                    b.rows == k
                        && a.fits()
                        && b.fits()
                        && m.checked_mul(n).is_some_and(|len| c.len() >= len),
                    "gemm: bad views"
                );
                if m == 0 || n == 0 {
                    return;
                }
                // SAFETY: every index the kernel touches lies inside the slices: `fits` checked
                // the largest offset of a and b, c holds m*n row-major elements, and c does not
                // alias a or b (it is a unique borrow).
                unsafe {
                    $f(
                        m,
                        k,
                        n,
                        alpha,
                        a.data.as_ptr(),
                        a.row_stride as isize,
                        a.col_stride as isize,
                        b.data.as_ptr(),
                        b.row_stride as isize,
                        b.col_stride as isize,
                        beta,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            }
        }
    };
}

impl_gemm!(f32, matrixmultiply::sgemm);
impl_gemm!(f64, matrixmultiply::dgemm);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_whose_last_offset_wraps_does_not_fit() {
        let data = [1.0f32, 2.0];
        // (rows - 1) * row_stride wraps to 0 in a wrapping product; the view must not fit.
        let view = MatRef {
            data: &data,
            rows: 2,
            cols: 1,
            row_stride: 1usize << 63,
            col_stride: 1,
        };
        assert!(!view.fits());
        assert!(MatRef::row_major(&data, 1, 2).fits());
        assert!(!MatRef::row_major(&data, 2, 2).fits());
    }
}
