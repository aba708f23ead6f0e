//! The decoder-only transformer wisp serves, for the GGUF families gemma3, llama and qwen2.
//!
//! This is wisp's own model file instead of candle-transformers' because the stock
//! quantized Gemma 3 is wrong (SiLU instead of GELU, no sliding window in decode) and
//! cannot serve (full-context RoPE tables per layer, concatenating KV cache, one position
//! per batch, no chunked prefill); see shared/notes/candle-gemma3.md. Here:
//! - each sequence owns a [`SeqCache`] preallocated to what the request can use, written
//!   in place; positions are explicit so prefill may be chunked and a prefix reused;
//! - RoPE tables are built once per frequency base, sized to the configured context;
//! - grouped-query attention folds the query heads of one KV head into the row dimension,
//!   so K and V are never repeated;
//! - on the CPU, Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1 matrices (and a tied embedding/output table of
//!   those types) are widened exactly to int8 at load and run on wisp's own repacked
//!   kernel ([`super::qgemm`]), the K-quants on candle's; Gemma's
//!   `gelu(gate) · up` is one fused, vectorised pass ([`super::ops::gelu_mul`]).
//! - on the CPU, attention is one pass per layer over every sequence of the step
//!   ([`super::attention`]) on caches that are plain host buffers; on GPUs it is candle's
//!   ops, one sequence at a time.
//!
//! Tensor names and hyper-parameter keys follow llama.cpp's GGUF conventions
//! (`llama.cpp: src/llama-model.cpp`, `build_gemma3`, `build_llama`, `build_qwen2`).

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Result, Tensor};

use super::attention::{self, Heads, LayerKv, SeqRows};
use super::qgemm::BlockMatrix;

/// The architectures this file implements, from `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gemma3,
    Llama,
    Qwen2,
}

impl Family {
    /// Maps a GGUF `general.architecture` to a family; `None` if unsupported.
    pub fn from_architecture(arch: &str) -> Option<Family> {
        match arch {
            "gemma3" => Some(Family::Gemma3),
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            _ => None,
        }
    }

    /// The GGUF metadata key prefix.
    pub fn arch_name(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3",
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct Hparams {
    pub family: Family,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// Gemma 3's sliding-window layers use their own RoPE base.
    pub rope_base_local: f32,
    pub sliding_window: Option<usize>,
    /// Every `swa_pattern`-th layer is global, the others sliding (Gemma 3: 6).
    pub swa_pattern: usize,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl Hparams {
    pub fn from_gguf(content: &gguf_file::Content, family: Family) -> Result<Hparams> {
        let arch = family.arch_name();
        let md = |key: &str| {
            let key = format!("{arch}.{key}");
            content.metadata.get(&key).ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata has no `{key}`")))
        };
        let n_embd = md("embedding_length")?.to_u32()? as usize;
        let n_head = md("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = match md("attention.head_count_kv") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => n_head,
        };
        let head_dim = match md("attention.key_length") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => n_embd / n_head,
        };
        let default_base = if family == Family::Gemma3 { 1_000_000.0 } else { 10_000.0 };
        let rope_base = md("rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(default_base);
        let sliding_window = match family {
            Family::Gemma3 => Some(md("attention.sliding_window")?.to_u32()? as usize),
            _ => None,
        };
        let vocab_size = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(tokens)) => tokens.len(),
            _ => content.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()[0]).unwrap_or(0),
        };
        let hp = Hparams {
            family,
            n_layer: md("block_count")?.to_u32()? as usize,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            rms_eps: md("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_base,
            rope_base_local: md("rope.local_freq_base").and_then(|v| v.to_f32()).unwrap_or(10_000.0),
            sliding_window,
            swa_pattern: md("attention.sliding_window_type").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(6),
            context_length: md("context_length")?.to_u32()? as usize,
            vocab_size,
        };
        if hp.n_head == 0 || hp.n_kv_head == 0 || !hp.n_head.is_multiple_of(hp.n_kv_head) {
            candle_core::bail!("bad head counts: {} query heads, {} KV heads", hp.n_head, hp.n_kv_head)
        }
        Ok(hp)
    }

    /// Gemma 3 alternates five sliding-window layers with one global layer.
    fn layer_window(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        (!(layer + 1).is_multiple_of(self.swa_pattern)).then_some(window)
    }
}

/// One sequence's KV cache, per layer, preallocated to `capacity` positions and filled in
/// place up to `len`.
pub struct SeqCache {
    kv: Kv,
    heads: Heads,
    len: usize,
    capacity: usize,
}

enum Kv {
    /// On the CPU: plain buffers that [`attention::attend`] writes and reads.
    Host(Vec<LayerKv>),
    /// On a GPU: K and V tensors of shape `(1, n_kv_head, capacity, head_dim)` for candle's ops.
    Device { k: Vec<Tensor>, v: Vec<Tensor> },
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

    /// Bytes of keys and values this cache holds (its capacity, not its length).
    pub fn bytes(&self) -> usize {
        match &self.kv {
            Kv::Host(layers) => layers.iter().map(LayerKv::bytes).sum(),
            Kv::Device { k, v } => k.iter().chain(v).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum(),
        }
    }

    /// Copies the first `n` positions of `other` into this (empty) cache: a prompt that
    /// starts with those tokens skips their prefill.
    pub fn copy_prefix(&mut self, other: &SeqCache, n: usize) -> Result<()> {
        if n > other.len || n > self.capacity {
            candle_core::bail!("cannot reuse {n} positions (source holds {}, room for {})", other.len, self.capacity)
        }
        match (&mut self.kv, &other.kv) {
            (Kv::Host(dst), Kv::Host(src)) => {
                for (dst, src) in dst.iter_mut().zip(src) {
                    dst.copy_prefix(src, self.heads, n, other.capacity, self.capacity);
                }
            }
            (Kv::Device { k, v }, Kv::Device { k: src_k, v: src_v }) => {
                for (dst, src) in k.iter_mut().zip(src_k).chain(v.iter_mut().zip(src_v)) {
                    dst.slice_set(&src.narrow(2, 0, n)?.contiguous()?, 2, 0)?;
                }
            }
            _ => candle_core::bail!("cannot copy a prefix between caches on different devices"),
        }
        self.len = n;
        Ok(())
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(xs, &self.weight, self.eps)
    }
}

/// A weight matrix and the kernel that multiplies by it.
enum Weight {
    /// Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 on the CPU: wisp's repacked kernel (`qgemm`).
    Blocks(Arc<BlockMatrix>),
    /// Anything else: candle's quantised matmul.
    Candle(QMatMul),
}

impl Weight {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Blocks(w) => w.forward(xs),
            Weight::Candle(w) => w.forward(xs),
        }
    }
}

struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// Run a single row as two (see [`Linear::forward`]).
    pad_single_row: bool,
}

impl Linear {
    fn new((weight, dtype): (Weight, GgmlDType), bias: Option<Tensor>) -> Linear {
        // candle picks a different x86 kernel for Q6_K with one row (compact weights) than
        // with several (repacked tiles), and the two round differently: a sequence decoded
        // alone would not produce the tokens it produces beside others. Padding one row to
        // two keeps every row on the tiled kernel, so batched output equals single-stream
        // output exactly (tested in host/tests/models.rs and e2e.rs). wisp's own Q8_0
        // kernel needs no such care.
        let pad_single_row = matches!(weight, Weight::Candle(_)) && dtype == GgmlDType::Q6K;
        Linear { weight, bias, pad_single_row }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = if self.pad_single_row && xs.dim(1)? == 1 {
            self.weight.forward(&Tensor::cat(&[xs, xs], 1)?)?.narrow(1, 0, 1)?
        } else {
            self.weight.forward(xs)?
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// The token embedding table.
enum Embedding {
    /// Shared with the tied output projection.
    Blocks(Arc<BlockMatrix>),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// `(tokens, n_embd)` rows for `ids`.
    fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Blocks(w) => Tensor::from_vec(w.gather(ids)?, (ids.len(), w.cols()), device),
            Embedding::Quantized(q) => q.embedding(&Tensor::new(ids, device)?),
        }
    }
}

/// A GGUF's tensors. The matrices wisp's block kernel (qgemm) serves are repacked straight from the
/// file a few rows at a time, never held whole beside their repacked copy (candle's
/// reader would hold the file's bytes twice, as read and as typed blocks: for the default
/// model's 168 MB embedding table, a load peak of ~350 MB).
struct Tensors<'a, R> {
    content: &'a gguf_file::Content,
    reader: &'a mut R,
    device: &'a Device,
    /// The file's length, read once: every tensor must lie inside it.
    file_size: u64,
}

impl<R: Read + Seek> Tensors<'_, R> {
    fn tensor(&mut self, name: &str) -> Result<QTensor> {
        self.content.tensor(self.reader, name, self.device)
    }

    /// The matrix `name` in wisp's block kernel's layout with its file type, if that kernel
    /// serves the type on this device; `None` (nothing read) otherwise.
    fn blocks(&mut self, name: &str) -> Result<Option<(Arc<BlockMatrix>, GgmlDType)>> {
        let Some(info) = self.content.tensor_infos.get(name) else { candle_core::bail!("the GGUF has no tensor `{name}`") };
        let dtype = info.ggml_dtype;
        if !self.device.is_cpu() || !BlockMatrix::serves(dtype) {
            return Ok(None);
        }
        let (rows, cols) = info.shape.dims2()?;
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        // As candle's reader does: a tensor must lie inside the file before anything is
        // allocated for it.
        let bytes = (rows as u64).saturating_mul((cols / dtype.block_size()) as u64).saturating_mul(dtype.type_size() as u64);
        if start.saturating_add(bytes) > self.file_size {
            candle_core::bail!("tensor `{name}` needs {bytes} bytes at offset {start}, past the end of the file ({} bytes)", self.file_size)
        }
        self.reader.seek(std::io::SeekFrom::Start(start))?;
        Ok(Some((Arc::new(BlockMatrix::read(self.reader, dtype, rows, cols)?), dtype)))
    }

    /// A weight matrix with the kernel that multiplies by it, and its file type.
    fn weight(&mut self, name: &str) -> Result<(Weight, GgmlDType)> {
        if let Some((w, dtype)) = self.blocks(name)? {
            return Ok((Weight::Blocks(w), dtype));
        }
        let t = self.tensor(name)?;
        let dtype = t.dtype();
        Ok((Weight::Candle(QMatMul::from_qtensor(t)?), dtype))
    }
}

struct Layer {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<RmsNorm>,
    /// Sliding window for this layer, `None` for global attention.
    window: Option<usize>,
    rope: usize,
}

/// `(max_len, head_dim / 2)` tables of every position's angles.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(head_dim: usize, base: f32, max_len: usize, device: &Device) -> Result<Rope> {
        let inv_freq: Vec<f32> = (0..head_dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / head_dim as f32)).collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), device)?;
        let t = Tensor::arange(0u32, max_len as u32, device)?.to_dtype(DType::F32)?.reshape((max_len, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Rope { cos: freqs.cos()?, sin: freqs.sin()? })
    }
}

/// A loaded model: weights, RoPE tables and the forward pass.
pub struct Model {
    hp: Hparams,
    embed: Embedding,
    embed_scale: Option<f64>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Weight,
    ropes: Vec<Rope>,
    /// Query heads grouped on one KV head.
    groups: usize,
    max_len: usize,
    device: Device,
    /// Attention by [`attention::attend`] on host buffers (the CPU), else by candle's ops.
    host_attention: bool,
    gelu: bool,
    interleaved_rope: bool,
}

impl Model {
    /// Loads the weights of `content`, sizing position tables for `max_len` tokens.
    pub fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        hp: Hparams,
        max_len: usize,
        device: &Device,
    ) -> Result<Model> {
        let file_size = reader.seek(std::io::SeekFrom::End(0))?;
        let mut file = Tensors { content, reader, device, file_size };
        let eps = hp.rms_eps as f32;
        let (embed, output) = if content.tensor_infos.contains_key("output.weight") {
            (Embedding::Quantized(Arc::new(file.tensor("token_embd.weight")?)), file.weight("output.weight")?.0)
        } else if let Some((w, _)) = file.blocks("token_embd.weight")? {
            // Tied: one copy of the table serves the lookup and the output projection.
            (Embedding::Blocks(w.clone()), Weight::Blocks(w))
        } else {
            let t = Arc::new(file.tensor("token_embd.weight")?);
            (Embedding::Quantized(t.clone()), Weight::Candle(QMatMul::from_arc(t)?))
        };
        let norm = RmsNorm { weight: file.tensor("output_norm.weight")?.dequantize(device)?, eps };
        let gemma = hp.family == Family::Gemma3;
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let has = |name: &str| content.tensor_infos.contains_key(&format!("blk.{i}.{name}"));
            let mut linear = |name: &str| -> Result<Linear> {
                let weight = file.weight(&format!("blk.{i}.{name}.weight"))?;
                let bias = match has(&format!("{name}.bias")) {
                    true => Some(file.tensor(&format!("blk.{i}.{name}.bias"))?.dequantize(device)?),
                    false => None,
                };
                Ok(Linear::new(weight, bias))
            };
            let (wq, wk, wv, wo) = (linear("attn_q")?, linear("attn_k")?, linear("attn_v")?, linear("attn_output")?);
            let (gate, up, down) = (linear("ffn_gate")?, linear("ffn_up")?, linear("ffn_down")?);
            let mut norm = |name: &str| -> Result<RmsNorm> {
                Ok(RmsNorm { weight: file.tensor(&format!("blk.{i}.{name}.weight"))?.dequantize(device)?, eps })
            };
            let optional_norm = |norm: &mut dyn FnMut(&str) -> Result<RmsNorm>, name: &str| {
                if gemma { norm(name).map(Some) } else { Ok(None) }
            };
            let window = hp.layer_window(i);
            layers.push(Layer {
                attn_norm: norm("attn_norm")?,
                q_norm: optional_norm(&mut norm, "attn_q_norm")?,
                k_norm: optional_norm(&mut norm, "attn_k_norm")?,
                post_attn_norm: optional_norm(&mut norm, "post_attention_norm")?,
                ffn_norm: norm("ffn_norm")?,
                post_ffn_norm: optional_norm(&mut norm, "post_ffw_norm")?,
                wq,
                wk,
                wv,
                wo,
                gate,
                up,
                down,
                window,
                rope: usize::from(window.is_some()),
            });
        }
        let mut ropes = vec![Rope::new(hp.head_dim, hp.rope_base, max_len, device)?];
        if hp.sliding_window.is_some() {
            ropes.push(Rope::new(hp.head_dim, hp.rope_base_local, max_len, device)?);
        }
        Ok(Model {
            embed_scale: gemma.then(|| (hp.n_embd as f64).sqrt()),
            groups: hp.n_head / hp.n_kv_head,
            gelu: gemma,
            interleaved_rope: hp.family == Family::Llama,
            hp,
            embed,
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
        let heads = self.heads();
        let kv = if self.host_attention {
            Kv::Host((0..self.hp.n_layer).map(|_| LayerKv::zeros(heads, capacity)).collect())
        } else {
            let shape = (1, heads.n_kv_head, capacity, heads.head_dim);
            let zeros = || (0..self.hp.n_layer).map(|_| Tensor::zeros(shape, DType::F32, &self.device)).collect::<Result<Vec<_>>>();
            Kv::Device { k: zeros()?, v: zeros()? }
        };
        Ok(SeqCache { kv, heads, len: 0, capacity })
    }

    /// Bytes of keys and values one position takes in a cache of this model (f16 in the
    /// CPU's caches, f32 in a GPU's).
    pub fn kv_bytes_per_token(&self) -> usize {
        let elem = if self.host_attention { LayerKv::ELEMENT_BYTES } else { DType::F32.size_in_bytes() };
        self.hp.n_layer * 2 * self.hp.n_kv_head * self.hp.head_dim * elem
    }

    fn heads(&self) -> Heads {
        Heads { n_head: self.hp.n_head, n_kv_head: self.hp.n_kv_head, head_dim: self.hp.head_dim }
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
        for (idx, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(layer, &x, segments, &mut spans, idx)?;
        }
        let mut last = Vec::with_capacity(spans.len());
        for (seg, span) in segments.iter_mut().zip(&spans) {
            seg.cache.len = span.pos + span.n;
            last.push(x.narrow(1, span.offset + span.n - 1, 1)?);
        }
        let last = if last.len() == 1 { last.remove(0) } else { Tensor::cat(&last, 1)? };
        let last = self.norm.forward(&last)?;
        self.output.forward(&last)?.squeeze(0)
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

    fn layer_forward(&self, layer: &Layer, x: &Tensor, segments: &mut [Segment<'_>], spans: &mut [Span], idx: usize) -> Result<Tensor> {
        let h = layer.attn_norm.forward(x)?;
        let qkv = [layer.wq.forward(&h)?, layer.wk.forward(&h)?, layer.wv.forward(&h)?];
        let attn = if self.host_attention {
            self.attention_host(layer, &qkv, segments, spans, idx)?
        } else {
            self.attention_device(layer, &qkv, segments, spans, idx)?
        };
        let mut attn = layer.wo.forward(&attn)?;
        if let Some(norm) = &layer.post_attn_norm {
            attn = norm.forward(&attn)?;
        }
        let x = (x + attn)?;

        let h = layer.ffn_norm.forward(&x)?;
        let (gate, up) = (layer.gate.forward(&h)?, layer.up.forward(&h)?);
        let act = if self.gelu { super::ops::gelu_mul(&gate, &up)? } else { (candle_nn::ops::silu(&gate)? * up)? };
        let mut ffn = layer.down.forward(&act)?;
        if let Some(norm) = &layer.post_ffn_norm {
            ffn = norm.forward(&ffn)?;
        }
        x + ffn
    }

    /// Attention of every segment in one pass on the CPU ([`attention::attend`]); `qkv`
    /// holds the projections of all rows of the step.
    fn attention_host(&self, layer: &Layer, qkv: &[Tensor; 3], segments: &mut [Segment<'_>], spans: &[Span], idx: usize) -> Result<Tensor> {
        use super::ops::CpuValues;
        let rows = qkv[0].dim(1)?;
        // q and k are normed and rotated in place, so copied; the rest is read where it lies.
        let (mut q, mut k) = (CpuValues::of(&qkv[0])?.to_vec(), CpuValues::of(&qkv[1])?.to_vec());
        let v = CpuValues::of(&qkv[2])?;
        let mut seqs = Vec::with_capacity(spans.len());
        for (seg, span) in segments.iter_mut().zip(spans) {
            let capacity = seg.cache.capacity;
            let Kv::Host(layers) = &mut seg.cache.kv else { candle_core::bail!("a device cache was given to the CPU attention") };
            seqs.push(SeqRows { offset: span.offset, n: span.n, pos: span.pos, capacity, kv: &mut layers[idx] });
        }
        let rope = &self.ropes[layer.rope];
        let q_norm = layer.q_norm.as_ref().map(|n| CpuValues::of(&n.weight)).transpose()?;
        let k_norm = layer.k_norm.as_ref().map(|n| CpuValues::of(&n.weight)).transpose()?;
        let (cos, sin) = (CpuValues::of(&rope.cos)?, CpuValues::of(&rope.sin)?);
        let spec = attention::Spec {
            heads: self.heads(),
            window: layer.window,
            q_norm: q_norm.as_deref(),
            k_norm: k_norm.as_deref(),
            eps: self.hp.rms_eps as f32,
            cos: &cos,
            sin: &sin,
            interleaved: self.interleaved_rope,
        };
        let out = attention::attend(&spec, &mut q, &mut k, &v, &mut seqs);
        Tensor::from_vec(out, (1, rows, self.hp.n_head * self.hp.head_dim), &self.device)
    }

    /// Attention with candle's ops, one segment at a time (GPUs).
    fn attention_device(
        &self,
        layer: &Layer,
        qkv: &[Tensor; 3],
        segments: &mut [Segment<'_>],
        spans: &mut [Span],
        idx: usize,
    ) -> Result<Tensor> {
        let hp = &self.hp;
        let [q_all, k_all, v_all] = qkv;
        let mut outs = Vec::with_capacity(spans.len());
        for (seg, span) in segments.iter_mut().zip(spans.iter_mut()) {
            let (n, pos) = (span.n, span.pos);
            let q = q_all.narrow(1, span.offset, n)?.reshape((1, n, hp.n_head, hp.head_dim))?.transpose(1, 2)?;
            let k = k_all.narrow(1, span.offset, n)?.reshape((1, n, hp.n_kv_head, hp.head_dim))?.transpose(1, 2)?;
            let v = v_all.narrow(1, span.offset, n)?.reshape((1, n, hp.n_kv_head, hp.head_dim))?.transpose(1, 2)?;
            // Masks are shared by every layer of the same kind; built only for runs of >1 token.
            let mask = if n > 1 {
                let slot = &mut span.masks[usize::from(layer.window.is_some())];
                if slot.is_none() {
                    *slot = Some(self.mask(pos, n, layer.window)?);
                }
                slot.as_ref()
            } else {
                None
            };
            outs.push(self.attention(layer, q, k, v, pos, seg.cache, idx, mask)?);
        }
        if outs.len() == 1 { Ok(outs.remove(0)) } else { Tensor::cat(&outs, 1) }
    }

    /// Attention of one sequence's `n` new positions (`q`, `k`, `v`: `(1, heads, n, d)`)
    /// over its cache; writes the new keys and values in place. Returns `(1, n, heads * d)`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos: usize,
        cache: &mut SeqCache,
        idx: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hp = &self.hp;
        let n = q.dim(2)?;
        let (q, k) = match (&layer.q_norm, &layer.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q.contiguous()?)?, kn.forward(&k.contiguous()?)?),
            _ => (q.contiguous()?, k.contiguous()?),
        };
        let rope = &self.ropes[layer.rope];
        let cos = rope.cos.narrow(0, pos, n)?;
        let sin = rope.sin.narrow(0, pos, n)?;
        let (q, k) = if self.interleaved_rope {
            (candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?, candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?)
        } else {
            (candle_nn::rotary_emb::rope(&q, &cos, &sin)?, candle_nn::rotary_emb::rope(&k, &cos, &sin)?)
        };
        let Kv::Device { k: cache_k, v: cache_v } = &mut cache.kv else {
            candle_core::bail!("a host cache was given to the device attention")
        };
        cache_k[idx].slice_set(&k, 2, pos)?;
        cache_v[idx].slice_set(&v.contiguous()?, 2, pos)?;
        let first = attention::first_key(pos, layer.window);
        let keys = pos + n - first;
        let k_all = cache_k[idx].narrow(2, first, keys)?;
        let v_all = cache_v[idx].narrow(2, first, keys)?;

        // Fold the query heads sharing a KV head into rows: (1, kv, groups * n, d).
        let scale = 1.0 / (hp.head_dim as f64).sqrt();
        let q = (q * scale)?.reshape((1, hp.n_kv_head, self.groups * n, hp.head_dim))?;
        let scores = q.matmul(&k_all.t()?)?;
        let scores = match mask {
            Some(mask) => scores.reshape((1, hp.n_kv_head, self.groups, n, keys))?.broadcast_add(mask)?.reshape((
                1,
                hp.n_kv_head,
                self.groups * n,
                keys,
            ))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let attn = probs.matmul(&v_all)?; // (1, kv, groups * n, d)
        attn.reshape((1, hp.n_head, n, hp.head_dim))?.transpose(1, 2)?.reshape((1, n, hp.n_head * hp.head_dim))
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
