//! wisp's CPU matrix multiply for block-quantised weights of 32-element blocks: Q8_0, and
//! Q5_0, Q5_1, Q4_0 and Q4_1 widened exactly to int8 at load (Q4_1 and Q5_1 keep their
//! per-block minimum).
//!
//! Why not candle's: candle runs a Q8_0 matmul as one dot product per (input row, weight
//! row), four weight rows at a time; its register-tiled, repacked x86 kernels exist only for
//! rows whose length is a multiple of 256 (and for Q8_0 only with AVX-512/AVX-VNNI), so
//! Gemma 3 270M's 640-wide projections (q, k, v, gate, up: two thirds of the model's
//! multiply-adds, and the tied 262144 × 640 output projection) never use them. Prompt
//! processing ran at 0.42× llama.cpp. (Its Q4_K and Q6_K tiles do apply here, and measured
//! faster than anything below would be for them, so those stay with candle.)
//!
//! The weights are repacked at load in groups of [`COLS`] output rows: for each block of 32
//! inputs, the group's 8 rows are interleaved 4 bytes at a time, so one 256-bit register
//! holds 4 consecutive inputs of 8 rows. A prompt's rows are quantised once to int8 blocks
//! of 32 (llama.cpp's Q8_0 activations); 4 input bytes are broadcast to all lanes and
//! multiplied against 8 rows at once, integer sums run over a whole block before one
//! conversion to f32, and each lane ends as one output element: no horizontal sums. A
//! register tile covers up to [`RM`] input rows × 8 output rows (the layout of candle's own
//! repacked K-quant tiles and of llama.cpp's repacked Q4_0/IQ4_NL kernels). Work is split
//! across candle's worker threads by panels of groups.
//!
//! Every output element is computed by the same sequence of operations whatever the number
//! of input rows or how they fall into tiles (one lane, blocks in order), so a sequence
//! decoded alone gets bit-identical logits to the same sequence decoded in a batch.
//!
//! The 4- and 5-bit types are widened because candle's kernels for them are one dot product
//! per (input row, weight row) (and scalar for Q5_0): every value of those types is an int8
//! times the block's scale (Q4_0: `d·(q − 8)`, Q5_0: `d·(q − 16)`), except Q4_1's and Q5_1's
//! `d·q + m`, whose minimum is added per block as `m · Σx` (llama.cpp's Q4_1 × Q8_1 dot
//! product: the activations' block sums are kept beside their quants). The price is memory:
//! a widened 4-bit matrix takes 9 (with a minimum: 10) bits per weight instead of 4.5 (5),
//! a widened 5-bit one 9 (10) instead of 5.5 (6).

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Result, Tensor};
use half::f16;

/// Elements per quantisation block.
pub const BLOCK: usize = 32;
/// Output rows interleaved in one group (one per 32-bit lane of a 256-bit register).
pub const COLS: usize = 8;

/// 32 bytes, aligned for 256-bit loads.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Quants([u8; BLOCK]);

const ZERO: Quants = Quants([0; BLOCK]);

/// A weight matrix `W` (out × in) for `y = x Wᵀ` on the CPU, repacked from a 32-element
/// block type (see [`Int8Matrix::read`]).
pub struct Int8Matrix {
    rows: usize,
    /// Blocks per row.
    blocks: usize,
    /// Per group of [`COLS`] rows (the last one padded with zero rows), per block: 8
    /// registers, register `g` holding inputs `4g..4g + 4` of each of the 8 rows.
    quants: Vec<Quants>,
    /// Per group, per block: the 8 rows' scales.
    scales: Vec<[f32; COLS]>,
    /// Per group, per block: the 8 rows' minimums (Q4_1 and Q5_1: a value is `scale · q + min`).
    mins: Option<Vec<[f32; COLS]>>,
}

/// Input rows quantised to int8 blocks (llama.cpp's Q8_0 activations, with Q8_1's block
/// sums).
struct Activations {
    rows: usize,
    blocks: usize,
    quants: Vec<Quants>,
    scales: Vec<f32>,
    /// Per block: `scale · Σ q`, the block's sum as the kernel sees it.
    sums: Vec<f32>,
}

/// The weight types [`Int8Matrix`] takes, and how one block of each widens to 32 int8
/// values, a scale and a minimum (0 but for Q4_1 and Q5_1).
fn widen_block(dtype: GgmlDType, block: &[u8]) -> Option<(f32, f32, [u8; BLOCK])> {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let mut q = [0u8; BLOCK];
    let nibbles = |q: &mut [u8; BLOCK], qs: &[u8], offset: u8| {
        for j in 0..16 {
            q[j] = (qs[j] & 0x0f).wrapping_sub(offset);
            q[j + 16] = (qs[j] >> 4).wrapping_sub(offset);
        }
    };
    let fifth_bits = |q: &mut [u8; BLOCK], qh: &[u8], qs: &[u8], offset: u8| {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for j in 0..16 {
            let hi0 = (((qh >> j) << 4) & 0x10) as u8;
            let hi1 = ((qh >> (j + 12)) & 0x10) as u8;
            q[j] = ((qs[j] & 0x0f) | hi0).wrapping_sub(offset);
            q[j + 16] = ((qs[j] >> 4) | hi1).wrapping_sub(offset);
        }
    };
    match dtype {
        // f16 d, 32 × i8
        GgmlDType::Q8_0 => q.copy_from_slice(&block[2..34]),
        // f16 d, 16 bytes of nibbles: d · (q − 8)
        GgmlDType::Q4_0 => nibbles(&mut q, &block[2..18], 8),
        // f16 d, f16 m, 16 bytes of nibbles: d · q + m
        GgmlDType::Q4_1 => {
            nibbles(&mut q, &block[4..20], 0);
            return Some((d, f16::from_le_bytes([block[2], block[3]]).to_f32(), q));
        }
        // f16 d, u32 of fifth bits, 16 bytes of nibbles: d · (q − 16)
        GgmlDType::Q5_0 => fifth_bits(&mut q, &block[2..6], &block[6..22], 16),
        // f16 d, f16 m, u32 of fifth bits, 16 bytes of nibbles: d · q + m
        GgmlDType::Q5_1 => {
            fifth_bits(&mut q, &block[4..8], &block[8..24], 0);
            return Some((d, f16::from_le_bytes([block[2], block[3]]).to_f32(), q));
        }
        _ => return None,
    }
    Some((d, 0.0, q))
}

impl Activations {
    const fn new() -> Activations {
        Activations { rows: 0, blocks: 0, quants: Vec::new(), scales: Vec::new(), sums: Vec::new() }
    }

    /// Quantises rows of `cols` values (per block: `scale = max|x| / 127`,
    /// `q = round(x / scale)`), reusing the buffers.
    fn quantize(&mut self, xs: &[f32], cols: usize) {
        debug_assert!(cols.is_multiple_of(BLOCK) && xs.len().is_multiple_of(cols));
        self.rows = xs.len() / cols;
        self.blocks = cols / BLOCK;
        let n = xs.len() / BLOCK;
        self.quants.resize(n, ZERO);
        self.scales.resize(n, 0.0);
        self.sums.resize(n, 0.0);
        for (((x, q), d), sum) in xs.chunks_exact(BLOCK).zip(&mut self.quants).zip(&mut self.scales).zip(&mut self.sums) {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            *d = amax / 127.0;
            let id = if *d != 0.0 { 1.0 / *d } else { 0.0 };
            let mut total = 0i32;
            for (q, &v) in q.0.iter_mut().zip(x) {
                let r = (v * id).round() as i8;
                total += r as i32;
                *q = r as u8;
            }
            *sum = *d * total as f32;
        }
    }
}

thread_local! {
    /// The quantised input rows, reused across calls (one buffer per calling thread).
    static SCRATCH: std::cell::RefCell<Activations> = const { std::cell::RefCell::new(Activations::new()) };
}

impl Int8Matrix {
    /// Whether this kernel takes weights of `dtype` (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1).
    pub fn serves(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q4_0 | GgmlDType::Q4_1)
    }

    /// The `rows × cols` weights of a served type, read from `reader` (positioned at the
    /// tensor's data, GGUF layout: row-major blocks) a few row groups at a time and
    /// repacked as they come: the file's bytes are never all in memory beside the result.
    pub fn read(reader: &mut impl std::io::Read, dtype: GgmlDType, rows: usize, cols: usize) -> Result<Int8Matrix> {
        /// Bytes read at once.
        const CHUNK: usize = 1 << 20;
        if !Int8Matrix::serves(dtype) {
            candle_core::bail!("{dtype:?} weights are not served by the int8 kernel")
        }
        if !cols.is_multiple_of(BLOCK) {
            candle_core::bail!("row length {cols} is not a multiple of {BLOCK}")
        }
        let blocks = cols / BLOCK;
        let tiles = rows.div_ceil(COLS) * blocks;
        let mut m = Int8Matrix {
            rows,
            blocks,
            quants: vec![ZERO; tiles * COLS],
            scales: vec![[0.0; COLS]; tiles],
            mins: matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1).then(|| vec![[0.0; COLS]; tiles]),
        };
        let block_bytes = dtype.type_size();
        let row_bytes = blocks * block_bytes;
        let rows_per_read = (CHUNK / row_bytes.max(1)).max(1);
        let mut buf = vec![0u8; rows_per_read.min(rows) * row_bytes];
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(rows_per_read);
            let bytes = &mut buf[..n * row_bytes];
            reader.read_exact(bytes)?;
            for row in bytes.chunks_exact(row_bytes) {
                let (group, lane) = (r / COLS, r % COLS);
                for (b, block) in row.chunks_exact(block_bytes).enumerate() {
                    let tile = group * blocks + b;
                    let (d, min, q) = widen_block(dtype, block).expect("a served type");
                    m.scales[tile][lane] = d;
                    if let Some(mins) = &mut m.mins {
                        mins[tile][lane] = min;
                    }
                    for (g, quad) in q.chunks_exact(4).enumerate() {
                        m.quants[tile * COLS + g].0[lane * 4..lane * 4 + 4].copy_from_slice(quad);
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
                let d = self.scales[tile][lane];
                let min = self.mins.as_ref().map_or(0.0, |m| m[tile][lane]);
                for g in 0..COLS {
                    let quad = &self.quants[tile * COLS + g].0[lane * 4..lane * 4 + 4];
                    out.extend(quad.iter().map(|&q| d.mul_add(q as i8 as f32, min)));
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
                xq.quantize(xs, k);
                matmul(&xq, self, &mut out);
            })
        })?;
        *dims.last_mut().expect("checked above") = n;
        Tensor::from_vec(out, dims, &Device::Cpu)
    }
}

/// Groups of output rows one worker takes at a time.
const PANEL: usize = 2;

/// Input rows per register tile (4 integer sums and 4 accumulators in registers).
const RM: usize = 4;

/// `out (m × n) = x (m × k) · wᵀ (k × n)`, on candle's worker threads.
fn matmul(x: &Activations, w: &Int8Matrix, out: &mut [f32]) {
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
                    match rm {
                        4 => tile::<4>(t, dst.get()),
                        3 => tile::<3>(t, dst.get()),
                        2 => tile::<2>(t, dst.get()),
                        _ => tile::<1>(t, dst.get()),
                    }
                }
                i += rm;
            }
        }
    });
}

/// One register tile: input rows `i..i + R` × the 8 output rows of `group`.
struct Tile<'a> {
    x: &'a Activations,
    w: &'a Int8Matrix,
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

/// One tile: R rows of x against the 8 outputs of w's group `group`.
///
/// # Safety
/// `out` must hold `x.rows × w.rows` elements, and no other thread may write this tile's
/// outputs while it runs.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
#[inline(always)]
unsafe fn tile<const R: usize>(t: Tile<'_>, out: *mut f32) {
    use std::arch::x86_64::*;
    let kb = t.x.blocks;
    // SAFETY: AVX2 and FMA are enabled at compile time (the cfg above). The quants and
    // scales (and sums, mins) are read at rows i..i+R of x and group `group` of w, all inside their buffers
    // (R rows remain from i, and the repacked w holds kb × COLS vectors per group, 32-byte
    // aligned for the aligned load); `store` writes only this tile's outputs.
    unsafe {
        let xq = t.x.quants.as_ptr().add(t.i * kb);
        let xd = t.x.scales.as_ptr().add(t.i * kb);
        let wq = t.w.quants.as_ptr().add(t.group * kb * COLS) as *const __m256i;
        let wd = t.w.scales.as_ptr().add(t.group * kb);
        let wm = t.w.mins.as_ref().map(|m| m.as_ptr().add(t.group * kb));
        let xs = t.x.sums.as_ptr().add(t.i * kb);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let mut sums = [_mm256_setzero_si256(); R];
            for g in 0..COLS {
                let w = _mm256_load_si256(wq.add(b * COLS + g));
                let wa = _mm256_sign_epi8(w, w);
                for (row, sum) in sums.iter_mut().enumerate() {
                    // Inputs 4g..4g+4 of this row, in every lane.
                    let quad = (xq.add(row * kb + b) as *const i32).add(g).read();
                    let x = _mm256_set1_epi32(quad);
                    // |w| · (x with w's sign) = w · x, in the unsigned × signed form the
                    // instruction takes; pairs of i16 sums widened to one i32 per lane.
                    let p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w));
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(p, ones));
                }
            }
            let ws = _mm256_loadu_ps(wd.add(b) as *const f32);
            for (row, acc) in acc.iter_mut().enumerate() {
                let d = _mm256_mul_ps(ws, _mm256_set1_ps(*xd.add(row * kb + b)));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[row]), d, *acc);
            }
            if let Some(wm) = wm {
                let mins = _mm256_loadu_ps(wm.add(b) as *const f32);
                for (row, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(mins, _mm256_set1_ps(*xs.add(row * kb + b)), *acc);
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

/// Portable version, the same arithmetic per output element: an integer sum per block,
/// scaled and accumulated in block order.
///
/// # Safety
/// As for the AVX2 version.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
#[inline(always)]
unsafe fn tile<const R: usize>(t: Tile<'_>, out: *mut f32) {
    let kb = t.x.blocks;
    for row in 0..R {
        let xi = (t.i + row) * kb;
        let mut acc = [0f32; COLS];
        for b in 0..kb {
            let tile = t.group * kb + b;
            let xq = &t.x.quants[xi + b].0;
            for (lane, acc) in acc.iter_mut().enumerate() {
                let mut sum = 0i32;
                for g in 0..COLS {
                    let wq = &t.w.quants[tile * COLS + g].0[lane * 4..lane * 4 + 4];
                    for e in 0..4 {
                        sum += wq[e] as i8 as i32 * xq[g * 4 + e] as i8 as i32;
                    }
                }
                *acc = (sum as f32).mul_add(t.w.scales[tile][lane] * t.x.scales[xi + b], *acc);
                if let Some(mins) = &t.w.mins {
                    *acc = mins[tile][lane].mul_add(t.x.sums[xi + b], *acc);
                }
            }
        }
        // SAFETY: the caller of `tile` guarantees `out` holds x.rows × w.rows elements.
        unsafe { t.store(out, row, &acc) };
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

    /// The 32-element block types the kernel takes.
    const TYPES: [GgmlDType; 5] = [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q4_0, GgmlDType::Q4_1];

    /// A seeded n × k matrix quantised to `dtype`, repacked, and candle's dequantised values.
    fn weights(n: usize, k: usize, seed: u32, dtype: GgmlDType) -> (Int8Matrix, Vec<f32>) {
        let t = Tensor::from_vec(seeded(n * k, seed), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bytes = q.data().unwrap();
        (Int8Matrix::read(&mut std::io::Cursor::new(&bytes[..]), dtype, n, k).unwrap(), want)
    }

    fn activations(xs: &[f32], k: usize) -> Activations {
        let mut a = Activations::new();
        a.quantize(xs, k);
        a
    }

    #[test]
    fn weights_unpack_to_candles_dequantised_values() {
        for dtype in TYPES {
            // 13 rows: one full group of 8 and one padded group.
            let (w, want) = weights(13, 96, 3, dtype);
            let ids: Vec<u32> = (0..13).collect();
            let got = w.gather(&ids).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // d·q + m is one fused step here, two roundings in candle.
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{dtype:?} [{i}]: {g} vs {w}");
            }
            if !matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1) {
                assert_eq!(got, want, "{dtype:?} widens exactly");
            }
            assert!(w.gather(&[13]).is_err());
        }
        assert!(!Int8Matrix::serves(GgmlDType::Q4K), "K-quants stay with candle");
        assert!(Int8Matrix::read(&mut std::io::Cursor::new(vec![0u8; 1024]), GgmlDType::Q4K, 4, 256).is_err());
    }

    #[test]
    fn a_matrix_read_in_several_chunks_is_the_same() {
        // 3001 rows of 640 Q8_0 values: 2 MB, read 1 MiB at a time (1542 rows, not a whole
        // number of row groups).
        let (w, want) = weights(3001, 640, 5, GgmlDType::Q8_0);
        let ids: Vec<u32> = (0..3001).collect();
        assert_eq!(w.gather(&ids).unwrap(), want);
    }

    #[test]
    fn matmul_matches_the_product_of_the_dequantised_values() {
        let (k, n) = (640, 37);
        for dtype in TYPES {
            let (w, wf) = weights(n, k, 1, dtype);
            for m in [1, 2, 3, 4, 5, 9] {
                let x = activations(&seeded(m * k, 2 + m as u32), k);
                let mut out = vec![0f32; m * n];
                matmul(&x, &w, &mut out);
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
                        assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "{dtype:?} m={m} ({i},{j}): {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
        let (k, n) = (640, 50);
        for dtype in TYPES {
            let (w, _) = weights(n, k, 7, dtype);
            let xs = seeded(11 * k, 8);
            let mut batched = vec![0f32; 11 * n];
            matmul(&activations(&xs, k), &w, &mut batched);
            for i in 0..11 {
                let mut alone = vec![0f32; n];
                matmul(&activations(&xs[i * k..(i + 1) * k], k), &w, &mut alone);
                assert_eq!(alone, batched[i * n..(i + 1) * n], "{dtype:?} row {i}");
            }
        }
    }
}
