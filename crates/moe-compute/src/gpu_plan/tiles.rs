//! The grouped expert GEMM's geometry (kernels/grouped_gemm_tc.cu): block tiles, the tile table
//! over (expert, column tile, row tile), the shared-memory swizzle, and the gate/up interleaving
//! done when expert weights are uploaded.
//!
//! **Tile order.** Expert e's tiles are numbered with the row tile fastest, so the blocks that
//! run together read the same weight slab (expert, column tile) while it sits in L2. A block
//! finds its tile by a binary search over `tile_offsets` (one entry per expert). The grid is
//! [`GemmTiling::max_tiles`], a bound that depends only on the number of (row, choice) pairs, so
//! a CUDA graph captured for a batch bucket covers every routing; blocks past the last tile exit.
//!
//! **Swizzle.** A stage holds `block_k = 64` bf16 per row: 128 bytes, eight 16-byte chunks.
//! Chunk c of row r is stored at chunk `c ^ (r % 8)`: the eight rows an `ldmatrix` phase reads
//! at one logical chunk land in eight different chunks, covering all 32 banks once, and the
//! eight `cp.async` writes of one row are distinct too.
//!
//! **Gate/up interleaving.** The fused `[gate; up]` weight ([2I, K]) is uploaded with its rows
//! in groups of 16: gate rows 8g..8g+8, then up rows 8g..8g+8. An m16n8 accumulator pair (2j,
//! 2j+1) then holds gate and up of the same 8 intermediate columns in the same thread, and the
//! epilogue writes silu(gate)·up as bf16 without touching shared memory.

/// A block tile of the grouped GEMM and its pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmTiling {
    pub block_m: u32,
    pub block_n: u32,
    pub block_k: u32,
    pub stages: u32,
    /// Warps along m and along n (the block has `warps_m * warps_n` warps).
    pub warps_m: u32,
    pub warps_n: u32,
}

/// The largest dynamic shared memory a block may opt into on sm_90 (227 KB).
pub const SM90_MAX_SHARED: u32 = 227 * 1024;

/// One tile of the grouped GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub expert: u32,
    /// First slot (row of the permuted activations) and how many of the tile's rows are valid.
    pub row0: u32,
    pub rows: u32,
    pub col0: u32,
}

impl GemmTiling {
    /// 128×128×64, 8 warps (2×4, 64×32 each), 3 stages: the expert path's default.
    pub const EXPERT_DEFAULT: Self =
        Self { block_m: 128, block_n: 128, block_k: 64, stages: 3, warps_m: 2, warps_n: 4 };
    /// 64×128×64, 4 warps (1×4), 4 stages: decode loads of a few rows per expert.
    pub const EXPERT_SMALL_M: Self = Self { block_m: 64, block_n: 128, block_k: 64, stages: 4, warps_m: 1, warps_n: 4 };
    /// Every tiling the kernel is compiled for (template instances in grouped_gemm_tc.cu).
    pub const ALL: [Self; 2] = [Self::EXPERT_DEFAULT, Self::EXPERT_SMALL_M];

    pub fn threads(&self) -> u32 {
        self.warps_m * self.warps_n * 32
    }

    /// Dynamic shared memory of the pipeline: `stages` × (A tile + B tile) in bf16.
    pub fn shared_bytes(&self) -> u32 {
        self.stages * (self.block_m + self.block_n) * self.block_k * 2
    }

    /// The m16n8 accumulators each warp holds (four f32 registers each).
    pub fn fragments_per_warp(&self) -> u32 {
        (self.block_m / self.warps_m / 16) * (self.block_n / self.warps_n / 8)
    }

    /// Column tiles over `n` output columns.
    pub fn n_tiles(&self, n: u32) -> u32 {
        n.div_ceil(self.block_n)
    }

    /// The tile table: expert e has `ceil(count_e / block_m) * n_tiles` tiles.
    pub fn tile_offsets(&self, offsets: &[u32], n_tiles: u32) -> Vec<u32> {
        let mut out = Vec::with_capacity(offsets.len());
        out.push(0);
        for w in offsets.windows(2) {
            let m_tiles = (w[1] - w[0]).div_ceil(self.block_m);
            out.push(out[out.len() - 1] + m_tiles * n_tiles);
        }
        out
    }

    /// The grid bound: `sum ceil(c_e / m) <= pairs / m + (non-empty experts)`.
    pub fn max_tiles(&self, pairs: usize, experts: usize, n_tiles: u32) -> u32 {
        (pairs as u32 / self.block_m + experts.min(pairs) as u32) * n_tiles
    }

    /// Tile `t` as a block finds it (None past the last tile).
    pub fn tile_at(&self, offsets: &[u32], tile_offsets: &[u32], n_tiles: u32, t: u32) -> Option<Tile> {
        let last = *tile_offsets.last()?;
        if t >= last || n_tiles == 0 {
            return None;
        }
        // Binary search: the last expert whose first tile is <= t (empty experts are skipped
        // because their next entry is equal).
        let (mut lo, mut hi) = (0usize, tile_offsets.len() - 1);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if tile_offsets[mid] <= t {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let e = lo;
        let count = offsets[e + 1] - offsets[e];
        let m_tiles = count.div_ceil(self.block_m);
        let local = t - tile_offsets[e];
        let (n_tile, m_tile) = (local / m_tiles, local % m_tiles);
        let row0 = offsets[e] + m_tile * self.block_m;
        Some(Tile {
            expert: e as u32,
            row0,
            rows: (count - m_tile * self.block_m).min(self.block_m),
            col0: n_tile * self.block_n,
        })
    }
}

/// The physical 16-byte chunk of logical chunk `chunk` in row `row` of a 128-byte stage row.
pub fn swizzle_chunk(row: u32, chunk: u32) -> u32 {
    chunk ^ (row % 8)
}

/// The source row of interleaved row `i` of a fused [gate; up] weight with `inter` rows each
/// (`inter` a multiple of 8).
pub fn interleaved_source_row(i: u32, inter: u32) -> u32 {
    let (group, within) = (i / 16, i % 16);
    if within < 8 {
        group * 8 + within
    } else {
        inter + group * 8 + within - 8
    }
}

/// The intermediate column an interleaved row computes, and whether it is the gate's.
pub fn interleaved_column(i: u32) -> (u32, bool) {
    ((i / 16) * 8 + i % 8, i % 16 < 8)
}

/// Rows of a fused [gate; up] weight ([2·inter, k], row-major) in the interleaved order.
pub fn interleave_gate_up<T: Copy>(w: &[T], inter: usize, k: usize) -> Option<Vec<T>> {
    if !inter.is_multiple_of(8) || w.len() != 2 * inter * k {
        return None;
    }
    let mut out = Vec::with_capacity(w.len());
    for i in 0..2 * inter {
        let src = interleaved_source_row(i as u32, inter as u32) as usize;
        out.extend_from_slice(&w[src * k..(src + 1) * k]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn every_tiling_fits_and_divides_evenly() {
        for t in GemmTiling::ALL {
            assert!(t.shared_bytes() <= SM90_MAX_SHARED, "{t:?}");
            assert_eq!(t.block_m % (16 * t.warps_m), 0);
            assert_eq!(t.block_n % (16 * t.warps_n), 0, "gate/up fragment pairs stay in one warp");
            assert_eq!(t.block_k, 64, "the swizzle assumes 128-byte stage rows");
            // Each stage's A and B tiles load in whole 16-byte chunks per thread.
            assert_eq!((t.block_m * t.block_k / 8) % t.threads(), 0);
            assert_eq!((t.block_n * t.block_k / 8) % t.threads(), 0);
            assert!(t.fragments_per_warp() * 4 <= 128, "accumulators leave room in 255 registers");
        }
    }

    #[test]
    fn the_tile_table_covers_every_row_and_column_once_in_slab_order() {
        let t = GemmTiling::EXPERT_DEFAULT;
        let mut rng = SplitMix64::new(9);
        for experts in [1usize, 5, 64] {
            let counts: Vec<u32> =
                (0..experts).map(|_| if rng.below(3) == 0 { 0 } else { rng.below(400) as u32 }).collect();
            let mut offsets = vec![0u32];
            for c in &counts {
                offsets.push(offsets[offsets.len() - 1] + c);
            }
            let n = 300u32;
            let n_tiles = t.n_tiles(n);
            let table = t.tile_offsets(&offsets, n_tiles);
            let pairs = offsets[experts] as usize;
            let total = table[experts];
            assert!(total <= t.max_tiles(pairs, experts, n_tiles));
            let mut covered = vec![0u32; pairs * n_tiles as usize];
            let mut previous: Option<Tile> = None;
            for i in 0..t.max_tiles(pairs, experts, n_tiles) {
                let Some(tile) = t.tile_at(&offsets, &table, n_tiles, i) else {
                    assert!(i >= total);
                    continue;
                };
                let e = tile.expert as usize;
                assert!(tile.rows > 0 && tile.row0 >= offsets[e] && tile.row0 + tile.rows <= offsets[e + 1]);
                for r in tile.row0..tile.row0 + tile.rows {
                    covered[r as usize * n_tiles as usize + (tile.col0 / t.block_n) as usize] += 1;
                }
                // Row tiles run fastest: consecutive tiles share the weight slab until it is done.
                if let Some(p) = previous {
                    if p.expert == tile.expert && p.col0 == tile.col0 {
                        assert_eq!(tile.row0, p.row0 + t.block_m);
                    } else {
                        assert!(tile.row0 == offsets[e], "a new slab starts at the expert's first row");
                    }
                }
                previous = Some(tile);
            }
            assert!(covered.iter().all(|&c| c == 1), "{experts} experts");
        }
    }

    #[test]
    fn the_swizzle_is_a_bijection_and_ldmatrix_phases_hit_every_bank_once() {
        for row in 0..64 {
            let mut seen = [false; 8];
            for c in 0..8 {
                seen[swizzle_chunk(row, c) as usize] = true;
            }
            assert!(seen.iter().all(|&s| s), "row {row}");
        }
        // An ldmatrix phase: eight consecutive rows at one logical chunk.
        for row0 in (0..128).step_by(8) {
            for c in 0..8 {
                let mut banks = [0u32; 32];
                for r in row0..row0 + 8 {
                    let byte = swizzle_chunk(r, c) * 16;
                    for word in 0..4 {
                        banks[((byte / 4 + word) % 32) as usize] += 1;
                    }
                }
                assert!(banks.iter().all(|&b| b == 1), "rows {row0}.., chunk {c}: {banks:?}");
            }
        }
    }

    #[test]
    fn interleaved_gate_up_gives_swiglu_in_the_epilogue_bit_for_bit() {
        let (inter, k, rows) = (24usize, 40usize, 3usize);
        let mut rng = SplitMix64::new(4);
        let w: Vec<f32> = (0..2 * inter * k).map(|_| rng.signed()).collect();
        let x: Vec<f32> = (0..rows * k).map(|_| rng.signed()).collect();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0.0f32, |s, (p, q)| p.mul_add(*q, s));
        let silu = |v: f32| v / (1.0 + (-v).exp());
        let wi = interleave_gate_up(&w, inter, k).expect("multiple of 8");
        assert!(interleave_gate_up(&w[..2 * 20 * k], 20, k).is_none(), "20 is not a multiple of 8");
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            // The GEMM's output row over interleaved columns, then the epilogue per fragment pair.
            let acc: Vec<f32> = (0..2 * inter).map(|i| dot(xr, &wi[i * k..(i + 1) * k])).collect();
            let mut hidden = vec![f32::NAN; inter];
            for pair in 0..2 * inter / 16 {
                for j in 0..8 {
                    let (g, u) = (acc[pair * 16 + j], acc[pair * 16 + 8 + j]);
                    let (col, is_gate) = interleaved_column((pair * 16 + j) as u32);
                    assert!(is_gate && !interleaved_column((pair * 16 + 8 + j) as u32).1);
                    hidden[col as usize] = silu(g) * u;
                }
            }
            for c in 0..inter {
                let want = silu(dot(xr, &w[c * k..(c + 1) * k])) * dot(xr, &w[(inter + c) * k..(inter + c + 1) * k]);
                assert_eq!(hidden[c].to_bits(), want.to_bits(), "row {r} column {c}");
            }
        }
    }
}
