//! The two small matrix products of a prefill's causal attention on the CPU (`model::cpu_forward`): query
//! vectors against keys stored transposed ([`scores_tile`]), then softmax weights against the values
//! ([`values_tile`]). Four query rows share every key / value vector loaded, 16 lanes side by side in
//! registers. The SIMD versions (AVX2 + FMA, NEON) sum each output in the portable loop's order, with fused
//! multiply-adds, so they differ from it by a rounding per step at most.

/// Keys per score tile: `width` in [`scores_tile`] is a multiple of it.
pub const KEY_TILE: usize = 16;

/// `s[i][j] = q_i · k_j` for the query vectors `qs` (`[n, hd]`, n a multiple of 4) and keys `j < width`
/// (a multiple of [`KEY_TILE`]) given transposed (`kt[d · stride + j]`); `s` is `[n, width]`.
pub fn scores_tile(qs: &[f32], kt: &[f32], stride: usize, hd: usize, width: usize, s: &mut [f32]) {
    let n = qs.len().checked_div(hd).unwrap_or(0);
    assert!(qs.len() == n * hd && n.is_multiple_of(4), "query vectors: a multiple of 4 of {hd} floats");
    assert!(width.is_multiple_of(KEY_TILE) && width <= stride, "key tile width {width} of {stride}");
    assert!(hd == 0 || kt.len() >= (hd - 1) * stride + width, "transposed keys");
    assert!(s.len() >= n * width, "score rows");
    if hd == 0 || n == 0 {
        s[..n * width].fill(0.0);
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if super::simd() {
        // SAFETY: the bounds are asserted above; the CPU has AVX2 and FMA (`simd`).
        unsafe { super::avx2::scores_tile(qs.as_ptr(), n, kt.as_ptr(), stride, hd, width, s.as_mut_ptr()) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if super::simd() {
        // SAFETY: as above; NEON is part of every aarch64 CPU.
        unsafe { super::neon::scores_tile(qs.as_ptr(), n, kt.as_ptr(), stride, hd, width, s.as_mut_ptr()) };
        return;
    }
    scores_portable(qs, kt, stride, hd, width, s)
}

/// `o[i] = Σ_{j < len} p[i][j] · v_j` for the rows of `p` (`[n, width]`, n a multiple of 4, `len ≤ width`)
/// and the values `v` (`[len, hd]`); `o` is `[n, hd]`.
pub fn values_tile(p: &[f32], width: usize, v: &[f32], hd: usize, len: usize, o: &mut [f32]) {
    let n = o.len().checked_div(hd).unwrap_or(0);
    assert!(o.len() == n * hd && n.is_multiple_of(4), "output vectors: a multiple of 4 of {hd} floats");
    assert!(len <= width && p.len() >= n * width, "weight rows");
    assert!(v.len() >= len * hd, "value vectors");
    if n == 0 {
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if super::simd() && hd.is_multiple_of(16) {
        // SAFETY: the bounds are asserted above; the CPU has AVX2 and FMA (`simd`).
        unsafe { super::avx2::values_tile(p.as_ptr(), n, width, v.as_ptr(), hd, len, o.as_mut_ptr()) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if super::simd() && hd.is_multiple_of(16) {
        // SAFETY: as above; NEON is part of every aarch64 CPU.
        unsafe { super::neon::values_tile(p.as_ptr(), n, width, v.as_ptr(), hd, len, o.as_mut_ptr()) };
        return;
    }
    values_portable(p, width, v, hd, len, o)
}

fn scores_portable(qs: &[f32], kt: &[f32], stride: usize, hd: usize, width: usize, s: &mut [f32]) {
    for (qi, q4) in qs.chunks_exact(4 * hd).enumerate() {
        for j in (0..width).step_by(KEY_TILE) {
            let mut acc = [[0f32; KEY_TILE]; 4];
            for d in 0..hd {
                let k: &[f32; KEY_TILE] = kt[d * stride + j..][..KEY_TILE].try_into().expect("tile");
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = q4[r * hd + d];
                    for l in 0..KEY_TILE {
                        acc[l] += a * k[l];
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                s[(qi * 4 + r) * width + j..][..KEY_TILE].copy_from_slice(acc);
            }
        }
    }
}

fn values_portable(p: &[f32], width: usize, v: &[f32], hd: usize, len: usize, o: &mut [f32]) {
    fn tile<const W: usize>(p: &[f32], width: usize, v: &[f32], hd: usize, len: usize, o: &mut [f32]) {
        for (qi, o4) in o.chunks_exact_mut(4 * hd).enumerate() {
            let p4 = &p[qi * 4 * width..(qi + 1) * 4 * width];
            for d in (0..hd).step_by(W) {
                let mut acc = [[0f32; W]; 4];
                for j in 0..len {
                    let vj: &[f32; W] = v[j * hd + d..][..W].try_into().expect("tile");
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = p4[r * width + j];
                        for l in 0..W {
                            acc[l] += a * vj[l];
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    o4[r * hd + d..][..W].copy_from_slice(acc);
                }
            }
        }
    }
    if hd.is_multiple_of(16) {
        tile::<16>(p, width, v, hd, len, o)
    } else if hd.is_multiple_of(8) {
        tile::<8>(p, width, v, hd, len, o)
    } else {
        tile::<1>(p, width, v, hd, len, o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::testing::seeded_randn(seed, 0.0, 1.0, &[n]).to_vec1::<f32>().unwrap()
    }

    /// Each output within a few roundings of the plain f64 sum (the SIMD kernels fuse the multiply-adds the
    /// portable loop rounds twice), for head dims on and off the 16-lane vectors.
    #[test]
    fn tiles_equal_plain_sums() {
        for hd in [64, 48, 40, 7] {
            let (n, keys, stride) = (12, 45usize, 64);
            let width = keys.next_multiple_of(KEY_TILE);
            let qs = values(n * hd, 1);
            let kt = values(hd * stride, 2);
            let mut s = vec![f32::NAN; n * width];
            scores_tile(&qs, &kt, stride, hd, width, &mut s);
            for i in 0..n {
                for j in 0..width {
                    let want: f64 = (0..hd).map(|d| qs[i * hd + d] as f64 * kt[d * stride + j] as f64).sum();
                    assert!((s[i * width + j] as f64 - want).abs() < 1e-5 * hd as f64, "scores hd {hd} ({i}, {j})");
                }
            }
            let p: Vec<f32> = values(n * width, 3).iter().map(|v| v.abs()).collect();
            let v = values(keys * hd, 4);
            let mut o = vec![f32::NAN; n * hd];
            values_tile(&p, width, &v, hd, keys, &mut o);
            for i in 0..n {
                for d in 0..hd {
                    let want: f64 = (0..keys).map(|j| p[i * width + j] as f64 * v[j * hd + d] as f64).sum();
                    assert!((o[i * hd + d] as f64 - want).abs() < 1e-5 * keys as f64, "values hd {hd} ({i}, {d})");
                }
            }
            // The kernel in use against the portable loop: a rounding per step apart at most.
            let mut sp = vec![0.0; n * width];
            scores_portable(&qs, &kt, stride, hd, width, &mut sp);
            let mut op = vec![0.0; n * hd];
            values_portable(&p, width, &v, hd, keys, &mut op);
            for (a, b) in s.iter().zip(&sp).chain(o.iter().zip(&op)) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()) * 8.0, "{a} vs portable {b}");
            }
        }
    }
}
