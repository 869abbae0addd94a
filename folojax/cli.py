"""The `folojax` command: generate, bench, init-random."""

import argparse
import sys


def _generate(args) -> int:
    from folojax.engine.llm import LLM
    from folojax.sampling_params import SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              seed=args.seed, max_tokens=args.max_tokens)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], sampling, use_tqdm=False)
    else:
        outputs = llm.generate([args.prompt], sampling, use_tqdm=False)
    output, metrics = outputs[0].outputs[0], outputs[0].metrics
    print(output.text if args.chat else args.prompt + output.text)
    print(f"\n[{len(output.token_ids)} tokens, finish_reason={output.finish_reason}] "
          f"TTFT {metrics.ttft * 1e3:.1f} ms, TPOT {metrics.tpot * 1e3:.2f} ms, "
          f"{metrics.tokens_per_second:.1f} tokens/s (a first call: these include XLA compiling "
          "the prefill and decode steps; `folojax bench` times warm runs)",
          file=sys.stderr)
    return 0


def _bench(args) -> int:
    if args.throughput:
        return _bench_throughput(args)
    from folojax.bench import format_results, run_bench

    results = run_bench(args.model, args.dtype, args.batch_size, args.prompt_len,
                        args.max_tokens, args.repeats, args.compare_hf)
    print(f"model={args.model or 'embedded SmolLM2-135M-Instruct'} dtype={args.dtype} "
          f"batch={args.batch_size} prompt_len={args.prompt_len} max_tokens={args.max_tokens}")
    print(format_results(results))
    return 0


def _bench_throughput(args) -> int:
    from folojax.bench_throughput import format_throughput, run_throughput_bench

    if args.model is None:
        raise ValueError("bench --throughput needs --model: a Hugging Face checkpoint directory "
                         "(e.g. from `folojax init-random --config configs/qwen3-0.6b.json`)")
    results, prefix = run_throughput_bench(
        args.model, args.dtype, args.num_requests, args.min_prompt_len, args.max_prompt_len,
        args.max_tokens, args.max_num_seqs, args.max_num_batched_tokens, args.prefix_len,
        args.compare_hf, args.repeats)
    print(f"model={args.model} dtype={args.dtype} requests={args.num_requests} "
          f"prompts={args.min_prompt_len}-{args.max_prompt_len} max_tokens={args.max_tokens} "
          f"max_num_seqs={args.max_num_seqs} max_num_batched_tokens={args.max_num_batched_tokens} "
          f"rounds={args.repeats}")
    print(format_throughput(results, prefix))
    return 0


def _init_random(args) -> int:
    from folojax.weights.random_checkpoint import write_random_checkpoint

    write_random_checkpoint(args.config, args.out, seed=args.seed, dtype=args.dtype)
    print(f"wrote a random-weight checkpoint of {args.config} to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="folojax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", default=None,
                     help="HF directory, .gguf file or hub id (default: embedded SmolLM2)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.set_defaults(func=_generate)

    bench = commands.add_parser("bench", help="measure TTFT, TPOT and tokens/s")
    bench.add_argument("--model", default=None)
    bench.add_argument("--dtype", default="auto")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3,
                       help="timed runs (medians reported); with --throughput, rounds in which "
                            "the engines take turns")
    bench.add_argument("--compare-hf", action="store_true",
                       help="also run transformers+torch on the same workload")
    bench.add_argument("--throughput", action="store_true",
                       help="many mixed-length requests through the engine (uses the options "
                            "below, --max-tokens and --compare-hf)")
    bench.add_argument("--num-requests", type=int, default=48)
    bench.add_argument("--min-prompt-len", type=int, default=32)
    bench.add_argument("--max-prompt-len", type=int, default=256)
    bench.add_argument("--max-num-seqs", type=int, default=64)
    bench.add_argument("--max-num-batched-tokens", type=int, default=1024)
    bench.add_argument("--prefix-len", type=int, default=1000,
                       help="shared prefix for the prefix-caching TTFT figure (0 = skip)")
    bench.set_defaults(func=_bench)

    init = commands.add_parser("init-random", help="write a random-weight HF checkpoint")
    init.add_argument("--config", required=True, help="a config.json, e.g. configs/qwen3-0.6b.json")
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="bfloat16")
    init.set_defaults(func=_init_random)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"folojax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
