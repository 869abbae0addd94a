#!/usr/bin/env bash
# Issue 17's GPU figures: a random Qwen3-0.6B-shaped checkpoint in bfloat16 against int8
# (quantization="int8") and 4 bits (an RTN GPTQ-format checkpoint of it, groups of 128), at
# batch 1 and on nano-vllm's workload (256 requests, prompts of 100-1024 tokens, 256 tokens out).
# Run from the repository root on the GPU machine (no install: PYTHONPATH=.):
#
#     bash examples/gpu_quantized_bench.sh
#
# FAST=1 runs every command on a tiny model and workload (a check that none is broken, on CPU).
set -euo pipefail
export PYTHONPATH="${PYTHONPATH:-.}"
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/folojax-gpu-quantized}"
if [[ "${FAST:-0}" == 1 ]]; then
  CONFIG=configs/qwen3-small.json
  BATCH1=(--prompt-len 16 --max-tokens 8 --repeats 1)
  WORKLOAD=(--num-requests 4 --min-prompt-len 8 --max-prompt-len 32 --max-tokens 8)
else
  CONFIG=configs/qwen3-0.6b.json
  BATCH1=(--prompt-len 128 --max-tokens 128 --repeats 3)
  WORKLOAD=(--num-requests 256 --min-prompt-len 100 --max-prompt-len 1024 --max-tokens 256)
fi
folojax() { "$PY" -m folojax.cli "$@"; }

folojax init-random --config "$CONFIG" --out "$OUT/bf16"
folojax quantize --method rtn --bits 4 --group-size 128 --asym "$OUT/bf16" "$OUT/rtn4"

# Batch 1: bfloat16 against int8, then the 4-bit checkpoint against itself dequantized.
folojax bench --model "$OUT/bf16" --dtype bfloat16 --quantization none,int8 "${BATCH1[@]}" \
  --num-scheduler-steps 8
folojax bench --model "$OUT/rtn4" --dtype bfloat16 --quantization auto,none "${BATCH1[@]}" \
  --num-scheduler-steps 8
# nano-vllm's workload.
folojax bench --throughput --model "$OUT/bf16" --dtype bfloat16 --quantization none,int8 \
  "${WORKLOAD[@]}" --max-num-seqs 256 --max-num-batched-tokens 8192 --prefix-len 0 --repeats 1
folojax bench --throughput --model "$OUT/rtn4" --dtype bfloat16 --quantization auto \
  "${WORKLOAD[@]}" --max-num-seqs 256 --max-num-batched-tokens 8192 --prefix-len 0 --repeats 1
