"""The `folojax` command: generate, serve, bench, perplexity, quantize, init-random.

Arguments are checked before anything loads, so a bad one fails at once. The command owns its
process, so it tunes glibc's malloc first (folojax/host_malloc.py; FOLOJAX_TUNE_MALLOC=0 does
not).
"""

import argparse
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; use {', '.join(DTYPES)}")


def _quantizations(value: str) -> tuple[str, ...]:
    """--quantization's comma-separated choices, checked (bench runs each; the others take one)."""
    from folojax.weights.quantized import QUANTIZATIONS

    choices = tuple(value.split(","))
    for choice in choices:
        if choice not in QUANTIZATIONS:
            raise ValueError(f"--quantization {choice!r} is not supported; use "
                             f"{', '.join(QUANTIZATIONS)}")
    return choices


def _attention_backends(value: str) -> tuple[str, ...]:
    """--attention-backend's comma-separated choices, checked (bench runs each)."""
    from folojax.ops.attention_backends import check_backend_name

    choices = tuple(choice.strip() for choice in value.split(","))
    for choice in choices:
        try:
            check_backend_name(choice)
        except ValueError as error:
            raise ValueError(f"--{error}".replace("attention_backend", "attention-backend",
                                                  1)) from None
    return choices


def _max_num_seqs(value: str) -> tuple[int, ...]:
    """bench --max-num-seqs' comma-separated choices, checked (--throughput runs each)."""
    choices = []
    for choice in value.split(","):
        try:
            number = int(choice)
        except ValueError:
            number = 0
        if number <= 0:
            raise ValueError(f"--max-num-seqs takes positive ints, comma-separated; got "
                             f"{choice.strip()!r}")
        choices.append(number)
    return tuple(choices)


def _one_attention_backend(value: str) -> str:
    if "," in value:
        raise ValueError(f"--attention-backend takes one choice here, got {value!r}")
    return _attention_backends(value)[0]


def _one_quantization(value: str) -> str:
    if "," in value:
        raise ValueError(f"--quantization takes one choice here, got {value!r}")
    return _quantizations(value)[0]


def _check_generate(args):
    """The sampling parameters, checked before the model loads."""
    from folojax.sampling_params import SamplingParams

    if not args.prompt:
        raise ValueError("--prompt is empty: give the text to complete")
    _check_dtype(args.dtype)
    _one_quantization(args.quantization)
    _one_attention_backend(args.attention_backend)
    if args.max_model_len is not None and args.max_model_len <= 0:
        raise ValueError(f"--max-model-len must be positive, got {args.max_model_len}")
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed, max_tokens=args.max_tokens)


def _generate(args) -> int:
    from folojax.engine.llm import LLM

    sampling = _check_generate(args)
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              quantization=args.quantization, attention_backend=args.attention_backend)
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


def _check_serve(args) -> str | None:
    """The API key (--api-key, else $FOLOJAX_API_KEY), after checking the arguments."""
    import os

    _check_dtype(args.dtype)
    _one_quantization(args.quantization)
    _one_attention_backend(args.attention_backend)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens",
                 "num_scheduler_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.served_model_name == "":
        raise ValueError("--served-model-name is empty")
    if args.api_key == "":
        raise ValueError("the API key is empty: give --api-key a value, or leave it out")
    if args.api_key is not None:
        return args.api_key
    return os.environ.get("FOLOJAX_API_KEY") or None  # set but empty: no key


def _serve(args) -> int:
    import logging
    import os

    from folojax.engine.llm import LLM
    from folojax.entrypoints.openai.api_server import run_server

    api_key = _check_serve(args)
    engine_logger = logging.getLogger("folojax")  # its INFO lines, beside uvicorn's
    if not engine_logger.handlers:  # once per process, however often serve runs in it
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        engine_logger.addHandler(handler)
    engine_logger.setLevel(logging.INFO)
    model = args.model if args.model is not None else args.model_option
    llm = LLM(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              seed=args.seed, enable_prefix_caching=not args.no_enable_prefix_caching,
              warmup=args.warmup, padded_steps_before_compile=1,
              quantization=args.quantization, num_scheduler_steps=args.num_scheduler_steps,
              attention_backend=args.attention_backend)
    name = args.served_model_name or (os.path.basename(os.path.normpath(model)) if model
                                      else "SmolLM2-135M-Instruct")
    run_server(llm, args.host, args.port, name, api_key)
    return 0


def _check_bench(args) -> None:
    _check_dtype(args.dtype)
    _quantizations(args.quantization)
    _attention_backends(args.attention_backend)
    _max_num_seqs(args.max_num_seqs)
    if args.first_call and args.quantization != "auto":
        raise ValueError("bench --first-call times LLM's defaults: it takes no --quantization")
    if args.first_call and args.attention_backend != "auto":
        raise ValueError("bench --first-call times LLM's defaults: it takes no "
                         "--attention-backend")
    for name in ("batch_size", "prompt_len", "max_tokens", "repeats", "num_requests",
                 "min_prompt_len", "max_prompt_len", "max_num_batched_tokens",
                 "num_scheduler_steps"):
        value = getattr(args, name)
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.prefix_len < 0:
        raise ValueError(f"--prefix-len must be >= 0, got {args.prefix_len}")
    if args.min_prompt_len > args.max_prompt_len:
        raise ValueError(f"--min-prompt-len ({args.min_prompt_len}) exceeds --max-prompt-len "
                         f"({args.max_prompt_len})")


def _bench_serve(args) -> int:
    import httpx

    from folojax.bench_serve import format_serve_bench, run_serve_bench

    if args.concurrency is not None and args.concurrency <= 0:
        raise ValueError(f"--concurrency must be positive, got {args.concurrency}")
    if args.request_rate is not None and args.request_rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {args.request_rate}")
    if args.min_tokens is not None and not 0 <= args.min_tokens <= args.max_tokens:
        raise ValueError(f"--min-tokens must be in [0, --max-tokens], got {args.min_tokens}")
    model = args.served_model_name
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if model is None:  # the server's first model
        try:
            models = httpx.get(args.base_url.rstrip("/") + "/models", headers=headers,
                               timeout=30)
            models.raise_for_status()
        except httpx.HTTPError as error:
            raise ValueError(f"cannot list the models at {args.base_url}: {error}") from None
        model = models.json()["data"][0]["id"]
    concurrency = args.concurrency
    if concurrency is None and args.request_rate is None:
        concurrency = 16
    if args.plot:
        return _plot_serve_bench(args, model, concurrency or 16)
    result = run_serve_bench(args.base_url, model, args.num_requests, args.prompt_words,
                             args.max_tokens, concurrency, args.request_rate, args.api_key,
                             min_tokens=args.min_tokens)
    mode = ", ".join(([f"Poisson {args.request_rate}/s"] if args.request_rate else [])
                     + ([f"concurrency {concurrency}"] if concurrency else []))
    print(f"{args.base_url} model={model} requests={args.num_requests} "
          f"prompt_words={args.prompt_words} max_tokens={args.max_tokens} {mode}")
    print(format_serve_bench(result))
    return 0


def _plot_serve_bench(args, model: str, max_concurrency: int) -> int:
    """Runs the load at concurrency 1, 2, 4, ... up to max_concurrency; plots latency
    against throughput."""
    from folojax.bench_serve import format_serve_bench, plot_latency_against_load, run_serve_bench

    levels = sorted({min(2 ** i, max_concurrency) for i in range(max_concurrency.bit_length())}
                    | {max_concurrency})
    points = []
    for level in levels:
        result = run_serve_bench(args.base_url, model, args.num_requests, args.prompt_words,
                                 args.max_tokens, level, None, args.api_key,
                                 min_tokens=args.min_tokens)
        print(f"concurrency {level}:\n{format_serve_bench(result)}")
        points.append((level, result))
    plot_latency_against_load(points, args.plot)
    print(f"wrote {args.plot}")
    return 0


def _bench(args) -> int:
    if args.mode == "serve":
        return _bench_serve(args)
    _check_bench(args)
    if args.first_call:
        return _bench_first_call(args)
    if args.throughput:
        return _bench_throughput(args)
    from folojax.bench import format_results, run_bench

    results, limit = run_bench(args.model, args.dtype, args.batch_size, args.prompt_len,
                               args.max_tokens, args.repeats, args.compare_hf,
                               _quantizations(args.quantization), args.compare_llama_cpp,
                               args.num_scheduler_steps,
                               _attention_backends(args.attention_backend))
    print(f"model={args.model or 'embedded SmolLM2-135M-Instruct'} dtype={args.dtype} "
          f"quantization={args.quantization} attention_backend={args.attention_backend} "
          f"batch={args.batch_size} "
          f"prompt_len={args.prompt_len} max_tokens={args.max_tokens} "
          f"num_scheduler_steps={args.num_scheduler_steps}")
    print(format_results(results, limit))
    return 0


def _bench_throughput(args) -> int:
    from folojax.bench_throughput import format_throughput, run_throughput_bench
    from folojax.weights.loader import resolve_model_path

    results, prefix = run_throughput_bench(
        resolve_model_path(args.model), args.dtype, args.num_requests, args.min_prompt_len,
        args.max_prompt_len, args.max_tokens, _max_num_seqs(args.max_num_seqs),
        args.max_num_batched_tokens,
        args.prefix_len, args.compare_hf, args.repeats, _quantizations(args.quantization),
        args.num_scheduler_steps, _attention_backends(args.attention_backend))
    print(f"model={args.model or 'embedded SmolLM2-135M-Instruct'} dtype={args.dtype} "
          f"quantization={args.quantization} attention_backend={args.attention_backend} "
          f"requests={args.num_requests} "
          f"prompts={args.min_prompt_len}-{args.max_prompt_len} max_tokens={args.max_tokens} "
          f"max_num_seqs={args.max_num_seqs} max_num_batched_tokens={args.max_num_batched_tokens} "
          f"num_scheduler_steps={args.num_scheduler_steps} rounds={args.repeats}")
    print(format_throughput(results, prefix))
    return 0


def _bench_first_call(args) -> int:
    from folojax.bench_first_call import format_first_call, run_first_call_bench

    if args.model is None:
        raise ValueError("bench --first-call needs --model: a Hugging Face checkpoint directory")
    results = run_first_call_bench(args.model, args.dtype, args.num_requests,
                                   args.min_prompt_len, args.max_prompt_len, args.max_tokens,
                                   args.compare_hf)
    print(f"model={args.model} dtype={args.dtype} requests={args.num_requests} "
          f"prompts={args.min_prompt_len}-{args.max_prompt_len} max_tokens={args.max_tokens}, "
          "LLM's default settings, each engine in a fresh process")
    print(format_first_call(results))
    return 0


def _quantize(args) -> int:
    from folojax.quantize import quantize_checkpoint

    sym = getattr(args, "sym", True)  # neither --sym nor --asym: symmetric
    calibration = {name: getattr(args, name) for name in ("calibration_samples",
                                                          "calibration_length")
                   if hasattr(args, name)}  # else quantize_checkpoint's defaults
    out_dir = quantize_checkpoint(args.model, args.out_dir, args.method, args.bits,
                                  args.group_size, sym, args.act_order, args.grid_search,
                                  **calibration)
    print(f"wrote {args.method} {args.bits}-bit (group size {args.group_size}, "
          f"{'symmetric' if sym else 'asymmetric'}"
          f"{', act-order' if args.act_order else ''}"
          f"{', grid search' if args.grid_search else ''}) GPTQ checkpoint of "
          f"{args.model or 'the embedded SmolLM2-135M-Instruct'} to "
          f"{out_dir}")
    return 0


def _perplexity(args) -> int:
    from folojax.perplexity import format_perplexity, run_perplexity

    _check_dtype(args.dtype)
    quantizations = _quantizations(args.quantization)
    if args.context_len < 2:
        raise ValueError(f"--context-len must be >= 2, got {args.context_len}")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    results = run_perplexity(args.model, text, args.dtype, quantizations, args.context_len,
                             args.compare_hf)
    print(f"model={args.model or 'embedded SmolLM2-135M-Instruct'} dtype={args.dtype} "
          f"text={args.text} ({len(text)} characters) context_len={args.context_len}")
    print(format_perplexity(results))
    return 0


def _init_random(args) -> int:
    from folojax.weights.random_checkpoint import write_random_checkpoint

    write_random_checkpoint(args.config, args.out, seed=args.seed, dtype=args.dtype)
    print(f"wrote a random-weight checkpoint of {args.config} to {args.out}")
    return 0


def _add_model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", default=None,
                         help="HF directory, .gguf file or hub id; none: the embedded SmolLM2")
    command.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on "
                         "CPU), float32, bfloat16 or float16")
    _add_quantization_argument(command)


def _add_num_scheduler_steps_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--num-scheduler-steps", type=int, default=1,
                         help="decode tokens per request in one dispatch while every running "
                              "request decodes and none waits (the same outputs)")


def _add_attention_backend_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--attention-backend", default="auto",
                         help="auto (the fastest that serves the model here; logged) or one of "
                              "folojax.list_attention_backends(): reference, xla, cpu, pallas; "
                              "bench takes several, comma-separated, run in turn")


def _add_quantization_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--quantization", default="auto",
                         help="auto (a GGUF's Q4_0/Q4_1/Q8_0 tensors and a GPTQ checkpoint "
                              "stay quantized), none "
                              "(dequantized to --dtype) or int8 (weights per output channel, "
                              "at load time, against int8 activations); bench and perplexity "
                              "take several, comma-separated, run in turn")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="folojax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    gen = commands.add_parser("generate", help="generate text from a prompt", **defaults)
    gen.add_argument("--prompt", required=True, help="the text to complete (or, with --chat, "
                     "the user's message)")
    _add_model_arguments(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept (1 = all)")
    gen.add_argument("--top-k", type=int, default=0, help="most likely tokens kept (0 = all)")
    gen.add_argument("--seed", type=int, default=None, help="per-request seed, in [0, 2**64)")
    gen.add_argument("--max-model-len", type=int, default=None,
                     help="longest prompt plus output; none: the model's context")
    _add_attention_backend_argument(gen)
    gen.set_defaults(func=_generate)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server", **defaults)
    serve.add_argument("model", nargs="?", default=None,
                       help="HF directory, .gguf file or hub id; none: the embedded SmolLM2")
    serve.add_argument("--model", dest="model_option", default=None, help="the same, as an option")
    serve.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on "
                       "CPU), float32, bfloat16 or float16")
    _add_quantization_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` "
                       "(default: $FOLOJAX_API_KEY; neither: no key)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model's name in the API; none: the model path's last part")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt plus output; none: the model's context")
    serve.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once")
    serve.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="tokens computed per step; none: LLM's default")
    serve.add_argument("--seed", type=int, default=0, help="the engine's seed (unseeded requests)")
    _add_num_scheduler_steps_argument(serve)
    _add_attention_backend_argument(serve)
    serve.add_argument("--no-enable-prefix-caching", action="store_true",
                       help="turn prefix caching off")
    serve.add_argument("--warmup", action="store_true",
                       help="compile the step's largest shapes before listening, so that no "
                            "step waits for a compile (a slower start, and slower first "
                            "requests here: docs/BENCHMARKS.md)")
    serve.set_defaults(func=_serve)

    bench = commands.add_parser("bench", help="measure TTFT, TPOT and tokens/s", **defaults)
    bench.add_argument("mode", nargs="?", choices=["serve"], default=None,
                       help="serve: load an OpenAI-compatible server at --base-url (uses "
                            "--num-requests and --max-tokens too); none: time the engines "
                            "in this process")
    _add_model_arguments(bench)
    bench.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    bench.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    bench.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt")
    bench.add_argument("--repeats", type=int, default=3,
                       help="timed runs (medians reported); with --throughput, rounds in which "
                            "the engines take turns")
    bench.add_argument("--compare-hf", action="store_true",
                       help="also run transformers+torch on the same workload")
    bench.add_argument("--compare-llama-cpp", action="store_true",
                       help="also run llama.cpp (llama-cpp-python, an optional extra) on the "
                            "same GGUF file, at batch 1")
    bench.add_argument("--throughput", action="store_true",
                       help="many mixed-length requests through the engine (uses the options "
                            "below, --max-tokens and --compare-hf)")
    bench.add_argument("--first-call", action="store_true",
                       help="the --throughput workload's first call in fresh processes, load "
                            "and compilation included, with folojax's caches cold and warm")
    bench.add_argument("--num-requests", type=int, default=48, help="--throughput: requests")
    bench.add_argument("--min-prompt-len", type=int, default=32,
                       help="--throughput: shortest prompt")
    bench.add_argument("--max-prompt-len", type=int, default=256,
                       help="--throughput: longest prompt")
    bench.add_argument("--max-num-seqs", default="256",
                       help="--throughput: requests running at once; several, comma-separated, "
                            "run in turn")
    bench.add_argument("--max-num-batched-tokens", type=int, default=1024,
                       help="--throughput: tokens computed per step")
    _add_num_scheduler_steps_argument(bench)
    _add_attention_backend_argument(bench)
    bench.add_argument("--prefix-len", type=int, default=1000,
                       help="shared prefix for the prefix-caching TTFT figure (0 = skip)")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                       help="serve: the server's OpenAI base URL")
    bench.add_argument("--served-model-name", default=None,
                       help="serve: the model field; none: the server's first model")
    bench.add_argument("--concurrency", type=int, default=None,
                       help="serve: requests in flight at once (none: 16, or no cap with "
                            "--request-rate)")
    bench.add_argument("--request-rate", type=float, default=None,
                       help="serve: Poisson arrivals per second; none: all at once")
    bench.add_argument("--prompt-words", type=int, default=64,
                       help="serve: random words per prompt")
    bench.add_argument("--api-key", default=None, help="serve: the server's API key")
    bench.add_argument("--min-tokens", type=int, default=None,
                       help="serve: send min_tokens (vLLM's and llama.cpp's extension), e.g. "
                            "= --max-tokens so every server generates as many tokens")
    bench.add_argument("--plot", default=None, help="serve: run concurrency 1, 2, 4, ... up to "
                       "--concurrency and draw latency against load to this .png (matplotlib)")
    bench.set_defaults(func=_bench)

    quantize = commands.add_parser("quantize", help="write a GPTQ-format quantized checkpoint",
                                   **defaults)
    quantize.add_argument("model", nargs="?", default=None,
                          help="the source: an HF directory or a .gguf file; none: the embedded "
                               "SmolLM2")
    quantize.add_argument("out_dir", help="the new model directory to write")
    quantize.add_argument("--method", default="rtn",
                          help="rtn: round-to-nearest per group; gptq: GPTQ, layer by layer, "
                          "on calibration text (the standard library's module docstrings)")
    quantize.add_argument("--bits", type=int, default=4, help="4 or 8")
    quantize.add_argument("--group-size", type=int, default=128,
                          help="inputs per scale and zero point; -1: one group per output")
    symmetry = quantize.add_mutually_exclusive_group()
    symmetry.add_argument("--sym", dest="sym", action="store_true", default=argparse.SUPPRESS,
                          help="a fixed zero point, (2**bits) / 2 (default: this)")
    symmetry.add_argument("--asym", dest="sym", action="store_false", default=argparse.SUPPRESS,
                          help="a zero point per group, from its range (default: off)")
    quantize.add_argument("--act-order", action="store_true",
                          help="gptq: round inputs by decreasing Hessian diagonal (desc_act)")
    quantize.add_argument("--grid-search", action="store_true",
                          help="shrink each group's range where that rounds its weights with "
                          "less error (GPTQ's optional search)")
    quantize.add_argument("--calibration-samples", type=int, default=argparse.SUPPRESS,
                          help="gptq: calibration segments (default: 128)")
    quantize.add_argument("--calibration-length", type=int, default=argparse.SUPPRESS,
                          help="gptq: tokens per calibration segment (default: 256)")
    quantize.set_defaults(func=_quantize, command="quantize")
    parser.quantize_parser = quantize  # parse_command_line reads its positionals intermixed

    perplexity = commands.add_parser("perplexity", help="a model's perplexity on a text",
                                     **defaults)
    _add_model_arguments(perplexity)
    perplexity.add_argument("--text", required=True,
                            help="a UTF-8 text file (docs/BENCHMARKS.md names the held-out text)")
    perplexity.add_argument("--context-len", type=int, default=1024,
                            help="tokens per window: each window is scored afresh")
    perplexity.add_argument("--compare-hf", action="store_true",
                            help="also score the same windows with transformers+torch")
    perplexity.set_defaults(func=_perplexity)

    init = commands.add_parser("init-random", help="write a random-weight HF checkpoint",
                               **defaults)
    init.add_argument("--config", required=True, help="a config.json, e.g. configs/qwen3-0.6b.json")
    init.add_argument("--out", required=True, help="the directory to write")
    init.add_argument("--seed", type=int, default=0, help="of the random weights")
    init.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16")
    init.set_defaults(func=_init_random)
    return parser


def parse_command_line(argv=None) -> argparse.Namespace:
    """The arguments of a `folojax` command line (default sys.argv[1:]). quantize's positionals
    (an optional source, then the out dir) are read intermixed with its options, so that
    `quantize MODEL --bits 4 OUT` finds both."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["quantize"]:
        return parser.quantize_parser.parse_intermixed_args(argv[1:])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from folojax.host_malloc import tune_host_malloc

    args = parse_command_line(argv)
    tune_host_malloc()  # before JAX starts its threads; FOLOJAX_TUNE_MALLOC=0 leaves glibc's
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"folojax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
