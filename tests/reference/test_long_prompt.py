"""A 32k-token prompt through the functional generate, in bounded memory: the prompt is
prefilled in chunks over the paged cache (the dense score matrix would take ~34 GB)."""

import json
import subprocess
import sys

import torch
import transformers

SCRIPT = """
import json, resource, sys
import jax
import folojax
model = folojax.load_model(sys.argv[1], dtype="float32", load_tokenizer=False)
prompt = [3 + (i * 7919) % 300 for i in range(32768)]
cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=32768 + 8)
result = folojax.generate(model.params, cache, jax.random.key(0), prompt, config=model.config,
                          sampling=folojax.SamplingParams(temperature=0, max_tokens=4,
                                                          ignore_eos=True))
print(json.dumps({"tokens": result.token_ids[0],
                  "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
MEMORY_LIMIT_BYTES = 4 * 2**30  # the dense score matrix alone would take ~34 GB


def test_a_32k_token_prompt_through_generate_in_bounded_memory(tmp_path):
    config = transformers.Qwen3Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=32768 + 64, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(result["tokens"]) == 4
    assert result["max_rss_bytes"] < MEMORY_LIMIT_BYTES, result
