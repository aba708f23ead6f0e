//! What a GGUF says about its model: the architecture (`general.architecture`) and the
//! hyper-parameters under its prefix, read once and checked before any tensor is.

use candle_core::Result;
use candle_core::quantized::gguf_file::{self, Value};

pub use super::moe::Activation;
use super::rope::RopeParams;
use crate::engine::attention::Heads;

/// More layers than any released model has (Gemma 4 31B: 60); a larger count in a file is
/// refused before anything is allocated per layer.
const MAX_LAYERS: usize = 1024;

/// The architectures wisp implements, from `general.architecture`; one module each beside
/// this file says what sets it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gemma3,
    Gemma4,
    GptOss,
    Llama,
    Mistral3,
    Phi3,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Qwen35,
    Qwen35Moe,
}

impl Family {
    pub const ALL: [Family; 11] = [
        Family::Gemma3,
        Family::Gemma4,
        Family::GptOss,
        Family::Llama,
        Family::Mistral3,
        Family::Phi3,
        Family::Qwen2,
        Family::Qwen3,
        Family::Qwen3Moe,
        Family::Qwen35,
        Family::Qwen35Moe,
    ];

    /// Maps a GGUF `general.architecture` to a family; `None` if unsupported.
    pub fn from_architecture(arch: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.arch_name() == arch)
    }

    /// The GGUF `general.architecture` value, also the metadata key prefix.
    pub fn arch_name(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3",
            Family::Gemma4 => "gemma4",
            Family::GptOss => "gpt-oss",
            Family::Llama => "llama",
            Family::Mistral3 => "mistral3",
            Family::Phi3 => "phi3",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Qwen3Moe => "qwen3moe",
            Family::Qwen35 => "qwen35",
            Family::Qwen35Moe => "qwen35moe",
        }
    }

    /// The supported architectures, for error messages: "gemma3, llama, ...".
    pub fn supported_list() -> String {
        Family::ALL.map(Family::arch_name).join(", ")
    }
}

/// How a family's layers are put together, beyond the shared pre-norm decoder block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    /// One `attn_qkv` matrix instead of `attn_q`, `attn_k`, `attn_v` (Phi 3).
    pub fused_qkv: bool,
    /// One `ffn_up` matrix of `2 × n_ff` rows, gate first, instead of `ffn_gate` + `ffn_up` (Phi 3).
    pub fused_gate_up: bool,
    /// Per-head RMS norms of q and k before RoPE (`attn_q_norm`, `attn_k_norm`: Gemma 3, Qwen 3).
    pub qk_norm: bool,
    /// RMS norms after attention and after the MLP, before the residual add (Gemma).
    pub post_norms: bool,
    /// `gelu_tanh(gate) · up` (Gemma) instead of `silu(gate) · up`.
    pub gelu: bool,
    /// Token embeddings are multiplied by `√n_embd` (Gemma).
    pub embed_scale: bool,
    /// A learned logit per query head in each softmax (`attn_sinks`: gpt-oss).
    pub sinks: bool,
    /// The name of the norm before the MLP (`post_attention_norm` in gpt-oss).
    pub ffn_norm: &'static str,
    /// A weightless per-head RMS norm of v before it is cached (Gemma 4).
    pub v_norm: bool,
    /// The q projection is twice as wide, each head's q followed by a gate of the same
    /// size whose sigmoid multiplies that head's attention output (Qwen 3.5).
    pub gated_q: bool,
    /// Routed experts ([`Hparams::moe`]) run beside the dense MLP, in the layers that have
    /// a router, instead of replacing it (Gemma 4).
    pub experts_beside_mlp: bool,
}

impl Layout {
    /// Llama's block: separate projections, SiLU-gated MLP, no extra norms.
    pub const LLAMA: Layout = Layout {
        fused_qkv: false,
        fused_gate_up: false,
        qk_norm: false,
        post_norms: false,
        gelu: false,
        embed_scale: false,
        sinks: false,
        ffn_norm: "ffn_norm.weight",
        v_norm: false,
        gated_q: false,
        experts_beside_mlp: false,
    };
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct Hparams {
    pub family: Family,
    pub layout: Layout,
    pub n_layer: usize,
    pub n_embd: usize,
    pub rms_eps: f64,
    /// Each layer's heads, MLP width, window and KV cache (uniform but for the window in
    /// most families; Gemma 4 sizes heads by attention kind and shares caches).
    pub layers: Vec<LayerShape>,
    /// RoPE of the global-attention layers (all layers but Gemma's sliding ones).
    pub rope: RopeParams,
    /// Gemma's sliding-window layers use their own RoPE (base, and head size in Gemma 4).
    pub rope_local: Option<RopeParams>,
    /// Scaling of q by position (Llama 4, Mistral 3: `1 + scale · ln(1 + ⌊pos / floor⌋)`).
    pub attn_temperature: Option<AttnTemperature>,
    /// The factor of q·k in the softmax; `None`: `1/√head_dim` (Gemma 4: 1, its q/k norms
    /// set the scale).
    pub attn_scale: Option<f32>,
    /// Logits become `cap · tanh(logits / cap)` (Gemma 4: 30).
    pub final_softcap: Option<f32>,
    /// Width of each layer's slice of the per-layer token embeddings (Gemma 4 E2B/E4B's
    /// `per_layer_token_embd`); 0 when the model has none.
    pub per_layer_input: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    /// Routed experts in place of the dense MLP (Qwen 3 MoE).
    pub moe: Option<Moe>,
    /// The shape of the Gated DeltaNet layers, where some layers are recurrent (Qwen 3.5).
    pub delta_net: Option<DeltaNetShape>,
}

/// What one layer's attention and MLP look like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerShape {
    pub heads: Heads,
    pub n_ff: usize,
    /// Sliding window, `None` for global attention.
    pub window: Option<usize>,
    /// The layer whose keys and values this one attends to: itself, or an earlier layer
    /// of the same kind whose cache it reads without writing (Gemma 4's shared KV).
    pub kv_source: usize,
    /// A Gated DeltaNet layer (a recurrent state per sequence, no KV cache) instead of
    /// attention (Qwen 3.5's three of every four).
    pub recurrent: bool,
}

/// A Gated DeltaNet layer's geometry (llama.cpp's `ssm.*` keys): keys and values of
/// `head_dim` (`ssm.state_size`), `n_k_heads` key heads (`ssm.group_count`) shared by
/// `n_v_heads` value heads (`ssm.time_step_rank`, tiled: value head `h` reads key head
/// `h % n_k_heads`), and a causal convolution of `conv_kernel` taps over q, k and v.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeltaNetShape {
    pub conv_kernel: usize,
    pub head_dim: usize,
    pub n_k_heads: usize,
    pub n_v_heads: usize,
}

impl DeltaNetShape {
    pub fn key_dim(&self) -> usize {
        self.n_k_heads * self.head_dim
    }

    pub fn value_dim(&self) -> usize {
        self.n_v_heads * self.head_dim
    }

    /// Channels of the convolution: q, k and v side by side.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }

    /// Values of one sequence's state in one layer: the convolution's held inputs and each
    /// value head's `head_dim × head_dim` memory.
    pub fn state_floats(&self) -> usize {
        (self.conv_kernel - 1) * self.conv_dim() + self.n_v_heads * self.head_dim * self.head_dim
    }
}

/// A mixture-of-experts MLP: each token runs `n_used` of `n_expert` gated MLPs of width
/// `n_ff`, chosen and weighted by a router.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moe {
    pub n_expert: usize,
    pub n_used: usize,
    pub n_ff: usize,
    pub activation: Activation,
    /// Width of a shared expert every row runs beside the routed ones, its output gated by
    /// a sigmoid (Qwen 3.5 MoE); 0 without one.
    pub n_ff_shared: usize,
}

impl Moe {
    /// `{arch}.expert_count`, `expert_used_count` and `expert_feed_forward_length`
    /// (llama.cpp's default without it: the dense width over the experts used).
    pub(super) fn read(meta: &Meta<'_>, hp: &Hparams) -> Result<Moe> {
        let dense_ff = hp.layers.first().map_or(0, |l| l.n_ff);
        let (n_expert, n_used) = (meta.u32("expert_count")?, meta.u32("expert_used_count")?);
        let n_ff = meta.opt_u32("expert_feed_forward_length")?.unwrap_or(dense_ff / n_used.max(1));
        let n_ff_shared = meta.opt_u32("expert_shared_feed_forward_length")?.unwrap_or(0);
        Ok(Moe { n_expert, n_used, n_ff, activation: Activation::Silu, n_ff_shared })
    }
}

/// Llama 4's attention temperature tuning, which Mistral 3 keeps: long positions sharpen q.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnTemperature {
    pub scale: f32,
    pub floor: f32,
}

impl Hparams {
    /// Reads the hyper-parameters of `family` from `content`'s metadata.
    pub fn from_gguf(content: &gguf_file::Content, family: Family) -> Result<Hparams> {
        let meta = Meta { content, arch: family.arch_name() };
        let hp = match family {
            Family::Gemma3 => super::gemma3::hparams(&meta)?,
            Family::Gemma4 => super::gemma4::hparams(&meta)?,
            Family::GptOss => super::gpt_oss::hparams(&meta)?,
            Family::Llama => super::llama::hparams(&meta)?,
            Family::Mistral3 => super::mistral3::hparams(&meta)?,
            Family::Phi3 => super::phi3::hparams(&meta)?,
            Family::Qwen2 => super::qwen2::hparams(&meta)?,
            Family::Qwen3 => super::qwen3::hparams(&meta)?,
            Family::Qwen3Moe => super::qwen3moe::hparams(&meta)?,
            Family::Qwen35 | Family::Qwen35Moe => super::qwen35::hparams(&meta, family)?,
        };
        hp.validate()?;
        Ok(hp)
    }

    /// What every family shares: Llama's keys and defaults, RoPE on all `head_dim` values.
    /// Head counts and MLP widths may be one value or one per layer.
    pub(super) fn common(meta: &Meta<'_>, family: Family) -> Result<Hparams> {
        let n_layer = meta.u32("block_count")?;
        if n_layer > MAX_LAYERS {
            candle_core::bail!("bad hyper-parameters: {n_layer} layers (at most {MAX_LAYERS})")
        }
        let n_embd = meta.u32("embedding_length")?;
        let n_head = meta.per_layer("attention.head_count", n_layer)?;
        let n_kv_head = meta.opt_per_layer("attention.head_count_kv", n_layer)?.unwrap_or_else(|| n_head.clone());
        // Absent in some mixture-of-experts files; a dense layer of width 0 is refused below.
        let n_ff = meta.opt_per_layer("feed_forward_length", n_layer)?.unwrap_or_else(|| vec![0; n_layer]);
        let head_dim = match meta.opt_u32("attention.key_length")? {
            Some(d) => d,
            None => n_embd.checked_div(n_head.first().copied().unwrap_or(0)).unwrap_or(0),
        };
        let vocab_size = match meta.content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => meta.content.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()[0]).unwrap_or(0),
        };
        let rope_dims = meta.opt_u32("rope.dimension_count")?.unwrap_or(head_dim);
        let layers = (0..n_layer)
            .map(|i| LayerShape {
                heads: Heads { n_head: n_head[i], n_kv_head: n_kv_head[i], head_dim },
                n_ff: n_ff[i],
                window: None,
                kv_source: i,
                recurrent: false,
            })
            .collect();
        Ok(Hparams {
            family,
            layout: Layout::LLAMA,
            n_layer,
            n_embd,
            rms_eps: meta.f32("attention.layer_norm_rms_epsilon")? as f64,
            layers,
            rope: RopeParams::read(meta, rope_dims, 10_000.0)?,
            rope_local: None,
            attn_temperature: None,
            attn_scale: None,
            final_softcap: None,
            per_layer_input: 0,
            context_length: meta.u32("context_length")?,
            vocab_size,
            moe: None,
            delta_net: None,
        })
    }

    /// Gives the layers for which `sliding(i)` holds the window `window` (the others stay
    /// global).
    pub(super) fn set_windows(&mut self, window: usize, sliding: impl Fn(usize) -> bool) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.window = sliding(i).then_some(window);
        }
    }

    /// The RoPE of layer `i`: 0 for [`Hparams::rope`], 1 for [`Hparams::rope_local`].
    pub(super) fn rope_index(&self, i: usize) -> usize {
        usize::from(self.layers[i].window.is_some() && self.rope_local.is_some())
    }

    /// Shapes a forward pass relies on; a malformed file is refused here, not in a kernel.
    fn validate(&self) -> Result<()> {
        let fail = |what: String| Err(candle_core::Error::Msg(format!("bad hyper-parameters: {what}")));
        if self.n_layer == 0 || self.n_embd == 0 || self.vocab_size == 0 {
            return fail(format!("{} layers, embedding length {}, vocabulary {}", self.n_layer, self.n_embd, self.vocab_size));
        }
        if let Some(d) = self.delta_net {
            let DeltaNetShape { conv_kernel, head_dim, n_k_heads, n_v_heads } = d;
            if !(2..=16).contains(&conv_kernel) || head_dim == 0 || n_k_heads == 0 || !n_v_heads.is_multiple_of(n_k_heads) {
                return fail(format!(
                    "Gated DeltaNet: convolution of {conv_kernel}, {n_k_heads} key heads and {n_v_heads} value heads of {head_dim}"
                ));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if layer.recurrent {
                if self.delta_net.is_none() || layer.kv_source != i || layer.n_ff == 0 && self.moe.is_none() {
                    return fail(format!("layer {i} is recurrent in a model without the recurrent layers' shape"));
                }
                continue;
            }
            let Heads { n_head, n_kv_head, head_dim } = layer.heads;
            if n_head == 0 || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
                return fail(format!("layer {i}: {n_head} query heads, {n_kv_head} KV heads"));
            }
            if head_dim == 0 || !head_dim.is_multiple_of(2) {
                return fail(format!("layer {i}: head dim {head_dim}"));
            }
            if layer.n_ff == 0 && (self.moe.is_none() || self.layout.experts_beside_mlp) {
                return fail(format!("layer {i}: feed-forward length 0"));
            }
            if layer.window == Some(0) {
                return fail(format!("layer {i}: a sliding window of 0"));
            }
            let rope = if self.rope_index(i) == 1 { self.rope_local.as_ref().unwrap_or(&self.rope) } else { &self.rope };
            if rope.n_rot == 0 || rope.n_rot > head_dim || !rope.n_rot.is_multiple_of(2) {
                return fail(format!("layer {i}: RoPE over {} of a head's {head_dim} values", rope.n_rot));
            }
            // A shared cache is an earlier layer's own, written with the same geometry and
            // read through the same window.
            let src = layer.kv_source;
            if src != i {
                let source = self.layers.get(src).filter(|s| src < i && s.kv_source == src);
                if source.is_none_or(|s| s.heads.n_kv_head != n_kv_head || s.heads.head_dim != head_dim || s.window != layer.window) {
                    return fail(format!("layer {i} reads the KV cache of layer {src}, which does not match it"));
                }
            }
        }
        if let Some(moe) = self.moe
            && (moe.n_expert == 0 || moe.n_used == 0 || moe.n_used > moe.n_expert || moe.n_ff == 0)
        {
            return fail(format!("{} of {} experts of width {}", moe.n_used, moe.n_expert, moe.n_ff));
        }
        Ok(())
    }
}

/// The metadata of one architecture: `arch.key` lookups with the type checked.
pub(super) struct Meta<'a> {
    pub content: &'a gguf_file::Content,
    pub arch: &'static str,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(&format!("{}.{key}", self.arch))
    }

    fn missing(&self, key: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!("GGUF metadata has no `{}.{key}`", self.arch))
    }

    fn typed<T>(&self, key: &str, value: Option<&'a Value>, read: impl FnOnce(&'a Value) -> Result<T>) -> Result<Option<T>> {
        value.map(|v| read(v).map_err(|e| candle_core::Error::Msg(format!("GGUF metadata `{}.{key}`: {e}", self.arch)))).transpose()
    }

    /// A count or length (any integer type), as `usize`.
    pub fn opt_u32(&self, key: &str) -> Result<Option<usize>> {
        self.typed(key, self.get(key), |v| v.to_u32().or_else(|_| v.to_u64().map(|x| x.min(u32::MAX as u64) as u32)))
            .map(|v| v.map(|x| x as usize))
    }

    pub fn u32(&self, key: &str) -> Result<usize> {
        self.opt_u32(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.typed(key, self.get(key), |v| v.to_f32().or_else(|_| v.to_f64().map(|x| x as f32)))
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| self.missing(key))
    }

    /// A count that is one value for all layers or an array of one per layer.
    pub fn opt_per_layer(&self, key: &str, n_layer: usize) -> Result<Option<Vec<usize>>> {
        let value = self.get(key);
        self.typed(key, value, |v| match v {
            Value::Array(items) => {
                if items.len() != n_layer {
                    candle_core::bail!("{} values for {n_layer} layers", items.len())
                }
                items.iter().map(|x| x.to_u32().or_else(|_| x.to_i32().map(|x| x.max(0) as u32)).map(|x| x as usize)).collect()
            }
            v => Ok(vec![v.to_u32()? as usize; n_layer]),
        })
    }

    pub fn per_layer(&self, key: &str, n_layer: usize) -> Result<Vec<usize>> {
        self.opt_per_layer(key, n_layer)?.ok_or_else(|| self.missing(key))
    }

    /// An array of one flag per layer.
    pub fn opt_flags(&self, key: &str, n_layer: usize) -> Result<Option<Vec<bool>>> {
        self.typed(key, self.get(key), |v| match v {
            Value::Array(items) if items.len() == n_layer => items.iter().map(Value::to_bool).collect(),
            Value::Array(items) => candle_core::bail!("{} values for {n_layer} layers", items.len()),
            _ => candle_core::bail!("not an array"),
        })
    }

    pub fn flags(&self, key: &str, n_layer: usize) -> Result<Vec<bool>> {
        self.opt_flags(key, n_layer)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.typed(key, self.get(key), |v| v.to_string().map(String::as_str))
    }
}
