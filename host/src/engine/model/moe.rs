//! Routed experts (llama.cpp `build_moe_ffn`): a router scores every expert for each row,
//! the row runs the best `n_used` experts' gated MLPs ([`Activation`]), and their outputs
//! are summed with the router's weights. The rows of a step are grouped by expert, so an expert's
//! matrices are read once per step for all the rows routed to it: the prompt's tokens
//! during prefill, the batch's sequences during decode.

use std::io::{Read, Seek};

use candle_core::{Device, Result, Tensor};

use super::blocks::{Linear, Tensors};
use super::hparams::Moe;

/// One expert's gated MLP.
struct Expert {
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// An expert's gated activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `silu(gate) · up`.
    Silu,
    /// gpt-oss's clamped SwiGLU (ggml `swiglu_oai`): with `g = min(gate, limit)` and
    /// `u = clamp(up, −limit, limit)`, `g · σ(alpha · g) · (u + 1)`.
    SwigluOai { alpha: f32, limit: f32 },
}

pub(super) struct Experts {
    /// The router's `(n_expert, n_embd)` weights and its bias, as f32.
    router: Vec<f32>,
    router_bias: Option<Vec<f32>>,
    experts: Vec<Expert>,
    moe: Moe,
}

impl Experts {
    /// Layer `i`'s router (`ffn_gate_inp`, with a bias where the file has one) and experts
    /// (`ffn_{gate,up,down}_exps`, one 3-D tensor each, expert-major, with `(n_expert,
    /// rows)` biases where the file has them: gpt-oss).
    pub fn load<R: Read + Seek>(file: &mut Tensors<'_, R>, i: usize, n_embd: usize, moe: Moe) -> Result<Experts> {
        let name = |n: &str| format!("blk.{i}.{n}");
        let (n, ff) = (moe.n_expert, moe.n_ff);
        let router = file.tensor(&name("ffn_gate_inp.weight"), &[n, n_embd])?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let bias_name = name("ffn_gate_inp.bias");
        let router_bias = match file.has(&bias_name) {
            true => Some(file.tensor(&bias_name, &[n])?.dequantize(&Device::Cpu)?.to_vec1()?),
            false => None,
        };
        let gate = file.experts(&name("ffn_gate_exps"), [n, ff, n_embd])?;
        let up = file.experts(&name("ffn_up_exps"), [n, ff, n_embd])?;
        let down = file.experts(&name("ffn_down_exps"), [n, n_embd, ff])?;
        let experts = gate.into_iter().zip(up).zip(down).map(|((gate, up), down)| Expert { gate, up, down }).collect();
        Ok(Experts { router, router_bias, experts, moe })
    }

    /// The MLP output of every row of `h`, `(1, rows, n_embd)`.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let (_, rows, width) = h.dims3()?;
        let xs = h.flatten_all()?.to_vec1::<f32>()?;
        // Per expert: the rows routed to it and their weights.
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.moe.n_expert];
        let mut scores = vec![0f32; self.moe.n_expert];
        for (row, x) in xs.chunks_exact(width).enumerate() {
            // The router's scores, one dot product per expert in a fixed order: a row is
            // routed the same whatever else is in the batch (a matmul's blocking would
            // depend on the number of rows).
            for (e, score) in scores.iter_mut().enumerate() {
                *score =
                    crate::engine::ops::dot(x, &self.router[e * width..(e + 1) * width]) + self.router_bias.as_ref().map_or(0.0, |b| b[e]);
            }
            for (expert, weight) in route(&scores, self.moe.n_used) {
                routed[expert].0.push(row as u32);
                routed[expert].1.push(weight);
            }
        }
        let device = h.device();
        let mut out = vec![0f32; rows * width];
        for (expert, (ids, weights)) in self.experts.iter().zip(&routed) {
            if ids.is_empty() {
                continue;
            }
            // The expert's rows, gathered from the host copy the router read.
            let gathered: Vec<f32> = ids.iter().flat_map(|&r| &xs[r as usize * width..(r as usize + 1) * width]).copied().collect();
            let xs = Tensor::from_vec(gathered, (1, ids.len(), width), device)?;
            let act = activate(self.moe.activation, &expert.gate.forward(&xs)?, &expert.up.forward(&xs)?)?;
            let ys = expert.down.forward(&act)?.squeeze(0)?.to_vec2::<f32>()?;
            for ((&row, &weight), y) in ids.iter().zip(weights).zip(&ys) {
                let dst = &mut out[row as usize * width..][..width];
                for (o, &v) in dst.iter_mut().zip(y) {
                    *o += weight * v;
                }
            }
        }
        Tensor::from_vec(out, (1, rows, width), device)
    }
}

/// `act(gate) · up`, elementwise.
fn activate(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match activation {
        Activation::Silu => candle_nn::ops::silu(gate)? * up,
        Activation::SwigluOai { alpha, limit } => {
            let (shape, device) = (gate.shape().clone(), gate.device().clone());
            let (g, u) = (gate.flatten_all()?.to_vec1::<f32>()?, up.flatten_all()?.to_vec1::<f32>()?);
            let out = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| {
                    let (g, u) = (g.min(limit), u.clamp(-limit, limit));
                    g / (1.0 + (-alpha * g).exp()) * (u + 1.0)
                })
                .collect::<Vec<f32>>();
            Tensor::from_vec(out, shape, &device)
        }
    }
}

/// The experts one row runs and their weights, best first, from the router's `scores`:
/// the top `n_used` scores and a softmax over those. Qwen 3 MoE's rule (a softmax over
/// every expert, the top kept and renormalised to sum to one) and gpt-oss's (the top
/// scores, then a softmax over them) give the same weights: the first softmax's
/// denominator cancels.
fn route(scores: &[f32], n_used: usize) -> Vec<(usize, f32)> {
    // Ties go to the lower index, as ggml's argsort; a NaN score (a malformed file) is
    // chosen last and weighs nothing.
    let key = |e: usize| if scores[e].is_nan() { f32::NEG_INFINITY } else { scores[e] };
    let better = |a: &usize, b: &usize| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // The best n_used, then only those sorted (a total order: the same result as a full sort).
    if n_used < order.len() {
        order.select_nth_unstable_by(n_used, better);
        order.truncate(n_used);
    }
    order.sort_by(better);
    let max = order.first().map_or(0.0, |&e| key(e));
    let exps: Vec<f32> = order.iter().map(|&e| (key(e) - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    order.into_iter().zip(exps).map(|(e, p)| (e, if sum > 0.0 { p / sum } else { 0.0 })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_routing_keeps_the_top_experts_renormalised() {
        let scores = [0.0, 2.0, -1.0, 1.0];
        let chosen = route(&scores, 2);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3]);
        let (e2, e1) = (2f32.exp(), 1f32.exp());
        assert!((chosen[0].1 - e2 / (e2 + e1)).abs() < 1e-6);
        assert!((chosen[0].1 + chosen[1].1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn routing_ties_and_nans_are_ordered() {
        let chosen = route(&[1.0, f32::NAN, 1.0, 0.5], 2);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [0, 2]);
    }
}
