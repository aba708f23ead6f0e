//! Mistral 3 and Ministral 3 dense (`mistral3`; llama.cpp `src/models/mistral3.cpp`):
//! Llama's block and pair order with YaRN-scaled RoPE (`rope.scaling.*`, with
//! `yarn_log_multiplier` setting the magnitude) and Llama 4's attention temperature: q is
//! multiplied by `1 + attention.temperature_scale · ln(1 + ⌊pos / n_ctx_orig⌋)` after RoPE.

use candle_core::Result;

use super::hparams::{AttnTemperature, Family, Hparams, Meta};

pub(super) fn hparams(meta: &Meta<'_>) -> Result<Hparams> {
    let mut hp = Hparams::common(meta, Family::Mistral3)?;
    hp.rope.neox = false;
    let floor = meta.opt_u32("rope.scaling.original_context_length")?.unwrap_or(hp.context_length);
    hp.attn_temperature = match meta.opt_f32("attention.temperature_scale")? {
        Some(scale) if scale != 0.0 => Some(AttnTemperature { scale, floor: floor.max(1) as f32 }),
        _ => None,
    };
    Ok(hp)
}
