//! Qwen 3 dense (`qwen3`; llama.cpp `src/models/qwen3.cpp`): Qwen 2 without the q/k/v
//! biases, with a per-head RMS norm of q and of k before RoPE, and a head dim that is not
//! `n_embd / n_head` (Qwen3-0.6B: 16 heads of 128 on a 1024-wide stream), so
//! `attention.key_length` is read.

use candle_core::Result;

use super::hparams::{Family, Hparams, Layout, Meta};

pub(super) fn hparams(meta: &Meta<'_>) -> Result<Hparams> {
    let mut hp = Hparams::common(meta, Family::Qwen3)?;
    hp.layout = Layout { qk_norm: true, ..Layout::LLAMA };
    Ok(hp)
}
