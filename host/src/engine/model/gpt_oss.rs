//! gpt-oss (`gpt-oss`; llama.cpp `src/models/openai-moe.cpp`): every MLP is routed experts
//! (gpt-oss-20b: 4 of 32 of width 2880) with biases on the router and on each expert's
//! projections and gpt-oss's clamped SwiGLU; biases on q, k, v and the output projection;
//! a learned sink logit per query head in every softmax; sliding-window (128) and global
//! layers alternating, the first sliding; YaRN-scaled NEOX RoPE; the norm before the MLP
//! stored as `post_attention_norm`. Its experts ship in MXFP4, run on wisp's kernel.

use candle_core::Result;

use super::hparams::{Activation, Family, Hparams, Layout, Meta, Moe};

pub(super) fn hparams(meta: &Meta<'_>) -> Result<Hparams> {
    let mut hp = Hparams::common(meta, Family::GptOss)?;
    hp.layout = Layout { sinks: true, ffn_norm: "post_attention_norm.weight", ..Layout::LLAMA };
    hp.moe = Some(Moe { activation: Activation::SwigluOai { alpha: 1.702, limit: 7.0 }, ..Moe::read(meta, &hp)? });
    hp.set_windows(meta.u32("attention.sliding_window")?, |i| i.is_multiple_of(2));
    Ok(hp)
}
