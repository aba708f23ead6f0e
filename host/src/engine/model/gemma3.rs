//! Gemma 3 (`gemma3`; llama.cpp `src/models/gemma3.cpp`): embeddings scaled by `√n_embd`,
//! `gelu_tanh(gate) · up`, RMS norms after attention and after the MLP as well as before,
//! per-head q/k norms, and five sliding-window layers (their own RoPE base, 10k) to one
//! global layer. The norm weights in the file already include Gemma's `1 +`.

use candle_core::Result;

use super::hparams::{Family, Hparams, Layout, Meta};
use super::rope::RopeParams;

pub(super) fn hparams(meta: &Meta<'_>) -> Result<Hparams> {
    let mut hp = Hparams::common(meta, Family::Gemma3)?;
    hp.layout = Layout { qk_norm: true, post_norms: true, gelu: true, embed_scale: true, ..Layout::LLAMA };
    hp.rope = RopeParams::read(meta, hp.layers[0].heads.head_dim, 1_000_000.0)?;
    hp.rope_local = Some(RopeParams {
        base: meta.opt_f32("rope.local_freq_base")?.unwrap_or(10_000.0),
        freq_scale: 1.0,
        attn_factor: 1.0,
        yarn: None,
        ..hp.rope.clone()
    });
    // Every `pattern`-th layer is global, the others slide.
    let pattern = meta.opt_u32("attention.sliding_window_type")?.unwrap_or(6).max(1);
    hp.set_windows(meta.u32("attention.sliding_window")?, |i| !(i + 1).is_multiple_of(pattern));
    Ok(hp)
}
