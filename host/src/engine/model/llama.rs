//! Llama (`llama`; llama.cpp `src/models/llama.cpp`): the plain pre-norm block, SiLU-gated
//! MLP, RoPE on adjacent pairs (the converter permuted q and k's rows for it). Llama 3.x
//! stores its RoPE scaling (factor 32 and the low/high frequency ramp of Llama 3.1-3.3) as
//! per-pair divisors in `rope_freqs.weight`; Llama 2 and SmolLM have none. Also the family
//! of Mistral 7B and SmolLM2.

use candle_core::Result;

use super::hparams::{Family, Hparams, Meta};
use super::rope::Factors;

pub(super) fn hparams(meta: &Meta<'_>) -> Result<Hparams> {
    let mut hp = Hparams::common(meta, Family::Llama)?;
    hp.rope.neox = false;
    hp.rope.factors = Factors::Tensor("rope_freqs.weight");
    Ok(hp)
}
