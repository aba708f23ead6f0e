//! Turning logits into the next token: penalties, temperature, top-k / top-p / min-p
//! filtering and a seeded draw, plus log-probabilities for the API.
//!
//! The order follows vLLM's sampler: logit bias and penalties on the raw logits, then
//! temperature, then the truncation filters, then the draw. Log-probabilities are those of
//! the raw model distribution (before penalties and temperature), as OpenAI reports them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings of one request, already validated by the api layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    /// 0.0 disables min-p filtering.
    pub min_p: f32,
    /// 1.0 disables; >1 discourages tokens seen in prompt or output (CTRL-style).
    pub repetition_penalty: f32,
    /// OpenAI semantics: subtracted once from tokens already generated.
    pub presence_penalty: f32,
    /// OpenAI semantics: subtracted per occurrence in the generated text.
    pub frequency_penalty: f32,
    /// Added to the logits of the given token ids.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// How many alternatives to report per position (0 = none); `Some` asks for logprobs.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

/// The chosen token and, when asked, its log-probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// A sampler for one sequence: holds the RNG and the counts the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each token in the generated text.
    generated: std::collections::HashMap<u32, u32>,
    /// Tokens of the prompt, for the repetition penalty.
    prompt: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Sampler {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let prompt = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { Default::default() };
        Sampler { params, rng, generated: Default::default(), prompt }
    }

    /// Picks the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        // Log-probabilities come from the raw logits, so they are taken before penalties.
        let report = self.params.logprobs.map(|n| {
            let lse = log_sum_exp(logits);
            let top: Vec<(u32, f32)> = top_n(logits, n).into_iter().map(|(i, l)| (i, l - lse)).collect();
            (lse, top, logits.to_vec())
        });
        self.apply_penalties(logits);
        let token = if self.params.temperature <= 0.0 { argmax(logits) } else { self.draw(logits) };
        *self.generated.entry(token).or_default() += 1;
        match report {
            Some((lse, top, raw)) => Sampled { token, logprob: Some(raw[token as usize] - lse), top },
            None => Sampled { token, logprob: None, top: Vec::new() },
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for (token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(*token as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &token in self.prompt.iter().chain(self.generated.keys()) {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    /// Temperature, then top-k, top-p and min-p over the candidates, then one draw.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        // Candidates sorted by weight, descending. Only as many as the filters can keep are
        // sorted: top-k bounds them directly; for top-p the prefix is widened until it
        // holds enough mass, so a 262k vocabulary is rarely sorted whole.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = logits.iter().map(|l| ((l - max) / p.temperature).exp()).collect();
        if p.top_k == 0 && p.top_p >= 1.0 {
            // No truncation by rank: draw straight from the weights (the best weighs 1.0,
            // so min-p is a plain threshold), no sorting.
            let kept = weights.iter().enumerate().filter(|(_, w)| **w >= p.min_p).map(|(i, w)| (i as u32, *w));
            return self.draw_from(kept.collect());
        }
        let (candidates, norm) = if p.top_k > 0 {
            // Top-p then applies to the renormalised top-k set.
            let candidates = top_n(&weights, p.top_k);
            let norm = candidates.iter().map(|(_, w)| w).sum::<f32>();
            (candidates, norm)
        } else {
            let total: f32 = weights.iter().sum();
            let mut width = 64.min(weights.len());
            loop {
                let candidates = top_n(&weights, width);
                let mass = candidates.iter().map(|(_, w)| w).sum::<f32>() / total;
                if width == weights.len() || (p.top_p < 1.0 && mass >= p.top_p) {
                    break (candidates, total);
                }
                width = (width * 4).min(weights.len());
            }
        };
        let best = candidates.first().map(|(_, w)| *w).unwrap_or(0.0);
        let mut kept = Vec::with_capacity(candidates.len());
        let mut cumulative = 0.0;
        for (token, w) in candidates {
            if p.min_p > 0.0 && w < p.min_p * best {
                break;
            }
            kept.push((token, w));
            cumulative += w / norm;
            if p.top_p < 1.0 && cumulative >= p.top_p {
                break;
            }
        }
        self.draw_from(kept)
    }

    /// One weighted draw from non-empty `kept` (weights need not be normalised).
    fn draw_from(&mut self, kept: Vec<(u32, f32)>) -> u32 {
        let sum: f32 = kept.iter().map(|(_, w)| w).sum();
        let mut r = self.rng.random::<f32>() * sum;
        for (token, w) in &kept {
            r -= w;
            if r <= 0.0 {
                return *token;
            }
        }
        kept.last().map(|(t, _)| *t).unwrap_or(0)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln()
}

/// The `n` largest values with their indices, descending; ties keep the lower index first.
fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(values.len());
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams { seed: Some(7), ..SamplingParams::default() }
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, ..params() }, &[]);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9]).token, 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits = vec![1.0, 1.1, 0.9, 1.05, 0.95];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed: Some(seed), ..params() }, &[]);
            (0..32).map(|_| s.sample(&mut logits.clone()).token).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_k: 1, ..params() }, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.4]).token, 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~88% of the mass: top_p 0.5 leaves only it.
        let mut s = Sampler::new(SamplingParams { top_p: 0.5, ..params() }, &[]);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [4.0, 2.0, 1.0, 0.0]).token, 0);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let mut s = Sampler::new(SamplingParams { min_p: 0.5, ..params() }, &[]);
        for _ in 0..50 {
            let t = s.sample(&mut [2.0, 1.9, -3.0, -3.0]).token;
            assert!(t < 2, "{t}");
        }
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, frequency_penalty: 1.0, ..params() }, &[]);
        assert_eq!(s.sample(&mut [2.0, 1.5]).token, 0);
        // Token 0 was generated once: 2.0 - 1.0 < 1.5.
        assert_eq!(s.sample(&mut [2.0, 1.5]).token, 1);
    }

    #[test]
    fn repetition_penalty_covers_prompt_tokens() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, repetition_penalty: 2.0, ..params() }, &[0]);
        assert_eq!(s.sample(&mut [2.0, 1.5]).token, 1);
    }

    #[test]
    fn logit_bias_can_force_a_token() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, logit_bias: vec![(2, 100.0)], ..params() }, &[]);
        assert_eq!(s.sample(&mut [2.0, 1.5, 0.0]).token, 2);
    }

    #[test]
    fn logprobs_are_of_the_raw_distribution() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, logprobs: Some(2), logit_bias: vec![(1, 10.0)], ..params() }, &[]);
        let out = s.sample(&mut [0.0, 0.0]);
        assert_eq!(out.token, 1);
        let half = 0.5f32.ln();
        assert!((out.logprob.unwrap() - half).abs() < 1e-5);
        assert_eq!(out.top.len(), 2);
        assert!((out.top[0].1 - half).abs() < 1e-5);
    }

    #[test]
    fn top_n_is_sorted_and_stable() {
        assert_eq!(top_n(&[1.0, 3.0, 3.0, 2.0], 3), vec![(1, 3.0), (2, 3.0), (3, 2.0)]);
    }
}
