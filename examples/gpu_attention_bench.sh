#!/usr/bin/env bash
# Issue 18's GPU figures: a random Qwen3-0.6B-shaped checkpoint in bfloat16, per attention
# backend (XLA's work-item loop against the Pallas kernel): the backends' tests on the GPU
# first, then nano-vllm's workload (256 requests, prompts of 100-1024 tokens, 256 tokens out)
# beside transformers, batch-1 TPOT (single steps and 8 per dispatch), prefill of 1k/8k/32k
# tokens, and the attention micro-benchmark. Run from the repository root on the GPU machine (no
# install: PYTHONPATH=.):
#
#     bash examples/gpu_attention_bench.sh
#
# FAST=1 runs every command on a tiny model and workload, with Pallas' interpreter standing in
# for the GPU kernel (a check that none is broken, on CPU). A failing test or a backend that
# fails in a benchmark does not stop the script: that benchmark runs again with `xla` alone.
set -euo pipefail
export PYTHONPATH="${PYTHONPATH:-.}"
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/folojax-gpu-attention}"
if [[ "${FAST:-0}" == 1 ]]; then
  CONFIG=configs/qwen3-small.json
  BACKENDS=xla,pallas-interpret
  BATCH1=(--prompt-len 16 --max-tokens 8 --repeats 1)
  WORKLOAD=(--num-requests 4 --min-prompt-len 8 --max-prompt-len 32 --max-tokens 8)
  PREFILLS=(64)
else
  CONFIG=configs/qwen3-0.6b.json
  BACKENDS=xla,pallas
  BATCH1=(--prompt-len 128 --max-tokens 128 --repeats 3)
  WORKLOAD=(--num-requests 256 --min-prompt-len 100 --max-prompt-len 1024 --max-tokens 256)
  PREFILLS=(1024 8192 32768)
fi
folojax() { "$PY" -m folojax.cli "$@"; }
# A benchmark over every backend in one run (same-run ratios), else over `xla` alone.
each_backend() {
  folojax "$@" --attention-backend "$BACKENDS" ||
    { echo "FAILED with --attention-backend $BACKENDS; again with xla alone"; \
      folojax "$@" --attention-backend xla; }
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
if "$PY" -c "import pytest" 2>/dev/null; then  # every backend against `reference`, here
  "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_backends.py \
    tests/reference/test_engine_equivalence.py -k "backend" || echo "FAILED: the backends' tests"
fi
folojax init-random --config "$CONFIG" --out "$OUT/bf16"

# nano-vllm's workload, per backend, and transformers on the same requests.
each_backend bench --throughput --model "$OUT/bf16" --dtype bfloat16 "${WORKLOAD[@]}" \
  --max-num-seqs 256 --max-num-batched-tokens 8192 --prefix-len 0 --repeats 1 --compare-hf
# Batch-1 TPOT: one token per dispatch, then 8.
for steps in 1 8; do
  each_backend bench --model "$OUT/bf16" --dtype bfloat16 "${BATCH1[@]}" \
    --num-scheduler-steps "$steps"
done
# Prefill: TTFT of one long prompt.
for tokens in "${PREFILLS[@]}"; do
  each_backend bench --model "$OUT/bf16" --dtype bfloat16 --prompt-len "$tokens" \
    --max-tokens 2 --repeats 2
done
"$PY" examples/attention_microbench.py
