//! The model file and its KV cache, on tiny generated GGUFs of the llama and qwen2
//! families and on the real default Gemma 3 model.
//!
//! The strongest check a cache admits without a reference implementation: the logits of a
//! position must not depend on how the sequence was fed (one prefill, chunks of any size,
//! or token by token). That exercises positions, RoPE, the causal and sliding-window
//! masks and in-place KV writes at once.

mod common;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use wisp::config::ModelConfig;
use wisp::engine::model::Family;
use wisp::engine::{ModelParts, load_parts};

/// GPT-2's byte → printable-char map (the byte-level BPE alphabet).
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = vec!['\0'; 256];
    for &b in &printable {
        chars[b as usize] = char::from_u32(b).unwrap();
    }
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        }
    }
    printable.clear();
    chars
}

struct Tiny {
    family: Family,
    n_embd: usize,
    n_head: usize,
    n_kv_head: usize,
    n_ff: usize,
    n_layer: usize,
}

/// Writes a tiny GGUF with seeded random weights and a working tokenizer.
fn write_tiny(tiny: &Tiny, path: &std::path::Path) {
    use gguf_file::Value;
    let dev = Device::Cpu;
    let arch = match tiny.family {
        Family::Llama => "llama",
        Family::Qwen2 => "qwen2",
        other => unreachable!("{other:?}: the real Gemma 3 model and the oracle tests' files are used instead"),
    };
    let (tokens, types, model, merges): (Vec<String>, Vec<i32>, &str, Vec<String>) = match tiny.family {
        Family::Llama => {
            let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
            let mut types = vec![2, 3, 3];
            tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
            types.extend(std::iter::repeat_n(6, 256));
            for t in ["▁", "h", "e", "l", "o", "he", "ll", "llo", "hello", "▁hello", "w", "r", "d", "▁w", "or", "▁wor", "ld", "▁world"]
            {
                tokens.push(t.into());
                types.push(1);
            }
            (tokens, types, "llama", Vec::new())
        }
        _ => {
            let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
            let mut types = vec![1; 256];
            let merges = vec!["h e".to_string(), "l l".into(), "he ll".into(), "hell o".into(), "Ġ w".into()];
            for t in ["he", "ll", "hell", "hello", "Ġw", "<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
                tokens.push(t.into());
                types.push(if t.starts_with("<|") { 3 } else { 1 });
            }
            (tokens, types, "gpt2", merges)
        }
    };
    let vocab = tokens.len();
    let head_dim = tiny.n_embd / tiny.n_head;
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.context_length"), Value::U32(256)),
        (format!("{arch}.embedding_length"), Value::U32(tiny.n_embd as u32)),
        (format!("{arch}.block_count"), Value::U32(tiny.n_layer as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(tiny.n_ff as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(tiny.n_head as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(tiny.n_kv_head as u32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        ("tokenizer.ggml.model".into(), Value::String(model.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().cloned().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.iter().map(|t| Value::I32(*t)).collect())),
    ];
    match tiny.family {
        Family::Llama => {
            md.push(("tokenizer.ggml.scores".into(), Value::Array((0..vocab).map(|i| Value::F32(-(i as f32))).collect())));
            md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(1)));
            md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(2)));
            md.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)));
        }
        _ => {
            md.push(("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::String).collect())));
            md.push(("tokenizer.ggml.pre".into(), Value::String("qwen2".into())));
            md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32((vocab - 1) as u32)));
        }
    }
    let mut seed = 0x2545_f491_u64;
    let mut rand = |shape: &[usize], scale: f32| -> QTensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed % 2001) as f32 / 1000.0 - 1.0) * scale
            })
            .collect();
        let t = Tensor::from_vec(data, shape, &dev).unwrap();
        let dtype = if shape.len() == 2 && shape[1].is_multiple_of(32) { GgmlDType::Q8_0 } else { GgmlDType::F32 };
        QTensor::quantize(&t, dtype).unwrap()
    };
    let ones = |n: usize| QTensor::quantize(&Tensor::ones(n, candle_core::DType::F32, &dev).unwrap(), GgmlDType::F32).unwrap();
    let (e, kv, ff) = (tiny.n_embd, tiny.n_kv_head * head_dim, tiny.n_ff);
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), rand(&[vocab, e], 1.0)),
        ("output_norm.weight".into(), ones(e)),
        ("output.weight".into(), rand(&[vocab, e], 0.5)),
    ];
    for i in 0..tiny.n_layer {
        let p = |n: &str| format!("blk.{i}.{n}");
        tensors.push((p("attn_norm.weight"), ones(e)));
        tensors.push((p("ffn_norm.weight"), ones(e)));
        tensors.push((p("attn_q.weight"), rand(&[e, e], 0.3)));
        tensors.push((p("attn_k.weight"), rand(&[kv, e], 0.3)));
        tensors.push((p("attn_v.weight"), rand(&[kv, e], 0.3)));
        tensors.push((p("attn_output.weight"), rand(&[e, e], 0.3)));
        tensors.push((p("ffn_gate.weight"), rand(&[ff, e], 0.3)));
        tensors.push((p("ffn_up.weight"), rand(&[ff, e], 0.3)));
        tensors.push((p("ffn_down.weight"), rand(&[e, ff], 0.3)));
        if tiny.family == Family::Qwen2 {
            tensors.push((p("attn_q.bias"), rand(&[e], 0.1)));
            tensors.push((p("attn_k.bias"), rand(&[kv], 0.1)));
            tensors.push((p("attn_v.bias"), rand(&[kv], 0.1)));
        }
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
}

fn load(path: &std::path::Path) -> ModelParts {
    load_parts(&ModelConfig { id: "t".into(), path: Some(path.into()), device: "cpu".into(), ..ModelConfig::default() })
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Logits of the last token when `tokens` are fed in chunks of `chunk`.
fn last_logits(parts: &ModelParts, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let mut cache = parts.model.new_cache(tokens.len()).unwrap();
    let mut logits = None;
    for c in tokens.chunks(chunk) {
        logits = Some(parts.model.forward(c, &mut cache).unwrap());
    }
    logits.unwrap().to_vec1().unwrap()
}

/// Feeding order changes float summation order and, through the 8-bit quantisation of
/// activations in the quantised matmuls, can flip a rounding; that moves logits by a few
/// percent at most. A wrong position, mask or cache slot moves them by their whole scale
/// and changes the ranking, which is what this catches.
fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_within(a, b, 0.05, what)
}

fn assert_within(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1.0);
    assert!(worst / scale < tolerance, "{what}: logits differ by {worst} (scale {scale})");
    let top = |l: &[f32]| {
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|x, y| l[*y].total_cmp(&l[*x]));
        idx.truncate(10);
        idx
    };
    let (ta, tb) = (top(a), top(b));
    assert_eq!(ta[0], tb[0], "{what}: the most likely token differs");
    // The same ten best tokens, but for near-ties at the edge: a token of a's ten that b
    // ranks lower must be within 2 % of the scale of b's tenth (a wrong cache slot or mask
    // reorders tokens by their whole spread; Gemma 4's CPU and candle attention paths swap
    // a tenth place 1.03 % apart on Zen 4 once Q6_K runs on wisp's kernel).
    let edge = b[tb[9]];
    let missing: Vec<(usize, f32)> = ta.iter().filter(|t| !tb.contains(t)).map(|&t| (t, edge - b[t])).collect();
    assert!(
        missing.len() <= 3 && missing.iter().all(|&(_, gap)| gap < 0.02 * scale),
        "{what}: a's top 10 {ta:?}, b's {tb:?}: a's tokens below b's tenth by {missing:?} (scale {scale})"
    );
}

fn check_family(tiny: Tiny, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny(&tiny, &path);
    let parts = load(&path);
    assert_eq!(parts.family, tiny.family);
    let ids = parts.tokenizer.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert!(!ids.is_empty());
    assert_eq!(parts.tokenizer.tokenizer.decode(&ids, true).unwrap(), text, "round trip");
    let tokens: Vec<u32> = ids.iter().copied().cycle().take(40).collect();
    let whole = last_logits(&parts, &tokens, tokens.len());
    assert_close(&whole, &last_logits(&parts, &tokens, 7), "chunks of 7");
    assert_close(&whole, &last_logits(&parts, &tokens, 1), "token by token");
    assert_eq!(whole.len(), parts.tokenizer.vocab_size());
    assert_same_as_candle_attention(parts, &tokens);
}

/// The CPU attention kernel against candle's ops (what GPUs run), through the whole model:
/// a prompt in chunks, then tokens one by one.
fn assert_same_as_candle_attention(mut parts: ModelParts, tokens: &[u32]) {
    let run = |parts: &ModelParts| {
        let (prompt, rest) = tokens.split_at(tokens.len() - 3);
        let mut cache = parts.model.new_cache(tokens.len()).unwrap();
        for c in prompt.chunks(100) {
            parts.model.forward(c, &mut cache).unwrap();
        }
        rest.iter().map(|t| parts.model.forward(&[*t], &mut cache).unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<_>>()
    };
    let host = run(&parts);
    parts.model.use_candle_attention();
    // The summation order differs in every layer, and the int8 activations of the next
    // matmul amplify that (candle's path alone moves by 3-5 % between chunkings of the same
    // prompt); a wrong table, norm, window or cache slot moves logits by their whole scale.
    for (i, (a, b)) in host.iter().zip(run(&parts)).enumerate() {
        assert_within(a, &b, 0.1, &format!("decode step {i}: CPU attention vs candle's"));
    }
}

#[test]
fn a_tiny_llama_gguf_loads_and_its_cache_is_consistent() {
    check_family(Tiny { family: Family::Llama, n_embd: 64, n_head: 4, n_kv_head: 2, n_ff: 128, n_layer: 2 }, "hello world");
}

#[test]
fn a_tiny_qwen2_gguf_loads_and_its_cache_is_consistent() {
    check_family(Tiny { family: Family::Qwen2, n_embd: 64, n_head: 4, n_kv_head: 1, n_ff: 128, n_layer: 2 }, "hello wide world");
}

#[test]
fn an_unsupported_architecture_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    let arch = gguf_file::Value::String("mamba".into());
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &[("general.architecture", &arch)], &[]).unwrap();
    let err = load_parts(&ModelConfig { id: "x".into(), path: Some(path), ..ModelConfig::default() }).err().unwrap();
    assert!(err.to_string().contains("mamba"), "{err}");
}

#[test]
fn the_error_names_the_supported_architectures_and_an_unknown_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    let arch = gguf_file::Value::String("mamba".into());
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &[("general.architecture", &arch)], &[]).unwrap();
    let err = load_parts(&ModelConfig { id: "x".into(), path: Some(path.clone()), ..ModelConfig::default() }).err().unwrap().to_string();
    for family in ["gemma3", "llama", "mistral3", "phi3", "qwen2", "qwen3", "qwen3moe"] {
        assert!(err.contains(family), "{err}");
    }
    // A tiny llama whose first tensor's type id is rewritten to 16 (IQ2_XXS, which needs
    // its grid tables: not run).
    let tiny = dir.path().join("tiny.gguf");
    write_tiny(&Tiny { family: Family::Llama, n_embd: 64, n_head: 4, n_kv_head: 2, n_ff: 128, n_layer: 1 }, &tiny);
    let mut bytes = std::fs::read(&tiny).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // name, then n_dims (u32), dims (u64 each), then the type (u32).
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * n_dims;
    bytes[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = load_parts(&ModelConfig { id: "x".into(), path: Some(path), ..ModelConfig::default() }).err().unwrap().to_string();
    assert!(err.contains("token_embd.weight") && err.contains("IQ2_XXS") && err.contains("Q4_K") && err.contains("IQ4_XS"), "{err}");
}

/// A GGUF is untrusted input: truncated anywhere or with bytes of its header and tensor
/// table changed, loading it must end in an error or a model, never a panic that escapes or
/// an abort (the process would die with it).
#[test]
fn malformed_and_truncated_ggufs_are_refused_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.gguf");
    write_tiny(&Tiny { family: Family::Qwen2, n_embd: 64, n_head: 4, n_kv_head: 2, n_ff: 128, n_layer: 1 }, &tiny);
    let good = std::fs::read(&tiny).unwrap();
    let path = dir.path().join("bad.gguf");
    let try_load = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        load_parts(&ModelConfig { id: "x".into(), path: Some(path.clone()), device: "cpu".into(), ..ModelConfig::default() }).is_ok()
    };
    assert!(try_load(&good));
    // The header and tensor table end where the tensor data starts: find it by truncating.
    let mut refused = 0;
    for len in (0..good.len()).step_by(good.len() / 400 + 1) {
        refused += usize::from(!try_load(&good[..len]));
    }
    assert!(refused > 350, "only {refused} truncated files were refused");
    // Seeded byte changes in the first 4 KiB (metadata and tensor table of this file).
    let mut seed = 0x9e37_79b9_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let head = good.len().min(4096);
    for _ in 0..600 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % head as u64) as usize;
            bytes[at] = match next() % 3 {
                0 => 0,
                1 => 0xff,
                _ => next() as u8,
            };
        }
        try_load(&bytes);
    }
    // The value a reader divides by.
    let mut md = good.clone();
    let key = b"general.architecture";
    assert!(md.windows(key.len()).any(|w| w == key));
    let zero = gguf_file::Value::U32(0);
    let arch = gguf_file::Value::String("qwen2".into());
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &[("general.architecture", &arch), ("general.alignment", &zero)], &[])
        .unwrap();
    md = std::fs::read(&path).unwrap();
    assert!(!try_load(&md), "an alignment of 0 is refused");
}

/// Gemma 3 alternates sliding-window (512) and global layers: past 512 tokens, chunked
/// prefill and token-by-token decode must see exactly the same keys.
#[test]
fn gemma3_logits_do_not_depend_on_chunking_past_the_sliding_window() {
    let parts = load(&common::default_model_path());
    assert_eq!(parts.family, Family::Gemma3);
    let text = "In the beginning the universe was created. This has made a lot of people very angry. ";
    let unit = parts.tokenizer.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let mut tokens = vec![2u32];
    tokens.extend(unit.iter().copied().cycle().take(600));
    let whole = last_logits(&parts, &tokens, tokens.len());
    assert_close(&whole, &last_logits(&parts, &tokens, 128), "chunks of 128");
    // On the CPU every row goes through the same operations whatever the chunk (wisp's
    // attention and block kernel, Q6_K included): exactly the same bits.
    assert_eq!(whole, last_logits(&parts, &tokens, 1), "token by token");
    // Prefill 590 tokens, then decode the last ones one by one.
    let mut cache = parts.model.new_cache(tokens.len()).unwrap();
    parts.model.forward(&tokens[..590], &mut cache).unwrap();
    let mut logits = None;
    for t in &tokens[590..] {
        logits = Some(parts.model.forward(&[*t], &mut cache).unwrap());
    }
    assert_close(&whole, &logits.unwrap().to_vec1::<f32>().unwrap(), "decode after prefill");
    assert_same_as_candle_attention(parts, &tokens);
}

/// Continuous batching: a sequence's logits in a batched step (beside other sequences, at
/// other positions, one prefilling) equal its logits alone.
fn assert_batched_equals_alone(parts: &ModelParts) {
    use wisp::engine::model::Segment;
    let encode = |text: &str| {
        let mut ids: Vec<u32> = parts.tokenizer.bos.filter(|_| parts.tokenizer.add_bos).into_iter().collect();
        ids.extend(parts.tokenizer.tokenizer.encode(text, false).unwrap().get_ids());
        ids
    };
    let a = encode("The capital of France is Paris, and the capital of Italy is");
    let b = encode("Once upon a time");
    let c = encode("def fibonacci(n):");
    // Alone: prefill, then one decode token each.
    let alone = |prompt: &[u32], next: u32| {
        let mut cache = parts.model.new_cache(prompt.len() + 1).unwrap();
        parts.model.forward(prompt, &mut cache).unwrap();
        parts.model.forward(&[next], &mut cache).unwrap().to_vec1::<f32>().unwrap()
    };
    let want = [alone(&a, 42), alone(&b, 43)];
    // Batched: a and b prefilled together, then decoded together beside c's prefill.
    let mut ca = parts.model.new_cache(a.len() + 1).unwrap();
    let mut cb = parts.model.new_cache(b.len() + 1).unwrap();
    let mut cc = parts.model.new_cache(c.len()).unwrap();
    parts.model.forward_batch(&mut [Segment { tokens: &a, cache: &mut ca }, Segment { tokens: &b, cache: &mut cb }]).unwrap();
    let got = parts
        .model
        .forward_batch(&mut [
            Segment { tokens: &[42], cache: &mut ca },
            Segment { tokens: &c, cache: &mut cc },
            Segment { tokens: &[43], cache: &mut cb },
        ])
        .unwrap();
    let row = |i: usize| got.get(i).unwrap().to_vec1::<f32>().unwrap();
    for (name, want, got) in [("a", &want[0], row(0)), ("b", &want[1], row(2))] {
        let max = want.iter().zip(&got).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert_eq!(&got, want, "{name}: logits differ by up to {max}");
    }
}

#[test]
fn batched_forward_equals_forward_alone() {
    let parts = load(&common::default_model_path());
    assert!(parts.tokenizer.add_bos && parts.tokenizer.bos == Some(2), "Gemma's prompts start with <bos>");
    assert_batched_equals_alone(&parts);
}

/// With routed experts too: each expert runs the rows routed to it from every sequence of
/// the step, so a row's experts see other sequences' rows beside it (gate and up on wisp's
/// block kernel in Q4_K, down in Q6_K), and an untied Q6_K output projection.
#[test]
fn batched_forward_equals_forward_alone_with_experts() {
    let parts = load(&common::synthetic("qwen3moe-Q4_K_M"));
    assert_eq!(parts.family, Family::Qwen3Moe);
    assert_batched_equals_alone(&parts);
}

/// Gemma 4 (Gemma-4-E2B's shapes, 10 layers, window 16): layers that read another layer's
/// cache, two head sizes, per-layer inputs. Past the window, chunked prefill, token by
/// token and a batch give the same logits, and candle's attention path (GPUs) agrees.
#[test]
fn gemma4_logits_do_not_depend_on_chunking_batching_or_the_attention_path() {
    let parts = load(&common::synthetic("gemma4-Q4_K_M"));
    assert_eq!(parts.family, Family::Gemma4);
    let unit = parts.tokenizer.tokenizer.encode("The quick brown fox jumps over the lazy dog. ", false).unwrap().get_ids().to_vec();
    let mut tokens = vec![parts.tokenizer.bos.unwrap()];
    tokens.extend(unit.iter().copied().cycle().take(60));
    let whole = last_logits(&parts, &tokens, tokens.len());
    assert_close(&whole, &last_logits(&parts, &tokens, 7), "chunks of 7");
    let by_token = last_logits(&parts, &tokens, 1);
    let max = whole.iter().zip(&by_token).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(whole == by_token, "token by token: logits differ by up to {max}");
    assert_batched_equals_alone(&parts);
    assert_same_as_candle_attention(parts, &tokens);
}

/// Qwen 3.5 (0.8B's shapes, 4 layers: three Gated DeltaNet, one gated attention): the
/// recurrent state carries across prompt chunks, steps and batches bit for bit; a cache
/// copied at a kept state (a checkpoint, or the end) continues as if it had read the whole
/// prompt, and a position without a kept state is refused.
#[test]
fn qwen35_state_carries_across_chunks_batches_and_checkpoints() {
    let parts = load(&common::synthetic("qwen35-Q4_K_M"));
    assert_eq!(parts.family, Family::Qwen35);
    let unit = parts.tokenizer.tokenizer.encode("The quick brown fox jumps over the lazy dog. ", false).unwrap().get_ids().to_vec();
    let tokens: Vec<u32> = unit.iter().copied().cycle().take(60).collect();
    let whole = last_logits(&parts, &tokens, tokens.len());
    for chunk in [7, 1] {
        let chunked = last_logits(&parts, &tokens, chunk);
        let max = whole.iter().zip(&chunked).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(whole == chunked, "chunks of {chunk}: logits differ by up to {max}");
    }
    assert_batched_equals_alone(&parts);

    let model = &parts.model;
    let mut source = model.new_cache(tokens.len()).unwrap();
    model.forward(&tokens[..40], &mut source).unwrap();
    source.checkpoint();
    model.forward(&tokens[40..50], &mut source).unwrap();
    assert_eq!((source.reusable(39), source.reusable(45), source.reusable(55)), (0, 40, 50));
    for at in [40, 50] {
        let mut cache = model.new_cache(tokens.len()).unwrap();
        cache.copy_prefix(&source, at).unwrap();
        let logits = model.forward(&tokens[at..], &mut cache).unwrap().to_vec1::<f32>().unwrap();
        assert!(logits == whole, "continued from the state kept at {at}");
    }
    let mut cache = model.new_cache(tokens.len()).unwrap();
    let refused = cache.copy_prefix(&source, 45).unwrap_err().to_string();
    assert!(refused.contains("no recurrent state is kept at position 45"), "{refused}");
    assert_same_as_candle_attention(parts, &tokens);
}
