//! Every architecture wisp implements, checked against llama.cpp on the same file.
//!
//! No real weights of these models can be fetched here, and none is needed: llama.cpp
//! implements every family. scripts/make-test-models.sh writes each family's GGUF with its
//! released per-layer shapes, a real tokenizer and seeded random weights (made so greedy
//! decoding is mostly decisive: scripts/make-gguf.py), cut to two layers (one of experts), in the quant
//! types users run. For each file and three prompts, llama-server decodes 32 greedy tokens
//! and reports its top two log-probabilities at each step; wisp runs the same tokens
//! (teacher-forced, so one early disagreement cannot derail the rest) and must
//! - pick llama.cpp's token wherever llama.cpp's top-1 leads its top-2 by >= 0.2 nats,
//! - give llama.cpp's token a log-probability within 0.1 of llama.cpp's, at every step.

mod common;

use serde_json::{Value, json};
use wisp::config::ModelConfig;
use wisp::engine::{ModelParts, load_parts};

const PROMPTS: [&str; 3] = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, in a small village,"];
const STEPS: usize = 32;
/// Where llama.cpp's choice must be wisp's too.
const DECISIVE_NATS: f32 = 0.2;
const LOGPROB_TOLERANCE: f32 = 0.1;
/// Both engines run with this context (it picks Phi 3's LongRoPE factors).
const CONTEXT: usize = 4096;

/// llama.cpp's greedy step: its token and, where llama-server reports them, that token's
/// log-probability and the runner-up's.
struct Step {
    token: u32,
    probs: Option<(f32, f32)>,
}

fn llama_steps(server: &common::LlamaServer, prompt: &[u32]) -> Vec<Step> {
    // A negative temperature decodes greedily and reports the plain softmax of the logits.
    let body = json!({
        "prompt": prompt, "n_predict": STEPS, "temperature": -1.0, "n_probs": 2,
        "ignore_eos": true, "cache_prompt": false, "return_tokens": true,
    });
    let reply: Value = common::client().post(format!("{}/completion", server.url)).json(&body).send().unwrap().json().unwrap();
    let tokens: Vec<u32> =
        reply["tokens"].as_array().unwrap_or_else(|| panic!("llama-server: {reply}")).iter().map(|t| t.as_u64().unwrap() as u32).collect();
    // It may end early on an end-of-generation token other than eos (ignore_eos spares only
    // eos): the steps up to there are compared.
    assert!(tokens.len() >= STEPS / 4, "llama-server returned {} tokens: {reply}", tokens.len());
    // A token that ends inside a UTF-8 character gets no entry of its own: llama-server
    // reports the next one (with the text of both). Entries follow the tokens in order.
    let mut entries = reply["completion_probabilities"].as_array().unwrap().iter().peekable();
    tokens
        .into_iter()
        .map(|token| {
            let probs = entries.next_if(|p| p["id"].as_u64() == Some(token as u64)).map(|p| {
                let top = p["top_logprobs"].as_array().unwrap();
                assert_eq!(top[0]["id"], p["id"], "llama.cpp's greedy token is its top-1");
                let lp = |i: usize| top[i]["logprob"].as_f64().unwrap() as f32;
                (lp(0), lp(1))
            });
            Step { token, probs }
        })
        .collect()
}

/// log-softmax of one step's logits.
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
    let log_sum = max + sum.ln() as f32;
    logits.iter().map(|l| l - log_sum).collect()
}

/// wisp's log-probabilities at each of llama.cpp's steps, fed llama.cpp's tokens.
fn wisp_steps(parts: &ModelParts, prompt: &[u32], steps: &[Step]) -> Vec<Vec<f32>> {
    let mut cache = parts.model.new_cache(prompt.len() + steps.len()).unwrap();
    let mut logits = parts.model.forward(prompt, &mut cache).unwrap();
    let mut out = Vec::with_capacity(steps.len());
    for step in steps {
        out.push(log_softmax(&logits.to_vec1::<f32>().unwrap()));
        logits = parts.model.forward(&[step.token], &mut cache).unwrap();
    }
    out
}

fn check(name: &str) {
    compare(name, false)
}

/// Also candle's attention ops (what GPUs run) against llama.cpp, for the families whose
/// RoPE or q scaling the GPU path implements on its own.
fn check_with_candle_attention(name: &str) {
    compare(name, true)
}

fn compare(name: &str, candle_attention: bool) {
    let path = common::synthetic(name);
    let ctx = CONTEXT.to_string();
    let llama = common::LlamaServer::start(&path, &["-c", &ctx, "-np", "1", "-t", "2", "--no-warmup"]);
    let config =
        ModelConfig { id: name.into(), path: Some(path.clone()), device: "cpu".into(), context_length: CONTEXT, ..ModelConfig::default() };
    let mut parts = load_parts(&config).unwrap_or_else(|e| panic!("wisp cannot load {}: {e}", path.display()));
    let prompts: Vec<(&str, Vec<u32>, Vec<Step>)> = PROMPTS
        .iter()
        .map(|text| {
            let mut prompt = parts.tokenizer.tokenizer.encode(*text, false).unwrap().get_ids().to_vec();
            if parts.tokenizer.add_bos
                && let Some(bos) = parts.tokenizer.bos
            {
                prompt.insert(0, bos);
            }
            let steps = llama_steps(&llama, &prompt);
            (*text, prompt, steps)
        })
        .collect();
    agree(name, &parts, &prompts);
    if candle_attention {
        parts.model.use_candle_attention();
        agree(&format!("{name} (candle's attention)"), &parts, &prompts);
    }
}

/// wisp's steps on `prompts` against llama.cpp's.
fn agree(name: &str, parts: &ModelParts, prompts: &[(&str, Vec<u32>, Vec<Step>)]) {
    let (mut failures, mut decisive, mut total, mut worst) = (Vec::new(), 0, 0, 0f32);
    let mut distinct = std::collections::HashSet::new();
    for (text, prompt, steps) in prompts {
        for (i, (step, ours)) in steps.iter().zip(wisp_steps(parts, prompt, steps)).enumerate() {
            let Some((logprob, second)) = step.probs else { continue };
            total += 1;
            distinct.insert(step.token);
            let argmax = (0..ours.len()).max_by(|a, b| ours[*a].total_cmp(&ours[*b])).unwrap() as u32;
            let delta = (ours[step.token as usize] - logprob).abs();
            worst = worst.max(delta);
            if logprob - second >= DECISIVE_NATS {
                decisive += 1;
                if argmax != step.token {
                    failures.push(format!(
                        "{text:?} step {i}: llama.cpp picks {} (lead {:.2} nats), wisp {argmax}",
                        step.token,
                        logprob - second
                    ));
                }
            }
            if delta > LOGPROB_TOLERANCE {
                failures.push(format!(
                    "{text:?} step {i}: token {} log-probability llama.cpp {logprob:.3}, wisp {:.3}",
                    step.token, ours[step.token as usize]
                ));
            }
        }
    }
    eprintln!("{name}: {decisive} of {total} steps decisive, {} distinct tokens, worst log-probability gap {worst:.4}", distinct.len());
    assert!(failures.is_empty(), "{name}: {} disagreements with llama.cpp:\n{}", failures.len(), failures.join("\n"));
    // A file whose every step is a coin toss, or that repeats one token, would check little.
    assert!(decisive * 2 >= total, "{name}: only {decisive} of {total} steps are decisive: the synthetic file checks little");
    assert!(distinct.len() >= 2 * PROMPTS.len(), "{name}: llama.cpp decoded only {} distinct tokens", distinct.len());
}

/// One table for the embedding and the output, as Qwen3-0.6B ships (wisp's tied path; the
/// untied Q8_0 file agreed too and left CI to keep it within its time).
#[test]
fn qwen3_tied_q8_0_matches_llama_cpp() {
    check("qwen3-tied-Q8_0");
}

#[test]
fn qwen3_q4_k_m_matches_llama_cpp() {
    check("qwen3-Q4_K_M");
}

#[test]
fn llama3_rope_scaling_q8_0_matches_llama_cpp() {
    check("llama3-Q8_0");
}

#[test]
fn llama3_rope_scaling_q4_k_m_matches_llama_cpp() {
    check("llama3-Q4_K_M");
}

#[test]
fn phi3_longrope_short_factors_q8_0_matches_llama_cpp() {
    check("phi3-Q8_0");
}

#[test]
fn phi3_longrope_short_factors_q4_k_m_matches_llama_cpp() {
    check("phi3-Q4_K_M");
}

#[test]
fn phi4_mini_partial_rotary_long_factors_q4_k_m_matches_llama_cpp() {
    check_with_candle_attention("phi4-Q4_K_M");
}

#[test]
fn mistral3_yarn_and_temperature_q8_0_matches_llama_cpp() {
    check_with_candle_attention("mistral3-Q8_0");
}

#[test]
fn mistral3_yarn_and_temperature_q4_k_m_matches_llama_cpp() {
    check("mistral3-Q4_K_M");
}

/// The non-linear 4-bit types (a table of 16 values under a scale), which candle cannot
/// read: on wisp's kernel.
#[test]
fn qwen3_iq4_xs_matches_llama_cpp() {
    check("qwen3-IQ4_XS");
}

#[test]
fn llama3_iq4_nl_matches_llama_cpp() {
    check("llama3-IQ4_NL");
}

/// Routed experts: 8 of Qwen3-30B-A3B's 128 per token, one layer of them. llama-quantize's
/// Q4_K_M keeps the experts' down projection in Q6_K, gate and up in Q4_K (wisp's kernel
/// both). (Q8_0 and MXFP4 experts on this file agreed too, 0.059 and 0.064 in session
/// 14; CI keeps one MoE file of each family to stay within its time: gpt-oss's is MXFP4.)
#[test]
fn qwen3moe_q4_k_m_matches_llama_cpp() {
    check("qwen3moe-Q4_K_M");
}

/// gpt-oss-20b's shapes, experts in MXFP4 as released: attention sinks, biases on the
/// attention, router and experts, clamped SwiGLU, YaRN, and a sliding window cut to 16 so
/// the prompts pass it. Its GPU path (candle's attention with the sinks as a column) too.
#[test]
fn gpt_oss_mxfp4_matches_llama_cpp() {
    check_with_candle_attention("gpt-oss-MXFP4_MOE");
}

/// Gemma-4-E2B's shapes cut to 10 layers: sliding layers of head 256 and global ones of 512
/// with proportional RoPE, layers 5-9 reading the caches of layers 3 and 4, per-layer token
/// embeddings, v norms, soft-capped logits, a window cut to 16 so the prompts pass it. Its
/// GPU path (candle's attention) too.
#[test]
fn gemma4_q4_k_m_matches_llama_cpp() {
    check_with_candle_attention("gemma4-Q4_K_M");
}

/// Qwen3.5-0.8B's shapes cut to 4 layers: three Gated DeltaNet layers (causal convolution,
/// L2-normed q/k, decay and delta rule, gated RMS norm) and one attention layer with a
/// sigmoid output gate, q/k norms and interleaved M-RoPE; a multi-token-prediction block
/// after the trunk that both engines skip. Its GPU path (candle's attention) too. (A Q8_0
/// file agreed too, 0.061, session 16; CI keeps the most used quant to stay within its time.)
/// Mutations this file catches: a convolution without its held inputs (3.3 nats), a state
/// reset between steps (2.2), no decay (2.6), no `silu(z)` gate (6.6), no attention output
/// gate (0.50).
#[test]
fn qwen35_q4_k_m_matches_llama_cpp() {
    check_with_candle_attention("qwen35-Q4_K_M");
}

/// Qwen3.5-35B-A3B's shapes cut to two layers, a Gated DeltaNet layer and an attention
/// layer: 8 of 256 routed experts of width 512 and a shared expert behind a sigmoid gate in
/// place of the MLP.
#[test]
fn qwen35moe_q4_k_m_matches_llama_cpp() {
    check("qwen35moe-Q4_K_M");
}

/// Gemma-4-26B-A4B's shapes cut to two layers, a sliding one and a global one: 8 of 128 GELU experts of width 704
/// (gate and up in one tensor, a per-expert output scale) beside the dense MLP, each side
/// with its own norms, routed on the stream normed and scaled apart from the experts' input.
#[test]
fn gemma4_moe_q4_k_m_matches_llama_cpp() {
    check("gemma4-moe-Q4_K_M");
}

#[test]
fn qwen2_q4_k_m_matches_llama_cpp() {
    check("qwen2-Q4_K_M");
}
