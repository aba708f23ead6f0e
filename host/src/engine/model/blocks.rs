//! The parts every family is built from: RMS norms, weight matrices with the kernel that
//! multiplies by them, the embedding table, and the reader that takes them out of a GGUF.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{Device, Module, Result, Tensor};

use crate::engine::qgemm::BlockMatrix;

pub(super) struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(xs, &self.weight, self.eps)
    }
}

/// A weight matrix and the kernel that multiplies by it.
pub(super) enum Weight {
    /// Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 on the CPU: wisp's repacked kernel (`qgemm`).
    Blocks(Arc<BlockMatrix>),
    /// Anything else: candle's quantised matmul.
    Candle(QMatMul),
}

impl Weight {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Blocks(w) => w.forward(xs),
            Weight::Candle(w) => w.forward(xs),
        }
    }
}

pub(super) struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// Run a single row as two (see [`Linear::forward`]).
    pad_single_row: bool,
}

impl Linear {
    pub fn new((weight, dtype): (Weight, GgmlDType), bias: Option<Tensor>) -> Linear {
        // candle picks a different x86 kernel for Q6_K with one row (compact weights) than
        // with several (repacked tiles), and the two round differently: a sequence decoded
        // alone would not produce the tokens it produces beside others. Padding one row to
        // two keeps every row on the tiled kernel, so batched output equals single-stream
        // output exactly (tested in host/tests/models.rs and e2e.rs). wisp's own Q8_0
        // kernel needs no such care.
        let pad_single_row = matches!(weight, Weight::Candle(_)) && dtype == GgmlDType::Q6K;
        Linear { weight, bias, pad_single_row }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
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
pub(super) enum Embedding {
    /// Shared with the tied output projection.
    Blocks(Arc<BlockMatrix>),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// `(tokens, n_embd)` rows for `ids`.
    pub fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
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
pub(super) struct Tensors<'a, R> {
    pub content: &'a gguf_file::Content,
    pub reader: &'a mut R,
    pub device: &'a Device,
    /// The file's length, read once: every tensor must lie inside it.
    pub file_size: u64,
}

impl<R: Read + Seek> Tensors<'_, R> {
    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The tensor `name`, checked to have `shape` (GGUF order reversed: rows first).
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let Some(info) = self.content.tensor_infos.get(name) else { candle_core::bail!("the GGUF has no tensor `{name}`") };
        if info.shape.dims() != shape {
            candle_core::bail!("tensor `{name}` has shape {:?}, this model needs {shape:?}", info.shape.dims())
        }
        self.content.tensor(self.reader, name, self.device)
    }

    /// A vector (a norm's weights, a bias, RoPE factors) as f32 on the device.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        self.tensor(name, &[len])?.dequantize(self.device)
    }

    pub fn norm(&mut self, name: &str, len: usize, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.vector(name, len)?, eps })
    }

    /// The matrix `name` in wisp's block kernel's layout with its file type, if that kernel
    /// serves the type on this device; `None` (nothing read) otherwise.
    pub fn blocks(&mut self, name: &str, shape: [usize; 2]) -> Result<Option<(Arc<BlockMatrix>, GgmlDType)>> {
        let Some(info) = self.content.tensor_infos.get(name) else { candle_core::bail!("the GGUF has no tensor `{name}`") };
        if info.shape.dims() != shape {
            candle_core::bail!("tensor `{name}` has shape {:?}, this model needs {shape:?}", info.shape.dims())
        }
        let dtype = info.ggml_dtype;
        if !self.device.is_cpu() || !BlockMatrix::serves(dtype) {
            return Ok(None);
        }
        let [rows, cols] = shape;
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

    /// A `(rows, cols)` weight matrix with the kernel that multiplies by it, and its file type.
    pub fn weight(&mut self, name: &str, shape: [usize; 2]) -> Result<(Weight, GgmlDType)> {
        if let Some((w, dtype)) = self.blocks(name, shape)? {
            return Ok((Weight::Blocks(w), dtype));
        }
        let t = self.tensor(name, &shape)?;
        let dtype = t.dtype();
        Ok((Weight::Candle(QMatMul::from_qtensor(t)?), dtype))
    }

    /// `name.weight` of `shape` and `name.bias` if the file has one.
    pub fn linear(&mut self, name: &str, shape: [usize; 2]) -> Result<Linear> {
        let weight = self.weight(&format!("{name}.weight"), shape)?;
        let bias_name = format!("{name}.bias");
        let bias = if self.has(&bias_name) { Some(self.vector(&bias_name, shape[0])?) } else { None };
        Ok(Linear::new(weight, bias))
    }
}
