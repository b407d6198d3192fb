//! The sampler's uniform draws as a pure function of (seed, draw index). The host sampler draws
//! from SplitMix64, whose state after n draws is `seed + n·γ`: the n-th draw needs no history,
//! so a device sampler given each row's seed and draw count makes exactly the host's draws, and
//! a CUDA graph replays them with nothing but two integers per row uploaded.

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The `draw`-th (0-based) 64-bit output of `SplitMix64::new(seed)`.
pub fn nth_u64(seed: u64, draw: u64) -> u64 {
    let mut z = seed.wrapping_add(GAMMA.wrapping_mul(draw.wrapping_add(1)));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `draw`-th uniform in [0, 1) of `SplitMix64::new(seed).unit()`.
pub fn nth_unit(seed: u64, draw: u64) -> f32 {
    (nth_u64(seed, draw) >> 40) as f32 / (1u64 << 24) as f32
}

/// Random benchmark weight `i` of a matrix made from `seed`: uniform in ±`scale` from the
/// `i`-th draw, truncated to bf16 (kernels/backend.cu `random_bf16` makes the same bits).
pub fn random_bf16(seed: u64, i: u64, scale: f32) -> u16 {
    let v = (nth_unit(seed, i) * 2.0 - 1.0) * scale;
    (v.to_bits() >> 16) as u16
}

/// `n` of them, on the host's cores.
pub fn random_bf16_vec(n: usize, seed: u64, scale: f32) -> Vec<u16> {
    use rayon::prelude::*;
    let mut out = vec![0u16; n];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        for (j, v) in chunk.iter_mut().enumerate() {
            *v = random_bf16(seed, (c << 16 | j) as u64, scale);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn random_weights_are_uniform_in_the_scale_and_reproducible() {
        let v = random_bf16_vec(200_000, 9, 0.5);
        assert_eq!(v, random_bf16_vec(200_000, 9, 0.5));
        assert_ne!(v, random_bf16_vec(200_000, 10, 0.5));
        let f: Vec<f32> = v.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
        assert!(f.iter().all(|x| x.abs() <= 0.5));
        let mean = f.iter().sum::<f32>() / f.len() as f32;
        assert!(mean.abs() < 0.01, "{mean}");
        assert_eq!(v[70_000], random_bf16(9, 70_000, 0.5), "chunking does not change the values");
    }

    #[test]
    fn the_nth_draw_is_the_sequential_generators() {
        for seed in [0u64, 7, u64::MAX, 0x1234_5678_9abc_def0] {
            let mut r = SplitMix64::new(seed);
            for n in 0..2000 {
                assert_eq!(nth_unit(seed, n), r.unit(), "seed {seed} draw {n}");
            }
        }
    }
}
