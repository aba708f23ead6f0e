//! `wisp bench`: prompt-processing and decode speed of a model, measured on the engine
//! directly (no HTTP), in the shape of llama.cpp's `llama-bench` (pp N, tg N) and, with
//! `--batch`, of `llama-batched-bench` (B sequences decoding together), so the two can be
//! put side by side (scripts/bench-vs-llama.sh).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::config::{DEFAULT_MODEL_PATH, ModelConfig};
use crate::engine::load_parts;
use crate::engine::model::{Model, Segment, SeqCache};
use crate::engine::sampling::{Sampler, SamplingParams};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// GGUF file to measure.
    #[arg(long, default_value = DEFAULT_MODEL_PATH)]
    pub model: PathBuf,
    /// Prompt tokens processed in one prefill (llama-bench `-p`).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated one at a time (llama-bench `-n`).
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Repetitions of each test (llama-bench `-r`).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Prefill chunk size.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Sequences decoded together in one forward pass, a comma-separated list
    /// (llama-batched-bench `-npl`); for each B > 1 the table gets a `tgN×B` row with the
    /// aggregate tokens/s of B sequences that each decode `gen_tokens` tokens.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Device: auto, cpu, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Mean and standard deviation of a sample.
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Prefills `prompt` into a new cache in chunks; returns the cache and the last logits.
fn prefill(model: &Model, prompt: &[u32], capacity: usize, chunk: usize) -> anyhow::Result<(SeqCache, Vec<f32>)> {
    let mut cache = model.new_cache(capacity)?;
    let mut logits = None;
    for chunk in prompt.chunks(chunk) {
        logits = Some(model.forward(chunk, &mut cache)?);
    }
    Ok((cache, logits.context("empty prompt")?.to_vec1::<f32>()?))
}

/// Decodes `tokens` greedy tokens for each of `batch` sequences prefilled with `prompt`,
/// all in one forward pass per step; returns the aggregate tokens/s of the decode.
fn batched_decode(model: &Model, prompt: &[u32], batch: usize, tokens: usize, chunk: usize) -> anyhow::Result<f64> {
    let capacity = prompt.len() + tokens;
    let mut caches = Vec::with_capacity(batch);
    let mut samplers = Vec::with_capacity(batch);
    let mut logits = Vec::with_capacity(batch);
    for _ in 0..batch {
        let (cache, l) = prefill(model, prompt, capacity, chunk)?;
        caches.push(cache);
        logits.push(l);
        samplers.push(Sampler::new(SamplingParams { temperature: 0.0, ..SamplingParams::default() }, prompt));
    }
    let started = Instant::now();
    for _ in 0..tokens {
        let next: Vec<[u32; 1]> = samplers.iter_mut().zip(&mut logits).map(|(s, l)| [s.sample(l).token]).collect();
        let mut segments: Vec<Segment<'_>> = next.iter().zip(caches.iter_mut()).map(|(t, cache)| Segment { tokens: t, cache }).collect();
        let out = model.forward_batch(&mut segments)?;
        for (row, l) in logits.iter_mut().enumerate() {
            *l = out.get(row)?.to_vec1::<f32>()?;
        }
    }
    Ok((batch * tokens) as f64 / started.elapsed().as_secs_f64())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let config = ModelConfig {
        id: "bench".into(),
        path: Some(args.model.clone()),
        device: args.device.clone(),
        context_length: args.prompt_tokens + args.gen_tokens + 1,
        ..ModelConfig::default()
    };
    let load_started = Instant::now();
    let parts = load_parts(&config).with_context(|| format!("loading {}", args.model.display()))?;
    let load_secs = load_started.elapsed().as_secs_f64();
    let model = &parts.model;
    // A fixed, ordinary text, repeated to the prompt length.
    let text = "The quick brown fox jumps over the lazy dog while the committee reviews the annual report. ";
    let unit = parts.tokenizer.tokenizer.encode(text, false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    let prompt: Vec<u32> = unit.iter().copied().cycle().take(args.prompt_tokens).collect();

    let mut pp = Vec::new();
    let mut tg = Vec::new();
    let batches: Vec<usize> = args.batch.iter().copied().filter(|&b| b > 1).collect();
    let mut tg_batched = vec![Vec::new(); batches.len()];
    for rep in 0..args.reps + 1 {
        let started = Instant::now();
        let (mut cache, mut logits) = prefill(model, &prompt, args.prompt_tokens + args.gen_tokens, args.chunk)?;
        let pp_secs = started.elapsed().as_secs_f64();
        let mut sampler = Sampler::new(SamplingParams { temperature: 0.0, ..SamplingParams::default() }, &prompt);
        let started = Instant::now();
        for _ in 0..args.gen_tokens {
            let token = sampler.sample(&mut logits).token;
            logits = model.forward(&[token], &mut cache)?.to_vec1::<f32>()?;
        }
        let tg_secs = started.elapsed().as_secs_f64();
        let mut batched = Vec::with_capacity(batches.len());
        for &b in &batches {
            batched.push(batched_decode(model, &prompt, b, args.gen_tokens, args.chunk)?);
        }
        // The first repetition warms caches and is not counted (llama-bench does the same).
        if rep > 0 {
            pp.push(args.prompt_tokens as f64 / pp_secs);
            tg.push(args.gen_tokens as f64 / tg_secs);
            for (samples, tps) in tg_batched.iter_mut().zip(batched) {
                samples.push(tps);
            }
        }
    }
    let threads = candle_core::utils::get_num_threads();
    println!("model: {} ({:?}), loaded in {load_secs:.2} s, {threads} threads", args.model.display(), parts.family);
    println!("| engine | test | t/s |");
    println!("|---|---|---|");
    let (m, sd) = mean_sd(&pp);
    println!("| wisp | pp{} | {m:.2} ± {sd:.2} |", args.prompt_tokens);
    let (m, sd) = mean_sd(&tg);
    println!("| wisp | tg{} | {m:.2} ± {sd:.2} |", args.gen_tokens);
    for (b, samples) in batches.iter().zip(&tg_batched) {
        let (m, sd) = mean_sd(samples);
        println!("| wisp | tg{}x{b} | {m:.2} ± {sd:.2} |", args.gen_tokens);
    }
    Ok(())
}
