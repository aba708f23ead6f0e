//! Routed experts (llama.cpp `build_moe_ffn`): a router scores every expert for each row,
//! the row runs the best `n_used` experts' gated MLPs ([`Activation`]), and their outputs
//! are summed with the router's weights. The rows of a step are grouped by expert, so an expert's
//! matrices are read once per step for all the rows routed to it: the prompt's tokens
//! during prefill, the batch's sequences during decode. Gemma 4 runs them beside its dense
//! MLP ([`Beside`]).

use std::io::{Read, Seek};

use candle_core::{DType, Device, Result, Tensor};

use super::blocks::{GateUp, Linear, RmsNorm, Tensors};
use super::hparams::Moe;

/// One expert's gated MLP.
struct Expert {
    gate_up: GateUp,
    down: Linear,
}

impl Expert {
    /// `down(act(gate · x) · (up · x))` for the rows of `xs`.
    fn forward(&self, activation: Activation, xs: &Tensor) -> Result<Tensor> {
        let (gate, up) = self.gate_up.forward(xs)?;
        self.down.forward(&activate(activation, &gate, &up)?)
    }
}

/// An expert's gated activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `silu(gate) · up`.
    Silu,
    /// `gelu_tanh(gate) · up` (Gemma 4).
    Gelu,
    /// gpt-oss's clamped SwiGLU (ggml `swiglu_oai`): with `g = min(gate, limit)` and
    /// `u = clamp(up, −limit, limit)`, `g · σ(alpha · g) · (u + 1)`.
    SwigluOai { alpha: f32, limit: f32 },
}

pub(super) struct Experts {
    /// The router's `(n_expert, n_embd)` weights and its bias, as f32.
    router: Vec<f32>,
    router_bias: Option<Vec<f32>>,
    experts: Vec<Expert>,
    /// Each expert's output is multiplied by its entry (`ffn_down_exps.scale`: Gemma 4).
    scales: Option<Vec<f32>>,
    /// The expert every row runs (Qwen 3.5 MoE), weighted by `sigmoid(gate · x)`.
    shared: Option<(Expert, Vec<f32>)>,
    moe: Moe,
}

impl Experts {
    /// Layer `i`'s router (`ffn_gate_inp`, with a bias where the file has one) and experts
    /// (`ffn_{gate,up,down}_exps`, one 3-D tensor each, expert-major, with `(n_expert,
    /// rows)` biases where the file has them: gpt-oss; or gate and up as one
    /// `ffn_gate_up_exps`, gate rows first: Gemma 4).
    pub fn load<R: Read + Seek>(file: &mut Tensors<'_, R>, i: usize, n_embd: usize, moe: Moe) -> Result<Experts> {
        let name = |n: &str| format!("blk.{i}.{n}");
        let (n, ff) = (moe.n_expert, moe.n_ff);
        let router = file.tensor(&name("ffn_gate_inp.weight"), &[n, n_embd])?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let bias_name = name("ffn_gate_inp.bias");
        let router_bias = match file.has(&bias_name) {
            true => Some(file.tensor(&bias_name, &[n])?.dequantize(&Device::Cpu)?.to_vec1()?),
            false => None,
        };
        let gate_ups: Vec<GateUp> = match file.has(&name("ffn_gate_up_exps.weight")) {
            true => file.experts(&name("ffn_gate_up_exps"), [n, 2 * ff, n_embd])?.into_iter().map(GateUp::Fused).collect(),
            false => {
                let gate = file.experts(&name("ffn_gate_exps"), [n, ff, n_embd])?;
                let up = file.experts(&name("ffn_up_exps"), [n, ff, n_embd])?;
                gate.into_iter().zip(up).map(|(gate, up)| GateUp::Separate(gate, up)).collect()
            }
        };
        let down = file.experts(&name("ffn_down_exps"), [n, n_embd, ff])?;
        let experts = gate_ups.into_iter().zip(down).map(|(gate_up, down)| Expert { gate_up, down }).collect();
        let scale_name = name("ffn_down_exps.scale");
        let scales = match file.has(&scale_name) {
            true => Some(file.vector(&scale_name, n)?.to_device(&Device::Cpu)?.to_vec1()?),
            false => None,
        };
        let shared = match moe.n_ff_shared {
            0 => None,
            ff => {
                let expert = Expert {
                    gate_up: GateUp::Separate(
                        file.linear(&name("ffn_gate_shexp"), [ff, n_embd])?,
                        file.linear(&name("ffn_up_shexp"), [ff, n_embd])?,
                    ),
                    down: file.linear(&name("ffn_down_shexp"), [n_embd, ff])?,
                };
                let gate = file.vector(&name("ffn_gate_inp_shexp.weight"), n_embd)?.to_device(&Device::Cpu)?.to_vec1()?;
                Some((expert, gate))
            }
        };
        Ok(Experts { router, router_bias, experts, scales, shared, moe })
    }

    /// The MLP output of every row of `h`, `(1, rows, n_embd)`.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.forward_routed(h, None)
    }

    /// The MLP output of every row of `h`, each row routed by its row of `router_input` (of `h`
    /// itself where `None`).
    fn forward_routed(&self, h: &Tensor, router_input: Option<&Tensor>) -> Result<Tensor> {
        let (_, rows, width) = h.dims3()?;
        let xs = h.flatten_all()?.to_vec1::<f32>()?;
        let route_xs = router_input.map(|r| r.flatten_all()?.to_vec1::<f32>()).transpose()?;
        if route_xs.as_ref().is_some_and(|r| r.len() != xs.len()) {
            candle_core::bail!("experts: the router's input has another shape than the experts'")
        }
        // Per expert: the rows routed to it and their weights.
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.moe.n_expert];
        let mut scores = vec![0f32; self.moe.n_expert];
        for (row, x) in route_xs.as_ref().unwrap_or(&xs).chunks_exact(width).enumerate() {
            // The router's scores, one dot product per expert in a fixed order: a row is
            // routed the same whatever else is in the batch (a matmul's blocking would
            // depend on the number of rows).
            for (e, score) in scores.iter_mut().enumerate() {
                *score =
                    crate::engine::ops::dot(x, &self.router[e * width..(e + 1) * width]) + self.router_bias.as_ref().map_or(0.0, |b| b[e]);
            }
            for (expert, weight) in route(&scores, self.moe.n_used) {
                routed[expert].0.push(row as u32);
                routed[expert].1.push(weight * self.scales.as_ref().map_or(1.0, |s| s[expert]));
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
            let ys = expert.forward(self.moe.activation, &xs)?.squeeze(0)?.to_vec2::<f32>()?;
            for ((&row, &weight), y) in ids.iter().zip(weights).zip(&ys) {
                let dst = &mut out[row as usize * width..][..width];
                for (o, &v) in dst.iter_mut().zip(y) {
                    *o += weight * v;
                }
            }
        }
        if let Some((expert, gate)) = &self.shared {
            let ys = expert.forward(self.moe.activation, h)?.flatten_all()?.to_vec1::<f32>()?;
            for ((o, y), x) in out.chunks_exact_mut(width).zip(ys.chunks_exact(width)).zip(xs.chunks_exact(width)) {
                let weight = 1.0 / (1.0 + (-crate::engine::ops::dot(x, gate)).exp());
                for (o, &v) in o.iter_mut().zip(y) {
                    *o += weight * v;
                }
            }
        }
        Tensor::from_vec(out, (1, rows, width), device)
    }
}

/// Gemma 4's experts beside the dense MLP (llama.cpp `gemma4.cpp`): the MLP's output is
/// normed (`post_ffw_norm_1`); the experts take the stream normed by `pre_ffw_norm_2` and are
/// routed on the stream RMS-normed and scaled by `ffn_gate_inp.scale / √n_embd`; their sum
/// is normed (`post_ffw_norm_2`) and added to the MLP's (the layer's `post_ffw_norm` follows).
pub(super) struct Beside {
    post_dense: RmsNorm,
    pre: RmsNorm,
    post: RmsNorm,
    router_input: RmsNorm,
    experts: Experts,
}

impl Beside {
    /// Layer `i`'s experts and norms, `None` where the layer has no router (a dense layer).
    pub fn load<R: Read + Seek>(file: &mut Tensors<'_, R>, i: usize, n_embd: usize, moe: Moe, eps: f32) -> Result<Option<Beside>> {
        let name = |n: &str| format!("blk.{i}.{n}");
        if !file.has(&name("ffn_gate_inp.weight")) {
            return Ok(None);
        }
        let scale = file.vector(&name("ffn_gate_inp.scale"), n_embd)?;
        let router_input = RmsNorm { weight: (scale.to_dtype(DType::F32)? / (n_embd as f64).sqrt())?, eps };
        Ok(Some(Beside {
            post_dense: file.norm(&name("post_ffw_norm_1.weight"), n_embd, eps)?,
            pre: file.norm(&name("pre_ffw_norm_2.weight"), n_embd, eps)?,
            post: file.norm(&name("post_ffw_norm_2.weight"), n_embd, eps)?,
            router_input,
            experts: Experts::load(file, i, n_embd, moe)?,
        }))
    }

    /// The MLP's output `dense` (of the stream normed by `ffn_norm`) with the experts' added,
    /// for the stream `x` after attention.
    pub fn forward(&self, x: &Tensor, dense: &Tensor) -> Result<Tensor> {
        let routed = self.experts.forward_routed(&self.pre.forward(x)?, Some(&self.router_input.forward(x)?))?;
        self.post_dense.forward(dense)? + self.post.forward(&routed)?
    }
}

/// `act(gate) · up`, elementwise.
fn activate(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match activation {
        Activation::Silu => candle_nn::ops::silu(gate)? * up,
        Activation::Gelu => crate::engine::ops::gelu_mul(gate, up),
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
