//! Constrained decoding: a response format compiled by llguidance into a matcher that,
//! before every sampled token, says which tokens of the vocabulary may come next.
//!
//! A model builds its [`Grammars`] once (the token trie of its vocabulary); each
//! constrained request compiles its [`Constraint`] into a [`Grammar`] before it is
//! admitted, so a schema llguidance cannot enforce is a 400 naming the feature, never a
//! reply that does not validate. The scheduler computes each step's masks on a thread of
//! their own while the forward pass runs, so a mask never stalls the batch.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, SimpleVob, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use super::tokenizer::GgufTokenizer;

/// What a reply must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this JSON schema.
    JsonSchema(Value),
}

impl Constraint {
    /// The schema llguidance compiles. JSON is emitted compact with one space after `,`
    /// and `:` (no free whitespace: a small model can otherwise spend its tokens on
    /// newlines).
    fn schema(&self) -> Value {
        let mut schema = match self {
            Constraint::JsonObject => json!({"type": "object"}),
            Constraint::JsonSchema(schema) => schema.clone(),
        };
        if let Some(fields) = schema.as_object_mut() {
            fields.insert("x-guidance".into(), json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
        }
        schema
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The schema uses what cannot be enforced, or is not a schema.
    #[error("{0}")]
    Unsupported(String),
    /// The model's vocabulary could not be mapped to bytes.
    #[error("constrained decoding is unavailable for this model: {0}")]
    Unavailable(String),
}

/// A model's compiler of constraints: its vocabulary as a token trie.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// Builds the token trie of `tokenizer`'s vocabulary (`vocab_size` logits per step).
    pub fn new(tokenizer: Arc<GgufTokenizer>, vocab_size: usize) -> Result<Grammars, GrammarError> {
        let unavailable = |e: String| GrammarError::Unavailable(e);
        // llguidance maps tokens to bytes from a tokenizer.json; it reads only these parts
        // (the whole file would serialize every merge: seconds on a 262k vocabulary).
        let hf = &tokenizer.tokenizer;
        let added: Vec<Value> = hf
            .get_added_tokens_decoder()
            .iter()
            .map(|(id, token)| json!({"id": id, "content": token.content, "special": token.special}))
            .collect();
        let decoder = serde_json::to_value(hf.get_decoder()).map_err(|e| unavailable(e.to_string()))?;
        let json = json!({"decoder": decoder, "added_tokens": added, "model": {"vocab": hf.get_vocab(false)}});
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| unavailable(e.to_string()))?;
        // Ids with no vocabulary entry (padding rows of the output matrix) are never allowed.
        words.resize(vocab_size.max(words.len()), Vec::new());
        let eos = tokenizer.eos.or(tokenizer.stop_ids.first().copied()).ok_or_else(|| unavailable("no end-of-sequence token".into()))?;
        let info = TokRxInfo {
            vocab_size: words.len() as u32,
            tok_eos: eos,
            tok_bos: tokenizer.bos,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: tokenizer.stop_ids.iter().copied().find(|&id| id != eos),
        };
        let env: toktrie::TokEnv = Arc::new(Vocabulary { trie: TokTrie::from(&info, &words), tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| unavailable(e.to_string()))?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// Compiles a constraint for one request.
    pub fn compile(&self, constraint: &Constraint) -> Result<Grammar, GrammarError> {
        let grammar = TopLevelGrammar::from_json_schema(constraint.schema());
        let parser = self.factory.create_parser(grammar).map_err(|e| GrammarError::Unsupported(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Unsupported(e));
        }
        Ok(Grammar { matcher })
    }
}

/// The vocabulary as llguidance sees it: token bytes in a trie, and the tokenizer for
/// the text a grammar forces.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<GgufTokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        let text = String::from_utf8_lossy(s);
        self.tokenizer.tokenizer.encode(text.as_ref(), false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }
}

/// One request's constraint as it generates: the state of its grammar.
pub struct Grammar {
    matcher: Matcher,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

impl Grammar {
    /// The tokens allowed next (end-of-sequence among them once the value is complete).
    pub fn mask(&mut self) -> Result<SimpleVob, String> {
        self.matcher.compute_mask().map_err(|e| e.to_string())
    }

    /// Advances past a sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The value is complete and nothing more may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// Sets every logit the mask does not allow to -inf. End-of-sequence stands for all of the
/// model's stop tokens (an instruct model ends its turn with its own).
pub fn apply_mask(logits: &mut [f32], mask: &SimpleVob, eos: u32, stop_ids: &[u32]) {
    let stop_allowed = mask.is_allowed(eos);
    for (id, logit) in logits.iter_mut().enumerate() {
        let id = id as u32;
        let allowed = (id as usize) < mask.len() && mask.is_allowed(id);
        if !(allowed || stop_allowed && stop_ids.contains(&id)) {
            *logit = f32::NEG_INFINITY;
        }
    }
}
