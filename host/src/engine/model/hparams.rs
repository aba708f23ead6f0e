//! What a GGUF says about its model: the architecture (`general.architecture`) and the
//! hyper-parameters under its prefix, read once and checked before any tensor is.

use candle_core::Result;
use candle_core::quantized::gguf_file::{self, Value};

pub use super::moe::Activation;
use super::rope::RopeParams;

/// The architectures wisp implements, from `general.architecture`; one module each beside
/// this file says what sets it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gemma3,
    GptOss,
    Llama,
    Mistral3,
    Phi3,
    Qwen2,
    Qwen3,
    Qwen3Moe,
}

impl Family {
    pub const ALL: [Family; 8] =
        [Family::Gemma3, Family::GptOss, Family::Llama, Family::Mistral3, Family::Phi3, Family::Qwen2, Family::Qwen3, Family::Qwen3Moe];

    /// Maps a GGUF `general.architecture` to a family; `None` if unsupported.
    pub fn from_architecture(arch: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.arch_name() == arch)
    }

    /// The GGUF `general.architecture` value, also the metadata key prefix.
    pub fn arch_name(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3",
            Family::GptOss => "gpt-oss",
            Family::Llama => "llama",
            Family::Mistral3 => "mistral3",
            Family::Phi3 => "phi3",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Qwen3Moe => "qwen3moe",
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
    };
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct Hparams {
    pub family: Family,
    pub layout: Layout,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub rms_eps: f64,
    /// RoPE of the global-attention layers (all layers but Gemma's sliding ones).
    pub rope: RopeParams,
    /// Gemma 3's sliding-window layers use their own RoPE base.
    pub rope_local: Option<RopeParams>,
    pub sliding_window: Option<usize>,
    /// Every `swa_pattern`-th layer is global, the others sliding (Gemma 3: 6).
    pub swa_pattern: usize,
    /// Scaling of q by position (Llama 4, Mistral 3: `1 + scale · ln(1 + ⌊pos / floor⌋)`).
    pub attn_temperature: Option<AttnTemperature>,
    pub context_length: usize,
    pub vocab_size: usize,
    /// Routed experts in place of the dense MLP (Qwen 3 MoE).
    pub moe: Option<Moe>,
}

/// A mixture-of-experts MLP: each token runs `n_used` of `n_expert` gated MLPs of width
/// `n_ff`, chosen and weighted by a router.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moe {
    pub n_expert: usize,
    pub n_used: usize,
    pub n_ff: usize,
    pub activation: Activation,
}

impl Moe {
    /// `{arch}.expert_count`, `expert_used_count` and `expert_feed_forward_length`
    /// (llama.cpp's default without it: the dense width over the experts used).
    pub(super) fn read(meta: &Meta<'_>, dense_ff: usize) -> Result<Moe> {
        let (n_expert, n_used) = (meta.u32("expert_count")?, meta.u32("expert_used_count")?);
        let n_ff = meta.opt_u32("expert_feed_forward_length")?.unwrap_or(dense_ff / n_used.max(1));
        Ok(Moe { n_expert, n_used, n_ff, activation: Activation::Silu })
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
            Family::GptOss => super::gpt_oss::hparams(&meta)?,
            Family::Llama => super::llama::hparams(&meta)?,
            Family::Mistral3 => super::mistral3::hparams(&meta)?,
            Family::Phi3 => super::phi3::hparams(&meta)?,
            Family::Qwen2 => super::qwen2::hparams(&meta)?,
            Family::Qwen3 => super::qwen3::hparams(&meta)?,
            Family::Qwen3Moe => super::qwen3moe::hparams(&meta)?,
        };
        hp.validate()?;
        Ok(hp)
    }

    /// What every family shares: Llama's keys and defaults, RoPE on all `head_dim` values.
    pub(super) fn common(meta: &Meta<'_>, family: Family) -> Result<Hparams> {
        let n_embd = meta.u32("embedding_length")?;
        let n_head = meta.u32("attention.head_count")?;
        let n_kv_head = meta.opt_u32("attention.head_count_kv")?.unwrap_or(n_head);
        let head_dim = match meta.opt_u32("attention.key_length")? {
            Some(d) => d,
            None if n_head > 0 => n_embd / n_head,
            None => 0,
        };
        let vocab_size = match meta.content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => meta.content.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()[0]).unwrap_or(0),
        };
        let rope_dims = meta.opt_u32("rope.dimension_count")?.unwrap_or(head_dim);
        Ok(Hparams {
            family,
            layout: Layout::LLAMA,
            n_layer: meta.u32("block_count")?,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            n_ff: meta.u32("feed_forward_length")?,
            rms_eps: meta.f32("attention.layer_norm_rms_epsilon")? as f64,
            rope: RopeParams::read(meta, rope_dims, 10_000.0)?,
            rope_local: None,
            sliding_window: None,
            swa_pattern: 1,
            attn_temperature: None,
            context_length: meta.u32("context_length")?,
            vocab_size,
            moe: None,
        })
    }

    /// Shapes a forward pass relies on; a malformed file is refused here, not in a kernel.
    fn validate(&self) -> Result<()> {
        let fail = |what: String| Err(candle_core::Error::Msg(format!("bad hyper-parameters: {what}")));
        if self.n_head == 0 || self.n_kv_head == 0 || !self.n_head.is_multiple_of(self.n_kv_head) {
            return fail(format!("{} query heads, {} KV heads", self.n_head, self.n_kv_head));
        }
        if self.n_layer == 0 || self.n_embd == 0 || self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.vocab_size == 0 {
            return fail(format!(
                "{} layers, embedding length {}, head dim {}, vocabulary {}",
                self.n_layer, self.n_embd, self.head_dim, self.vocab_size
            ));
        }
        for rope in std::iter::once(&self.rope).chain(&self.rope_local) {
            if rope.n_rot == 0 || rope.n_rot > self.head_dim || !rope.n_rot.is_multiple_of(2) {
                return fail(format!("RoPE over {} of a head's {} values", rope.n_rot, self.head_dim));
            }
        }
        if let Some(moe) = self.moe
            && (moe.n_expert == 0 || moe.n_used == 0 || moe.n_used > moe.n_expert || moe.n_ff == 0)
        {
            return fail(format!("{} of {} experts of width {}", moe.n_used, moe.n_expert, moe.n_ff));
        }
        if self.sliding_window == Some(0) || self.swa_pattern == 0 {
            return fail("a sliding window of 0".into());
        }
        Ok(())
    }

    /// The sliding window of `layer`, `None` for a global layer: every `swa_pattern`-th
    /// layer is global when the family has a window (Gemma 3: five sliding, one global).
    pub(super) fn layer_window(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        (!(layer + 1).is_multiple_of(self.swa_pattern)).then_some(window)
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

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.typed(key, self.get(key), |v| v.to_string().map(String::as_str))
    }
}
