//! A `tokenizers::Tokenizer` built from GGUF metadata alone, and incremental detokenizing.
//!
//! GGUF files carry their vocabulary in `tokenizer.ggml.*`; many (the default Gemma 3
//! among them) have no tokenizer.json anywhere. Two GGUF tokenizer models are supported:
//!
//! - `llama` (SentencePiece vocabularies: Gemma, Llama 2, Mistral): a BPE with byte fallback
//!   whose merges are derived from the token scores: every split of a normal token into two
//!   vocabulary tokens is a merge, ranked by the merged token's score. This reproduces
//!   llama.cpp's SPM tokenizer exactly on the default model (shared/notes/candle-gemma3.md;
//!   the fixture test in this file checks it token for token).
//! - `gpt2` (byte-level BPE: Qwen 2/3/3.5, Llama 3, Phi-4-mini, Mistral's Tekken): merges from
//!   `tokenizer.ggml.merges`, the pre-tokenizer regex chosen by `tokenizer.ggml.pre`, whole
//!   words first where llama.cpp ignores merges (Llama 3, Tekken). llama.cpp's own test
//!   vectors (`models/ggml-vocab-*.gguf`) are checked in host/tests/tokenizer.rs.
//! - `gemma4` (Gemma 4): a BPE with merges over raw UTF-8 with spaces as "▁", split only at
//!   runs of newlines, unknown characters as byte tokens (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_GEMMA4`).
//!
//! The tokenizer is assembled with `tokenizers`' builders. (Generating a tokenizer.json in
//! memory and loading it, as wisp first did, peaked at ~670 MB above the GGUF for the
//! default model's 262k tokens and 514k merges: serde buffers the whole model section
//! twice before `tokenizers` reads it.)

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_UNUSED: i32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF tokenizer metadata: {0}")]
    Metadata(String),
    #[error("building the tokenizer: {0}")]
    Build(String),
}

/// The tokenizer plus the special ids a server needs.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Ids that end a generation: eos, eot and the family's end-of-turn tokens.
    pub stop_ids: Vec<u32>,
    /// `tokenizer.chat_template` when the GGUF has one.
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    pub fn from_gguf(content: &Content) -> Result<GgufTokenizer, TokenizerError> {
        let md = &content.metadata;
        let model = string(md, "tokenizer.ggml.model")?;
        let tokens = strings(md, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => v.iter().map(|x| x.to_i32().unwrap_or(TYPE_NORMAL)).collect(),
            _ => vec![TYPE_NORMAL; tokens.len()],
        };
        let tokenizer = match model.as_str() {
            "llama" => {
                let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
                    Some(Value::Array(v)) => v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect(),
                    _ => return Err(TokenizerError::Metadata("`tokenizer.ggml.scores` is missing".into())),
                };
                let add_space_prefix = md.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
                spm(&tokens, &scores, &types, add_space_prefix, id(md, "tokenizer.ggml.unknown_token_id"))
            }
            "gpt2" => {
                let merges = strings(md, "tokenizer.ggml.merges")?;
                let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str);
                gpt2(&tokens, &merges, &types, pre.unwrap_or("default"))
            }
            "gemma4" => {
                let merges = strings(md, "tokenizer.ggml.merges")?;
                gemma4(&tokens, &merges, &types, id(md, "tokenizer.ggml.unknown_token_id"))
            }
            other => {
                return Err(TokenizerError::Metadata(format!(
                    "tokenizer model `{other}` is not supported (supported: llama, gpt2, gemma4)"
                )));
            }
        }
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let bos = id(md, "tokenizer.ggml.bos_token_id");
        let eos = id(md, "tokenizer.ggml.eos_token_id");
        let default_add_bos = model == "llama";
        // llama.cpp adds Gemma 4's BOS whatever the file says.
        let add_bos = model == "gemma4" || md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(default_add_bos);
        let mut stop_ids: Vec<u32> = [eos, id(md, "tokenizer.ggml.eot_token_id")].into_iter().flatten().collect();
        // Gemma 4 ends a turn with `<turn|>` and a tool call with `<|tool_response>`.
        for name in ["<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<turn|>", "<|tool_response>"] {
            if let Some(t) = tokenizer.token_to_id(name) {
                stop_ids.push(t);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let chat_template = md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        Ok(GgufTokenizer { tokenizer, bos, eos, add_bos, stop_ids, chat_template })
    }

    /// The text of a token id (with SentencePiece's "▁" shown as a space), for logprobs.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

fn string(md: &HashMap<String, Value>, key: &str) -> Result<String, TokenizerError> {
    md.get(key).and_then(|v| v.to_string().ok()).cloned().ok_or_else(|| TokenizerError::Metadata(format!("`{key}` is missing")))
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, TokenizerError> {
    match md.get(key) {
        Some(Value::Array(v)) => {
            v.iter().map(|x| x.to_string().cloned().map_err(|e| TokenizerError::Metadata(format!("`{key}`: {e}")))).collect()
        }
        _ => Err(TokenizerError::Metadata(format!("`{key}` is missing"))),
    }
}

fn id(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

/// Control, unknown and unused tokens are special (matched whole, skipped in output);
/// user-defined tokens are matched whole on raw text but decoded as text.
fn added_tokens(tokens: &[String], types: &[i32]) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| matches!(**t, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNUSED))
        .map(|(content, t)| AddedToken::from(content.clone(), *t != TYPE_USER_DEFINED).normalized(false))
        .collect()
}

/// A byte-pair model over the GGUF's vocabulary (a token listed twice keeps its last id).
fn bpe(
    tokens: &[String],
    merges: Vec<(String, String)>,
    unk: Option<&String>,
    byte_fallback: bool,
    ignore_merges: bool,
) -> tokenizers::Result<BPE> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut builder =
        BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(byte_fallback).fuse_unk(byte_fallback).ignore_merges(ignore_merges);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.clone());
    }
    builder.build()
}

/// SentencePiece vocabulary as a byte-fallback BPE with merges derived from scores.
fn spm(tokens: &[String], scores: &[f32], types: &[i32], add_space_prefix: bool, unk: Option<u32>) -> tokenizers::Result<Tokenizer> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // (score of merged token, merged id, split offset) → (left, right). Higher scores merge
    // first; ties break on the merged id, then the split, so the order is deterministic.
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (merged, token) in tokens.iter().enumerate() {
        if types.get(merged) != Some(&TYPE_NORMAL) || token.chars().nth(1).is_none() {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if index.contains_key(left) && index.contains_key(right) {
                merges.push((scores.get(merged).copied().unwrap_or(0.0), merged, split, left, right));
            }
        }
    }
    drop(index);
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = merges.into_iter().map(|(_, _, _, l, r)| (l.to_string(), r.to_string())).collect();
    let mut tokenizer = Tokenizer::new(bpe(tokens, merges, unk.and_then(|u| tokens.get(u as usize)), true, false)?);
    let mut normalizers = vec![];
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(Replace::new(" ", "▁")?.into());
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)))?;
    let mut decoders = vec![Replace::new("▁", " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    tokenizer.add_tokens(added_tokens(tokens, types))?;
    Ok(tokenizer)
}

/// The split regexes of llama.cpp's `tokenizer.ggml.pre` values (`llama-vocab.cpp`).
fn pre_tokenizer_regex(pre: &str) -> &'static str {
    match pre {
        "qwen2" | "deepseek-r1-qwen" => {
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        // Qwen 3.5 / 3.6: combining marks join letters.
        "qwen35" => {
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        // Mistral's Tekken (Mistral Nemo, Ministral 3); not checked against vectors: llama.cpp
        // ships no Tekken vocabulary.
        "tekken" => {
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        // o200k (Phi-4-mini); not checked against vectors either.
        "gpt-4o" => {
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        "llama3" | "llama-bpe" | "smaug-bpe" => {
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        _ => r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    }
}

/// Pre-tokenizers whose words are taken whole when the vocabulary has them, before any
/// merge (llama.cpp's `ignore_merges`: Llama 3, Tekken).
fn ignores_merges(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-v3" | "llama-bpe" | "tekken" | "pixtral")
}

/// Byte-level BPE (GPT-2 style) with the GGUF's merges.
fn gpt2(tokens: &[String], merges: &[String], types: &[i32], pre: &str) -> tokenizers::Result<Tokenizer> {
    let merges = merges.iter().filter_map(|m| m.split_once(' ').map(|(l, r)| (l.to_string(), r.to_string()))).collect();
    let mut tokenizer = Tokenizer::new(bpe(tokens, merges, None, false, ignores_merges(pre))?);
    let byte_level = ByteLevel::new(false, false, false);
    let split = Split::new(SplitPattern::Regex(pre_tokenizer_regex(pre).into()), SplitDelimiterBehavior::Isolated, false)?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![split.into(), byte_level.into()])));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer.add_tokens(added_tokens(tokens, types))?;
    Ok(tokenizer)
}

/// Gemma 4's BPE: merges over raw UTF-8 (no byte map) in which spaces are "▁", words split
/// only between runs of newlines and the rest, byte tokens for what the merges cannot spell.
/// A merge's two halves are split at its first space after the first byte: tokens may
/// themselves hold spaces (llama.cpp `llama_vocab::impl::load`).
fn gemma4(tokens: &[String], merges: &[String], types: &[i32], unk: Option<u32>) -> tokenizers::Result<Tokenizer> {
    let merges = merges
        .iter()
        .filter_map(|m| {
            let at = m.as_bytes().iter().skip(1).position(|&b| b == b' ')? + 1;
            Some((m[..at].to_string(), m[at + 1..].to_string()))
        })
        .collect();
    let mut tokenizer = Tokenizer::new(bpe(tokens, merges, unk.and_then(|u| tokens.get(u as usize)), true, false)?);
    tokenizer.with_normalizer(Some(Replace::new(" ", "▁")?))?;
    let split = Split::new(SplitPattern::Regex(r"[^\n]+|[\n]+".into()), SplitDelimiterBehavior::Isolated, false)?;
    tokenizer.with_pre_tokenizer(Some(split));
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    tokenizer.add_tokens(added_tokens(tokens, types))?;
    Ok(tokenizer)
}

/// Turns a stream of token ids into text deltas, never splitting a UTF-8 character:
/// text is released only once the decoded suffix no longer ends in a partial character.
/// Ported from candle's `TokenOutputStream` (candle-examples/src/token_output_stream.rs).
pub struct Detokenizer {
    tokens: Vec<u32>,
    prev: usize,
    current: usize,
}

impl Detokenizer {
    pub fn new() -> Detokenizer {
        Detokenizer { tokens: Vec::new(), prev: 0, current: 0 }
    }

    /// Adds one token; returns the text that became final, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        let before = self.decode(tokenizer, self.prev, self.current);
        self.tokens.push(token);
        let after = self.decode(tokenizer, self.prev, self.tokens.len());
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len()) {
            let text = after[before.len()..].to_string();
            self.prev = self.current;
            self.current = self.tokens.len();
            text
        } else {
            String::new()
        }
    }

    /// Whatever is still held (a partial character at the end of the stream).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let before = self.decode(tokenizer, self.prev, self.current);
        let after = self.decode(tokenizer, self.prev, self.tokens.len());
        self.prev = self.tokens.len();
        self.current = self.tokens.len();
        match after.get(before.len()..) {
            Some(rest) if after.len() > before.len() => rest.to_string(),
            _ => String::new(),
        }
    }

    fn decode(&self, tokenizer: &Tokenizer, from: usize, to: usize) -> String {
        tokenizer.decode(&self.tokens[from..to], true).unwrap_or_default()
    }
}

impl Default for Detokenizer {
    fn default() -> Self {
        Detokenizer::new()
    }
}
