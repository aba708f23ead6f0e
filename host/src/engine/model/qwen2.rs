//! Qwen 2 and 2.5 (`qwen2`; llama.cpp `src/models/qwen2.cpp`): Llama's block with biases on
//! the q, k and v projections (read wherever the file has them) and NEOX RoPE.

use candle_core::Result;

use super::hparams::{Family, Hparams, Meta};

pub(super) fn hparams(meta: &Meta<'_>) -> Result<Hparams> {
    Hparams::common(meta, Family::Qwen2)
}
