//! Launch sequence of `kernels/similarity.cu`.

use super::params::*;
use super::{blocks_for, extent, handles, Backend, Launch};
use crate::shared::Similarity;
use crate::Result;

/// The 64 x 64 output tile of similarity.cu.
const TILE: usize = 64;

/// The `rows x cols` score matrix of `kind` between the rows of `a` and `b`.
pub(crate) fn forward<B: Backend>(
    b: &B,
    a: &B::Buf,
    bm: &B::Buf,
    (rows, cols, dim): (usize, usize, usize),
    kind: Similarity,
) -> Result<B::Buf> {
    let out = b.output("out", rows * cols)?;
    let kind = match kind {
        Similarity::Dot => ContraSimilarityKind_CONTRA_SIM_DOT,
        Similarity::Cosine => ContraSimilarityKind_CONTRA_SIM_COSINE,
        Similarity::SquaredEuclidean => ContraSimilarityKind_CONTRA_SIM_SQUARED_EUCLIDEAN,
        Similarity::Euclidean => ContraSimilarityKind_CONTRA_SIM_EUCLIDEAN,
    };
    let params = ContraSimilarityParams {
        a: b.ptr(a),
        b: b.ptr(bm),
        out: b.ptr(&out).cast(),
        rows: extent("rows", rows)?,
        cols: extent("cols", cols)?,
        dim: extent("dim", dim)?,
        kind: kind as i32,
    };
    let launch = Launch {
        grid: [blocks_for(cols, TILE), blocks_for(rows, TILE), 1],
        block: [16, 16, 1],
        shared_bytes: 0,
    };
    let kernel = handles::SIMILARITY_FWD.of(b.info(a).elem);
    b.launch(kernel, launch, &params, &[&out])?;
    Ok(out)
}
