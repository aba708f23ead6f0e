//! Phi 3, 3.5 and Phi-4-mini (`phi3`; llama.cpp `src/models/phi3.cpp`): one fused
//! `attn_qkv` matrix (rows q, then k, then v) and one fused `ffn_up` of `2 × n_ff` rows
//! (gate, then up); NEOX RoPE over the first `rope.dimension_count` values of a head only
//! (Phi-4-mini rotates 96 of 128); LongRoPE: per-pair divisors `rope_factors_short` or,
//! when the configured context passes `rope.scaling.original_context_length`,
//! `rope_factors_long`, with the stored `rope.scaling.attn_factor` on cos and sin. The
//! sliding window some files declare is ignored, as llama.cpp does.

use candle_core::Result;

use super::hparams::{Family, Hparams, Layout, Meta};
use super::rope::Factors;

pub(super) fn hparams(meta: &Meta<'_>) -> Result<Hparams> {
    let mut hp = Hparams::common(meta, Family::Phi3)?;
    hp.layout = Layout { fused_qkv: true, fused_gate_up: true, ..Layout::LLAMA };
    let n_ctx_orig = meta.opt_u32("rope.scaling.original_context_length")?.unwrap_or(hp.context_length);
    hp.rope.factors = Factors::LongShort { n_ctx_orig };
    Ok(hp)
}
