//! wisp's CPU matrix multiply for block-quantised weights of 32-element blocks: Q8_0, Q5_0,
//! Q5_1, Q4_0 and Q4_1, each kept at its own width (Q4_1 and Q5_1 with their per-block
//! minimum), MXFP4 and IQ4_NL, and the super-block types Q4_K, Q5_K, Q6_K and IQ4_XS, whose
//! 256 values are eight 32-value blocks with integer sub-block scales (and, in Q4_K and
//! Q5_K, minimums) under one f16 `d` (and `dmin`). A super-block type is held as it is:
//! each block's integer sum is multiplied by its sub-block scale as an integer, summed over
//! the super-block and only then multiplied by `d` and the activations' scale (llama.cpp's
//! K-quant × Q8_K dot products); Q6_K's 16-value halves carry an integer sum each. The
//! widths are the file's but for a byte per 6-bit scale: Q4_K 4.625 bits a weight (file
//! 4.5), Q5_K 5.625 (5.5), Q6_K 6.5625 (the same), IQ4_XS 4.3125 (4.25).
//!
//! Why not candle's: candle runs a Q8_0 matmul as one dot product per (input row, weight
//! row), four weight rows at a time; its register-tiled, repacked x86 kernels exist only for
//! rows whose length is a multiple of 256 (and for Q8_0 only with AVX-512/AVX-VNNI), so
//! Gemma 3 270M's 640-wide projections (q, k, v, gate, up: two thirds of the model's
//! multiply-adds, and the tied 262144 × 640 output projection) never use them. Prompt
//! processing ran at 0.42× llama.cpp. Its kernels for the 4- and 5-bit types are one dot
//! product per (input row, weight row), and scalar for Q5_0; its Q4_K decode on a
//! Llama-3.2-1B-shaped file ran at 0.50× llama.cpp. Its Q6_K kernel (the output projection
//! and a quarter of the layers of every Q4_K_M file) picks another kernel for one row than
//! for several, rounding differently, and expands the weights to bytes lazily beside the
//! compact copy it keeps (+0.9 GB on a Qwen3.5-4B-shaped file).
//!
//! The weights are repacked at load in groups of [`COLS`] output rows: for each block of 32
//! inputs, the group's 8 rows are interleaved 4 values at a time, so one 256-bit register
//! holds 4 consecutive inputs of 8 rows (a 4-bit type: two such sets, one per nibble, see
//! [`Packing`]). A prompt's rows are quantised once to int8 blocks of 32 (llama.cpp's Q8_0
//! activations); 4 input bytes are broadcast to all lanes and multiplied against 8 rows at
//! once, integer sums run over a whole block before one conversion to f32, and each lane
//! ends as one output element: no horizontal sums. A register tile covers up to [`RM`]
//! input rows × 8 output rows (the layout of candle's own repacked K-quant tiles and of
//! llama.cpp's repacked Q4_0/IQ4_NL kernels). Work is split across candle's worker threads
//! by panels of groups.
//!
//! The multiply is of unsigned bytes by signed ones (VNNI's `vpdpbusd`, or AVX2's
//! `vpmaddubsw` + `vpmaddwd`), so every weight is stored unsigned: the 4- and 5-bit types as
//! in the file (Q4_0's weight is `d·(q − 8)`, Q5_0's `d·(q − 16)`), Q8_0's int8 biased by
//! 128. They multiply as they are and the offset comes off the integer sum as
//! `offset · Σx`; Q4_1's and Q5_1's `d·q + m` add their minimum per block as `m · Σx`
//! (llama.cpp's Q4_1 × Q8_1 dot product: the activations' block sums are kept beside their
//! quants). AVX2's 16-bit pair sums would overflow on Q8_0's full bytes, so there it is
//! unbiased and multiplied as `|w| · (x with w's sign)`. A 4-bit type takes 4.5 (with a
//! minimum: 5) bits per weight as in the file, a 5-bit one 5.5 (6): its fifth bits are a
//! bit plane put back on the nibbles in registers; Q6_K's top two bits are two such planes.
//!
//! Every output element is computed by the same sequence of operations whatever the number
//! of input rows or how they fall into tiles (one lane, blocks in order; the integer sums
//! are exact), so a sequence decoded alone gets bit-identical logits to the same sequence
//! decoded in a batch, and every kernel (VNNI, AVX2, plain Rust) gets the same bits.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Result, Tensor};
use half::f16;

/// Elements per quantisation block.
pub const BLOCK: usize = 32;
/// Output rows interleaved in one group (one per 32-bit lane of a 256-bit register).
pub const COLS: usize = 8;

/// A weight type the block kernel takes: one candle knows, or one only wisp runs (read
/// from the GGUF by [`crate::engine::model::gguf`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FileType {
    Ggml(GgmlDType),
    /// 32 values: an f16 scale, 16 bytes of 4-bit indices into [`IQ4NL_VALUES`].
    Iq4Nl,
    /// 256 values: an f16 scale, eight 6-bit sub-block scales (biased by 32; the high 2
    /// bits in a u16, the low 4 in 4 bytes), 128 bytes of indices into [`IQ4NL_VALUES`].
    Iq4Xs,
    /// 32 values: an E8M0 exponent, 16 bytes of E2M1 values ([`FP4_VALUES`]).
    Mxfp4,
}

/// ggml's `kvalues_iq4nl`.
const IQ4NL_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
/// ggml's `kvalues_mxfp4`: E2M1's values doubled (the scale is halved to match).
const FP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

impl FileType {
    /// The type of GGUF type id `id` (`ggml.h`), `None` for one wisp does not run.
    pub fn from_id(id: u32) -> Option<FileType> {
        use GgmlDType::*;
        Some(match id {
            0 => FileType::Ggml(F32),
            1 => FileType::Ggml(F16),
            2 => FileType::Ggml(Q4_0),
            3 => FileType::Ggml(Q4_1),
            6 => FileType::Ggml(Q5_0),
            7 => FileType::Ggml(Q5_1),
            8 => FileType::Ggml(Q8_0),
            9 => FileType::Ggml(Q8_1),
            10 => FileType::Ggml(Q2K),
            11 => FileType::Ggml(Q3K),
            12 => FileType::Ggml(Q4K),
            13 => FileType::Ggml(Q5K),
            14 => FileType::Ggml(Q6K),
            15 => FileType::Ggml(Q8K),
            20 => FileType::Iq4Nl,
            23 => FileType::Iq4Xs,
            30 => FileType::Ggml(BF16),
            39 => FileType::Mxfp4,
            _ => return None,
        })
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            FileType::Ggml(d) => d.block_size(),
            FileType::Iq4Nl | FileType::Mxfp4 => 32,
            FileType::Iq4Xs => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            FileType::Ggml(d) => d.type_size(),
            FileType::Iq4Nl => 18,
            FileType::Iq4Xs => 136,
            FileType::Mxfp4 => 17,
        }
    }

    /// The bytes of a `rows × cols` matrix, `None` if a row is not whole blocks or the
    /// size overflows.
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> Option<u64> {
        if !cols.is_multiple_of(self.block_size()) {
            return None;
        }
        (rows as u64).checked_mul((cols / self.block_size()) as u64)?.checked_mul(self.type_size() as u64)
    }

    /// The table a [`Packing::Lut`] type's indices look up.
    fn table(self) -> Option<&'static [i8; 16]> {
        match self {
            FileType::Iq4Nl | FileType::Iq4Xs => Some(&IQ4NL_VALUES),
            FileType::Mxfp4 => Some(&FP4_VALUES),
            FileType::Ggml(_) => None,
        }
    }
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileType::Ggml(d) => write!(f, "{d:?}"),
            FileType::Iq4Nl => f.write_str("IQ4_NL"),
            FileType::Iq4Xs => f.write_str("IQ4_XS"),
            FileType::Mxfp4 => f.write_str("MXFP4"),
        }
    }
}

/// 32 bytes, aligned for 256-bit loads.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Quants([u8; BLOCK]);

const ZERO: Quants = Quants([0; BLOCK]);

/// How a group's block of weights is held: registers of 4 inputs × 8 rows of unsigned
/// values, for input quads `g = 0..8` of the block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Packing {
    /// Q8_0: 8 registers of full bytes (int8 + 128), register `g` for quad `g`.
    Int8,
    /// Q4_0, Q4_1: 4 registers of unsigned nibbles (0..16), register `p` holding quad `p`
    /// in its low nibbles and quad `p + 4` in its high ones.
    Nibbles,
    /// Q5_0, Q5_1: the low 4 bits as `Nibbles`, and a fifth register ([`FIFTHS`]) whose
    /// byte `j` holds in bit `g` the fifth bit of quad `g`'s byte `j`.
    Fives,
    /// IQ4_NL, IQ4_XS, MXFP4: indices as `Nibbles`, each standing for the entry of
    /// [`BlockMatrix::table`] it indexes.
    Lut,
    /// Q6_K: the low 4 bits as `Nibbles`, and two registers ([`HIGHS`], `HIGHS + 1`) whose
    /// byte `j` holds in bits `2(g mod 4)..` the top two bits of quad `g`'s byte `j`, quads
    /// 0-3 in the first and 4-7 in the second. Quads 0-3 are the block's first 16-value
    /// sub-block, 4-7 its second, each with its own scale ([`BlockMatrix::sub_scales`]).
    Sixes,
}

/// The register of a [`Packing::Fives`] block that holds the fifth bits.
const FIFTHS: usize = COLS / 2;
/// The first of the two registers of a [`Packing::Sixes`] block that hold the top bits.
const HIGHS: usize = COLS / 2;

impl Packing {
    /// Registers per group and block.
    const fn registers(self) -> usize {
        match self {
            Packing::Int8 => COLS,
            Packing::Nibbles | Packing::Lut => COLS / 2,
            Packing::Fives => COLS / 2 + 1,
            Packing::Sixes => COLS / 2 + 2,
        }
    }

    /// Where quad `g`'s low bits are held: their register and shift in each byte.
    const fn place(self, g: usize) -> (usize, u32) {
        match self {
            Packing::Int8 => (g, 0),
            Packing::Nibbles | Packing::Fives | Packing::Lut | Packing::Sixes => (g % (COLS / 2), 4 * (g / (COLS / 2)) as u32),
        }
    }

    /// Integer sub-block scales per block of a super-block type: Q6_K's 16-value halves
    /// have one each.
    const fn subs(self) -> usize {
        match self {
            Packing::Sixes => 2,
            _ => 1,
        }
    }

    /// The low bits of one value once shifted down.
    const fn mask(self) -> u8 {
        match self {
            Packing::Int8 => 0xff,
            Packing::Nibbles | Packing::Fives | Packing::Lut | Packing::Sixes => 0x0f,
        }
    }
}

/// A weight matrix `W` (out × in) for `y = x Wᵀ` on the CPU, repacked from a 32-element
/// block type (see [`BlockMatrix::read`]).
pub struct BlockMatrix {
    rows: usize,
    /// Blocks per row.
    blocks: usize,
    packing: Packing,
    /// A weight is `scale · (u − offset)` (`+ min` with minimums) for a stored `u`.
    offset: i32,
    /// Per group of [`COLS`] rows (the last one padded with zero rows), per block:
    /// `packing.registers()` registers.
    quants: Vec<Quants>,
    /// Per group, per span of [`BlockMatrix::group`] blocks: the 8 rows' scales (f16 in
    /// every served type): a 32-value type's block scale, a super-block's `d`.
    scales: Vec<[f16; COLS]>,
    /// Per group, per span: the 8 rows' minimums: Q4_1's and Q5_1's `m`, Q4_K's and Q5_K's
    /// `−dmin`.
    mins: Option<Vec<[f16; COLS]>>,
    /// Super-block types, per group, per block: the 8 rows' integer sub-block scales,
    /// [`Packing::subs`] of them (Q6_K's two 16-value halves, one otherwise).
    sub_scales: Option<Vec<[i8; COLS]>>,
    /// Q4_K and Q5_K, per group, per pair of blocks: the 8 rows' 6-bit minimum multipliers,
    /// row by row (byte `2·row + b mod 2`), as the 16-bit pairs `vpmaddwd` takes once widened.
    sub_mins: Option<Vec<[u8; 2 * COLS]>>,
    /// Blocks that share one activation scale and one entry of `scales` (8 for the
    /// super-block types: the K-quants and IQ4_XS, see [`Activations::quantize`]; else 1).
    group: usize,
    /// [`Packing::Lut`]: the value of each index, biased by 128 as Q8_0's bytes.
    table: [u8; 16],
}

/// Input rows quantised to int8 blocks (llama.cpp's Q8_0 activations, with Q8_1's block
/// sums).
struct Activations {
    rows: usize,
    blocks: usize,
    quants: Vec<Quants>,
    scales: Vec<f32>,
    /// Per block: `Σ q`, for the weights' offset.
    totals: Vec<i32>,
    /// Per block: `Σ q` of its first 16 values, for the offset of a weight type with
    /// 16-value sub-blocks (Q6_K).
    firsts: Vec<i32>,
    /// Per block: `scale · Σ q`, the block's sum as the kernel sees it, for the weights'
    /// minimum.
    sums: Vec<f32>,
    /// Per pair of blocks (with `group` > 1): their `Σ q` as two 16-bit halves, for
    /// `vpmaddwd` against a super-block type's minimums.
    pairs: Vec<i32>,
}

/// How each served type is held: its packing, its values' offset, whether it has a
/// per-block minimum.
fn format(file_type: FileType) -> Option<(Packing, i32, bool)> {
    let FileType::Ggml(dtype) = file_type else {
        // Table entries are held as Q8_0's bytes are.
        return Some((Packing::Lut, 128, false));
    };
    Some(match dtype {
        GgmlDType::Q8_0 => (Packing::Int8, 128, false),
        GgmlDType::Q5_0 => (Packing::Fives, 16, false),
        GgmlDType::Q5_1 => (Packing::Fives, 0, true),
        GgmlDType::Q4_0 => (Packing::Nibbles, 8, false),
        GgmlDType::Q4_1 => (Packing::Nibbles, 0, true),
        // Each 32-value sub-block of a K-quant's 256 as a Q4_1 / Q5_1 block.
        GgmlDType::Q4K => (Packing::Nibbles, 0, true),
        GgmlDType::Q5K => (Packing::Fives, 0, true),
        GgmlDType::Q6K => (Packing::Sixes, 32, false),
        _ => return None,
    })
}

/// 32-value blocks in one block of the file's type (8 in a super-block of 256).
fn sub_blocks(file_type: FileType) -> usize {
    file_type.block_size() / BLOCK
}

/// The 6-bit scale and minimum of sub-block `j` of a K-quant super-block (llama.cpp's
/// `get_scale_min_k4`).
fn k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 { (q[j] & 63, q[j + 4] & 63) } else { ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)) }
}

/// One 32-value block as the kernel holds it: a weight is `scale · (q − offset) + min`, or
/// in a super-block type `scale · subs[h] · (q − offset) + min · sub_min`, `h` the block's
/// 16-value half in Q6_K (0 otherwise), `scale` and `min` the super-block's.
struct Unpacked {
    scale: f16,
    min: f16,
    subs: [i8; 2],
    sub_min: u8,
    /// The values as stored (unsigned, before their offset).
    q: [u8; BLOCK],
}

/// Sub-block `sub` (of [`sub_blocks`]) of one block of a served type.
///
/// A super-block type's scales are kept as they are: Q4_K's and Q5_K's sub-block is
/// `d·sc·q − dmin·m` with f16 `d`, `dmin` and 6-bit `sc`, `m`; Q6_K's halves are
/// `d·sc·(q − 32)` with int8 `sc`; IQ4_XS's sub-block is `d·(ls − 32)·v` for table values `v`.
///
/// A table type's values are its indices; MXFP4's scale `2^(e − 128)` is rounded to f16
/// (exact from 2⁻²⁴ to 2¹⁵).
fn unpack_block(file_type: FileType, block: &[u8], sub: usize) -> Unpacked {
    let plain = |scale: f16, min: f16, q: [u8; BLOCK]| Unpacked { scale, min, subs: [1, 1], sub_min: 0, q };
    let f16_at = |i: usize| f16::from_le_bytes([block[i], block[i + 1]]);
    let mut q = [0u8; BLOCK];
    let nibbles = |q: &mut [u8; BLOCK], qs: &[u8]| {
        for j in 0..16 {
            q[j] = qs[j] & 0x0f;
            q[j + 16] = qs[j] >> 4;
        }
    };
    let fifth_bits = |q: &mut [u8; BLOCK], qh: &[u8], qs: &[u8]| {
        nibbles(q, qs);
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for (j, q) in q.iter_mut().enumerate() {
            *q |= (((qh >> j) & 1) << 4) as u8;
        }
    };
    let dtype = match file_type {
        FileType::Ggml(dtype) => dtype,
        // f16 d, 16 bytes of nibbles
        FileType::Iq4Nl => {
            nibbles(&mut q, &block[2..18]);
            return plain(f16_at(0), f16::ZERO, q);
        }
        // f16 d, u16 of high scale bits, 4 bytes of low ones, 128 bytes of nibbles (16 per
        // sub-block)
        FileType::Iq4Xs => {
            let high = u16::from_le_bytes([block[2], block[3]]);
            let ls = ((block[4 + sub / 2] >> (4 * (sub % 2))) & 0x0f) | ((((high >> (2 * sub)) & 3) as u8) << 4);
            nibbles(&mut q, &block[8 + 16 * sub..8 + 16 * sub + 16]);
            let ls = ls as i8 - 32;
            return Unpacked { scale: f16_at(0), min: f16::ZERO, subs: [ls, ls], sub_min: 0, q };
        }
        // u8 exponent, 16 bytes of nibbles
        FileType::Mxfp4 => {
            nibbles(&mut q, &block[1..17]);
            return plain(f16::from_f32((block[0] as f32 - 128.0).exp2()), f16::ZERO, q);
        }
    };
    let min = match dtype {
        // f16 d, 32 × i8
        GgmlDType::Q8_0 => {
            for (q, &b) in q.iter_mut().zip(&block[2..34]) {
                *q = b ^ 0x80;
            }
            None
        }
        // f16 d, 16 bytes of nibbles
        GgmlDType::Q4_0 => {
            nibbles(&mut q, &block[2..18]);
            None
        }
        // f16 d, f16 m, 16 bytes of nibbles
        GgmlDType::Q4_1 => {
            nibbles(&mut q, &block[4..20]);
            Some(f16_at(2))
        }
        // f16 d, u32 of fifth bits, 16 bytes of nibbles
        GgmlDType::Q5_0 => {
            fifth_bits(&mut q, &block[2..6], &block[6..22]);
            None
        }
        // f16 d, f16 m, u32 of fifth bits, 16 bytes of nibbles
        GgmlDType::Q5_1 => {
            fifth_bits(&mut q, &block[4..8], &block[8..24]);
            Some(f16_at(2))
        }
        // f16 d, f16 dmin, 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles:
        // sub-blocks 2c and 2c + 1 are the low and high nibbles of bytes 32c..32c + 32.
        // Q5_K: 32 bytes of fifth bits (bit s of byte l for sub-block s) before the nibbles.
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let (sc, m) = k_scale_min(sub, &block[4..16]);
            let (qh, qs) = if dtype == GgmlDType::Q5K { (Some(&block[16..48]), &block[48..176]) } else { (None, &block[16..144]) };
            let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
            for (l, q) in q.iter_mut().enumerate() {
                *q = if sub.is_multiple_of(2) { bytes[l] & 0x0f } else { bytes[l] >> 4 };
                if let Some(qh) = qh {
                    *q |= ((qh[l] >> sub) & 1) << 4;
                }
            }
            return Unpacked { scale: f16_at(0), min: -f16_at(2), subs: [sc as i8, sc as i8], sub_min: m, q };
        }
        // 128 bytes of low nibbles, 64 of top bit pairs, 16 int8 scales, f16 d. Each 128
        // values (n) take 64 low bytes and 32 top bytes: sub-block 4n + k's value l is the
        // low (k < 2) or high nibble of low byte 64n + 32(k mod 2) + l, with bits 2k..2k + 1
        // of top byte 32n + l above it, and scale 8n + 2k + l / 16 (ggml's
        // `dequantize_row_q6_K`).
        GgmlDType::Q6K => {
            let (n, k) = (sub / 4, sub % 4);
            let (ql, qh, sc) = (&block[64 * n + 32 * (k % 2)..], &block[128 + 32 * n..], &block[192 + 8 * n + 2 * k..]);
            for (l, q) in q.iter_mut().enumerate() {
                let low = if k < 2 { ql[l] & 0x0f } else { ql[l] >> 4 };
                *q = low | (((qh[l] >> (2 * k)) & 3) << 4);
            }
            return Unpacked { scale: f16_at(208), min: f16::ZERO, subs: [sc[0] as i8, sc[1] as i8], sub_min: 0, q };
        }
        _ => unreachable!("{file_type} is not a served type"),
    };
    plain(f16_at(0), min.unwrap_or(f16::ZERO), q)
}

impl Activations {
    const fn new() -> Activations {
        Activations {
            rows: 0,
            blocks: 0,
            quants: Vec::new(),
            scales: Vec::new(),
            totals: Vec::new(),
            firsts: Vec::new(),
            sums: Vec::new(),
            pairs: Vec::new(),
        }
    }

    /// Quantises rows of `cols` values (per block: `scale = max|x| / 127`,
    /// `q = round(x / scale)`, ties to even), reusing the buffers. With `group` > 1, the
    /// `max|x|` is taken over `group` blocks at a time (llama.cpp's Q8_K activations of
    /// its K-quant dot products: one scale per 256 values), so a K-quant's products round
    /// as llama.cpp's do.
    fn quantize(&mut self, xs: &[f32], cols: usize, group: usize) {
        debug_assert!(cols.is_multiple_of(BLOCK) && xs.len().is_multiple_of(cols));
        self.rows = xs.len() / cols;
        self.blocks = cols / BLOCK;
        let n = xs.len() / BLOCK;
        self.quants.resize(n, ZERO);
        self.scales.resize(n, 0.0);
        self.totals.resize(n, 0);
        self.firsts.resize(n, 0);
        self.sums.resize(n, 0.0);
        let blocks = xs.chunks_exact(BLOCK).zip(&mut self.quants).zip(&mut self.scales).zip(&mut self.totals).zip(&mut self.firsts);
        let mut floor = 0f32;
        for (i, (((((x, q), d), total), first), sum)) in blocks.zip(&mut self.sums).enumerate() {
            if group > 1 && i.is_multiple_of(group) {
                floor = xs[i * BLOCK..(i + group) * BLOCK].iter().fold(0f32, |m, v| m.max(v.abs()));
            }
            let x = x.try_into().expect("chunks of BLOCK");
            #[cfg(avx2_kernels)]
            // SAFETY: the features are enabled at compile time (cfg(avx2_kernels)).
            let (scale, t, f) = unsafe { simd::quantize_block(x, floor, q) };
            #[cfg(not(avx2_kernels))]
            let (scale, t, f) = quantize_block(x, floor, q);
            (*d, *total, *first, *sum) = (scale, t, f, scale * t as f32);
        }
        if group > 1 {
            // |Σ q| ≤ 32 · 127: each fits 16 bits.
            let pairs = self.totals.chunks_exact(2).map(|t| ((t[0] as u16 as u32) | ((t[1] as u16 as u32) << 16)) as i32);
            self.pairs.clear();
            self.pairs.extend(pairs);
        }
    }
}

/// One block of activations to int8: its quants, scale, `Σ q` and `Σ q` of the first 16
/// (the SIMD version gets the same bits, tested).
#[cfg_attr(avx2_kernels, allow(dead_code, reason = "tested against the SIMD version"))]
fn quantize_block(x: &[f32; BLOCK], floor: f32, q: &mut Quants) -> (f32, i32, i32) {
    let amax = x.iter().fold(floor, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (mut total, mut first) = (0, 0);
    for (i, (q, &v)) in q.0.iter_mut().zip(x).enumerate() {
        let r = (v * id).round_ties_even() as i8;
        total += r as i32;
        if i < BLOCK / 2 {
            first += r as i32;
        }
        *q = r as u8;
    }
    (d, total, first)
}

thread_local! {
    /// The quantised input rows, reused across calls (one buffer per calling thread).
    static SCRATCH: std::cell::RefCell<Activations> = const { std::cell::RefCell::new(Activations::new()) };
}

impl BlockMatrix {
    /// Whether this kernel takes weights of `file_type` (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q4_K,
    /// Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4).
    pub fn serves(file_type: FileType) -> bool {
        format(file_type).is_some()
    }

    /// The `rows × cols` weights of a served type, read from `reader` (positioned at the
    /// tensor's data, GGUF layout: row-major blocks) a few row groups at a time and
    /// repacked as they come: the file's bytes are never all in memory beside the result.
    pub fn read(reader: &mut impl std::io::Read, dtype: FileType, rows: usize, cols: usize) -> Result<BlockMatrix> {
        /// Bytes read at once.
        const CHUNK: usize = 1 << 20;
        let Some((packing, offset, with_min)) = format(dtype) else {
            candle_core::bail!("{dtype} weights are not served by the block kernel")
        };
        if !cols.is_multiple_of(dtype.block_size()) {
            candle_core::bail!("row length {cols} is not a multiple of {dtype}'s block of {}", dtype.block_size())
        }
        let subs = sub_blocks(dtype);
        let blocks = cols / BLOCK;
        let tiles = rows.div_ceil(COLS) * blocks;
        let spans = tiles / subs;
        let regs = packing.registers();
        let mut m = BlockMatrix {
            rows,
            blocks,
            packing,
            offset,
            quants: vec![ZERO; tiles * regs],
            scales: vec![[f16::ZERO; COLS]; spans],
            mins: with_min.then(|| vec![[f16::ZERO; COLS]; spans]),
            sub_scales: (subs > 1).then(|| vec![[0; COLS]; tiles * packing.subs()]),
            sub_mins: (subs > 1 && with_min).then(|| vec![[0; 2 * COLS]; tiles / 2]),
            group: subs,
            table: dtype.table().map_or([0; 16], |t| t.map(|v| (v as u8) ^ 0x80)),
        };
        let block_bytes = dtype.type_size();
        let row_bytes = cols / dtype.block_size() * block_bytes;
        let rows_per_read = (CHUNK / row_bytes.max(1)).max(1);
        let mut buf = vec![0u8; rows_per_read.min(rows) * row_bytes];
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(rows_per_read);
            let bytes = &mut buf[..n * row_bytes];
            reader.read_exact(bytes)?;
            for row in bytes.chunks_exact(row_bytes) {
                let (group, lane) = (r / COLS, r % COLS);
                for (b, sub, block) in
                    row.chunks_exact(block_bytes).enumerate().flat_map(|(b, block)| (0..subs).map(move |s| (b, s, block)))
                {
                    let tile = group * blocks + b * subs + sub;
                    let span = tile / subs;
                    let Unpacked { scale: d, min, subs: sub_scales, sub_min, q } = unpack_block(dtype, block, sub);
                    if !d.is_finite() || !min.is_finite() {
                        candle_core::bail!("{dtype} row {r} has a scale beyond f16's range ({d}, {min})")
                    }
                    m.scales[span][lane] = d;
                    if let Some(mins) = &mut m.mins {
                        mins[span][lane] = min;
                    }
                    if let Some(s) = &mut m.sub_scales {
                        for (h, &sc) in sub_scales[..packing.subs()].iter().enumerate() {
                            s[tile * packing.subs() + h][lane] = sc;
                        }
                    }
                    if let Some(s) = &mut m.sub_mins {
                        s[tile / 2][2 * lane + tile % 2] = sub_min;
                    }
                    for (g, quad) in q.chunks_exact(4).enumerate() {
                        let (reg, shift) = packing.place(g);
                        for (e, &u) in quad.iter().enumerate() {
                            let byte = lane * 4 + e;
                            m.quants[tile * regs + reg].0[byte] |= (u & packing.mask()) << shift;
                            match packing {
                                Packing::Fives => m.quants[tile * regs + FIFTHS].0[byte] |= (u >> 4) << g,
                                Packing::Sixes => m.quants[tile * regs + HIGHS + g / 4].0[byte] |= (u >> 4) << (2 * (g % 4)),
                                _ => {}
                            }
                        }
                    }
                }
                r += 1;
            }
        }
        Ok(m)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row length in elements.
    pub fn cols(&self) -> usize {
        self.blocks * BLOCK
    }

    /// The integer weights of quad `g` (inputs `4g..4g + 4`) of row `lane` in a tile.
    fn quad(&self, tile: usize, g: usize, lane: usize) -> [i32; 4] {
        let (reg, shift) = self.packing.place(g);
        let block = &self.quants[tile * self.packing.registers()..];
        std::array::from_fn(|e| {
            let mut u = (block[reg].0[lane * 4 + e] >> shift) & self.packing.mask();
            match self.packing {
                Packing::Fives => u |= ((block[FIFTHS].0[lane * 4 + e] >> g) & 1) << 4,
                Packing::Sixes => u |= ((block[HIGHS + g / 4].0[lane * 4 + e] >> (2 * (g % 4))) & 3) << 4,
                _ => {}
            }
            if self.packing == Packing::Lut {
                u = self.table[u as usize];
            }
            u as i32 - self.offset
        })
    }

    /// The scale and minimum (0 without one) of row `lane` in the span of a tile.
    fn scale_and_min(&self, tile: usize, lane: usize) -> (f32, f32) {
        let span = tile / self.group;
        (self.scales[span][lane].to_f32(), self.mins.as_ref().map_or(0.0, |m| m[span][lane].to_f32()))
    }

    /// The integer sub-block scale of quad `g` of row `lane` in a tile (1 without them).
    fn sub_scale(&self, tile: usize, g: usize, lane: usize) -> i32 {
        let subs = self.packing.subs();
        self.sub_scales.as_ref().map_or(1, |s| s[tile * subs + g * subs / COLS][lane] as i32)
    }

    /// The integer minimum multiplier of row `lane` in a tile (0 without them).
    fn sub_min(&self, tile: usize, lane: usize) -> i32 {
        self.sub_mins.as_ref().map_or(0, |s| s[tile / 2][2 * lane + tile % 2] as i32)
    }

    /// Dequantised rows `ids`, as `(ids.len(), cols)` f32 values (an embedding lookup).
    pub fn gather(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * self.cols());
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("token id {id} is out of range for {} rows", self.rows)
            }
            let (group, lane) = (id / COLS, id % COLS);
            for b in 0..self.blocks {
                let tile = group * self.blocks + b;
                let (d, min) = self.scale_and_min(tile, lane);
                if self.sub_scales.is_none() {
                    for g in 0..COLS {
                        out.extend(self.quad(tile, g, lane).map(|q| d.mul_add(q as f32, min)));
                    }
                    continue;
                }
                // As ggml's `dequantize_row_*` of these types: `(d · sc) · q − dmin · m`.
                let min = min * self.sub_min(tile, lane) as f32;
                for g in 0..COLS {
                    let d = d * self.sub_scale(tile, g, lane) as f32;
                    out.extend(self.quad(tile, g, lane).map(|q| d * q as f32 + min));
                }
            }
        }
        Ok(out)
    }

    /// `x Wᵀ` for `x` of shape `(..., in)`, f32 on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (k, n) = (self.cols(), self.rows);
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("matmul: input rows have {:?} values, weights {k}", dims.last())
        }
        let mut out = vec![0f32; x.elem_count() / k * n];
        super::ops::with_cpu_f32(x, |xs| {
            SCRATCH.with(|scratch| {
                let mut xq = scratch.borrow_mut();
                xq.quantize(xs, k, self.group);
                matmul(&xq, self, &mut out, Kernel::FASTEST);
            })
        })?;
        *dims.last_mut().expect("checked above") = n;
        Tensor::from_vec(out, dims, &Device::Cpu)
    }
}

/// The code that computes the tiles. Each gets the same bits (tested).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    /// Plain Rust, for CPUs without AVX2.
    #[cfg_attr(avx2_kernels, allow(dead_code, reason = "tested against the SIMD kernels"))]
    Plain,
    /// AVX2: `vpmaddubsw` + `vpmaddwd` for the byte dot products.
    #[cfg(avx2_kernels)]
    #[cfg_attr(vnni_kernels, allow(dead_code, reason = "tested against VNNI"))]
    Avx2,
    /// VNNI: one `vpdpbusd` for them (AVX-VNNI's encoding, or AVX512-VNNI's on 256-bit
    /// registers).
    #[cfg(vnni_kernels)]
    Vnni,
}

impl Kernel {
    /// The fastest this build's CPU features allow (`target-cpu=native`, see
    /// `.cargo/config.toml`).
    const FASTEST: Kernel = {
        #[cfg(vnni_kernels)]
        let fastest = Kernel::Vnni;
        #[cfg(all(avx2_kernels, not(vnni_kernels)))]
        let fastest = Kernel::Avx2;
        #[cfg(not(avx2_kernels))]
        let fastest = Kernel::Plain;
        fastest
    };
}

/// Groups of output rows one worker takes at a time.
const PANEL: usize = 2;

/// Input rows per register tile (as many integer sums and accumulators in registers): 8
/// with AVX-512VL's 32 vector registers (the 8-stream decode step 5 % faster than with 4),
/// else 4 of AVX2's 16.
const RM: usize = if cfg!(target_feature = "avx512vl") { 8 } else { 4 };

/// `out (m × n) = x (m × k) · wᵀ (k × n)`, on candle's worker threads.
fn matmul(x: &Activations, w: &BlockMatrix, out: &mut [f32], kernel: Kernel) {
    assert_eq!(x.blocks, w.blocks);
    assert_eq!(out.len(), x.rows * w.rows);
    let dst = super::ops::SyncPtr(out.as_mut_ptr());
    let groups = w.rows.div_ceil(COLS);
    candle_core::utils::barrier_pool().execute_chunked(groups.div_ceil(PANEL), |panels| {
        for group in panels.start * PANEL..(panels.end * PANEL).min(groups) {
            let mut i = 0;
            while i < x.rows {
                let rm = (x.rows - i).min(RM);
                let t = Tile { x, w, i, group };
                // SAFETY: groups are disjoint, so no two workers write the same element;
                // `out` has x.rows × w.rows elements (asserted above).
                unsafe {
                    match kernel {
                        Kernel::Plain => plain(t, rm, dst.get()),
                        #[cfg(avx2_kernels)]
                        Kernel::Avx2 => simd::tiles::<false>(t, rm, dst.get()),
                        #[cfg(vnni_kernels)]
                        Kernel::Vnni => simd::tiles::<true>(t, rm, dst.get()),
                    }
                }
                i += rm;
            }
        }
    });
}

/// One register tile: input rows `i..i + rm` × the 8 output rows of `group`.
struct Tile<'a> {
    x: &'a Activations,
    w: &'a BlockMatrix,
    i: usize,
    group: usize,
}

impl Tile<'_> {
    /// Writes a row's 8 results, leaving out the padding rows of the last group.
    ///
    /// # Safety
    /// `out` must hold `x.rows × w.rows` elements.
    unsafe fn store(&self, out: *mut f32, row: usize, lanes: &[f32; COLS]) {
        let first = self.group * COLS;
        let n = (self.w.rows - first).min(COLS);
        for (c, &v) in lanes[..n].iter().enumerate() {
            // SAFETY: row < the tile's rows and first + c < w.rows, so the offset is inside
            // the x.rows × w.rows buffer the caller guarantees; this tile's group owns it.
            unsafe { *out.add((self.i + row) * self.w.rows + first + c) = v };
        }
    }
}

/// A tile in plain Rust, the same arithmetic per output element as the SIMD kernels: an
/// integer sum per span of blocks (a super-block's sub-blocks multiplied by their integer
/// scales), scaled and accumulated in span order.
///
/// # Safety
/// `out` must hold `x.rows × w.rows` elements, and no other thread may write this tile's
/// outputs while it runs.
unsafe fn plain(t: Tile<'_>, rows: usize, out: *mut f32) {
    let (kb, span) = (t.x.blocks, t.w.group);
    for row in 0..rows {
        let xi = (t.i + row) * kb;
        let mut acc = [0f32; COLS];
        for first in (0..kb).step_by(span) {
            for (lane, acc) in acc.iter_mut().enumerate() {
                let (mut sum, mut mins) = (0i32, 0i32);
                for b in first..first + span {
                    let tile = t.group * kb + b;
                    let xq = &t.x.quants[xi + b].0;
                    for g in 0..COLS {
                        let mut quad = 0i32;
                        for (e, w) in t.w.quad(tile, g, lane).into_iter().enumerate() {
                            quad += w * xq[g * 4 + e] as i8 as i32;
                        }
                        sum += t.w.sub_scale(tile, g, lane) * quad;
                    }
                    mins += t.w.sub_min(tile, lane) * t.x.totals[xi + b];
                }
                let (d, min) = t.w.scale_and_min(t.group * kb + first, lane);
                let xd = t.x.scales[xi + first];
                *acc = (sum as f32).mul_add(d * xd, *acc);
                if t.w.sub_mins.is_some() {
                    *acc = (mins as f32).mul_add(min * xd, *acc);
                } else if t.w.mins.is_some() {
                    *acc = min.mul_add(t.x.sums[xi + first], *acc);
                }
            }
        }
        // SAFETY: the caller guarantees `out` holds x.rows × w.rows elements.
        unsafe { t.store(out, row, &acc) };
    }
}

/// The x86 kernels.
#[cfg(avx2_kernels)]
mod simd {
    use super::{COLS, FIFTHS, HIGHS, Packing, Quants, Tile};
    use std::arch::x86_64::*;

    /// How far ahead of the block in use its weights are prefetched, in bytes. A decode
    /// step (one input row) reads every weight once, so the loop waits on memory; the
    /// hardware prefetchers alone left decode at 0.85× llama.cpp on a Zen 5 VM, and asking
    /// for the weights 4–8 KiB ahead made it 13–35 % faster (measured at 0.4–10 KiB).
    const PREFETCH: usize = 6 << 10;

    /// The packings as const parameters.
    const INT8: u8 = 0;
    const NIBBLES: u8 = 1;
    const FIVES: u8 = 2;
    const LUT: u8 = 3;
    const SIXES: u8 = 4;

    /// A tile of `rows` (1..=RM) input rows, by packing and row count.
    ///
    /// # Safety
    /// As for [`super::plain`].
    #[inline(always)]
    pub(super) unsafe fn tiles<const VNNI: bool>(t: Tile<'_>, rows: usize, out: *mut f32) {
        // SAFETY: passed on from the caller.
        unsafe {
            match t.w.packing {
                Packing::Int8 => by_rows::<VNNI, INT8>(t, rows, out),
                Packing::Nibbles => by_rows::<VNNI, NIBBLES>(t, rows, out),
                Packing::Fives => by_rows::<VNNI, FIVES>(t, rows, out),
                Packing::Lut => by_rows::<VNNI, LUT>(t, rows, out),
                Packing::Sixes => by_rows::<VNNI, SIXES>(t, rows, out),
            }
        }
    }

    #[inline(always)]
    unsafe fn by_rows<const VNNI: bool, const P: u8>(t: Tile<'_>, rows: usize, out: *mut f32) {
        // SAFETY: passed on from the caller.
        unsafe {
            match rows {
                8 => tile::<VNNI, P, 8>(t, out),
                7 => tile::<VNNI, P, 7>(t, out),
                6 => tile::<VNNI, P, 6>(t, out),
                5 => tile::<VNNI, P, 5>(t, out),
                4 => tile::<VNNI, P, 4>(t, out),
                3 => tile::<VNNI, P, 3>(t, out),
                2 => tile::<VNNI, P, 2>(t, out),
                _ => tile::<VNNI, P, 1>(t, out),
            }
        }
    }

    /// `acc + Σ u · x` over each 32-bit lane's 4 byte pairs, `u` unsigned and `x` signed.
    /// Exact both ways for `u` ≤ 128 and `|x|` ≤ 127 (`vpmaddubsw`'s 16-bit pair sums
    /// saturate past 32767); `vpdpbusd` takes any `u`.
    #[inline(always)]
    unsafe fn dot<const VNNI: bool>(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the instructions' features are enabled at compile time (cfg(avx2_kernels),
        // and cfg(vnni_kernels) for `vpdpbusd`); they touch only registers.
        unsafe {
            #[cfg(all(vnni_kernels, target_feature = "avxvnni"))]
            if VNNI {
                return _mm256_dpbusd_avx_epi32(acc, u, x);
            }
            #[cfg(all(vnni_kernels, not(target_feature = "avxvnni")))]
            if VNNI {
                return _mm256_dpbusd_epi32(acc, u, x);
            }
            _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)))
        }
    }

    /// `acc + Σ a · b` over each 32-bit lane's 2 pairs of signed 16-bit values.
    #[inline(always)]
    unsafe fn dot16<const VNNI: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: as for `dot`.
        unsafe {
            #[cfg(all(vnni_kernels, target_feature = "avxvnni"))]
            if VNNI {
                return _mm256_dpwssd_avx_epi32(acc, a, b);
            }
            #[cfg(all(vnni_kernels, not(target_feature = "avxvnni")))]
            if VNNI {
                return _mm256_dpwssd_epi32(acc, a, b);
            }
            _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
        }
    }

    /// `acc + w · x` for bytes `w` biased by 128 (Q8_0's, a table's entries) under AVX2,
    /// whose 16-bit pair sums would overflow on full bytes: unbiased, as
    /// `|w| · (x with w's sign)` in the unsigned × signed form, each byte under 129.
    #[inline(always)]
    unsafe fn signed_dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: register-only instructions of cfg(avx2_kernels).
        unsafe {
            let w = _mm256_xor_si256(w, _mm256_set1_epi8(i8::MIN));
            dot::<false>(acc, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
        }
    }

    /// [`super::quantize_block`], 32 values at a time (llama.cpp's AVX2 `quantize_row_q8_0`).
    ///
    /// # Safety
    /// Needs the features of cfg(avx2_kernels).
    #[inline(always)]
    pub(super) unsafe fn quantize_block(x: &[f32; super::BLOCK], floor: f32, q: &mut Quants) -> (f32, i32, i32) {
        // SAFETY: the loads read x's 32 values and the aligned store writes q's 32 bytes.
        unsafe {
            let p = x.as_ptr();
            let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let sign = _mm256_set1_ps(-0.0);
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))).max(floor);
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let i = v.map(|v| _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
            let sum = |t: __m256i| {
                let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
                let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
                _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)))
            };
            let first = _mm256_add_epi32(i[0], i[1]);
            let (first, total) = (sum(first), sum(_mm256_add_epi32(first, _mm256_add_epi32(i[2], i[3]))));
            // The packs interleave 128-bit lanes: dwords 0, 4, 1, 5, ... back in order.
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_store_si256(q.0.as_mut_ptr() as *mut __m256i, bytes);
            (d, total, first)
        }
    }

    /// Inputs `4g..4g + 4` of an activation block, in every lane.
    #[inline(always)]
    unsafe fn quad(block: *const Quants, g: usize) -> __m256i {
        // SAFETY: g < 8, inside the 32-byte block the caller points at.
        unsafe { _mm256_set1_epi32((block as *const i32).add(g).read_unaligned()) }
    }

    /// One tile: R rows of x against the 8 outputs of w's group, w held as `P`.
    ///
    /// # Safety
    /// As for [`super::plain`].
    #[inline(always)]
    unsafe fn tile<const VNNI: bool, const P: u8, const R: usize>(t: Tile<'_>, out: *mut f32) {
        let (kb, span) = (t.x.blocks, t.w.group);
        let regs = t.w.packing.registers();
        let subs = t.w.packing.subs();
        // SAFETY: the features are enabled at compile time (cfg(avx2_kernels)). The quants, scales,
        // totals and sums are read at rows i..i+R of x and group `group` of w, all inside
        // their buffers (R rows remain from i, and the repacked w holds kb × regs vectors
        // per group, 32-byte aligned for the aligned load, kb / span scales and kb × subs
        // sub-block scales); `store` writes only this tile's outputs.
        unsafe {
            let xq = t.x.quants.as_ptr().add(t.i * kb);
            let xd = t.x.scales.as_ptr().add(t.i * kb);
            let xt = t.x.totals.as_ptr().add(t.i * kb);
            let xs = t.x.sums.as_ptr().add(t.i * kb);
            let xf = t.x.firsts.as_ptr().add(t.i * kb);
            let wq = t.w.quants.as_ptr().add(t.group * kb * regs) as *const __m256i;
            let wd = t.w.scales.as_ptr().add(t.group * kb / span);
            let wm = t.w.mins.as_ref().map(|m| m.as_ptr().add(t.group * kb / span));
            let wsc = t.w.sub_scales.as_ref().map_or(std::ptr::null(), |s| s.as_ptr().add(t.group * kb * subs));
            let wsm = t.w.sub_mins.as_ref().map_or(std::ptr::null(), |s| s.as_ptr().add(t.group * kb / 2));
            let xp = t.x.pairs.as_ptr().add(t.i * kb / 2);
            // Eight int8 sub-block scales, one per lane.
            let widen = |p: *const [i8; COLS]| _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i));
            let offset = t.w.offset;
            let low = _mm256_set1_epi8(0x0f);
            let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.w.table.as_ptr() as *const __m128i));
            let mut acc = [_mm256_setzero_ps(); R];
            for first in (0..kb).step_by(span) {
                // The span's integer sums: of the products, and of the minimums' products.
                let mut sums = [_mm256_setzero_si256(); R];
                let mut mins = [_mm256_setzero_si256(); R];
                for b in first..first + span {
                    let x = |row: usize| xq.add(row * kb + b);
                    // The weights PREFETCH bytes ahead, a cache line per two registers (past
                    // the group's end: the next group's, in memory order).
                    for r in (0..regs).step_by(2) {
                        _mm_prefetch::<_MM_HINT_T0>(wq.wrapping_add(b * regs + r + PREFETCH / 32) as *const i8);
                    }
                    let mut block = [_mm256_setzero_si256(); R];
                    if P == SIXES {
                        // Quad g's top bits (bits 2(g mod 4).. of `highs`) as bits 4-5 of each
                        // byte; the 16-bit shifts move nothing across bytes into those bits.
                        let top = |highs: __m256i, k: usize| {
                            let h = match k {
                                0 => _mm256_slli_epi16::<4>(highs),
                                1 => _mm256_slli_epi16::<2>(highs),
                                2 => highs,
                                _ => _mm256_srli_epi16::<2>(highs),
                            };
                            _mm256_and_si256(h, _mm256_set1_epi8(0x30))
                        };
                        // The two 16-value halves apart: quads 0-3 are the low nibbles, 4-7 the
                        // high ones. Each half's sum loses its offset (32 · Σx of the half) and
                        // is multiplied by the half's int8 scale, as integers.
                        for half in 0..2 {
                            let highs = _mm256_load_si256(wq.add(b * regs + HIGHS + half));
                            let mut part = [_mm256_setzero_si256(); R];
                            for p in 0..COLS / 2 {
                                let w = _mm256_load_si256(wq.add(b * regs + p));
                                let w = if half == 0 { w } else { _mm256_srli_epi16::<4>(w) };
                                let w = _mm256_or_si256(_mm256_and_si256(w, low), top(highs, p));
                                for (row, part) in part.iter_mut().enumerate() {
                                    *part = dot::<VNNI>(*part, w, quad(x(row), p + half * COLS / 2));
                                }
                            }
                            let scales = widen(wsc.add(b * subs + half));
                            for (row, block) in block.iter_mut().enumerate() {
                                let first = *xf.add(row * kb + b);
                                let x_total = if half == 0 { first } else { *xt.add(row * kb + b) - first };
                                let part = _mm256_sub_epi32(part[row], _mm256_set1_epi32(offset * x_total));
                                *block = _mm256_add_epi32(*block, _mm256_mullo_epi32(part, scales));
                            }
                        }
                    } else if P == NIBBLES || P == FIVES || P == LUT {
                        let fifths = if P == FIVES { _mm256_load_si256(wq.add(b * regs + FIFTHS)) } else { _mm256_setzero_si256() };
                        // Quad g's fifth bits as 0x10 in each byte.
                        let fifth = |g: usize| {
                            let bit = _mm256_set1_epi8((1u8 << g) as i8);
                            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(fifths, bit), bit), _mm256_set1_epi8(0x10))
                        };
                        for p in 0..COLS / 2 {
                            let w = _mm256_load_si256(wq.add(b * regs + p));
                            let mut lo = _mm256_and_si256(w, low);
                            let mut hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                            if P == FIVES {
                                lo = _mm256_or_si256(lo, fifth(p));
                                hi = _mm256_or_si256(hi, fifth(p + COLS / 2));
                            }
                            if P == LUT {
                                // Each index's table entry (biased by 128, as Q8_0's bytes).
                                lo = _mm256_shuffle_epi8(table, lo);
                                hi = _mm256_shuffle_epi8(table, hi);
                            }
                            for (row, block) in block.iter_mut().enumerate() {
                                if P == LUT && !VNNI {
                                    *block = signed_dot(*block, lo, quad(x(row), p));
                                    *block = signed_dot(*block, hi, quad(x(row), p + COLS / 2));
                                } else {
                                    *block = dot::<VNNI>(*block, lo, quad(x(row), p));
                                    *block = dot::<VNNI>(*block, hi, quad(x(row), p + COLS / 2));
                                }
                            }
                        }
                    } else {
                        for g in 0..COLS {
                            let w = _mm256_load_si256(wq.add(b * regs + g));
                            if P == INT8 && !VNNI {
                                for (row, block) in block.iter_mut().enumerate() {
                                    *block = signed_dot(*block, w, quad(x(row), g));
                                }
                            } else {
                                for (row, block) in block.iter_mut().enumerate() {
                                    *block = dot::<VNNI>(*block, w, quad(x(row), g));
                                }
                            }
                        }
                    }
                    // The offset of the stored values (taken off biased bytes already under AVX2).
                    if offset != 0 && P != SIXES && (P == NIBBLES || P == FIVES || VNNI) {
                        for (row, block) in block.iter_mut().enumerate() {
                            *block = _mm256_sub_epi32(*block, _mm256_set1_epi32(offset * *xt.add(row * kb + b)));
                        }
                    }
                    // A super-block's sub-block: times its integer scale (Q6_K's halves have
                    // theirs already).
                    if P != SIXES && !wsc.is_null() {
                        let scales = widen(wsc.add(b));
                        for block in &mut block {
                            *block = _mm256_mullo_epi32(*block, scales);
                        }
                    }
                    for (sum, block) in sums.iter_mut().zip(block) {
                        *sum = _mm256_add_epi32(*sum, block);
                    }
                }
                // The minimums' products `Σ m · Σx`, two blocks at a time.
                if !wsm.is_null() {
                    for pair in (first..first + span).step_by(2).map(|b| b / 2) {
                        let m = _mm256_cvtepu8_epi16(_mm_loadu_si128(wsm.add(pair) as *const __m128i));
                        for (row, mins) in mins.iter_mut().enumerate() {
                            *mins = dot16::<VNNI>(*mins, m, _mm256_set1_epi32(*xp.add(row * kb / 2 + pair)));
                        }
                    }
                }
                let ws = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(first / span) as *const __m128i));
                for (row, acc) in acc.iter_mut().enumerate() {
                    let d = _mm256_mul_ps(ws, _mm256_set1_ps(*xd.add(row * kb + first)));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[row]), d, *acc);
                }
                if let Some(wm) = wm {
                    let mv = _mm256_cvtph_ps(_mm_loadu_si128(wm.add(first / span) as *const __m128i));
                    for (row, acc) in acc.iter_mut().enumerate() {
                        *acc = if wsm.is_null() {
                            _mm256_fmadd_ps(mv, _mm256_set1_ps(*xs.add(row * kb + first)), *acc)
                        } else {
                            let d = _mm256_mul_ps(mv, _mm256_set1_ps(*xd.add(row * kb + first)));
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins[row]), d, *acc)
                        };
                    }
                }
            }
            for (row, &a) in acc.iter().enumerate() {
                let mut lanes = [0f32; COLS];
                _mm256_storeu_ps(lanes.as_mut_ptr(), a);
                t.store(out, row, &lanes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    fn seeded(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 7) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// The block types the kernel takes.
    const TYPES: [FileType; 11] = [
        FileType::Ggml(GgmlDType::Q8_0),
        FileType::Ggml(GgmlDType::Q5_0),
        FileType::Ggml(GgmlDType::Q5_1),
        FileType::Ggml(GgmlDType::Q4_0),
        FileType::Ggml(GgmlDType::Q4_1),
        FileType::Ggml(GgmlDType::Q4K),
        FileType::Ggml(GgmlDType::Q5K),
        FileType::Ggml(GgmlDType::Q6K),
        FileType::Iq4Nl,
        FileType::Iq4Xs,
        FileType::Mxfp4,
    ];

    /// A row length of whole blocks for `dtype`.
    fn row_length(dtype: FileType, short: usize) -> usize {
        if dtype.block_size() == 256 { 768 } else { short }
    }

    /// A seeded n × k matrix of `dtype`, repacked, and its values as ggml dequantises
    /// them: candle's for the types it knows, else llama.cpp's `dequantize_row_*` (from
    /// seeded block bytes with plausible scales: candle cannot quantise these types).
    fn weights(n: usize, k: usize, seed: u32, dtype: FileType) -> (BlockMatrix, Vec<f32>) {
        let (bytes, want) = match dtype {
            FileType::Ggml(d) => {
                let t = Tensor::from_vec(seeded(n * k, seed), (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&t, d).unwrap();
                let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (q.data().unwrap().to_vec(), want)
            }
            _ => table_blocks(n * k / dtype.block_size(), seed, dtype),
        };
        (BlockMatrix::read(&mut std::io::Cursor::new(&bytes[..]), dtype, n, k).unwrap(), want)
    }

    /// `blocks` seeded blocks of a table type and their values (ggml-quants.c).
    fn table_blocks(blocks: usize, seed: u32, dtype: FileType) -> (Vec<u8>, Vec<f32>) {
        let noise = seeded(blocks * dtype.type_size(), seed);
        let mut bytes: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        let mut want = Vec::new();
        for (i, block) in bytes.chunks_exact_mut(dtype.type_size()).enumerate() {
            let d = 0.001 + 0.0005 * (i % 7) as f32;
            let half = |v: f32| f16::from_f32(v).to_le_bytes();
            let nibbles = |qs: &[u8], scale: f32, table: &[i8; 16], out: &mut Vec<f32>| {
                out.extend(qs.iter().map(|q| scale * table[(q & 15) as usize] as f32));
                out.extend(qs.iter().map(|q| scale * table[(q >> 4) as usize] as f32));
            };
            match dtype {
                FileType::Iq4Nl => {
                    block[..2].copy_from_slice(&half(d));
                    nibbles(&block[2..18], f16::from_f32(d).to_f32(), &IQ4NL_VALUES, &mut want);
                }
                FileType::Iq4Xs => {
                    block[..2].copy_from_slice(&half(d));
                    let d = f16::from_f32(d).to_f32();
                    let high = u16::from_le_bytes([block[2], block[3]]);
                    for ib in 0..8 {
                        let ls = ((block[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32 | (((high >> (2 * ib)) & 3) as i32) << 4;
                        nibbles(&block[8 + 16 * ib..24 + 16 * ib], d * (ls - 32) as f32, &IQ4NL_VALUES, &mut want);
                    }
                }
                FileType::Mxfp4 => {
                    block[0] = 118 + (i % 9) as u8;
                    nibbles(&block[1..17], (block[0] as f32 - 128.0).exp2(), &FP4_VALUES, &mut want);
                }
                FileType::Ggml(_) => unreachable!(),
            }
        }
        (bytes, want)
    }

    fn activations(xs: &[f32], k: usize, group: usize) -> Activations {
        let mut a = Activations::new();
        a.quantize(xs, k, group);
        a
    }

    #[test]
    fn weights_unpack_to_candles_dequantised_values() {
        for dtype in TYPES {
            // 13 rows: one full group of 8 and one padded group.
            let k = if dtype.block_size() == 256 { 512 } else { 96 };
            let (w, want) = weights(13, k, 3, dtype);
            let ids: Vec<u32> = (0..13).collect();
            let got = w.gather(&ids).unwrap();
            let amax = want.iter().fold(0f32, |m, w| m.max(w.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // Q4_1's and Q5_1's d·q + m is one fused step here, two roundings in candle.
                assert!((g - w).abs() <= 1e-6 * amax.max(1.0), "{dtype} [{i}]: {g} vs {w}");
            }
            if !matches!(dtype, FileType::Ggml(GgmlDType::Q4_1 | GgmlDType::Q5_1)) {
                assert_eq!(got, want, "{dtype} widens exactly");
            }
            assert!(w.gather(&[13]).is_err());
        }
        let q3k = FileType::Ggml(GgmlDType::Q3K);
        assert!(!BlockMatrix::serves(q3k), "Q3_K stays with candle");
        assert!(BlockMatrix::read(&mut std::io::Cursor::new(vec![0u8; 1024]), q3k, 4, 256).is_err());
        let q4k = FileType::Ggml(GgmlDType::Q4K);
        assert!(BlockMatrix::read(&mut std::io::Cursor::new(vec![0u8; 1024]), q4k, 4, 96).is_err(), "rows of 96 are no K-quant");
        // An MXFP4 exponent past f16's range is refused, not run as infinities.
        let mut block = vec![0u8; 17 * 8];
        block[0] = 200;
        let err = BlockMatrix::read(&mut std::io::Cursor::new(block), FileType::Mxfp4, 8, 32).err().unwrap();
        assert!(err.to_string().contains("beyond f16's range"), "{err}");
    }

    #[test]
    fn a_matrix_read_in_several_chunks_is_the_same() {
        // 3001 rows of 640 Q8_0 values: 2 MB, read 1 MiB at a time (1542 rows, not a whole
        // number of row groups).
        let (w, want) = weights(3001, 640, 5, FileType::Ggml(GgmlDType::Q8_0));
        let ids: Vec<u32> = (0..3001).collect();
        assert_eq!(w.gather(&ids).unwrap(), want);
    }

    #[test]
    fn matmul_matches_the_product_of_the_dequantised_values() {
        let n = 37;
        for dtype in TYPES {
            let k = row_length(dtype, 640);
            let (w, _) = weights(n, k, 1, dtype);
            // The weights as the kernel holds them (candle's values, checked above).
            let wf = w.gather(&(0..n as u32).collect::<Vec<_>>()).unwrap();
            for m in [1, 2, 3, 4, 5, 9] {
                let x = activations(&seeded(m * k, 2 + m as u32), k, w.group);
                let mut out = vec![0f32; m * n];
                matmul(&x, &w, &mut out, Kernel::FASTEST);
                for i in 0..m {
                    // The activations as the kernel sees them: quantised to int8 blocks.
                    let xi: Vec<f64> = (0..k)
                        .map(|e| {
                            let b = i * x.blocks + e / BLOCK;
                            x.scales[b] as f64 * x.quants[b].0[e % BLOCK] as i8 as f64
                        })
                        .collect();
                    for j in 0..n {
                        let want: f64 = xi.iter().zip(&wf[j * k..(j + 1) * k]).map(|(a, &b)| a * b as f64).sum();
                        let got = out[i * n + j] as f64;
                        assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "{dtype} m={m} ({i},{j}): {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
        let n = 50;
        for dtype in TYPES {
            let k = row_length(dtype, 640);
            let (w, _) = weights(n, k, 7, dtype);
            let xs = seeded(11 * k, 8);
            let mut batched = vec![0f32; 11 * n];
            matmul(&activations(&xs, k, w.group), &w, &mut batched, Kernel::FASTEST);
            for i in 0..11 {
                let mut alone = vec![0f32; n];
                matmul(&activations(&xs[i * k..(i + 1) * k], k, w.group), &w, &mut alone, Kernel::FASTEST);
                assert_eq!(alone, batched[i * n..(i + 1) * n], "{dtype} row {i}");
            }
        }
    }

    #[test]
    fn every_kernel_gets_the_same_bits() {
        let kernels = [
            Kernel::Plain,
            #[cfg(avx2_kernels)]
            Kernel::Avx2,
            #[cfg(vnni_kernels)]
            Kernel::Vnni,
        ];
        assert!(kernels.contains(&Kernel::FASTEST));
        let n = 21;
        for dtype in TYPES {
            let k = row_length(dtype, 640);
            let (w, _) = weights(n, k, 11, dtype);
            // 7 rows: tiles of 4 and 3.
            let x = activations(&seeded(7 * k, 12), k, w.group);
            let results: Vec<Vec<f32>> = kernels
                .iter()
                .map(|&kernel| {
                    let mut out = vec![0f32; 7 * n];
                    matmul(&x, &w, &mut out, kernel);
                    out
                })
                .collect();
            for (kernel, got) in kernels.iter().zip(&results) {
                assert_eq!(got, &results[0], "{dtype}: {kernel:?} against {:?}", kernels[0]);
            }
        }
    }

    #[test]
    fn activations_quantise_to_the_same_bits_in_plain_rust_and_simd() {
        let mut xs = seeded(64 * BLOCK, 21);
        // A block of exact ties (scale 1): they round to even.
        xs[..BLOCK].copy_from_slice(&std::array::from_fn::<f32, BLOCK, _>(|i| if i == 0 { 127.0 } else { i as f32 - 15.5 }));
        // And a block of zeros (scale 0).
        xs[BLOCK..2 * BLOCK].fill(0.0);
        let a = activations(&xs, 8 * BLOCK, 1);
        for (b, x) in xs.chunks_exact(BLOCK).enumerate() {
            let mut q = ZERO;
            let (d, total, first) = quantize_block(x.try_into().unwrap(), 0.0, &mut q);
            assert_eq!((a.quants[b].0, a.scales[b], a.totals[b], a.firsts[b]), (q.0, d, total, first), "block {b}");
            assert_eq!(total, q.0.iter().map(|&q| q as i8 as i32).sum::<i32>());
            assert_eq!(first, q.0[..BLOCK / 2].iter().map(|&q| q as i8 as i32).sum::<i32>());
        }
        assert_eq!(a.quants[0].0[1..5].iter().map(|&q| q as i8).collect::<Vec<_>>(), [-14, -14, -12, -12], "ties to even");
        // K-quants' activations: one scale per 8 blocks, from the largest |x| of the 256.
        let a = activations(&xs, 8 * BLOCK, 8);
        for (b, x) in xs.chunks_exact(BLOCK).enumerate() {
            let group = &xs[b / 8 * 8 * BLOCK..(b / 8 + 1) * 8 * BLOCK];
            let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut q = ZERO;
            let (d, total, first) = quantize_block(x.try_into().unwrap(), amax, &mut q);
            assert_eq!(d, amax / 127.0, "block {b}");
            assert_eq!((a.quants[b].0, a.scales[b], a.totals[b], a.firsts[b]), (q.0, d, total, first), "block {b}");
        }
    }

    #[test]
    fn types_keep_about_their_width() {
        for (dtype, width) in [
            (FileType::Ggml(GgmlDType::Q4_0), 4.5),
            (FileType::Ggml(GgmlDType::Q5_0), 5.5),
            (FileType::Iq4Nl, 4.5),
            (FileType::Mxfp4, 4.5),
            (FileType::Ggml(GgmlDType::Q6K), 6.5625),
            // The file's 4.25, 4.5 and 5.5 with a byte for each 6-bit scale and minimum.
            (FileType::Iq4Xs, 4.3125),
            (FileType::Ggml(GgmlDType::Q4K), 4.625),
            (FileType::Ggml(GgmlDType::Q5K), 5.625),
        ] {
            let (w, _) = weights(16, 768, 3, dtype);
            let f16s = (w.scales.len() + w.mins.as_ref().map_or(0, Vec::len)) * COLS * 2;
            let ints = w.sub_scales.as_ref().map_or(0, |v| v.len() * COLS) + w.sub_mins.as_ref().map_or(0, |v| v.len() * 2 * COLS);
            let bits = (w.quants.len() * BLOCK + f16s + ints) * 8;
            assert_eq!(bits as f64 / (16 * 768) as f64, width, "{dtype}: bits per weight");
        }
    }
}
