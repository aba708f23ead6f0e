//! Attention on the CPU: every sequence of a batched step in one pass over plain buffers,
//! with the keys and values written in place into each sequence's cache. The cache holds
//! them in `f16` (as llama.cpp's default `-ctk f16 -ctv f16`): half the memory of `f32`
//! and half the bytes a decode step reads; the arithmetic stays `f32`.
//!
//! Why not candle's ops: run per sequence, attention was ~15 candle ops per layer (narrow,
//! reshape, transpose, contiguous, norms, RoPE, `slice_set`, mask, two matmuls, softmax),
//! each allocating its result. Measured here at 8 sequences decoding together on the
//! default model, that was 17 ms of a 53 ms step while the arithmetic is ~0.3 ms; alone it
//! was ~2 ms of a 14 ms token. Here one call per layer does, for all rows of all sequences:
//! the per-head RMS norms of q and k (Gemma 3), RoPE at each row's own position, the write
//! of k and v into the cache, then, split across candle's worker threads by (sequence,
//! query head, block of query rows), scores against the visible keys (causal, and the
//! sliding window by index: no mask tensor), softmax and the weighted sum of values.
//!
//! Each output row is computed by the same operations in the same order whatever else is
//! in the batch and however rows fall into work units, so a sequence decoded alone gets
//! the bits it gets in a batch (tested below and in host/tests/models.rs).

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::model::AttnTemperature;
use super::ops::{SyncPtr, dot};

/// Head geometry of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// One layer's keys and values of one sequence, each laid out `[kv_head][position][dim]`.
/// Held as f16 ([`LayerKv::ELEMENT_BYTES`] a value).
pub struct LayerKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
}

impl LayerKv {
    /// Bytes of one cached value.
    pub const ELEMENT_BYTES: usize = size_of::<f16>();

    pub fn zeros(heads: Heads, capacity: usize) -> LayerKv {
        let n = heads.n_kv_head * capacity * heads.head_dim;
        LayerKv { k: vec![f16::ZERO; n], v: vec![f16::ZERO; n] }
    }

    /// Bytes of keys and values held (the capacity, not the length).
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * Self::ELEMENT_BYTES
    }

    /// Copies positions `0..n` of `src` (a cache of `src_capacity` positions) into this one
    /// (of `capacity`).
    pub fn copy_prefix(&mut self, src: &LayerKv, heads: Heads, n: usize, src_capacity: usize, capacity: usize) {
        let d = heads.head_dim;
        for h in 0..heads.n_kv_head {
            let (from, to) = (h * src_capacity * d, h * capacity * d);
            self.k[to..to + n * d].copy_from_slice(&src.k[from..from + n * d]);
            self.v[to..to + n * d].copy_from_slice(&src.v[from..from + n * d]);
        }
    }
}

/// One sequence's rows in the step: `n` rows starting at row `offset` of the batch, at
/// positions `pos..pos + n`, and its cache for this layer.
pub struct SeqRows<'a> {
    pub offset: usize,
    pub n: usize,
    pub pos: usize,
    pub capacity: usize,
    pub kv: &'a mut LayerKv,
}

/// What a layer applies besides the projections.
pub struct Spec<'a> {
    pub heads: Heads,
    /// Sliding window (`None`: global attention).
    pub window: Option<usize>,
    /// Per-head RMS norm weights of q and k (Gemma 3), and their epsilon.
    pub q_norm: Option<&'a [f32]>,
    pub k_norm: Option<&'a [f32]>,
    /// A weightless per-head RMS norm of v (Gemma 4).
    pub v_norm: bool,
    pub eps: f32,
    /// The factor of q·k (`1/√head_dim` in most families).
    pub scale: f32,
    /// RoPE tables, `(positions, n_rot / 2)`.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// RoPE rotates the first `n_rot` values of each head (all of them but for Phi 4's
    /// partial rotary).
    pub n_rot: usize,
    /// NEOX RoPE pairs value `i` with `i + n_rot/2`; Llama's pairs adjacent values.
    pub neox: bool,
    /// Llama 4 / Mistral 3: q sharpened at long positions.
    pub temperature: Option<AttnTemperature>,
    /// gpt-oss: a learned logit per query head that joins each row's softmax as one more
    /// (value-less) position, so a head may attend to nothing.
    pub sinks: Option<&'a [f32]>,
}

/// First key position visible to a query at `pos` in a layer with `window`.
pub fn first_key(pos: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

/// Query rows one work unit takes (a prompt chunk is split; a decode row is one unit).
const QUERY_BLOCK: usize = 16;

/// Attention of every sequence's new rows: `q` is `(rows, n_head · head_dim)`; `new_kv`, the
/// step's `k` and `v`, `(rows, n_kv_head · head_dim)` each, all rows of the step in `seqs`
/// order, written into the caches; `None` where the layer reads a cache another layer of
/// the step has already written (Gemma 4's shared KV). Returns `(rows, n_head · head_dim)`.
pub fn attend(spec: &Spec<'_>, q: &mut [f32], mut new_kv: Option<(&mut [f32], &[f32])>, seqs: &mut [SeqRows<'_>]) -> Vec<f32> {
    let Heads { n_head, n_kv_head, head_dim: d } = spec.heads;
    let (q_width, kv_width) = (n_head * d, n_kv_head * d);
    let rows = q.len() / q_width;
    if let Some((k, v)) = &new_kv {
        assert!(k.len() == rows * kv_width && v.len() == rows * kv_width, "k and v have one row per query row");
    }
    // The parallel writes below are sound only if no two sequences share an output row and
    // every row is inside `out`: checked here, not assumed of the caller.
    let mut spans: Vec<(usize, usize)> = seqs.iter().map(|s| (s.offset, s.offset + s.n)).collect();
    spans.sort_unstable();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0) && spans.last().is_none_or(|s| s.1 <= rows),
        "attention: the sequences' rows overlap or pass the {rows} rows of the step"
    );
    let mut v_normed = vec![0f32; if spec.v_norm { d } else { 0 }];
    for seq in seqs.iter_mut() {
        for i in 0..seq.n {
            let (row, pos) = (seq.offset + i, seq.pos + i);
            // As llama.cpp: the temperature multiplies q after RoPE, beside the scale.
            let q_scale = spec.scale * spec.temperature.map_or(1.0, |t| 1.0 + t.scale * ((pos as f32 / t.floor).floor() + 1.0).ln());
            for head in q[row * q_width..(row + 1) * q_width].chunks_exact_mut(d) {
                prepare(spec, head, spec.q_norm, pos);
                head.iter_mut().for_each(|x| *x *= q_scale);
            }
            let Some((k, v)) = new_kv.as_mut() else { continue };
            let (k_row, v_row) = (&mut k[row * kv_width..(row + 1) * kv_width], &v[row * kv_width..(row + 1) * kv_width]);
            for h in 0..n_kv_head {
                prepare(spec, &mut k_row[h * d..(h + 1) * d], spec.k_norm, pos);
                let at = (h * seq.capacity + pos) * d;
                seq.kv.k[at..at + d].convert_from_f32_slice(&k_row[h * d..(h + 1) * d]);
                let v_head = &v_row[h * d..(h + 1) * d];
                let v_head = match spec.v_norm {
                    true => {
                        v_normed.copy_from_slice(v_head);
                        rms_norm(&mut v_normed, None, spec.eps);
                        &v_normed
                    }
                    false => v_head,
                };
                seq.kv.v[at..at + d].convert_from_f32_slice(v_head);
            }
        }
    }

    // Work units: (sequence, query head, block of query rows), so even one decoding
    // sequence keeps every thread busy.
    let mut units = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for qh in 0..n_head {
            for start in (0..seq.n).step_by(QUERY_BLOCK) {
                units.push((s, qh, start, (start + QUERY_BLOCK).min(seq.n)));
            }
        }
    }
    let mut out = vec![0f32; rows * q_width];
    let dst = SyncPtr(out.as_mut_ptr());
    let groups = n_head / n_kv_head;
    let seqs: &[SeqRows<'_>] = seqs;
    let q: &[f32] = q;
    candle_core::utils::barrier_pool().execute_chunked(units.len(), |range| {
        let mut scratch = Scratch::default();
        for &(s, qh, start, end) in &units[range] {
            let seq = &seqs[s];
            // The KV head this query head reads (grouped-query attention).
            let h = qh / groups;
            let cache = h * seq.capacity * d..(h + 1) * seq.capacity * d;
            let rows = (start..end).map(|i| seq.offset + i);
            let qs: [&[f32]; QUERY_BLOCK] = std::array::from_fn(|i| match start + i < end {
                true => &q[(seq.offset + start + i) * q_width + qh * d..][..d],
                false => &[],
            });
            scratch.visible.clear();
            scratch.visible.extend((start..end).map(|i| first_key(seq.pos + i, spec.window)..seq.pos + i + 1));
            let sink = spec.sinks.map(|s| s[qh]);
            let result = block_attention(&qs[..end - start], &seq.kv.k[cache.clone()], &seq.kv.v[cache], d, sink, &mut scratch);
            for (row, values) in rows.zip(result.chunks_exact(d)) {
                // SAFETY: sequences' rows are disjoint and inside `out` (asserted above) and
                // each (row, query head) belongs to exactly one unit, so no two workers
                // write the same `d` values; `out` has rows × q_width values and lives until
                // the pool has joined.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(row * q_width + qh * d), d) };
                o.copy_from_slice(values);
            }
        }
    });
    out
}

/// Cached positions widened from f16 at once: 64 × 256 values fit in L2 beside the scores.
const KEY_CHUNK: usize = 64;

/// A worker's buffers, reused across its work units.
#[derive(Default)]
struct Scratch {
    /// One chunk of keys or values as f32.
    chunk: Vec<f32>,
    /// Each row's scores, then probabilities, over the block's positions.
    scores: Vec<f32>,
    /// Each row's output.
    out: Vec<f32>,
    /// The positions each row sees.
    visible: Vec<Range<usize>>,
    /// Each row's sum of exponentials.
    sums: Vec<f32>,
}

/// softmax(q · K[keys]ᵀ) · V[keys] for a block of one query head's rows: `qs[r]` sees
/// positions `scratch.visible[r]` of `k` and `v` (one KV head's cache, `d` values per
/// position, f16), with the head's `sink` logit in the softmax's denominator. Positions
/// are widened KEY_CHUNK at a time for all the rows (a decode step reads the cache once,
/// with no copy of it in f32). Each row's scores are summed and applied in position order,
/// so its result does not depend on the other rows or on chunk bounds. Returns the rows'
/// outputs, `d` values each.
fn block_attention<'s>(qs: &[&[f32]], k: &[f16], v: &[f16], d: usize, sink: Option<f32>, scratch: &'s mut Scratch) -> &'s [f32] {
    let Scratch { chunk, scores, out, visible, sums } = scratch;
    let first = visible.iter().map(|r| r.start).min().unwrap_or(0);
    let last = visible.iter().map(|r| r.end).max().unwrap_or(0);
    let span = last - first;
    scores.clear();
    scores.resize(qs.len() * span, 0.0);
    out.clear();
    out.resize(qs.len() * d, 0.0);
    // In `[c0, c1)`, the positions row `r` sees.
    let seen = |r: usize, c0: usize, c1: usize| visible[r].start.max(c0)..visible[r].end.min(c1);
    for c0 in (first..last).step_by(KEY_CHUNK) {
        let c1 = (c0 + KEY_CHUNK).min(last);
        widen(&k[c0 * d..c1 * d], chunk);
        for (r, q) in qs.iter().enumerate() {
            for j in seen(r, c0, c1) {
                scores[r * span + j - first] = dot(q, &chunk[(j - c0) * d..(j - c0 + 1) * d]);
            }
        }
    }
    sums.clear();
    for (r, range) in visible.iter().enumerate() {
        let row = &mut scores[r * span + range.start - first..r * span + range.end - first];
        let max = row.iter().copied().fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
        let mut sum = 0.0;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        if let Some(sink) = sink {
            sum += (sink - max).exp();
        }
        sums.push(sum);
    }
    for c0 in (first..last).step_by(KEY_CHUNK) {
        let c1 = (c0 + KEY_CHUNK).min(last);
        widen(&v[c0 * d..c1 * d], chunk);
        for (r, sum) in sums.iter().enumerate() {
            let o = &mut out[r * d..(r + 1) * d];
            for j in seen(r, c0, c1) {
                let p = scores[r * span + j - first] / sum;
                for (o, x) in o.iter_mut().zip(&chunk[(j - c0) * d..(j - c0 + 1) * d]) {
                    *o = p.mul_add(*x, *o);
                }
            }
        }
    }
    out
}

/// `src` as f32 in `dst` (resized to fit).
fn widen(src: &[f16], dst: &mut Vec<f32>) {
    dst.resize(src.len(), 0.0);
    src.convert_to_f32_slice(dst);
}

/// RMS norm (if any) and RoPE at `pos`, in place, on one head's `d` values.
fn prepare(spec: &Spec<'_>, x: &mut [f32], norm: Option<&[f32]>, pos: usize) {
    if norm.is_some() {
        rms_norm(x, norm, spec.eps);
    }
    let half = spec.n_rot / 2;
    let (cos, sin) = (&spec.cos[pos * half..(pos + 1) * half], &spec.sin[pos * half..(pos + 1) * half]);
    // Values past `n_rot` pass unrotated.
    let x = &mut x[..spec.n_rot];
    if !spec.neox {
        for (pair, (c, s)) in x.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    } else {
        let (lo, hi) = x.split_at_mut(half);
        for ((a, b), (c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cos.iter().zip(sin)) {
            let (x1, x2) = (*a, *b);
            *a = x1 * c - x2 * s;
            *b = x1 * s + x2 * c;
        }
    }
}

/// `x / √(mean(x²) + eps)`, times `weight` where there is one.
fn rms_norm(x: &mut [f32], weight: Option<&[f32]>, eps: f32) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    match weight {
        Some(w) => x.iter_mut().zip(w).for_each(|(v, w)| *v = *v * inv * w),
        None => x.iter_mut().for_each(|v| *v *= inv),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn seeded(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 9) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    const HEADS: Heads = Heads { n_head: 4, n_kv_head: 2, head_dim: 16 };
    const MAX: usize = 40;

    /// RoPE tables over the first `n_rot` values of a head.
    fn tables(n_rot: usize) -> (Vec<f32>, Vec<f32>) {
        let half = n_rot / 2;
        let angle = |p: usize, i: usize| p as f32 / 10_000f32.powf(2.0 * i as f32 / n_rot as f32);
        let cos = (0..MAX * half).map(|x| angle(x / half, x % half).cos()).collect();
        let sin = (0..MAX * half).map(|x| angle(x / half, x % half).sin()).collect();
        (cos, sin)
    }

    /// The same attention through candle's ops (the path the model takes on GPUs): one
    /// sequence's `n` rows at `pos` over its earlier keys `k_past`/`v_past`.
    #[allow(clippy::too_many_arguments)]
    fn reference(spec: &Spec<'_>, q: &[f32], k: &[f32], v: &[f32], k_past: &[f32], v_past: &[f32], pos: usize, n: usize) -> Vec<f32> {
        let dev = Device::Cpu;
        let Heads { n_head, n_kv_head, head_dim: d } = spec.heads;
        let half = spec.n_rot / 2;
        let to = |x: &[f32], heads: usize| {
            Tensor::from_vec(x.to_vec(), (1, n, heads, d), &dev).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
        };
        let (mut qt, mut kt, mut vt) = (to(q, n_head), to(k, n_kv_head), to(v, n_kv_head));
        let norm = |t: &Tensor, w: Option<&[f32]>| match w {
            Some(w) => candle_nn::ops::rms_norm(t, &Tensor::new(w, &dev).unwrap(), spec.eps).unwrap(),
            None => t.clone(),
        };
        (qt, kt) = (norm(&qt, spec.q_norm), norm(&kt, spec.k_norm));
        if spec.v_norm {
            vt = norm(&vt, Some(&vec![1.0; d]));
        }
        let cos = Tensor::from_vec(spec.cos[pos * half..(pos + n) * half].to_vec(), (n, half), &dev).unwrap();
        let sin = Tensor::from_vec(spec.sin[pos * half..(pos + n) * half].to_vec(), (n, half), &dev).unwrap();
        let rope = if spec.neox { candle_nn::rotary_emb::rope } else { candle_nn::rotary_emb::rope_i };
        // Only the first n_rot values turn.
        let rope = |t: &Tensor| {
            let turned = rope(&t.narrow(3, 0, spec.n_rot).unwrap().contiguous().unwrap(), &cos, &sin).unwrap();
            Tensor::cat(&[&turned, &t.narrow(3, spec.n_rot, d - spec.n_rot).unwrap()], 3).unwrap()
        };
        (qt, kt) = (rope(&qt), rope(&kt));
        if let Some(t) = spec.temperature {
            let by_row: Vec<f32> = (0..n).map(|i| 1.0 + t.scale * (((pos + i) as f32 / t.floor).floor() + 1.0).ln()).collect();
            qt = qt.broadcast_mul(&Tensor::from_vec(by_row, (1, 1, n, 1), &dev).unwrap()).unwrap();
        }
        // The cache keeps keys and values in f16.
        let round = |t: &Tensor| t.to_dtype(candle_core::DType::F16).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        (kt, vt) = (round(&kt), round(&vt));
        let past = |x: &[f32]| Tensor::from_vec(x.to_vec(), (1, n_kv_head, pos, d), &dev).unwrap();
        let k_all = Tensor::cat(&[&past(k_past), &kt], 2).unwrap();
        let v_all = Tensor::cat(&[&past(v_past), &vt], 2).unwrap();
        let groups = n_head / n_kv_head;
        let mut out = vec![0f32; n * n_head * d];
        for qh in 0..n_head {
            let kv = qh / groups;
            let qh_t = qt.narrow(1, qh, 1).unwrap().squeeze(0).unwrap().squeeze(0).unwrap(); // (n, d)
            let ks = k_all.narrow(1, kv, 1).unwrap().squeeze(0).unwrap().squeeze(0).unwrap(); // (pos+n, d)
            let vs = v_all.narrow(1, kv, 1).unwrap().squeeze(0).unwrap().squeeze(0).unwrap();
            let scores = (qh_t.matmul(&ks.t().unwrap()).unwrap() * spec.scale as f64).unwrap();
            let mut mask = vec![0f32; n * (pos + n)];
            for i in 0..n {
                for j in 0..pos + n {
                    if j > pos + i || j < first_key(pos + i, spec.window) {
                        mask[i * (pos + n) + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let mut scores = (scores + Tensor::from_vec(mask, (n, pos + n), &dev).unwrap()).unwrap();
            if let Some(sinks) = spec.sinks {
                // The sink as one more column, dropped after the softmax.
                let column = Tensor::from_vec(vec![sinks[qh]; n], (n, 1), &dev).unwrap();
                scores = Tensor::cat(&[&scores, &column], 1).unwrap();
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap().narrow(1, 0, pos + n).unwrap();
            let o = probs.matmul(&vs).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in o.iter().enumerate() {
                out[(i * n_head + qh) * d..(i * n_head + qh + 1) * d].copy_from_slice(row);
            }
        }
        out
    }

    fn spec<'a>(cos: &'a [f32], sin: &'a [f32], norm: Option<&'a [f32]>, window: Option<usize>, neox: bool) -> Spec<'a> {
        let n_rot = cos.len() / MAX * 2;
        let scale = 1.0 / (HEADS.head_dim as f32).sqrt();
        Spec {
            heads: HEADS,
            window,
            q_norm: norm,
            k_norm: norm,
            v_norm: false,
            eps: 1e-6,
            scale,
            cos,
            sin,
            n_rot,
            neox,
            temperature: None,
            sinks: None,
        }
    }

    /// A cache of `capacity` whose first `pos` positions hold seeded keys and values;
    /// returns it with those values (as the cache holds them) in `[kv_head][pos][d]` order.
    fn cache(pos: usize, capacity: usize, seed: u32) -> (LayerKv, Vec<f32>, Vec<f32>) {
        let d = HEADS.head_dim;
        let half = |x: Vec<f32>| x.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
        let src = LayerKv { k: half(seeded(HEADS.n_kv_head * pos * d, seed)), v: half(seeded(HEADS.n_kv_head * pos * d, seed + 1)) };
        let mut kv = LayerKv::zeros(HEADS, capacity);
        kv.copy_prefix(&src, HEADS, pos, pos, capacity);
        let wide = |x: &[f16]| x.iter().map(|x| x.to_f32()).collect();
        (kv, wide(&src.k), wide(&src.v))
    }

    #[test]
    fn matches_candles_ops_for_each_sequence_of_a_batch() {
        let norm = seeded(HEADS.head_dim, 99).iter().map(|x| x + 1.5).collect::<Vec<_>>();
        let (qw, kw) = (HEADS.n_head * HEADS.head_dim, HEADS.n_kv_head * HEADS.head_dim);
        // gpt-oss's sinks, one per query head, some far above the scores.
        let sinks: Vec<f32> = (0..HEADS.n_head).map(|h| h as f32 * 1.5 - 2.0).collect();
        // (window, neox, q/k norms, n_rot, temperature, sinks, Gemma 4's v norm and scale 1)
        let cases = [
            (None, true, true, 16, false, false, false),
            (Some(5), true, false, 16, false, false, false),
            (None, false, false, 16, false, false, false),
            (Some(3), false, true, 16, false, false, false),
            // Phi 4's partial rotary; Mistral 3's temperature (floor 8: rows past 8 are sharpened).
            (None, true, false, 12, true, false, false),
            (None, false, true, 8, true, false, false),
            // gpt-oss: sinks on sliding and global layers.
            (Some(4), true, false, 16, false, true, false),
            (None, true, false, 16, false, true, false),
            // Gemma 4: v normed without weights, q·k unscaled, on both kinds of layer.
            (Some(4), true, true, 16, false, false, true),
            (None, true, true, 16, false, false, true),
        ];
        for (window, neox, with_norm, n_rot, temperature, with_sinks, gemma4) in cases {
            let (cos, sin) = tables(n_rot);
            let mut spec = spec(&cos, &sin, with_norm.then_some(&norm[..]), window, neox);
            spec.temperature = temperature.then_some(AttnTemperature { scale: 0.5, floor: 8.0 });
            spec.sinks = with_sinks.then_some(&sinks[..]);
            if gemma4 {
                (spec.v_norm, spec.scale) = (true, 1.0);
            }
            // Three sequences: a decode row at 12, a prompt chunk of 20 rows at 0 (two query
            // blocks), a chunk of 3 rows at 7.
            let shapes = [(12usize, 1usize), (0, 20), (7, 3)];
            let rows: usize = shapes.iter().map(|s| s.1).sum();
            let (q0, k0, v0) = (seeded(rows * qw, 1), seeded(rows * kw, 2), seeded(rows * kw, 3));
            let mut caches: Vec<_> = shapes.iter().enumerate().map(|(i, &(pos, _))| cache(pos, MAX, 10 + 2 * i as u32)).collect();
            let mut offset = 0;
            let mut seqs = Vec::new();
            for ((pos, n), (kv, _, _)) in shapes.iter().zip(caches.iter_mut()) {
                seqs.push(SeqRows { offset, n: *n, pos: *pos, capacity: MAX, kv });
                offset += n;
            }
            let (mut q, mut k) = (q0.clone(), k0.clone());
            let out = attend(&spec, &mut q, Some((&mut k, &v0)), &mut seqs);
            let mut offset = 0;
            for (&(pos, n), (_, k_past, v_past)) in shapes.iter().zip(&caches) {
                let part = |x: &[f32], w: usize| x[offset * w..(offset + n) * w].to_vec();
                let want = reference(&spec, &part(&q0, qw), &part(&k0, kw), &part(&v0, kw), k_past, v_past, pos, n);
                for (j, (a, b)) in part(&out, qw).iter().zip(&want).enumerate() {
                    assert!((a - b).abs() < 1e-5, "window {window:?} neox {neox} n_rot {n_rot}: seq at {pos}, value {j}: {a} vs {b}");
                }
                offset += n;
            }
        }
    }

    #[test]
    fn a_sequence_gets_the_same_bits_alone_and_in_a_batch() {
        let (cos, sin) = tables(HEADS.head_dim);
        let spec = spec(&cos, &sin, None, Some(6), true);
        let (qw, kw) = (HEADS.n_head * HEADS.head_dim, HEADS.n_kv_head * HEADS.head_dim);
        let (q, k, v) = (seeded(18 * qw, 4), seeded(18 * kw, 5), seeded(18 * kw, 6));
        // Alone: 17 prompt rows at 3.
        let (mut alone_kv, _, _) = cache(3, MAX, 7);
        let alone = attend(
            &spec,
            &mut q[qw..].to_vec(),
            Some((&mut k[kw..].to_vec(), &v[kw..])),
            &mut [SeqRows { offset: 0, n: 17, pos: 3, capacity: MAX, kv: &mut alone_kv }],
        );
        // In a batch, after another sequence's decode row.
        let (mut kv0, _, _) = cache(9, MAX, 8);
        let (mut kv1, _, _) = cache(3, MAX, 7);
        let mut seqs = [
            SeqRows { offset: 0, n: 1, pos: 9, capacity: MAX, kv: &mut kv0 },
            SeqRows { offset: 1, n: 17, pos: 3, capacity: MAX, kv: &mut kv1 },
        ];
        let batched = attend(&spec, &mut q.clone(), Some((&mut k.clone(), &v)), &mut seqs);
        assert_eq!(alone, batched[qw..]);
        assert_eq!(alone_kv.k, kv1.k);
        assert_eq!(alone_kv.v, kv1.v);
    }

    /// A layer that shares an earlier layer's cache (Gemma 4) reads the keys and values that
    /// layer wrote in the same step, and writes nothing.
    #[test]
    fn a_layer_reading_a_shared_cache_sees_what_its_source_wrote() {
        let (cos, sin) = tables(HEADS.head_dim);
        let spec = spec(&cos, &sin, None, None, true);
        let (qw, kw) = (HEADS.n_head * HEADS.head_dim, HEADS.n_kv_head * HEADS.head_dim);
        let (q, k, v) = (seeded(5 * qw, 11), seeded(5 * kw, 12), seeded(5 * kw, 13));
        let (mut kv, _, _) = cache(4, MAX, 14);
        let source = attend(
            &spec,
            &mut q.clone(),
            Some((&mut k.clone(), &v)),
            &mut [SeqRows { offset: 0, n: 5, pos: 4, capacity: MAX, kv: &mut kv }],
        );
        let written = (kv.k.clone(), kv.v.clone());
        let shared = attend(&spec, &mut q.clone(), None, &mut [SeqRows { offset: 0, n: 5, pos: 4, capacity: MAX, kv: &mut kv }]);
        assert_eq!(source, shared);
        assert_eq!(written, (kv.k, kv.v));
    }
}
