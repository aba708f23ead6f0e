//! Gated DeltaNet, the recurrent layer of Qwen 3.5 / 3.6 (llama.cpp
//! `src/models/qwen35.cpp`, `delta-net-base.cpp` and the fused CPU op
//! `ggml_compute_forward_gated_delta_net`). Instead of a KV cache growing with the
//! sequence, each sequence keeps a fixed [`State`] per layer:
//! 1. `x → [q | k | v]` (one matrix) goes through a causal depthwise convolution of
//!    `conv_kernel` taps (the state holds the last `conv_kernel - 1` inputs) and SiLU;
//! 2. q and k are L2-normalised per head; value head `h` reads key head `h mod n_k_heads`;
//! 3. per value head, the `d × d` memory `S` decays by `exp(g)`,
//!    `g = softplus(alpha·x + dt_bias) · a` (`a = -exp(A_log)` as stored), then takes the
//!    delta rule's correction `S += β (v - S k) kᵀ`, `β = sigmoid(beta·x)`; the output is
//!    `S q / √d`;
//! 4. each head's output is RMS-normed, scaled by `ssm_norm` and gated by `silu(z·x)`,
//!    then projected back to the stream (`ssm_out`).
//!
//! Tokens of one sequence run one after another (the recurrence), sequences and value heads
//! in parallel on candle's worker threads. Each (sequence, head) is computed by the same
//! operations in the same order whatever else is in the step and however its prompt is
//! chunked, so batched == alone and chunked == whole hold bit for bit, as for attention.
//! On a GPU the projections run there and the recurrence on the host.

use std::io::{Read, Seek};

use candle_core::{Device, Result, Tensor};

use super::blocks::{Linear, Tensors};
use super::hparams::DeltaNetShape;
use crate::engine::ops::{SyncPtr, dot};

/// One sequence's memory in one Gated DeltaNet layer.
#[derive(Clone)]
pub struct State {
    /// The convolution's last `conv_kernel - 1` inputs, `[tap][channel]`, oldest first.
    conv: Vec<f32>,
    /// Each value head's `d × d` memory, `[head][value j][key i]`.
    ssm: Vec<f32>,
}

impl State {
    pub fn zeros(shape: &DeltaNetShape) -> State {
        State {
            conv: vec![0.0; (shape.conv_kernel - 1) * shape.conv_dim()],
            ssm: vec![0.0; shape.n_v_heads * shape.head_dim * shape.head_dim],
        }
    }

    pub fn bytes(&self) -> usize {
        (self.conv.len() + self.ssm.len()) * size_of::<f32>()
    }
}

/// One sequence's rows of a step (`offset..offset + n` of the step's rows) and its state.
pub(super) struct Rows<'a> {
    pub offset: usize,
    pub n: usize,
    pub state: &'a mut State,
}

/// A Gated DeltaNet layer's weights.
pub(super) struct DeltaNet {
    shape: DeltaNetShape,
    qkv: Linear,
    z: Linear,
    alpha: Linear,
    beta: Linear,
    /// The convolution's taps, `[tap][channel]`.
    conv: Vec<f32>,
    dt_bias: Vec<f32>,
    /// `-exp(A_log)` per value head.
    a: Vec<f32>,
    norm: Vec<f32>,
    out: Linear,
    eps: f32,
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl DeltaNet {
    /// Layer `i`'s tensors (llama.cpp's names), every shape checked. The small float
    /// projections run on wisp's kernel as Q8_0 (as `per_layer_model_proj`), so a row's
    /// result does not depend on how many rows share the step.
    pub fn load<R: Read + Seek>(file: &mut Tensors<'_, R>, i: usize, e: usize, shape: DeltaNetShape, eps: f32) -> Result<DeltaNet> {
        let name = |n: &str| format!("blk.{i}.{n}");
        let (channels, taps, heads) = (shape.conv_dim(), shape.conv_kernel, shape.n_v_heads);
        let by_channel = host(&file.tensor(&name("ssm_conv1d.weight"), &[channels, taps])?.dequantize(&Device::Cpu)?)?;
        let conv = (0..taps).flat_map(|t| (0..channels).map(move |c| (c, t))).map(|(c, t)| by_channel[c * taps + t]).collect();
        Ok(DeltaNet {
            shape,
            qkv: file.linear_q8(&name("attn_qkv"), [channels, e])?,
            z: file.linear_q8(&name("attn_gate"), [shape.value_dim(), e])?,
            alpha: file.linear_q8(&name("ssm_alpha"), [heads, e])?,
            beta: file.linear_q8(&name("ssm_beta"), [heads, e])?,
            conv,
            dt_bias: host(&file.vector(&name("ssm_dt.bias"), heads)?)?,
            a: host(&file.vector(&name("ssm_a"), heads)?)?,
            norm: host(&file.vector(&name("ssm_norm.weight"), shape.head_dim)?)?,
            out: file.linear(&name("ssm_out"), [e, shape.value_dim()])?,
            eps,
        })
    }

    /// The layer's output `(1, rows, n_embd)` for the normed input `h` of every row of the
    /// step; each sequence's rows run through its state, which they advance.
    pub fn forward(&self, h: &Tensor, seqs: &mut [Rows<'_>]) -> Result<Tensor> {
        let rows = h.dim(1)?;
        if let Some(seq) = seqs.iter().find(|s| s.offset + s.n > rows) {
            candle_core::bail!("a sequence's rows {}..{} are past the step's {rows}", seq.offset, seq.offset + seq.n)
        }
        let mixed = self.convolve(&host(&self.qkv.forward(h)?)?, seqs);
        let gates = [&self.z, &self.alpha, &self.beta].map(|w| w.forward(h).and_then(|t| host(&t)));
        let [z, alpha, beta] = gates;
        let out = self.recur(&mixed, &z?, &alpha?, &beta?, seqs, rows);
        let out = Tensor::from_vec(out, (1, rows, self.shape.value_dim()), &Device::Cpu)?.to_device(h.device())?;
        self.out.forward(&out)
    }

    /// The causal convolution and SiLU of every row's `[q | k | v]`, each sequence's rows
    /// after the inputs its state holds (which then holds its last ones).
    fn convolve(&self, mixed: &[f32], seqs: &mut [Rows<'_>]) -> Vec<f32> {
        let (c, taps) = (self.shape.conv_dim(), self.shape.conv_kernel);
        let mut out = vec![0f32; mixed.len()];
        for seq in seqs.iter_mut() {
            let held = &mut seq.state.conv;
            for row in seq.offset..seq.offset + seq.n {
                let x = &mixed[row * c..(row + 1) * c];
                let y = &mut out[row * c..(row + 1) * c];
                // Oldest input first, as ggml's `ssm_conv` sums.
                for (t, w) in self.conv.chunks_exact(c).enumerate() {
                    let input = if t + 1 < taps { &held[t * c..(t + 1) * c] } else { x };
                    for ((y, &w), &v) in y.iter_mut().zip(w).zip(input) {
                        *y += v * w;
                    }
                }
                for y in y.iter_mut() {
                    *y = silu(*y);
                }
                held.copy_within(c.., 0);
                let last = held.len() - c;
                held[last..].copy_from_slice(x);
            }
        }
        out
    }

    /// The delta rule over every (sequence, value head), then the gated norm: the
    /// `(rows, value_dim)` input of `ssm_out`.
    fn recur(&self, mixed: &[f32], z: &[f32], alpha: &[f32], beta: &[f32], seqs: &mut [Rows<'_>], rows: usize) -> Vec<f32> {
        let DeltaNetShape { head_dim: d, n_k_heads, n_v_heads: heads, .. } = self.shape;
        let (c, key_dim, value_dim) = (self.shape.conv_dim(), self.shape.key_dim(), self.shape.value_dim());
        let mut out = vec![0f32; rows * value_dim];
        let dst = SyncPtr(out.as_mut_ptr());
        let spans: Vec<(usize, usize, SyncPtr)> = seqs.iter_mut().map(|s| (s.offset, s.n, SyncPtr(s.state.ssm.as_mut_ptr()))).collect();
        let units: Vec<(usize, usize)> = (0..spans.len()).flat_map(|s| (0..heads).map(move |h| (s, h))).collect();
        let scale = 1.0 / (d as f32).sqrt();
        candle_core::utils::barrier_pool().execute_chunked(units.len(), |range| {
            let (mut q, mut k) = (vec![0f32; d], vec![0f32; d]);
            for &(s, h) in &units[range] {
                let (offset, n, states) = spans[s];
                // SAFETY: each (sequence, head) is one unit, so this head's d × d values of
                // the sequence's state (a buffer of `heads · d · d` that outlives the pool's
                // call, borrowed mutably through `seqs`) are touched by this worker alone.
                let state = unsafe { std::slice::from_raw_parts_mut(states.get().add(h * d * d), d * d) };
                let kh = h % n_k_heads;
                for row in offset..offset + n {
                    let x = &mixed[row * c..(row + 1) * c];
                    l2_normed(&x[kh * d..(kh + 1) * d], &mut q, self.eps);
                    l2_normed(&x[key_dim + kh * d..key_dim + (kh + 1) * d], &mut k, self.eps);
                    let v = &x[2 * key_dim + h * d..2 * key_dim + (h + 1) * d];
                    let at = row * heads + h;
                    let a = alpha[at] + self.dt_bias[h];
                    let softplus = if a > 20.0 { a } else { (1.0 + a.exp()).ln() };
                    let decay = (softplus * self.a[h]).exp();
                    let b = 1.0 / (1.0 + (-beta[at]).exp());
                    // SAFETY: row `row` and head `h` are this unit's alone (sequences' rows
                    // are disjoint and inside the step, checked in `forward`), inside `out`
                    // (rows × value_dim values), which lives until the pool has joined.
                    let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(row * value_dim + h * d), d) };
                    // Row j of the state is all that value j's decay, delta, update and
                    // output read: one pass over the state per token.
                    for ((s_row, o), &v) in state.chunks_exact_mut(d).zip(o.iter_mut()).zip(v) {
                        s_row.iter_mut().for_each(|s| *s *= decay);
                        let delta = (v - dot(s_row, &k)) * b;
                        for (s, &k) in s_row.iter_mut().zip(&k) {
                            *s = k.mul_add(delta, *s);
                        }
                        *o = dot(s_row, &q) * scale;
                    }
                    let mean_square = o.iter().map(|x| x * x).sum::<f32>() / d as f32;
                    let inv = 1.0 / (mean_square + self.eps).sqrt();
                    let gate = &z[row * value_dim + h * d..row * value_dim + (h + 1) * d];
                    for ((o, &w), &g) in o.iter_mut().zip(&self.norm).zip(gate) {
                        *o = *o * inv * w * silu(g);
                    }
                }
            }
        });
        out
    }
}

/// `x / √(Σx² + eps)` into `out` (ggml's `rms_norm(x, eps/n) / √n`).
fn l2_normed(x: &[f32], out: &mut [f32], eps: f32) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + eps).sqrt();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * inv;
    }
}
