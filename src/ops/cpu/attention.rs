//! The two small matrix products of a prefill's causal attention on the CPU (`model::cpu_forward`): query
//! vectors against keys stored transposed ([`scores_tile`]), then softmax weights against the values
//! ([`values_tile`]). Both run through the f32 GEMM's micro-kernels (`gemm::product_wide`: 6 rows × 16 lanes in
//! registers, fused multiply-adds on AVX2 and NEON), which take the keys / values in place at their stride.

use super::gemm::{self, NR};

/// Keys per score tile: `width` in [`scores_tile`] is a multiple of it.
pub const KEY_TILE: usize = NR;

/// `s[i][j] = q_i · k_j` for the query vectors `qs` (`[n, hd]`, n a multiple of 4) and keys `j < width` (a
/// multiple of [`KEY_TILE`]) given transposed (`kt[d · stride + j]`); `s` is `[n, width]`.
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
    // SAFETY: n query rows of hd floats; hd key rows `stride` apart with `width ≤ stride` floats each (asserted
    // with the keys' length); n score rows of `width`.
    unsafe { gemm::product_wide(qs.as_ptr(), hd, kt.as_ptr(), stride, hd, n, width, s.as_mut_ptr(), width, false) };
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
    if !hd.is_multiple_of(NR) {
        // Head dims off the micro-kernel's 16 lanes (stories260K's 8): a loop of 4 rows × 8 or 1 dims.
        return if hd.is_multiple_of(8) {
            values_narrow::<8>(p, width, v, hd, len, o)
        } else {
            values_narrow::<1>(p, width, v, hd, len, o)
        };
    }
    // SAFETY: n weight rows of `width` ≥ len floats; len value rows of hd floats (a multiple of NR); n output
    // rows of hd floats.
    unsafe { gemm::product_wide(p.as_ptr(), width, v.as_ptr(), hd, len, n, hd, o.as_mut_ptr(), hd, false) };
}

/// [`values_tile`] for head dims that are not a multiple of 16: 4 rows × `W` dims accumulate over the keys.
fn values_narrow<const W: usize>(p: &[f32], width: usize, v: &[f32], hd: usize, len: usize, o: &mut [f32]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::testing::seeded_randn(seed, 0.0, 1.0, &[n]).to_vec1::<f32>().unwrap()
    }

    /// Each output within a few roundings of the plain f64 sum (the SIMD kernels fuse the multiply-adds a plain
    /// loop rounds twice), for head dims on and off the 16-lane vectors (12 rows: two 6-row tiles).
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
            // The kernel in use against the plain f32 loops (multiply, then add, in order): a rounding per step
            // apart at most.
            let sp: Vec<f32> = (0..n * width)
                .map(|e| (0..hd).fold(0f32, |acc, d| acc + qs[e / width * hd + d] * kt[d * stride + e % width]))
                .collect();
            let op: Vec<f32> = (0..n * hd)
                .map(|e| (0..keys).fold(0f32, |acc, j| acc + p[e / hd * width + j] * v[j * hd + e % hd]))
                .collect();
            for (a, b) in s.iter().zip(&sp).chain(o.iter().zip(&op)) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()) * 8.0, "{a} vs portable {b}");
            }
        }
    }
}
