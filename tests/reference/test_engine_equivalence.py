"""The engine against transformers: whatever the pool size, token budget, prefix sharing or
request order, every request gets the tokens it would get alone."""

import numpy as np
import pytest
import torch

import folojax
from tests.conftest import make_tiny_checkpoint

MAX_TOKENS = 10


@pytest.fixture(scope="module", params=["qwen3_gqa_tied", "llama_mqa"])
def checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


def make_llm(checkpoint, **kwargs) -> folojax.LLM:
    return folojax.LLM(checkpoint.path, skip_tokenizer_init=True, dtype="float32", **kwargs)


def mixed_prompts() -> list[list[int]]:
    """Different lengths (3 to 70 tokens), two sharing a 40-token prefix, and a repeat."""
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 320, 40).tolist()
    prompts = [rng.integers(3, 320, n).tolist() for n in (3, 17, 70, 9, 33)]
    prompts += [prefix + [5, 6, 7], prefix + rng.integers(3, 320, 12).tolist(), prompts[2]]
    return prompts


def hf_greedy(checkpoint, prompt: list[int], num_tokens: int = MAX_TOKENS) -> list[int]:
    with torch.no_grad():
        out = checkpoint.torch_model.generate(
            torch.tensor([prompt]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
            do_sample=False)
    return out[0, len(prompt):].tolist()


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


GREEDY = folojax.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_tight_engine_gives_every_request_its_greedy_tokens_alone(checkpoint):
    prompts = mixed_prompts()
    # 14 blocks of 8 tokens (112 tokens) for 8 requests of up to 80: preemption is certain;
    # a 24-token budget splits every long prompt into chunks.
    llm = make_llm(checkpoint, block_size=8, num_kv_blocks=14, max_num_batched_tokens=24,
                   max_num_seqs=6)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert token_ids(outputs) == [hf_greedy(checkpoint, p) for p in prompts]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    # Everything came back to the pool.
    assert llm.llm_engine.kv_cache_manager.pool.num_free_blocks == 14


@pytest.mark.parametrize("block_size", [12, 20])
def test_block_sizes_that_do_not_divide_the_attention_chunks(checkpoint, block_size):
    """Attention walks a block table a chunk of blocks at a time; with 12- or 20-token blocks a
    190-token prompt ends inside a chunk that a table rounded only to a power of two would cut
    short (and the device would clamp the slice onto the wrong blocks)."""
    prompt = np.random.default_rng(3).integers(3, 320, 190).tolist()
    llm = make_llm(checkpoint, block_size=block_size, max_num_batched_tokens=256)
    [output] = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    assert output.outputs[0].token_ids == hf_greedy(checkpoint, prompt)


def test_prefix_cache_hits_are_reported_and_change_nothing(checkpoint):
    prompts = mixed_prompts()
    cached = make_llm(checkpoint, block_size=8, max_num_seqs=8)
    uncached = make_llm(checkpoint, block_size=8, max_num_seqs=8, enable_prefix_caching=False)
    requests = [{"prompt_token_ids": p} for p in prompts]
    first = cached.generate(requests, GREEDY, use_tqdm=False)
    again = cached.generate(requests, GREEDY, use_tqdm=False)  # every prompt is cached now
    reference = uncached.generate(requests, GREEDY, use_tqdm=False)
    assert token_ids(first) == token_ids(again) == token_ids(reference)
    assert [o.num_cached_tokens for o in reference] == [0] * len(prompts)
    # Second run: all full blocks of each prompt but the one holding its last token.
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 8 * 8 for p in prompts]
    # A new prompt sharing the 40-token prefix (5 full blocks) of a finished one.
    fresh = make_llm(checkpoint, block_size=8)
    fresh.generate(requests[5], GREEDY, use_tqdm=False)
    shared = fresh.generate(requests[6], GREEDY, use_tqdm=False)[0]
    assert shared.num_cached_tokens == 40
    assert shared.outputs[0].token_ids == first[6].outputs[0].token_ids


def test_seeded_sampling_is_the_same_tight_or_roomy_and_in_any_order(checkpoint):
    prompts = mixed_prompts()
    samplings = [folojax.SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i,
                                        max_tokens=MAX_TOKENS, ignore_eos=True)
                 for i in range(len(prompts))]
    requests = [{"prompt_token_ids": p} for p in prompts]
    roomy = make_llm(checkpoint, max_num_seqs=16).generate(requests, samplings, use_tqdm=False)
    tight_llm = make_llm(checkpoint, block_size=8, num_kv_blocks=14, max_num_batched_tokens=24,
                         max_num_seqs=4)
    reversed_tight = tight_llm.generate(requests[::-1], samplings[::-1], use_tqdm=False)
    assert tight_llm.llm_engine.scheduler.num_preemptions > 0
    assert token_ids(roomy) == token_ids(reversed_tight)[::-1]
    assert len({tuple(t) for t in token_ids(roomy)}) > 1


def test_n_completions_fork_after_the_prompt(checkpoint):
    prompt = mixed_prompts()[2]  # 70 tokens: the fork shares blocks, copies the partial one
    llm = make_llm(checkpoint, block_size=8, max_num_seqs=8)
    greedy = llm.generate({"prompt_token_ids": prompt},
                          folojax.SamplingParams(n=3, temperature=0, max_tokens=MAX_TOKENS,
                                                 ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in greedy.outputs] == [0, 1, 2]
    assert [c.token_ids for c in greedy.outputs] == [hf_greedy(checkpoint, prompt)] * 3

    sampled = folojax.SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=MAX_TOKENS,
                                     ignore_eos=True)
    output = llm.generate({"prompt_token_ids": prompt}, sampled, use_tqdm=False)[0]
    completions = [c.token_ids for c in output.outputs]
    assert len(completions) == 3 and len({tuple(c) for c in completions}) == 3
    single = folojax.SamplingParams(temperature=1.0, seed=7, max_tokens=MAX_TOKENS,
                                    ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompt}, single, use_tqdm=False)[0]
    assert completions[0] == alone.outputs[0].token_ids
    # The same n=3 request in a tight pool (forcing copies and preemption) gives the same three.
    tight = make_llm(checkpoint, block_size=8, num_kv_blocks=12, max_num_seqs=4)
    assert [c.token_ids for c in tight.generate({"prompt_token_ids": prompt}, sampled,
                                                use_tqdm=False)[0].outputs] == completions
    assert llm.llm_engine.kv_cache_manager.pool.num_free_blocks == (
        llm.engine_config.kv_cache.num_blocks)


@pytest.mark.parametrize("backend", ["reference", "xla", "cpu", "pallas", "pallas-interpret"])
def test_every_attention_backend_gives_the_greedy_tokens_under_preemption_chunks_and_hits(
        checkpoint, backend):
    """A tight pool (preemption), a 24-token budget (chunked prompts), then the same prompts
    again (prefix-cache hits): transformers' greedy tokens through each backend that runs here
    (`pallas` on a GPU; its kernel in the interpreter everywhere). A backend that cannot serve
    the model's head_dim says so when the engine starts."""
    from folojax.ops.attention_backends import BACKENDS

    if backend != "pallas-interpret" and backend not in folojax.list_attention_backends():
        pytest.skip(f"the {backend} attention backend does not run here")
    config = checkpoint.model.config
    engine_args = dict(block_size=16, num_kv_blocks=9, max_num_batched_tokens=24, max_num_seqs=6,
                       attention_backend=backend)
    limit = BACKENDS[backend].unsupported(config.head_dim, 16, "float32")
    if limit is not None:  # pallas and qwen3_gqa_tied's head_dim 24
        with pytest.raises(ValueError, match=f"attention_backend '{backend}' cannot serve "
                                             f"head_dim={config.head_dim}"):
            make_llm(checkpoint, **engine_args)
        return
    prompts = mixed_prompts()
    llm = make_llm(checkpoint, **engine_args)
    assert llm.llm_engine.runner.attention_backend == backend
    requests = [{"prompt_token_ids": p} for p in prompts]
    first = llm.generate(requests, GREEDY, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    again = llm.generate(requests, GREEDY, use_tqdm=False)
    assert sum(o.num_cached_tokens for o in again) > 0
    expected = [hf_greedy(checkpoint, p) for p in prompts]
    assert token_ids(first) == expected
    assert token_ids(again) == expected
