//! The parts every family is built from: RMS norms, weight matrices with the kernel that
//! multiplies by them, the embedding table, and the reader that takes them out of a GGUF.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};

use super::gguf::Header;
use crate::engine::qgemm::{BlockMatrix, FileType};

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
    /// The types [`BlockMatrix::serves`] on the CPU: wisp's repacked kernel (`qgemm`).
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
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Linear {
        // candle picks a different x86 kernel for Q6_K with one row (compact weights) than
        // with several (repacked tiles), and the two round differently: a sequence decoded
        // alone would not produce the tokens it produces beside others. Padding one row to
        // two keeps every row on the tiled kernel, so batched output equals single-stream
        // output exactly (tested in host/tests/models.rs and e2e.rs). wisp's own kernel,
        // which runs Q6_K on the CPU, needs no such care.
        let pad_single_row = matches!(&weight, Weight::Candle(QMatMul::QTensor(t)) if t.dtype() == GgmlDType::Q6K);
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

/// An MLP's gate and up projections, separate or one fused matrix, gate rows first (Phi 3,
/// Gemma 4's experts).
pub(super) enum GateUp {
    Separate(Linear, Linear),
    Fused(Linear),
}

impl GateUp {
    /// The gate and up projections of `h`, `(1, rows, width)` each.
    pub fn forward(&self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            GateUp::Separate(gate, up) => Ok((gate.forward(h)?, up.forward(h)?)),
            GateUp::Fused(w) => {
                let both = w.forward(h)?;
                let ff = both.dim(2)? / 2;
                Ok((both.narrow(2, 0, ff)?.contiguous()?, both.narrow(2, ff, ff)?.contiguous()?))
            }
        }
    }
}

/// An embedding table.
pub(super) enum Embedding {
    /// Shared with the tied output projection.
    Blocks(Arc<BlockMatrix>),
    Quantized(Arc<QTensor>),
    /// Left in the file, its rows read as tokens need them.
    OnDisk(DiskTable),
}

impl Embedding {
    /// `(tokens, cols)` rows for `ids`.
    pub fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Blocks(w) => Tensor::from_vec(w.gather(ids)?, (ids.len(), w.cols()), device),
            Embedding::Quantized(q) => q.embedding(&Tensor::new(ids, device)?),
            Embedding::OnDisk(table) => table.rows(ids)?.to_device(device),
        }
    }
}

/// A table of a type candle reads, left in the GGUF and read a row at a time (positioned
/// reads on a handle of its own, so any thread may look up at any time).
pub(super) struct DiskTable {
    file: File,
    /// Where row 0 starts in the file.
    start: u64,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl DiskTable {
    /// The rows `ids`, dequantized: `(ids, cols)` on the CPU.
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let mut raw = vec![0u8; ids.len() * self.row_bytes];
        for (&id, row) in ids.iter().zip(raw.chunks_exact_mut(self.row_bytes)) {
            if id as usize >= self.rows {
                candle_core::bail!("token {id} is past the table's {} rows", self.rows)
            }
            self.file.read_exact_at(row, self.start + id as u64 * self.row_bytes as u64)?;
        }
        candle_core::quantized::ggml_file::qtensor_from_ggml(self.dtype, &raw, vec![ids.len(), self.cols], &Device::Cpu)?
            .dequantize(&Device::Cpu)
    }
}

/// A GGUF's tensors. The matrices wisp's block kernel (qgemm) serves are repacked straight from the
/// file a few rows at a time, never held whole beside their repacked copy (candle's
/// reader would hold the file's bytes twice, as read and as typed blocks: for the default
/// model's 168 MB embedding table, a load peak of ~350 MB).
pub(super) struct Tensors<'a, R> {
    pub header: &'a Header,
    pub reader: &'a mut R,
    pub device: &'a Device,
    /// The file's length, read once: every tensor must lie inside it.
    pub file_size: u64,
}

impl<R: Read + Seek> Tensors<'_, R> {
    pub fn has(&self, name: &str) -> bool {
        self.header.content.tensor_infos.contains_key(name) || self.header.foreign.contains_key(name)
    }

    /// Whether `name` is of a type only wisp's block kernel runs.
    pub fn blocks_only(&self, name: &str) -> bool {
        self.header.foreign.contains_key(name)
    }

    /// The type of tensor `name`, checked to have `shape` (GGUF order reversed: rows first)
    /// and to lie inside the file, where its data starts, and its bytes.
    fn locate(&self, name: &str, shape: &[usize]) -> Result<(FileType, u64, u64)> {
        let (file_type, dims, offset) = match (self.header.content.tensor_infos.get(name), self.header.foreign.get(name)) {
            (Some(info), _) => (FileType::Ggml(info.ggml_dtype), info.shape.dims(), info.offset),
            (None, Some(t)) => (t.file_type, t.dims.as_slice(), t.offset),
            (None, None) => candle_core::bail!("the GGUF has no tensor `{name}`"),
        };
        if dims != shape {
            candle_core::bail!("tensor `{name}` has shape {dims:?}, this model needs {shape:?}")
        }
        let cols = shape.last().copied().unwrap_or(1);
        let Some(bytes) = file_type.matrix_bytes(shape.iter().product::<usize>() / cols.max(1), cols) else {
            candle_core::bail!("tensor `{name}`: rows of {cols} values are not whole {file_type} blocks of {}", file_type.block_size())
        };
        // As candle's reader does: a tensor must lie inside the file before anything is
        // allocated for it.
        let start = self.header.content.tensor_data_offset.saturating_add(offset);
        if start.saturating_add(bytes) > self.file_size {
            candle_core::bail!("tensor `{name}` needs {bytes} bytes at offset {start}, past the end of the file ({} bytes)", self.file_size)
        }
        Ok((file_type, start, bytes))
    }

    /// The tensor `name`, checked to have `shape`, for candle's kernels.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let (file_type, start, bytes) = self.locate(name, shape)?;
        let FileType::Ggml(dtype) = file_type else {
            candle_core::bail!("tensor `{name}` is {file_type}, which only wisp's CPU kernel runs")
        };
        let mut raw = vec![0u8; bytes as usize];
        self.reader.seek(std::io::SeekFrom::Start(start))?;
        self.reader.read_exact(&mut raw)?;
        candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &raw, shape.to_vec(), self.device)
    }

    /// A vector (a norm's weights, a bias, RoPE factors) as f32 on the device.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        self.tensor(name, &[len])?.dequantize(self.device)
    }

    pub fn norm(&mut self, name: &str, len: usize, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.vector(name, len)?, eps })
    }

    /// Whether wisp's block kernel runs `file_type` here.
    fn on_blocks(&self, file_type: FileType) -> bool {
        self.device.is_cpu() && BlockMatrix::serves(file_type)
    }

    /// The matrix `name` in wisp's block kernel's layout, if that kernel serves its type on
    /// this device; `None` (nothing read) otherwise.
    pub fn blocks(&mut self, name: &str, shape: [usize; 2]) -> Result<Option<Arc<BlockMatrix>>> {
        let (file_type, start, _) = self.locate(name, &shape)?;
        if !self.on_blocks(file_type) {
            return Ok(None);
        }
        self.reader.seek(std::io::SeekFrom::Start(start))?;
        Ok(Some(Arc::new(BlockMatrix::read(self.reader, file_type, shape[0], shape[1])?)))
    }

    /// An embedding table of `(rows, cols)`; a table of a type candle does not know is
    /// looked up on wisp's kernel.
    pub fn embedding(&mut self, name: &str, shape: [usize; 2]) -> Result<Embedding> {
        match self.blocks_only(name) {
            true => Ok(Embedding::Blocks(
                self.blocks(name, shape)?
                    .ok_or_else(|| candle_core::Error::Msg(format!("`{name}`'s type runs on wisp's CPU kernel only")))?,
            )),
            false => Ok(Embedding::Quantized(Arc::new(self.tensor(name, &shape)?))),
        }
    }

    /// A `(rows, cols)` weight matrix with the kernel that multiplies by it.
    pub fn weight(&mut self, name: &str, [rows, cols]: [usize; 2]) -> Result<Weight> {
        let (file_type, start, _) = self.locate(name, &[rows, cols])?;
        self.reader.seek(std::io::SeekFrom::Start(start))?;
        self.read_weight(name, file_type, rows, cols)
    }

    /// The `n` matrices of `rows × cols` in the expert-major 3-D tensor `name.weight` (GGUF
    /// `ffn_*_exps`), each with the kernel that multiplies by it, and its row of the
    /// `(n, rows)` matrix `name.bias` if the file has one.
    pub fn experts(&mut self, name: &str, [n, rows, cols]: [usize; 3]) -> Result<Vec<Linear>> {
        let bias_name = format!("{name}.bias");
        let biases = match self.has(&bias_name) {
            true => Some(self.tensor(&bias_name, &[n, rows])?.dequantize(self.device)?),
            false => None,
        };
        let name = format!("{name}.weight");
        let (file_type, start, _) = self.locate(&name, &[n, rows, cols])?;
        self.reader.seek(std::io::SeekFrom::Start(start))?;
        (0..n)
            .map(|e| {
                let bias = biases.as_ref().map(|b| b.get(e)).transpose()?;
                Ok(Linear::new(self.read_weight(&name, file_type, rows, cols)?, bias))
            })
            .collect()
    }

    /// The `rows × cols` matrix of `file_type` at the reader's position.
    fn read_weight(&mut self, name: &str, file_type: FileType, rows: usize, cols: usize) -> Result<Weight> {
        if self.on_blocks(file_type) {
            return Ok(Weight::Blocks(Arc::new(BlockMatrix::read(self.reader, file_type, rows, cols)?)));
        }
        let FileType::Ggml(dtype) = file_type else {
            candle_core::bail!("tensor `{name}` is {file_type}, which only wisp's CPU kernel runs")
        };
        let mut raw = vec![0u8; file_type.matrix_bytes(rows, cols).unwrap_or(0) as usize];
        self.reader.read_exact(&mut raw)?;
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &raw, vec![rows, cols], self.device)?;
        Ok(Weight::Candle(QMatMul::from_qtensor(t)?))
    }

    /// `name.weight` of `shape` for a matrix that llama-quantize leaves in a float type
    /// (Gemma 4's `per_layer_model_proj` stays F16): on the CPU, requantized to Q8_0 for
    /// wisp's kernel, whose every row is computed alike whatever the batch (candle's float
    /// matmul picks its kernel by the number of rows: a sequence alone would not get the
    /// bits it gets in a batch).
    pub fn linear_q8(&mut self, name: &str, [rows, cols]: [usize; 2]) -> Result<Linear> {
        let weight_name = format!("{name}.weight");
        let (file_type, _, _) = self.locate(&weight_name, &[rows, cols])?;
        let float = matches!(file_type, FileType::Ggml(GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::F32));
        if !float || !self.device.is_cpu() || !cols.is_multiple_of(32) {
            return self.linear(name, [rows, cols]);
        }
        let values = self.tensor(&weight_name, &[rows, cols])?.dequantize(&Device::Cpu)?;
        let q8 = QTensor::quantize(&values, GgmlDType::Q8_0)?;
        let blocks = BlockMatrix::read(&mut std::io::Cursor::new(q8.data()?), FileType::Ggml(GgmlDType::Q8_0), rows, cols)?;
        Ok(Linear::new(Weight::Blocks(Arc::new(blocks)), None))
    }

    /// `name.weight` of `shape` and `name.bias` if the file has one.
    pub fn linear(&mut self, name: &str, shape: [usize; 2]) -> Result<Linear> {
        let weight = self.weight(&format!("{name}.weight"), shape)?;
        let bias_name = format!("{name}.bias");
        let bias = if self.has(&bias_name) { Some(self.vector(&bias_name, shape[0])?) } else { None };
        Ok(Linear::new(weight, bias))
    }
}

impl Tensors<'_, File> {
    /// An embedding table of `(rows, cols)` left in the file, a row read per token and
    /// never held: Gemma 4's per-layer token embeddings (E2B: 262,144 × 8,960 values,
    /// ~1.3 GB at Q4_K, a few kB a token), which llama.cpp reads lazily too. A type candle
    /// cannot read is held in memory on wisp's kernel instead.
    pub fn embedding_on_disk(&mut self, name: &str, [rows, cols]: [usize; 2]) -> Result<Embedding> {
        let (file_type, start, bytes) = self.locate(name, &[rows, cols])?;
        let FileType::Ggml(dtype) = file_type else { return self.embedding(name, [rows, cols]) };
        let row_bytes = (bytes / rows.max(1) as u64) as usize;
        Ok(Embedding::OnDisk(DiskTable { file: self.reader.try_clone()?, start, dtype, rows, cols, row_bytes }))
    }
}
