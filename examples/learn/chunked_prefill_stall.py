"""How chunked prefill keeps a long prompt from stalling the requests that are decoding.

    python examples/learn/chunked_prefill_stall.py [--model PATH] [--long-prompt-len 1024]

A few requests decode; then a long prompt arrives. Without chunking, the step that admits it
computes the whole prompt, and every decoding request waits for that step. With chunking
(max_num_batched_tokens tokens per step), the prompt is computed a chunk per step beside the
decodes. Prints, for each, the longest gap between two tokens of a decoding request and the long
prompt's time to first token. Each engine runs the scenario once to compile, then is timed.
docs/learn/m5-chunked-prefill.md explains the figures.
"""

import argparse
import time

import numpy as np

import folojax
from folojax.runner.model_runner import wait_for_background_compiles


def scenario(engine, prompts: list[list[int]], long_prompt: list[int], max_tokens: int,
             tokens_before_long: int) -> tuple[float, float]:
    """(longest gap between two tokens of a decoding request while the long prompt was
    running, the long prompt's TTFT), in seconds."""
    decode = folojax.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"decode-{index}", prompt, decode)
    counts = {f"decode-{index}": 0 for index in range(len(prompts))}
    last_token_time: dict[str, float] = {}
    long_added = long_first_token = None
    longest_gap = 0.0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            num_tokens = len(output.outputs[0].token_ids)
            if output.request_id == "long":
                if long_first_token is None and num_tokens:
                    long_first_token = now
                continue
            if num_tokens > counts[output.request_id]:
                counts[output.request_id] = num_tokens
                if long_added is not None and long_first_token is None:
                    longest_gap = max(longest_gap, now - last_token_time[output.request_id])
                last_token_time[output.request_id] = now
        if long_added is None and min(counts.values()) >= tokens_before_long:
            engine.add_request("long", long_prompt,
                               folojax.SamplingParams(temperature=0.0, max_tokens=1))
            long_added = time.perf_counter()
    return longest_gap, long_first_token - long_added


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="none: the embedded SmolLM2")
    parser.add_argument("--num-decodes", type=int, default=4, help="requests decoding")
    parser.add_argument("--long-prompt-len", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256,
                        help="max_num_batched_tokens of the chunked engine")
    parser.add_argument("--max-tokens", type=int, default=48, help="each decoding request's")
    args = parser.parse_args(argv)

    model = folojax.load_model(args.model, load_tokenizer=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, 32).tolist()
               for _ in range(args.num_decodes)]
    long_prompt = rng.integers(0, model.config.vocab_size, args.long_prompt_len).tolist()
    tokens_before_long = max(1, args.max_tokens // 4)
    max_model_len = args.long_prompt_len + args.num_decodes + 32
    for name, engine_args in (
            (f"chunked, {args.chunk} tokens a step", dict(max_num_batched_tokens=args.chunk)),
            ("not chunked", dict(enable_chunked_prefill=False))):
        llm = folojax.LLM(model, max_model_len=max_model_len, enable_prefix_caching=False,
                          max_num_seqs=args.num_decodes + 1, **engine_args)
        scenario(llm.llm_engine, prompts, long_prompt, args.max_tokens, tokens_before_long)
        wait_for_background_compiles()
        gap, ttft = scenario(llm.llm_engine, prompts, long_prompt, args.max_tokens,
                             tokens_before_long)
        print(f"{name}: longest gap between a decoding request's tokens {gap * 1e3:.0f} ms; "
              f"the {args.long_prompt_len}-token prompt's TTFT {ttft * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
