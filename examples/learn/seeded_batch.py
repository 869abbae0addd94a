"""A seeded request draws the same tokens alone and in a batch of others.

    python examples/learn/seeded_batch.py [--model PATH] [--batch 8]

Samples one request (temperature 0.8, top_p 0.9, seed 1234) alone, then beside `--batch - 1`
other requests of other lengths and sampling settings, in two different orders, and prints
whether its tokens are the same each time. docs/learn/m1-offline-inference.md says why they
are: the request's key is derived from its seed alone, folded with each output's index.
"""

import argparse

import numpy as np

import folojax


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="none: the embedded SmolLM2")
    parser.add_argument("--batch", type=int, default=8, help="requests in the batch")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    llm = folojax.LLM(args.model, skip_tokenizer_init=True, max_model_len=256)
    vocab = llm.model.config.vocab_size
    rng = np.random.default_rng(0)
    ours = {"prompt_token_ids": rng.integers(0, vocab, 40).tolist()}
    seeded = folojax.SamplingParams(temperature=0.8, top_p=0.9, seed=1234,
                                    max_tokens=args.max_tokens, ignore_eos=True)
    others = [{"prompt_token_ids": rng.integers(0, vocab, int(n)).tolist()}
              for n in rng.integers(8, 120, args.batch - 1)]
    other_samplings = [folojax.SamplingParams(temperature=float(t), top_k=int(k),
                                              max_tokens=args.max_tokens, ignore_eos=True)
                       for t, k in zip(rng.uniform(0.0, 1.5, args.batch - 1),
                                       rng.integers(0, 50, args.batch - 1), strict=True)]
    alone = llm.generate([ours], seeded, use_tqdm=False)[0].outputs[0].token_ids
    first = llm.generate([ours] + others, [seeded] + other_samplings,
                         use_tqdm=False)[0].outputs[0].token_ids
    last = llm.generate(others + [ours], other_samplings + [seeded],
                        use_tqdm=False)[-1].outputs[0].token_ids
    for name, tokens in (("alone", alone), (f"first of {args.batch}", first),
                         (f"last of {args.batch}", last)):
        print(f"{name + ':':<12} {tokens}")
    print(f"the same tokens in all three: {alone == first == last}")


if __name__ == "__main__":
    main()
