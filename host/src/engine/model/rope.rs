//! Rotary position embeddings as ggml computes them (`ggml-cpu/ops.cpp`, `rope_yarn`):
//! the angle of pair `k` at position `p` is `p · base^(-2k / n_rot) / factor[k]`, scaled by
//! `freq_scale` and blended with the unscaled angle by YaRN's ramp, and cos/sin carry the
//! attention factor (`mscale`). One table per distinct parameter set, built once for the
//! configured context; plain RoPE, Llama 3's `rope_freqs`, Phi 3's LongRoPE factors and
//! Mistral 3's YaRN are all this one formula with different inputs.

use candle_core::Result;

use super::hparams::Meta;

/// How a family rotates q and k.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    pub base: f32,
    /// Values of a head that are rotated (the first `n_rot`; Phi 4's partial rotary < head_dim).
    pub n_rot: usize,
    /// NEOX pairs value `k` with `k + n_rot/2` (Qwen, Gemma, Phi); otherwise adjacent values
    /// `2k`, `2k + 1` are a pair (Llama and Mistral, whose q/k rows the converter permuted).
    pub neox: bool,
    /// `1 / rope.scaling.factor` (linear and YaRN scaling), 1 without scaling.
    pub freq_scale: f32,
    /// YaRN: the blend of scaled and unscaled angles by dimension.
    pub yarn: Option<Yarn>,
    /// Multiplies cos and sin (LongRoPE's and YaRN's magnitude correction).
    pub attn_factor: f32,
    /// Per-pair divisors of the angle, from a tensor of the file.
    pub factors: Factors,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// The context the model was trained at before scaling.
    pub n_ctx_orig: usize,
}

/// Where a family's per-pair frequency factors come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Factors {
    None,
    /// One tensor (Llama 3's `rope_freqs.weight`).
    Tensor(&'static str),
    /// Phi 3's LongRoPE: `rope_factors_long` when the configured context passes the
    /// original one, else `rope_factors_short` (llama.cpp's `get_rope_factors`).
    LongShort {
        n_ctx_orig: usize,
    },
}

impl RopeParams {
    /// Reads `rope.*` keys: base, scaling type and factor, YaRN's betas and log multiplier
    /// (llama.cpp `llama_context`'s attention factor rules), the stored attention factor.
    pub(super) fn read(meta: &Meta<'_>, n_rot: usize, default_base: f32) -> Result<RopeParams> {
        let base = meta.opt_f32("rope.freq_base")?.unwrap_or(default_base);
        let factor = meta.opt_f32("rope.scaling.factor")?.filter(|f| *f > 0.0).unwrap_or(1.0);
        let stored_attn_factor = meta.opt_f32("rope.scaling.attn_factor")?.unwrap_or(1.0);
        let kind = meta.opt_str("rope.scaling.type")?.unwrap_or("linear");
        let n_ctx_orig = match meta.opt_u32("rope.scaling.original_context_length")? {
            Some(n) => n,
            None => meta.u32("context_length")?,
        };
        let (freq_scale, yarn, attn_factor) = match kind {
            "none" => (1.0, None, stored_attn_factor),
            "linear" | "longrope" => (1.0 / factor, None, stored_attn_factor),
            "yarn" => {
                let log_mul = meta.opt_f32("rope.scaling.yarn_log_multiplier")?.unwrap_or(0.0);
                let mscale = |m: f32| if factor <= 1.0 { 1.0 } else { 1.0 + 0.1 * m * factor.ln() };
                // llama.cpp passes attn/(1 + 0.1 ln f) and ggml multiplies the (1 + 0.1 ln f)
                // back in: the magnitude that reaches cos/sin is the ratio below.
                let magnitude = if log_mul != 0.0 { mscale(1.0) / mscale(log_mul) } else { mscale(1.0) };
                let yarn = Yarn {
                    beta_fast: meta.opt_f32("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                    beta_slow: meta.opt_f32("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                    n_ctx_orig,
                };
                (1.0 / factor, Some(yarn), magnitude / mscale(1.0) * stored_attn_factor)
            }
            other => candle_core::bail!("RoPE scaling `{other}` is not supported (supported: none, linear, yarn, longrope)"),
        };
        Ok(RopeParams { base, n_rot, neox: true, freq_scale, yarn, attn_factor, factors: Factors::None })
    }

    /// `(positions, n_rot / 2)` tables of cos and sin for positions `0..positions`, with the
    /// per-pair `factors` (`n_rot / 2` of them) when the family has some.
    pub fn tables(&self, positions: usize, factors: Option<&[f32]>) -> Result<(Vec<f32>, Vec<f32>)> {
        let pairs = self.n_rot / 2;
        if let Some(f) = factors
            && f.len() < pairs
        {
            candle_core::bail!("RoPE factors: {} values for {pairs} rotated pairs", f.len())
        }
        let theta_scale = self.base.powf(-2.0 / self.n_rot as f32);
        let corr = self.yarn.map(|y| corr_dims(self.n_rot, y.n_ctx_orig, self.base, y.beta_fast, y.beta_slow));
        let (mut cos, mut sin) = (Vec::with_capacity(positions * pairs), Vec::with_capacity(positions * pairs));
        for p in 0..positions {
            // As ggml: one f32 angle multiplied pair by pair, not a power per pair.
            let mut theta = p as f32;
            for k in 0..pairs {
                let ff = factors.map_or(1.0, |f| f[k]);
                let extrap = theta / ff;
                let interp = self.freq_scale * extrap;
                let (angle, mscale) = match corr {
                    Some([low, high]) => {
                        let ramp = 1.0 - ((k as f32 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                        let angle = interp * (1.0 - ramp) + extrap * ramp;
                        (angle, self.attn_factor * (1.0 + 0.1 * (1.0 / self.freq_scale).ln()))
                    }
                    None => (interp, self.attn_factor),
                };
                cos.push(angle.cos() * mscale);
                sin.push(angle.sin() * mscale);
                theta *= theta_scale;
            }
        }
        Ok((cos, sin))
    }
}

/// The pair range over which YaRN blends from unscaled to scaled angles (`ggml_rope_yarn_corr_dims`).
fn corr_dims(n_rot: usize, n_ctx_orig: usize, base: f32, beta_fast: f32, beta_slow: f32) -> [f32; 2] {
    let dim = |r: f32| n_rot as f32 * (n_ctx_orig as f32 / (r * 2.0 * std::f32::consts::PI)).ln() / (2.0 * base.ln());
    [dim(beta_fast).floor().max(0.0), dim(beta_slow).ceil().min(n_rot as f32 - 1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(n_rot: usize) -> RopeParams {
        RopeParams { base: 10_000.0, n_rot, neox: true, freq_scale: 1.0, yarn: None, attn_factor: 1.0, factors: Factors::None }
    }

    #[test]
    fn plain_rope_is_position_times_inverse_frequency() {
        let (cos, sin) = plain(8).tables(3, None).unwrap();
        for p in 0..3 {
            for k in 0..4 {
                let angle = p as f64 / 10_000f64.powf(2.0 * k as f64 / 8.0);
                assert!((cos[p * 4 + k] as f64 - angle.cos()).abs() < 1e-5, "cos p={p} k={k}");
                assert!((sin[p * 4 + k] as f64 - angle.sin()).abs() < 1e-5, "sin p={p} k={k}");
            }
        }
    }

    #[test]
    fn factors_divide_the_angle_and_the_attention_factor_scales_both() {
        let mut rope = plain(4);
        rope.attn_factor = 2.0;
        let (cos, sin) = rope.tables(2, Some(&[1.0, 4.0])).unwrap();
        let angle = 1.0f64 / 100.0 / 4.0; // position 1, pair 1: base^(-2/4) = 1/100, divided by 4
        assert!((cos[3] as f64 - 2.0 * angle.cos()).abs() < 1e-5);
        assert!((sin[3] as f64 - 2.0 * angle.sin()).abs() < 1e-5);
        assert!(rope.tables(2, Some(&[1.0])).is_err(), "too few factors");
    }

    #[test]
    fn yarn_keeps_fast_pairs_and_scales_slow_ones() {
        // Ministral 3: corr dims [20, 37] for 128 rotated values, 16k context, base 1e6.
        assert_eq!(corr_dims(128, 16384, 1e6, 32.0, 1.0), [20.0, 37.0]);
        let mut rope = plain(128);
        rope.base = 1e6;
        rope.freq_scale = 1.0 / 16.0;
        rope.yarn = Some(Yarn { beta_fast: 32.0, beta_slow: 1.0, n_ctx_orig: 16384 });
        rope.attn_factor = 1.0 / (1.0 + 0.1 * 16f32.ln());
        let (_, sin) = rope.tables(2, None).unwrap();
        let unscaled = |k: i32| (1e6f64.powf(-2.0 * k as f64 / 128.0)).sin();
        assert!((sin[64] as f64 - unscaled(0)).abs() < 1e-5, "pair 0 is extrapolated (unscaled)");
        assert!((sin[64 + 63] as f64 - (1e6f64.powf(-126.0 / 128.0) / 16.0).sin()).abs() < 1e-6, "pair 63 is interpolated");
    }
}
