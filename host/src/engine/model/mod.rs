//! The decoder-only transformer wisp serves, one module per GGUF architecture beside the
//! shared parts (as llama.cpp's `src/models/` and candle-transformers split them):
//! - [`hparams`]: the architectures ([`Family`]) and what their metadata says;
//! - [`blocks`]: norms, weight matrices and their kernels, the tensor reader;
//! - [`rope`]: rotary tables as ggml computes them (plain, Llama 3 factors, LongRoPE, YaRN);
//! - [`gguf`]: the header of an untrusted file, read without panics;
//! - `gemma3`, `gemma4`, `gpt_oss`, `llama`, `mistral3`, `phi3`, `qwen2`, `qwen3`, `qwen3moe`,
//!   `qwen35` (with `qwen35moe`): what sets each family apart, its keys and its [`Layout`],
//!   with the llama.cpp file it follows;
//! - [`moe`]: routed experts in place of the MLP, or beside it (Gemma 4);
//! - [`deltanet`]: the Gated DeltaNet layer (a recurrent state in place of attention);
//! - this file: the pre-norm decoder block every family shares and the batched forward pass.
//!
//! This is wisp's own model instead of candle-transformers' because the stock quantized
//! Gemma 3 is wrong (SiLU instead of GELU, no sliding window in decode) and none of them can
//! serve (full-context RoPE tables per layer, concatenating KV cache, one position per batch,
//! no chunked prefill). Here:
//! - each sequence owns a [`SeqCache`] preallocated to what the request can use, written
//!   in place; positions are explicit so prefill may be chunked and a prefix reused;
//! - RoPE tables are built once per parameter set, sized to the configured context;
//! - grouped-query attention folds the query heads of one KV head into the row dimension,
//!   so K and V are never repeated;
//! - on the CPU, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS and MXFP4
//!   matrices (and a tied embedding/output table of those types) are repacked at load and
//!   run on wisp's own kernel ([`super::qgemm`]), Q2_K, Q3_K and the float types on candle's; Gemma's
//!   `gelu(gate) · up` is one fused, vectorised pass ([`super::ops::gelu_mul`]).
//! - on the CPU, attention is one pass per layer over every sequence of the step
//!   ([`super::attention`]) on caches that are plain host buffers; on GPUs it is candle's
//!   ops, one sequence at a time.
//!
//! Tensor names and hyper-parameter keys follow llama.cpp's GGUF conventions
//! (`llama.cpp: src/llama-model.cpp`, `src/models/<arch>.cpp`).

mod blocks;
mod deltanet;
mod gemma3;
mod gemma4;
pub mod gguf;
mod gpt_oss;
mod hparams;
mod llama;
mod mistral3;
mod moe;
mod phi3;
mod qwen2;
mod qwen3;
mod qwen35;
mod qwen3moe;
mod rope;

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Result, Tensor};

use super::attention::{self, Heads, LayerKv, SeqRows};
use blocks::{Embedding, GateUp, Linear, RmsNorm, Tensors, Weight};
pub use hparams::{AttnTemperature, DeltaNetShape, Family, Hparams, LayerShape, Layout, Moe};
pub use rope::{Factors, RopeParams, Yarn};

/// A candle error's message alone: candle appends a backtrace when RUST_BACKTRACE is set,
/// which has no place in an API error.
pub fn error_message(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// One sequence's KV cache, per layer, preallocated to `capacity` positions and filled in
/// place up to `len`. A layer that reads another layer's cache (Gemma 4) has none, nor
/// has a recurrent layer (Qwen 3.5), which holds a [`deltanet::State`] instead: the state
/// after `len` tokens, which cannot be cut back to an earlier position. So that a later
/// prompt sharing only part of the history still skips it, a cache may keep
/// [`Checkpoint`]s of the states at earlier positions (the end of each prompt).
pub struct SeqCache {
    kv: Kv,
    /// Each layer's head geometry.
    heads: Vec<Heads>,
    /// Each recurrent layer's state; `None` for attention layers.
    states: Vec<Option<deltanet::State>>,
    /// The states at earlier positions, oldest first, at most [`MAX_CHECKPOINTS`].
    checkpoints: Vec<Checkpoint>,
    len: usize,
    capacity: usize,
}

/// The recurrent states after the first `len` tokens.
#[derive(Clone)]
struct Checkpoint {
    len: usize,
    states: Vec<Option<deltanet::State>>,
}

impl Checkpoint {
    fn bytes(&self) -> usize {
        self.states.iter().flatten().map(deltanet::State::bytes).sum()
    }
}

/// Checkpoints a cache keeps (the newest): a session's last turns can be edited or
/// continued from a kept state.
const MAX_CHECKPOINTS: usize = 2;

enum Kv {
    /// On the CPU: plain buffers that [`attention::attend`] writes and reads.
    Host(Vec<Option<LayerKv>>),
    /// On a GPU: K and V tensors of shape `(1, n_kv_head, capacity, head_dim)` for candle's ops.
    Device(Vec<Option<[Tensor; 2]>>),
}

impl SeqCache {
    /// Number of positions already in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of keys and values this cache holds (its capacity, not its length), with its
    /// recurrent states and their checkpoints.
    pub fn bytes(&self) -> usize {
        let kv: usize = match &self.kv {
            Kv::Host(layers) => layers.iter().flatten().map(LayerKv::bytes).sum(),
            Kv::Device(layers) => layers.iter().flatten().flatten().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum(),
        };
        let states: usize = self.states.iter().flatten().map(deltanet::State::bytes).sum();
        kv + states + self.checkpoints.iter().map(Checkpoint::bytes).sum::<usize>()
    }

    fn recurrent(&self) -> bool {
        self.states.iter().any(Option::is_some)
    }

    /// The longest prefix of at most `n` positions another cache can copy from this one
    /// ([`SeqCache::copy_prefix`]): `n` itself (up to `len`) without recurrent layers; with
    /// them, the longest of `len` and the checkpoints not past `n` (0 if none).
    pub fn reusable(&self, n: usize) -> usize {
        let n = n.min(self.len);
        if !self.recurrent() {
            return n;
        }
        let kept = self.checkpoints.iter().map(|c| c.len).chain(std::iter::once(self.len));
        kept.filter(|&len| len <= n).max().unwrap_or(0)
    }

    /// Keeps the recurrent states at the current length, to continue from later (the
    /// oldest checkpoint goes past [`MAX_CHECKPOINTS`]). Nothing without recurrent layers.
    pub fn checkpoint(&mut self) {
        if !self.recurrent() || self.checkpoints.last().is_some_and(|c| c.len == self.len) {
            return;
        }
        if self.checkpoints.len() == MAX_CHECKPOINTS {
            self.checkpoints.remove(0);
        }
        self.checkpoints.push(Checkpoint { len: self.len, states: self.states.clone() });
    }

    /// Copies the first `n` positions of `other` into this (empty) cache: a prompt that
    /// starts with those tokens skips their prefill. With recurrent layers `n` must be one
    /// of `other`'s [`SeqCache::reusable`] positions; its checkpoints up to `n` come along.
    pub fn copy_prefix(&mut self, other: &SeqCache, n: usize) -> Result<()> {
        if n > other.len || n > self.capacity {
            candle_core::bail!("cannot reuse {n} positions (source holds {}, room for {})", other.len, self.capacity)
        }
        if other.recurrent() {
            let states = match n == other.len {
                true => &other.states,
                false => match other.checkpoints.iter().find(|c| c.len == n) {
                    Some(c) => &c.states,
                    None => candle_core::bail!("no recurrent state is kept at position {n}"),
                },
            };
            self.states.clone_from(states);
            self.checkpoints = other.checkpoints.iter().filter(|c| c.len < n).cloned().collect();
        }
        match (&mut self.kv, &other.kv) {
            (Kv::Host(dst), Kv::Host(src)) => {
                for ((dst, src), heads) in dst.iter_mut().zip(src).zip(&self.heads) {
                    if let (Some(dst), Some(src)) = (dst, src) {
                        dst.copy_prefix(src, *heads, n, other.capacity, self.capacity);
                    }
                }
            }
            (Kv::Device(dst), Kv::Device(src)) => {
                for (dst, src) in dst.iter_mut().flatten().zip(src.iter().flatten()) {
                    for (dst, src) in dst.iter_mut().zip(src) {
                        dst.slice_set(&src.narrow(2, 0, n)?.contiguous()?, 2, 0)?;
                    }
                }
            }
            _ => candle_core::bail!("cannot copy a prefix between caches on different devices"),
        }
        self.len = n;
        Ok(())
    }
}

/// q, k and v from one matrix each, or from one fused matrix split by rows (Phi 3). A layer
/// that reads another layer's cache has no k (nor v); without a v matrix, v is k's
/// projection (Gemma 4's `attention_k_eq_v`).
enum Qkv {
    Separate { q: Linear, k: Option<Linear>, v: Option<Linear> },
    Fused(Linear),
}

/// The feed-forward part of a layer.
enum Ffn {
    Dense { gate_up: GateUp, down: Linear },
    Experts(moe::Experts),
}

/// Gemma 4's per-layer input: `gelu(gate · x) ⊙ input`, projected back to the stream.
struct PerLayerGate {
    gate: Linear,
    proj: Linear,
    post_norm: RmsNorm,
}

/// How a layer mixes positions.
enum Mixer {
    Attention(Attention),
    /// A recurrent Gated DeltaNet layer (Qwen 3.5).
    DeltaNet(deltanet::DeltaNet),
}

struct Attention {
    /// Whether this layer computes and caches keys and values (else it reads the cache of
    /// `shape.kv_source`).
    writes_kv: bool,
    qkv: Qkv,
    wo: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Gemma 4's weightless norm of v (its weight is ones, made once at load).
    v_norm: Option<RmsNorm>,
    /// One logit per query head in each softmax (gpt-oss).
    sinks: Option<Tensor>,
    /// Each head's output is multiplied by the sigmoid of a gate from the q projection
    /// (Qwen 3.5's [`Layout::gated_q`]).
    gated: bool,
    /// Index into [`Model::ropes`].
    rope: usize,
}

struct Layer {
    shape: LayerShape,
    attn_norm: RmsNorm,
    mixer: Mixer,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    ffn: Ffn,
    /// Routed experts added to the MLP's output (Gemma 4's [`Layout::experts_beside_mlp`]).
    experts_beside: Option<moe::Beside>,
    post_ffn_norm: Option<RmsNorm>,
    per_layer: Option<PerLayerGate>,
    /// Multiplies the layer's output (Gemma 4's `layer_output_scale`).
    out_scale: Option<f64>,
}

impl Attention {
    /// Layer `i`'s attention as `hp.layout` and `hp.layers[i]` describe it.
    fn load<R: Read + Seek>(file: &mut Tensors<'_, R>, hp: &Hparams, i: usize) -> Result<Attention> {
        let (e, layout, shape) = (hp.n_embd, hp.layout, hp.layers[i]);
        let Heads { n_head, n_kv_head, head_dim: d } = shape.heads;
        let (q_rows, kv_rows) = (n_head * d, n_kv_head * d);
        let writes_kv = shape.kv_source == i;
        let eps = hp.rms_eps as f32;
        let name = |n: &str| format!("blk.{i}.{n}");
        let qkv = match layout.fused_qkv {
            true => Qkv::Fused(file.linear(&name("attn_qkv"), [q_rows + 2 * kv_rows, e])?),
            false => {
                // Only Gemma 4 may leave v out (v = k); elsewhere a missing v is an error.
                let has_v = hp.family != Family::Gemma4 || file.has(&name("attn_v.weight"));
                let q_width = if layout.gated_q { 2 * q_rows } else { q_rows };
                Qkv::Separate {
                    q: file.linear(&name("attn_q"), [q_width, e])?,
                    k: writes_kv.then(|| file.linear(&name("attn_k"), [kv_rows, e])).transpose()?,
                    v: (writes_kv && has_v).then(|| file.linear(&name("attn_v"), [kv_rows, e])).transpose()?,
                }
            }
        };
        let v_norm = (layout.v_norm && writes_kv)
            .then(|| Ok::<_, candle_core::Error>(RmsNorm { weight: Tensor::ones(d, DType::F32, file.device)?, eps }))
            .transpose()?;
        let mut optional = |present: bool, n: &str, len: usize| present.then(|| file.norm(&name(n), len, eps)).transpose();
        let q_norm = optional(layout.qk_norm, "attn_q_norm.weight", d)?;
        let k_norm = optional(layout.qk_norm && writes_kv, "attn_k_norm.weight", d)?;
        let sinks = match layout.sinks {
            true => Some(file.vector(&name("attn_sinks.weight"), n_head)?),
            false => None,
        };
        Ok(Attention {
            writes_kv,
            qkv,
            wo: file.linear(&name("attn_output"), [e, q_rows])?,
            q_norm,
            k_norm,
            v_norm,
            sinks,
            gated: layout.gated_q,
            rope: hp.rope_index(i),
        })
    }

    /// q of every row, for a layer with its own cache k and v, and for a gated layer the
    /// gate: `(1, rows, width)` each.
    fn qkv(&self, h: &Tensor, heads: Heads) -> Result<Projected> {
        let Heads { n_head, n_kv_head, head_dim } = heads;
        let (q, kv) = match &self.qkv {
            Qkv::Separate { q, k: Some(k), v } => {
                let k_out = k.forward(h)?;
                let v_out = match v {
                    Some(v) => v.forward(h)?,
                    None => k_out.clone(),
                };
                (q.forward(h)?, Some((k_out, v_out)))
            }
            Qkv::Separate { q, k: None, .. } => (q.forward(h)?, None),
            Qkv::Fused(w) => {
                let all = w.forward(h)?;
                let (q_rows, kv_rows) = (n_head * head_dim, n_kv_head * head_dim);
                let part = |start, len| all.narrow(2, start, len)?.contiguous();
                let kv = match self.writes_kv {
                    true => Some((part(q_rows, kv_rows)?, part(q_rows + kv_rows, kv_rows)?)),
                    false => None,
                };
                (part(0, q_rows)?, kv)
            }
        };
        if !self.gated {
            return Ok(Projected { q, kv, gate: None });
        }
        // Each head's q, then its gate.
        let rows = q.dim(1)?;
        let q = q.reshape((1, rows, n_head, 2 * head_dim))?;
        let half = |start| q.narrow(3, start, head_dim)?.contiguous()?.reshape((1, rows, n_head * head_dim));
        Ok(Projected { q: half(0)?, kv, gate: Some(half(head_dim)?) })
    }
}

/// An attention layer's projections of the rows of a step.
struct Projected {
    q: Tensor,
    /// k and v, for a layer with its own cache.
    kv: Option<(Tensor, Tensor)>,
    /// The output gate's logits (Qwen 3.5).
    gate: Option<Tensor>,
}

impl Layer {
    /// Whether this layer computes and caches keys and values.
    fn writes_kv(&self) -> bool {
        matches!(&self.mixer, Mixer::Attention(a) if a.writes_kv)
    }

    /// Layer `i` as `hp.layout` and `hp.layers[i]` describe it, every tensor's shape checked.
    fn load<R: Read + Seek>(file: &mut Tensors<'_, R>, hp: &Hparams, i: usize) -> Result<Layer> {
        let (e, layout, shape) = (hp.n_embd, hp.layout, hp.layers[i]);
        let eps = hp.rms_eps as f32;
        let name = |n: &str| format!("blk.{i}.{n}");
        let mixer = match (shape.recurrent, hp.delta_net) {
            (true, Some(delta)) => Mixer::DeltaNet(deltanet::DeltaNet::load(file, i, e, delta, eps)?),
            (true, None) => candle_core::bail!("layer {i} is recurrent in a model without the recurrent layers' shape"),
            (false, _) => Mixer::Attention(Attention::load(file, hp, i)?),
        };
        let ff = shape.n_ff;
        let ffn = match hp.moe {
            Some(moe) if !layout.experts_beside_mlp => Ffn::Experts(moe::Experts::load(file, i, e, moe)?),
            _ => {
                let gate_up = match layout.fused_gate_up {
                    true => GateUp::Fused(file.linear(&name("ffn_up"), [2 * ff, e])?),
                    false => GateUp::Separate(file.linear(&name("ffn_gate"), [ff, e])?, file.linear(&name("ffn_up"), [ff, e])?),
                };
                Ffn::Dense { gate_up, down: file.linear(&name("ffn_down"), [e, ff])? }
            }
        };
        let experts_beside = match hp.moe {
            Some(moe) if layout.experts_beside_mlp => moe::Beside::load(file, i, e, moe, eps)?,
            _ => None,
        };
        let mut optional = |present: bool, n: &str, len: usize| present.then(|| file.norm(&name(n), len, eps)).transpose();
        let post_attn_norm = optional(layout.post_norms, "post_attention_norm.weight", e)?;
        let post_ffn_norm = optional(layout.post_norms, "post_ffw_norm.weight", e)?;
        let p = hp.per_layer_input;
        let per_layer = match p {
            0 => None,
            _ => Some(PerLayerGate {
                gate: file.linear(&name("inp_gate"), [p, e])?,
                proj: file.linear(&name("proj"), [e, p])?,
                post_norm: file.norm(&name("post_norm.weight"), e, eps)?,
            }),
        };
        let scale_name = name("layer_output_scale.weight");
        let out_scale = match file.has(&scale_name) {
            true => Some(file.vector(&scale_name, 1)?.to_vec1::<f32>()?[0] as f64),
            false => None,
        };
        Ok(Layer {
            shape,
            attn_norm: file.norm(&name("attn_norm.weight"), e, eps)?,
            mixer,
            post_attn_norm,
            ffn_norm: file.norm(&name(layout.ffn_norm), e, eps)?,
            ffn,
            experts_beside,
            post_ffn_norm,
            per_layer,
            out_scale,
        })
    }

    /// The feed-forward output of every row of `h`: `down(act(gate) · up)`, or the experts'.
    fn ffn(&self, h: &Tensor, gelu: bool) -> Result<Tensor> {
        let (gate_up, down) = match &self.ffn {
            Ffn::Dense { gate_up, down } => (gate_up, down),
            Ffn::Experts(experts) => return experts.forward(h),
        };
        let (gate, up) = gate_up.forward(h)?;
        let act = if gelu { super::ops::gelu_mul(&gate, &up)? } else { (candle_nn::ops::silu(&gate)? * up)? };
        down.forward(&act)
    }
}

/// `(max_len, n_rot / 2)` tables of every position's cos and sin.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    n_rot: usize,
    neox: bool,
}

impl Rope {
    fn new(params: &RopeParams, factors: Option<&[f32]>, max_len: usize, device: &Device) -> Result<Rope> {
        let (cos, sin) = params.tables(max_len, factors)?;
        let shape = (max_len, params.n_rot / 2);
        Ok(Rope {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
            n_rot: params.n_rot,
            neox: params.neox,
        })
    }
}

/// Gemma 4's per-layer inputs of each token: its row of `per_layer_token_embd` (a slice per
/// layer, scaled by `√width`) plus a normed projection of its embedding, over `√2`.
struct PerLayerInputs {
    table: Embedding,
    proj: Linear,
    norm: RmsNorm,
    /// Each layer's slice.
    width: usize,
}

impl PerLayerInputs {
    /// `(1, rows, n_layer · width)` for the tokens `ids` whose scaled embeddings are `x`.
    fn forward(&self, ids: &[u32], x: &Tensor, device: &Device) -> Result<Tensor> {
        let (rows, n_embd) = (ids.len(), x.dim(2)?);
        let tokens = (self.table.forward(ids, device)? * (self.width as f64).sqrt())?.unsqueeze(0)?;
        let all = tokens.dim(2)?;
        let proj = (self.proj.forward(x)? * (1.0 / (n_embd as f64).sqrt()))?;
        let proj = self.norm.forward(&proj.reshape((1, rows * all / self.width, self.width))?)?.reshape((1, rows, all))?;
        (proj + tokens)? * std::f64::consts::FRAC_1_SQRT_2
    }
}

/// A loaded model: weights, RoPE tables and the forward pass.
pub struct Model {
    hp: Hparams,
    embed: Embedding,
    embed_scale: Option<f64>,
    per_layer: Option<PerLayerInputs>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    /// The global layers' RoPE, then the sliding layers' where they differ (Gemma 3 and 4).
    ropes: Vec<Rope>,
    max_len: usize,
    device: Device,
    /// Attention by [`attention::attend`] on host buffers (the CPU), else by candle's ops.
    host_attention: bool,
}

impl Model {
    /// Loads the weights of `content`, sizing position tables for `max_len` tokens.
    pub fn load(header: &gguf::Header, reader: &mut std::fs::File, hp: Hparams, max_len: usize, device: &Device) -> Result<Model> {
        let file_size = reader.seek(std::io::SeekFrom::End(0))?;
        let mut file = Tensors { header, reader, device, file_size };
        let (vocab, e) = (hp.vocab_size, hp.n_embd);
        let (embed, output) = if file.has("output.weight") {
            (file.embedding("token_embd.weight", [vocab, e])?, file.weight("output.weight", [vocab, e])?)
        } else if let Some(w) = file.blocks("token_embd.weight", [vocab, e])? {
            // Tied: one copy of the table serves the lookup and the output projection.
            (Embedding::Blocks(w.clone()), Weight::Blocks(w))
        } else {
            let t = Arc::new(file.tensor("token_embd.weight", &[vocab, e])?);
            (Embedding::Quantized(t.clone()), Weight::Candle(QMatMul::from_arc(t)?))
        };
        // A Linear, so a Q6_K table left to candle (off the CPU) is padded to its kernel for
        // several rows as the layers' are: one sequence's logits equal its logits in a batch.
        let output = Linear::new(output, None);
        let norm = file.norm("output_norm.weight", e, hp.rms_eps as f32)?;
        let per_layer = match hp.per_layer_input {
            0 => None,
            width => {
                let all = width * hp.n_layer;
                Some(PerLayerInputs {
                    table: file.embedding_on_disk("per_layer_token_embd.weight", [vocab, all])?,
                    proj: file.linear_q8("per_layer_model_proj", [all, e])?,
                    norm: file.norm("per_layer_proj_norm.weight", width, hp.rms_eps as f32)?,
                    width,
                })
            }
        };
        let layers = (0..hp.n_layer).map(|i| Layer::load(&mut file, &hp, i)).collect::<Result<Vec<_>>>()?;
        let mut ropes = Vec::with_capacity(2);
        for params in std::iter::once(&hp.rope).chain(&hp.rope_local) {
            let factors = match &params.factors {
                Factors::None => None,
                Factors::Tensor(name) => Some(*name),
                // llama.cpp's rule: the long factors once the configured context passes the
                // trained one.
                Factors::LongShort { n_ctx_orig } => {
                    Some(if max_len > *n_ctx_orig { "rope_factors_long.weight" } else { "rope_factors_short.weight" })
                }
            };
            let factors = match factors {
                Some(name) if file.has(name) => Some(file.vector(name, params.n_rot / 2)?.to_vec1::<f32>()?),
                _ => None,
            };
            ropes.push(Rope::new(params, factors.as_deref(), max_len, device)?);
        }
        Ok(Model {
            embed_scale: hp.layout.embed_scale.then(|| (hp.n_embd as f64).sqrt()),
            hp,
            embed,
            per_layer,
            layers,
            norm,
            output,
            ropes,
            max_len,
            host_attention: device.is_cpu(),
            device: device.clone(),
        })
    }

    pub fn hparams(&self) -> &Hparams {
        &self.hp
    }

    /// Runs attention with candle's ops (the GPU path) even on the CPU, so tests can check
    /// the CPU kernel against it. Caches made before the switch no longer fit.
    #[doc(hidden)]
    pub fn use_candle_attention(&mut self) {
        self.host_attention = false;
    }

    /// The longest sequence the position tables allow.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// A cache for one sequence of at most `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> Result<SeqCache> {
        let capacity = capacity.min(self.max_len).max(1);
        let heads: Vec<Heads> = self.layers.iter().map(|l| l.shape.heads).collect();
        let owners = self.layers.iter().zip(&heads).map(|(l, h)| l.writes_kv().then_some(*h));
        let kv = if self.host_attention {
            Kv::Host(owners.map(|h| h.map(|h| LayerKv::zeros(h, capacity))).collect())
        } else {
            let zeros = |h: Heads| Tensor::zeros((1, h.n_kv_head, capacity, h.head_dim), DType::F32, &self.device);
            Kv::Device(owners.map(|h| h.map(|h| Ok([zeros(h)?, zeros(h)?])).transpose()).collect::<Result<_>>()?)
        };
        let states =
            self.layers.iter().map(|l| self.hp.delta_net.filter(|_| l.shape.recurrent).map(|d| deltanet::State::zeros(&d))).collect();
        Ok(SeqCache { kv, heads, states, checkpoints: Vec::new(), len: 0, capacity })
    }

    /// Bytes of keys and values one position takes in a cache of this model (f16 in the
    /// CPU's caches, f32 in a GPU's).
    pub fn kv_bytes_per_token(&self) -> usize {
        let elem = if self.host_attention { LayerKv::ELEMENT_BYTES } else { DType::F32.size_in_bytes() };
        let per_layer = |l: &Layer| 2 * l.shape.heads.n_kv_head * l.shape.heads.head_dim * elem;
        self.layers.iter().filter(|l| l.writes_kv()).map(per_layer).sum()
    }

    /// Bytes of recurrent state one cache holds at most whatever its length (Qwen 3.5's
    /// Gated DeltaNet layers: the states and their checkpoints); 0 for attention-only models.
    pub fn max_state_bytes(&self) -> usize {
        let per_layer = self.hp.delta_net.map_or(0, |d| d.state_floats() * size_of::<f32>());
        self.layers.iter().filter(|l| l.shape.recurrent).count() * per_layer * (1 + MAX_CHECKPOINTS)
    }

    /// Runs `tokens` at positions `cache.len()..`, appends their keys and values to the
    /// cache and returns the logits of the last token, shape `(vocab,)`.
    pub fn forward(&self, tokens: &[u32], cache: &mut SeqCache) -> Result<Tensor> {
        self.forward_batch(&mut [Segment { tokens, cache }])?.squeeze(0)
    }

    /// One forward pass over several sequences at once (continuous batching): each segment
    /// is a run of tokens of one sequence at positions `cache.len()..` (a prompt chunk or
    /// one decode token). The projections and the MLP run on all rows together, so the
    /// weights are read once per step; attention runs per segment on its own cache.
    /// Returns the logits of each segment's last token, shape `(segments, vocab)`.
    pub fn forward_batch(&self, segments: &mut [Segment<'_>]) -> Result<Tensor> {
        let mut all = Vec::new();
        let mut spans = Vec::with_capacity(segments.len());
        for seg in segments.iter() {
            let (n, pos) = (seg.tokens.len(), seg.cache.len);
            if n == 0 {
                candle_core::bail!("forward needs at least one token per sequence")
            }
            if pos + n > seg.cache.capacity {
                candle_core::bail!("sequence of {} tokens exceeds its cache of {}", pos + n, seg.cache.capacity)
            }
            spans.push(Span { offset: all.len(), n, pos, masks: [None, None] });
            all.extend_from_slice(seg.tokens);
        }
        let mut x = self.embed.forward(&all, &self.device)?.unsqueeze(0)?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        let per_layer = self.per_layer.as_ref().map(|p| p.forward(&all, &x, &self.device)).transpose()?;
        for (idx, layer) in self.layers.iter().enumerate() {
            let input = match (&per_layer, &self.per_layer) {
                (Some(inputs), Some(p)) => Some(inputs.narrow(2, idx * p.width, p.width)?.contiguous()?),
                _ => None,
            };
            x = self.layer_forward(idx, layer, &x, input.as_ref(), segments, &mut spans)?;
        }
        let mut last = Vec::with_capacity(spans.len());
        for (seg, span) in segments.iter_mut().zip(&spans) {
            seg.cache.len = span.pos + span.n;
            last.push(x.narrow(1, span.offset + span.n - 1, 1)?);
        }
        let last = if last.len() == 1 { last.remove(0) } else { Tensor::cat(&last, 1)? };
        let last = self.norm.forward(&last)?;
        let logits = self.output.forward(&last)?.squeeze(0)?;
        match self.hp.final_softcap {
            Some(cap) => (logits / cap as f64)?.tanh()? * cap as f64,
            None => Ok(logits),
        }
    }

    /// Additive mask `(n, keys)`: 0 where query `pos + i` may see key `first + j`, -inf else.
    fn mask(&self, pos: usize, n: usize, window: Option<usize>) -> Result<Tensor> {
        let first = attention::first_key(pos, window);
        let keys = pos + n - first;
        let mut mask = vec![0f32; n * keys];
        for i in 0..n {
            let q = pos + i;
            for j in 0..keys {
                let k = first + j;
                let visible = k <= q && window.is_none_or(|w| q - k < w);
                if !visible {
                    mask[i * keys + j] = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(mask, (n, keys), &self.device)
    }

    /// Layer `idx` over every row of the step; `per_layer` is this layer's slice of the
    /// per-layer inputs (Gemma 4), `(1, rows, width)`.
    fn layer_forward(
        &self,
        idx: usize,
        layer: &Layer,
        x: &Tensor,
        per_layer: Option<&Tensor>,
        segments: &mut [Segment<'_>],
        spans: &mut [Span],
    ) -> Result<Tensor> {
        let h = layer.attn_norm.forward(x)?;
        let mut attn = match &layer.mixer {
            Mixer::Attention(a) => {
                let Projected { q, kv, gate } = a.qkv(&h, layer.shape.heads)?;
                let mut out = if self.host_attention {
                    self.attention_host(a, &layer.shape, q, kv, segments, spans)?
                } else {
                    self.attention_device(a, &layer.shape, &q, kv.as_ref(), segments, spans)?
                };
                if let Some(gate) = gate {
                    out = (out * candle_nn::ops::sigmoid(&gate)?)?;
                }
                a.wo.forward(&out)?
            }
            Mixer::DeltaNet(net) => {
                let mut seqs = Vec::with_capacity(spans.len());
                for (seg, span) in segments.iter_mut().zip(spans.iter()) {
                    let Some(state) = seg.cache.states[idx].as_mut() else {
                        candle_core::bail!("a recurrent layer was given a cache without its state")
                    };
                    seqs.push(deltanet::Rows { offset: span.offset, n: span.n, state });
                }
                net.forward(&h, &mut seqs)?
            }
        };
        if let Some(norm) = &layer.post_attn_norm {
            attn = norm.forward(&attn)?;
        }
        let x = (x + attn)?;

        let h = layer.ffn_norm.forward(&x)?;
        let mut ffn = layer.ffn(&h, self.hp.layout.gelu)?;
        if let Some(experts) = &layer.experts_beside {
            ffn = experts.forward(&x, &ffn)?;
        }
        if let Some(norm) = &layer.post_ffn_norm {
            ffn = norm.forward(&ffn)?;
        }
        let mut x = (x + ffn)?;
        if let (Some(gate), Some(input)) = (&layer.per_layer, per_layer) {
            let gated = super::ops::gelu_mul(&gate.gate.forward(&x)?, input)?;
            x = (&x + gate.post_norm.forward(&gate.proj.forward(&gated)?)?)?;
        }
        match layer.out_scale {
            Some(scale) => x * scale,
            None => Ok(x),
        }
    }

    /// Attention of every segment in one pass on the CPU ([`attention::attend`]); `q` and
    /// `kv` hold the projections of all rows of the step (`kv` is `None` where the layer
    /// reads another layer's cache).
    fn attention_host(
        &self,
        layer: &Attention,
        shape: &LayerShape,
        q: Tensor,
        kv: Option<(Tensor, Tensor)>,
        segments: &mut [Segment<'_>],
        spans: &[Span],
    ) -> Result<Tensor> {
        use super::ops::CpuValues;
        let rows = q.dim(1)?;
        let heads = shape.heads;
        // q and k are normed and rotated in place, so copied; v is read where it lies.
        let mut q = CpuValues::of(&q)?.to_vec();
        let mut k = kv.as_ref().map(|(k, _)| CpuValues::of(k).map(|k| k.to_vec())).transpose()?;
        let v = kv.as_ref().map(|(_, v)| CpuValues::of(v)).transpose()?;
        let mut seqs = Vec::with_capacity(spans.len());
        for (seg, span) in segments.iter_mut().zip(spans) {
            let capacity = seg.cache.capacity;
            let Kv::Host(layers) = &mut seg.cache.kv else { candle_core::bail!("a device cache was given to the CPU attention") };
            let Some(kv) = layers[shape.kv_source].as_mut() else { candle_core::bail!("layer reads a KV cache no layer keeps") };
            seqs.push(SeqRows { offset: span.offset, n: span.n, pos: span.pos, capacity, kv });
        }
        let rope = &self.ropes[layer.rope];
        let q_norm = layer.q_norm.as_ref().map(|n| CpuValues::of(&n.weight)).transpose()?;
        let k_norm = layer.k_norm.as_ref().map(|n| CpuValues::of(&n.weight)).transpose()?;
        let sinks = layer.sinks.as_ref().map(CpuValues::of).transpose()?;
        let (cos, sin) = (CpuValues::of(&rope.cos)?, CpuValues::of(&rope.sin)?);
        let spec = attention::Spec {
            heads,
            window: shape.window,
            q_norm: q_norm.as_deref(),
            k_norm: k_norm.as_deref(),
            v_norm: layer.v_norm.is_some(),
            eps: self.hp.rms_eps as f32,
            scale: self.attn_scale(heads),
            cos: &cos,
            sin: &sin,
            n_rot: rope.n_rot,
            neox: rope.neox,
            temperature: self.hp.attn_temperature,
            sinks: sinks.as_deref(),
        };
        let new_kv = k.as_deref_mut().zip(v.as_deref());
        let out = attention::attend(&spec, &mut q, new_kv, &mut seqs);
        Tensor::from_vec(out, (1, rows, heads.n_head * heads.head_dim), &self.device)
    }

    /// The factor of q·k in a layer of `heads`.
    fn attn_scale(&self, heads: Heads) -> f32 {
        self.hp.attn_scale.unwrap_or(1.0 / (heads.head_dim as f32).sqrt())
    }

    /// Attention with candle's ops, one segment at a time (GPUs).
    fn attention_device(
        &self,
        layer: &Attention,
        shape: &LayerShape,
        q_all: &Tensor,
        kv_all: Option<&(Tensor, Tensor)>,
        segments: &mut [Segment<'_>],
        spans: &mut [Span],
    ) -> Result<Tensor> {
        let Heads { n_head, n_kv_head, head_dim } = shape.heads;
        let mut outs = Vec::with_capacity(spans.len());
        for (seg, span) in segments.iter_mut().zip(spans.iter_mut()) {
            let (n, pos) = (span.n, span.pos);
            let rows = |t: &Tensor, heads| t.narrow(1, span.offset, n)?.reshape((1, n, heads, head_dim))?.transpose(1, 2);
            let q = rows(q_all, n_head)?;
            let kv = kv_all.map(|(k, v)| Ok::<_, candle_core::Error>((rows(k, n_kv_head)?, rows(v, n_kv_head)?))).transpose()?;
            // Masks are shared by every layer of the same kind; built only for runs of >1 token.
            let mask = if n > 1 {
                let slot = &mut span.masks[usize::from(shape.window.is_some())];
                if slot.is_none() {
                    *slot = Some(self.mask(pos, n, shape.window)?);
                }
                slot.as_ref()
            } else {
                None
            };
            outs.push(self.attention(layer, shape, q, kv, pos, seg.cache, mask)?);
        }
        if outs.len() == 1 { Ok(outs.remove(0)) } else { Tensor::cat(&outs, 1) }
    }

    /// Attention of one sequence's `n` new positions (`q`, `k`, `v`: `(1, heads, n, d)`)
    /// over its cache; writes the new keys and values in place (when the layer has its
    /// own). Returns `(1, n, heads * d)`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Attention,
        shape: &LayerShape,
        q: Tensor,
        kv: Option<(Tensor, Tensor)>,
        pos: usize,
        cache: &mut SeqCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hp = &self.hp;
        let heads = shape.heads;
        let Heads { n_head, n_kv_head, head_dim } = heads;
        let groups = n_head / n_kv_head;
        let n = q.dim(2)?;
        let rope = &self.ropes[layer.rope];
        let (cos, sin) = (rope.cos.narrow(0, pos, n)?, rope.sin.narrow(0, pos, n)?);
        let turn = |x: &Tensor| -> Result<Tensor> {
            let part = x.narrow(3, 0, rope.n_rot)?.contiguous()?;
            let turned = match rope.neox {
                true => candle_nn::rotary_emb::rope(&part, &cos, &sin)?,
                false => candle_nn::rotary_emb::rope_i(&part, &cos, &sin)?,
            };
            match rope.n_rot == head_dim {
                true => Ok(turned),
                false => Tensor::cat(&[&turned, &x.narrow(3, rope.n_rot, head_dim - rope.n_rot)?], 3)?.contiguous(),
            }
        };
        let normed = |x: Tensor, norm: &Option<RmsNorm>| match norm {
            Some(norm) => norm.forward(&x.contiguous()?),
            None => x.contiguous(),
        };
        let mut q = turn(&normed(q, &layer.q_norm)?)?;
        if let Some(t) = hp.attn_temperature {
            let by_row: Vec<f32> = (pos..pos + n).map(|p| 1.0 + t.scale * ((p as f32 / t.floor).floor() + 1.0).ln()).collect();
            q = q.broadcast_mul(&Tensor::from_vec(by_row, (1, 1, n, 1), &self.device)?)?;
        }
        let Kv::Device(layers) = &mut cache.kv else { candle_core::bail!("a host cache was given to the device attention") };
        let Some([cache_k, cache_v]) = layers[shape.kv_source].as_mut() else {
            candle_core::bail!("layer reads a KV cache no layer keeps")
        };
        if let Some((k, v)) = kv {
            let k = turn(&normed(k, &layer.k_norm)?)?;
            let v = normed(v, &layer.v_norm)?;
            cache_k.slice_set(&k, 2, pos)?;
            cache_v.slice_set(&v, 2, pos)?;
        }
        let first = attention::first_key(pos, shape.window);
        let keys = pos + n - first;
        let k_all = cache_k.narrow(2, first, keys)?;
        let v_all = cache_v.narrow(2, first, keys)?;

        // Fold the query heads sharing a KV head into rows: (1, kv, groups * n, d).
        let q = (q * self.attn_scale(heads) as f64)?.reshape((1, n_kv_head, groups * n, head_dim))?;
        let scores = q.matmul(&k_all.t()?)?;
        let scores = match mask {
            Some(mask) => {
                scores.reshape((1, n_kv_head, groups, n, keys))?.broadcast_add(mask)?.reshape((1, n_kv_head, groups * n, keys))?
            }
            None => scores,
        };
        let probs = match &layer.sinks {
            // Each query head's sink as one more column, dropped after the softmax.
            Some(sinks) => {
                let column = sinks.reshape((1, n_kv_head, groups, 1, 1))?.broadcast_as((1, n_kv_head, groups, n, 1))?;
                let scores = scores.reshape((1, n_kv_head, groups, n, keys))?;
                let probs = candle_nn::ops::softmax_last_dim(&Tensor::cat(&[&scores, &column.contiguous()?], 4)?)?;
                probs.narrow(4, 0, keys)?.reshape((1, n_kv_head, groups * n, keys))?
            }
            None => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let attn = probs.matmul(&v_all)?; // (1, kv, groups * n, d)
        attn.reshape((1, n_head, n, head_dim))?.transpose(1, 2)?.reshape((1, n, n_head * head_dim))
    }
}

/// One sequence's part of a batched forward pass.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

/// Where a segment's rows sit in the batch, and its masks.
struct Span {
    offset: usize,
    n: usize,
    pos: usize,
    masks: [Option<Tensor>; 2],
}
