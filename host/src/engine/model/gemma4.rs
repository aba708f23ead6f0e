//! Gemma 4 (`gemma4`; llama.cpp `src/models/gemma4.cpp`, read in docs/notes/gemma4.md):
//! Gemma 3's block (scaled embeddings, `gelu_tanh(gate) · up`, norms before and after
//! attention and MLP, per-head q/k norms) with
//! - sliding and global layers in a per-layer pattern, each kind with its own head size
//!   (E2B: 256 and 512) and RoPE: the global layers' is "proportional" (the full head's
//!   frequencies, `rope_freqs` zeroing the angle of all but the first quarter's pairs);
//! - a weightless RMS norm of v and a softmax scale of 1 (the q/k norms set it);
//! - the last `shared_kv_layers` layers reading the cache of the last earlier layer of their
//!   kind instead of computing keys and values;
//! - per-layer token embeddings (E2B/E4B): a second table gives every layer a slice for each
//!   token, mixed with a projection of the embedding, gated into the residual stream after
//!   the MLP;
//! - an optional scalar on each layer's output, MLP widths per layer, and logits soft-capped
//!   at 30 unless the file says otherwise;
//! - in 26B-A4B, routed experts (GELU, softmax top 8 of 128, renormalised) beside the dense
//!   MLP in every layer with a router, each side with its own norms ([`super::moe::Beside`]).

use candle_core::Result;

use super::hparams::{Activation, Family, Hparams, Layout, Meta, Moe};
use super::rope::{Factors, RopeParams};

pub(super) fn hparams(meta: &Meta<'_>) -> Result<Hparams> {
    let mut hp = Hparams::common(meta, Family::Gemma4)?;
    hp.layout =
        Layout { qk_norm: true, post_norms: true, gelu: true, embed_scale: true, v_norm: true, experts_beside_mlp: true, ..Layout::LLAMA };
    let n = hp.n_layer;
    let sliding = meta.flags("attention.sliding_window_pattern", n)?;
    hp.set_windows(meta.u32("attention.sliding_window")?, |i| sliding[i]);

    // Keys and values have one size per attention kind (llama.cpp requires k == v for both).
    let head_full = hp.layers[0].heads.head_dim;
    let head_swa = meta.u32("attention.key_length_swa")?;
    for (key, want) in [("attention.value_length", head_full), ("attention.value_length_swa", head_swa)] {
        if let Some(v) = meta.opt_u32(key)?
            && v != want
        {
            candle_core::bail!("gemma4: `{key}` {v} differs from the key length {want}")
        }
    }
    for layer in hp.layers.iter_mut().filter(|l| l.window.is_some()) {
        layer.heads.head_dim = head_swa;
    }

    hp.rope.factors = Factors::Tensor("rope_freqs.weight");
    hp.rope_local = Some(RopeParams {
        base: meta.opt_f32("rope.freq_base_swa")?.unwrap_or(10_000.0),
        n_rot: meta.opt_u32("rope.dimension_count_swa")?.unwrap_or(hp.rope.n_rot),
        freq_scale: 1.0,
        attn_factor: 1.0,
        yarn: None,
        factors: Factors::None,
        ..hp.rope.clone()
    });

    // Layers from `first_shared` on read the cache of the last earlier layer of their kind
    // (llama.cpp: S - 2 for sliding layers, S - 1 for global ones, which the released files
    // make the same layers).
    let shared = meta.opt_u32("attention.shared_kv_layers")?.unwrap_or(0);
    let Some(first_shared) = n.checked_sub(shared) else { candle_core::bail!("gemma4: {shared} shared KV layers of {n}") };
    for i in first_shared..n {
        let sliding = hp.layers[i].window.is_some();
        let Some(source) = (0..first_shared).rev().find(|&j| hp.layers[j].window.is_some() == sliding) else {
            candle_core::bail!("gemma4: layer {i} shares the KV cache of an earlier layer of its kind, and none has its own")
        };
        hp.layers[i].kv_source = source;
    }

    hp.attn_scale = Some(1.0);
    // llama.cpp's default when the key is absent is 30, not "off"; 0 turns it off.
    hp.final_softcap = Some(meta.opt_f32("final_logit_softcapping")?.unwrap_or(30.0)).filter(|c| *c != 0.0);
    hp.per_layer_input = meta.u32("embedding_length_per_layer_input")?;
    if meta.opt_u32("expert_count")?.is_some() {
        hp.moe = Some(Moe { activation: Activation::Gelu, ..Moe::read(meta, &hp)? });
    }
    Ok(hp)
}
