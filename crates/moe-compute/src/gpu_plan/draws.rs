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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

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
