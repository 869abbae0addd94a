"""Paged KV blocks, and what preemption by recompute costs: the same greedy requests through a
pool that holds them all and through one that holds a few at a time.

    python examples/learn/preemption_cost.py [--model PATH] [--num-requests 16]

Prints, for the workload, the slots contiguous per-request rows of max_model_len would reserve
against the blocks the paged cache fills; then, for each pool, the wall time, the preemptions
and whether every request's tokens are the same as with the roomy pool. Each pool runs the
workload once to compile, then is timed. docs/learn/m3-paged-kv.md explains the figures.
"""

import argparse
import time

import numpy as np

import folojax
from folojax.engine.kv_cache_manager import cdiv
from folojax.runner.model_runner import wait_for_background_compiles


def workload(vocab_size: int, num_requests: int, prompt_len: int, max_tokens: int, seed: int = 0):
    """Prompts of random tokens, prompt_len // 2 to prompt_len long, and output lengths of 1 to
    max_tokens (EOS ignored), so that rows of one fixed length would waste room."""
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(0, vocab_size, n).tolist()}
               for n in rng.integers(prompt_len // 2, prompt_len + 1, num_requests)]
    samplings = [folojax.SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True)
                 for n in rng.integers(1, max_tokens + 1, num_requests)]
    return prompts, samplings


def timed_run(llm: folojax.LLM, prompts, samplings):
    llm.generate(prompts, samplings, use_tqdm=False)  # compiles the step's shapes
    wait_for_background_compiles()
    llm.reset_prefix_cache()
    scheduler = llm.llm_engine.scheduler
    preemptions = scheduler.num_preemptions
    start = time.perf_counter()
    outputs = llm.generate(prompts, samplings, use_tqdm=False)
    seconds = time.perf_counter() - start
    return outputs, seconds, scheduler.num_preemptions - preemptions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="none: the embedded SmolLM2")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=96, help="the longest prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="the longest output")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tight-requests", type=int, default=3,
                        help="the tight pool holds this many of the longest requests")
    args = parser.parse_args(argv)

    model = folojax.load_model(args.model, load_tokenizer=False)
    max_model_len = args.prompt_len + args.max_tokens
    prompts, samplings = workload(model.config.vocab_size, args.num_requests, args.prompt_len,
                                  args.max_tokens)
    lengths = [len(p["prompt_token_ids"]) + s.max_tokens
               for p, s in zip(prompts, samplings, strict=True)]
    blocks = sum(cdiv(n, args.block_size) for n in lengths)
    print(f"{args.num_requests} requests, {sum(lengths)} tokens at the end: contiguous rows of "
          f"max_model_len={max_model_len} reserve {args.num_requests * max_model_len} slots "
          f"({sum(lengths) / (args.num_requests * max_model_len):.0%} used); blocks of "
          f"{args.block_size} hold them in {blocks} blocks = {blocks * args.block_size} slots "
          f"({sum(lengths) / (blocks * args.block_size):.0%} used)")

    roomy = cdiv(max_model_len, args.block_size) * args.num_requests
    tight = cdiv(max_model_len, args.block_size) * args.tight_requests
    results = {}
    for name, num_blocks in (("roomy", roomy), ("tight", tight)):
        llm = folojax.LLM(model, max_model_len=max_model_len, block_size=args.block_size,
                          num_kv_blocks=num_blocks, max_num_seqs=args.num_requests)
        outputs, seconds, preemptions = timed_run(llm, prompts, samplings)
        results[name] = [o.outputs[0].token_ids for o in outputs]
        same = results[name] == results["roomy"]
        print(f"{name} pool of {num_blocks} blocks: {seconds:.2f} s, {preemptions} preemptions, "
              f"tokens identical to the roomy pool's: {same}")


if __name__ == "__main__":
    main()
