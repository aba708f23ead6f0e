//! Qwen 3.5 / 3.6 dense (`qwen35`; llama.cpp `src/models/qwen35.cpp`, `delta-net-base.cpp`):
//! three of every four layers are Gated DeltaNet layers ([`super::deltanet`]: a causal
//! convolution and a recurrent state per sequence instead of a KV cache), the fourth is
//! attention with
//! - a q projection twice as wide whose second half of each head gates that head's output
//!   through a sigmoid ([`super::Layout::gated_q`]);
//! - per-head q/k RMS norms and a head of 256 on a stream of 1024 (0.8B);
//! - interleaved M-RoPE over the first quarter of each head: for text every section rotates
//!   by the token's position, which is NEOX RoPE over `rope.dimension_count` values (the
//!   sections are checked to leave no pair to the fourth, position-0 section).
//!
//! Every layer's norm before the MLP is stored as `post_attention_norm`. The
//! multi-token-prediction block converted files carry after the trunk is not read.

use candle_core::Result;

use super::hparams::{DeltaNetShape, Family, Hparams, Layout, Meta, Moe};

/// `qwen35`, or `qwen35moe` (Qwen3.5-35B-A3B: the same layers with routed experts and a
/// gated shared expert in place of the MLP).
pub(super) fn hparams(meta: &Meta<'_>, family: Family) -> Result<Hparams> {
    let mut hp = Hparams::common(meta, family)?;
    hp.layout = Layout { qk_norm: true, gated_q: true, ffn_norm: "post_attention_norm.weight", ..Layout::LLAMA };
    let n = hp.n_layer;
    let recurrent = match meta.opt_flags("attention.recurrent_layers", n)? {
        Some(flags) => flags,
        None => {
            let interval = meta.opt_u32("full_attention_interval")?.unwrap_or(4).max(1);
            (0..n).map(|i| !(i + 1).is_multiple_of(interval)).collect()
        }
    };
    for (layer, recurrent) in hp.layers.iter_mut().zip(recurrent) {
        layer.recurrent = recurrent;
    }
    // Converted files end with multi-token-prediction blocks (speculative decoding's draft
    // head), counted in `block_count`; the trunk is the layers before them.
    let nextn = meta.opt_u32("nextn_predict_layers")?.unwrap_or(0);
    let Some(trunk) = n.checked_sub(nextn).filter(|&t| t > 0) else {
        candle_core::bail!("qwen35: {nextn} prediction blocks of {n} layers leave no trunk")
    };
    hp.n_layer = trunk;
    hp.layers.truncate(trunk);
    if family == Family::Qwen35Moe {
        hp.moe = Some(Moe::read(meta, &hp)?);
    }

    let head_dim = meta.u32("ssm.state_size")?;
    let n_v_heads = meta.u32("ssm.time_step_rank")?;
    let inner = meta.u32("ssm.inner_size")?;
    if inner != n_v_heads * head_dim {
        candle_core::bail!("qwen35: `ssm.inner_size` {inner} is not {n_v_heads} value heads of {head_dim} (llama.cpp needs them equal)")
    }
    hp.delta_net =
        Some(DeltaNetShape { conv_kernel: meta.u32("ssm.conv_kernel")?, head_dim, n_k_heads: meta.u32("ssm.group_count")?, n_v_heads });

    // ggml's interleaved M-RoPE gives pair k the position of section t, h or w (all the
    // token's position for text) by `k mod 3`, and of section e (position 0) past them.
    let sections = meta.per_layer("rope.dimension_sections", 4)?;
    let total: usize = sections.iter().sum();
    let pairs = hp.rope.n_rot / 2;
    // (ggml_mrope_cache_init: lanes 0, 1, 2 of every three pairs are t, h, w while there
    // are pairs of that section left.)
    let positional = |k: usize| {
        let s = k % total.max(1);
        s < 3 * sections[s % 3]
    };
    if total == 0 || !(0..pairs).all(positional) {
        candle_core::bail!("qwen35: M-RoPE sections {sections:?} over {pairs} pairs leave some to the image section (not supported)")
    }
    Ok(hp)
}
