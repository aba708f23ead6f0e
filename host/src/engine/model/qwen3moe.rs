//! Qwen 3 MoE (`qwen3moe`; llama.cpp `src/models/qwen3moe.cpp`): Qwen 3's attention (per-head
//! q/k norms, NEOX RoPE, `attention.key_length` head dim) with every MLP replaced by routed
//! experts ([`super::moe`]): softmax over all experts, the top `expert_used_count` kept and
//! their weights renormalised to sum to one (Qwen3-30B-A3B: 8 of 128 experts of width 768).

use candle_core::Result;

use super::hparams::{Family, Hparams, Layout, Meta, Moe};

pub(super) fn hparams(meta: &Meta<'_>) -> Result<Hparams> {
    let mut hp = Hparams::common(meta, Family::Qwen3Moe)?;
    hp.layout = Layout { qk_norm: true, ..Layout::LLAMA };
    hp.moe = Some(Moe::read(meta, &hp)?);
    Ok(hp)
}
