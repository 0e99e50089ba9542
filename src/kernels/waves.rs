//! Key ranges against the wave tail: a sweep whose row tiles are too few to fill the card (or
//! leave a last, partial wave) cuts each row of key tiles into ranges that run as separate blocks
//! along grid y. How many, by the wave model, for the InfoNCE family and SigLIP alike.

use super::{Backend, Kernel, KernelParams, Launch};
use crate::Result;

/// A block's start, in key tiles: its rows staged and the key pipeline filled before its first
/// product, its rows' shares written at its end (the wave model's price of one more range per
/// row of tiles).
const RANGE_START_TILES: usize = 1;

/// A key split is taken when the wave model says it takes at most this fraction of the
/// unsplit time (9 / 10).
const SPLIT_GAIN: (usize, usize) = (9, 10);

/// The most key ranges a row of tiles is cut into (MoCo's few rows against a long queue take
/// the most: 94 at N = 256, K = 65536 on an H100).
const MAX_KEY_RANGES: usize = 256;

/// Tiles per key range (0: no split) for `row_blocks` row tiles whose blocks sweep up to
/// `longest` key tiles each, on a device that runs `concurrent` blocks at once, by the wave
/// model: blocks of one length run in waves of `concurrent`, so rows cut into ranges of r tiles
/// take ceil(blocks / concurrent) x (r + RANGE_START_TILES); a split must save a tenth
/// (`SPLIT_GAIN`). NT-Xent's forward at N = 65536 on an H100 (1024 row tiles of 513 key tiles,
/// 3 x 132 blocks at once): unsplit 2.59 waves (3 x 514 by the model), in 5 ranges 12.9 waves
/// of 103 (13 x 104, 12 % less). Its fused backward (one block per SM, rows of 1024 tiles) stays
/// whole at that size (7.76 waves; 5 ranges would save 2 %), while at N = 4096 (64 row tiles on
/// 132 SMs) it takes 2 ranges of 32 (33 against 65), and the forward 6 ranges of 6 (7 against
/// 34).
fn range_tiles(row_blocks: usize, longest: usize, concurrent: usize) -> usize {
    let model = |per_range: usize| {
        let blocks = row_blocks.saturating_mul(longest.div_ceil(per_range));
        blocks
            .div_ceil(concurrent.max(1))
            .saturating_mul(per_range + RANGE_START_TILES)
    };
    // Fewest ranges first: of equal estimates the one with fewer blocks.
    let best = (1..=MAX_KEY_RANGES.min(longest))
        .map(|ranges| longest.div_ceil(ranges))
        .min_by_key(|&per_range| model(per_range))
        .unwrap_or(longest);
    // Only a clear gain: the start cost is rough, and a split adds its rows' shares atomically
    // (dQ, SigLIP's loss and dA: no longer reproducible bit for bit).
    let clear_gain =
        model(best).saturating_mul(SPLIT_GAIN.1) <= model(longest).saturating_mul(SPLIT_GAIN.0);
    if best < longest && clear_gain {
        best
    } else {
        0
    }
}

/// Whether sweeps may be cut into key ranges by the wave model: yes unless
/// `CONTRA_KEY_RANGES=off` (read once), which keeps every sweep whole but MoCo's (its fixed
/// split, `sweep_grid`), so that a GPU run can time both in one session.
fn ranges_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("CONTRA_KEY_RANGES").map_or(true, |v| v != "off"))
}

/// `shape` (a sweep's grid of row tiles, each sweeping up to `longest` key tiles) with its rows
/// cut into key ranges along grid y where the device's figure for `kernel` says the card fills
/// better (`range_tiles`), and the tiles per range (0: as it was); None where the device gives
/// no figure or `CONTRA_KEY_RANGES=off`.
pub(crate) fn key_ranges<B: Backend, P: KernelParams>(
    b: &B,
    kernel: Kernel<P>,
    shape: Launch,
    longest: usize,
) -> Option<(usize, Launch)> {
    let concurrent = b
        .concurrent_blocks(kernel, &shape)
        .filter(|_| ranges_allowed())?;
    Some(match range_tiles(shape.grid[0], longest, concurrent) {
        0 => (0, shape),
        per_range => {
            let grid = [shape.grid[0], longest.div_ceil(per_range), 1];
            (per_range, Launch { grid, ..shape })
        }
    })
}

/// A buffer of `len` elements that each row's blocks write (a row's loss, its gradient): an
/// output the kernel fills when the sweep is whole, zeros the blocks add their shares to under
/// a key split (`split_tiles` > 0).
pub(crate) fn row_output<B: Backend>(
    b: &B,
    name: &'static str,
    len: usize,
    split_tiles: usize,
) -> Result<B::Buf> {
    match split_tiles {
        0 => b.output(name, len),
        _ => b.zeros(name, len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ranges_follow_the_wave_model() {
        let (h100_forward, h100_fused_backward) = (3 * 132, 132);
        // NT-Xent's forward at N = 65536 (half-rows of 513 tiles): 5 ranges of 103 tiles
        // (13 x 104 against 3 x 514 unsplit); its fused backward (rows of 1024) stays whole.
        assert_eq!(range_tiles(1024, 513, h100_forward), 103);
        assert_eq!(range_tiles(1024, 1024, h100_fused_backward), 0);
        // N = 4096: the forward in 6 ranges of 6 tiles (384 blocks, one wave), the backward in
        // 2 of 32.
        assert_eq!(range_tiles(64, 33, h100_forward), 6);
        assert_eq!(range_tiles(64, 64, h100_fused_backward), 32);
        // MoCo, 256 queries against a 65536-key queue: the forward in 94 ranges of 11 (376
        // blocks, one wave), the fused backward in 32 of 32 (128 blocks, one wave).
        assert_eq!(range_tiles(4, 1024, h100_forward), 11);
        assert_eq!(range_tiles(4, 1024, h100_fused_backward), 32);
        // One full wave unsplit, or a single key tile: nothing to gain.
        assert_eq!(range_tiles(396, 199, h100_forward), 0);
        assert_eq!(range_tiles(1, 1, h100_forward), 0);
        // The interp tests' modelled devices (tests/common: split_cases).
        assert_eq!(range_tiles(8, 5, 24), 2);
        assert_eq!(range_tiles(8, 8, 24), 3);
        assert_eq!(range_tiles(9, 5, 18), 3);
        assert_eq!(range_tiles(9, 9, 18), 5);
        // A split is taken only where the model says it saves a tenth, and leaves no range of the
        // longest row empty.
        for row_blocks in [1, 2, 7, 64, 255, 1024] {
            for longest in [1, 2, 5, 33, 129, 1024] {
                for concurrent in [1, 24, 132, 264, 396, 1056] {
                    let per_range = range_tiles(row_blocks, longest, concurrent);
                    if per_range == 0 {
                        continue;
                    }
                    let ranges = longest.div_ceil(per_range);
                    let time = |blocks: usize, per: usize| {
                        blocks.div_ceil(concurrent) * (per + RANGE_START_TILES)
                    };
                    assert!(
                        10 * time(row_blocks * ranges, per_range) <= 9 * time(row_blocks, longest),
                        "{row_blocks} x {longest} at {concurrent}"
                    );
                    assert!(ranges <= MAX_KEY_RANGES && per_range * (ranges - 1) < longest);
                }
            }
        }
    }
}
