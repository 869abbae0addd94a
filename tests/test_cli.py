"""The `folojax` command line."""

import json
import os

import pytest

import folojax
from folojax.bench import run_bench
from folojax.cli import main


def test_init_random_writes_a_loadable_checkpoint(tmp_path):
    config = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 96, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256,
              "tie_word_embeddings": True, "eos_token_id": 1}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "random"
    assert main(["init-random", "--config", str(config_path), "--out", str(out)]) == 0
    model = folojax.load_model(str(out), dtype="float32", load_tokenizer=False)
    assert model.config.hidden_size == 32 and len(model.params.layers) == 2


def test_bench_reports_both_engines(tiny_qwen3, capsys):
    assert main(["bench", "--model", tiny_qwen3.path, "--prompt-len", "16", "--max-tokens", "4",
                 "--repeats", "1", "--compare-hf", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "folojax " in out and "folojax LLM " in out and "transformers " in out
    assert "folojax LLM / transformers: decode tok/s x" in out
    assert "GB/s (numpy GEMV)" in out and "of the streaming limit" in out


def test_bench_times_each_quantization_in_turn(tiny_qwen3, capsys):
    results, _ = run_bench(tiny_qwen3.path, "float32", prompt_len=16, max_tokens=4, repeats=1,
                           quantizations=("none", "int8"))
    assert [r.name for r in results] == ["folojax [none]", "folojax LLM [none]",
                                         "folojax [int8]", "folojax LLM [int8]"]
    assert results[2].weight_bytes < 0.5 * results[0].weight_bytes  # int8 codes, not float32
    assert main(["bench", "--model", tiny_qwen3.path, "--prompt-len", "16", "--max-tokens", "4",
                 "--repeats", "1", "--dtype", "float32", "--quantization", "none,int8"]) == 0
    out = capsys.readouterr().out
    assert "quantization=none,int8" in out and "folojax LLM [int8]:" in out
    with pytest.raises(ValueError, match="needs a .gguf file"):
        run_bench(tiny_qwen3.path, "float32", compare_llama_cpp=True)


def test_bench_times_each_attention_backend_in_turn(tiny_qwen3, capsys):
    assert main(["bench", "--model", tiny_qwen3.path, "--prompt-len", "16", "--max-tokens", "4",
                 "--repeats", "1", "--dtype", "float32", "--attention-backend", "xla,reference"]
                ) == 0
    out = capsys.readouterr().out
    assert "attention_backend=xla,reference" in out
    assert "folojax LLM [xla] " in out and "folojax LLM [reference] " in out


def test_bad_argument_exits_with_a_clear_error(capsys):
    assert main(["generate", "--prompt", "hi", "--model", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.real_model
def test_generate_prints_text_and_timings(capsys):
    assert main(["generate", "--chat", "--prompt", "What is the capital of France?",
                 "--max-tokens", "16", "--max-model-len", "512"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "TTFT" in captured.err and "TPOT" in captured.err and "tokens/s" in captured.err


def test_bench_throughput_runs_every_engine_on_the_same_workload(tiny_qwen3, capsys):
    from folojax.bench_throughput import run_throughput_bench

    results, prefix = run_throughput_bench(
        tiny_qwen3.path, "float32", num_requests=6, min_prompt=4, max_prompt=40, max_tokens=5,
        max_num_seqs=4, max_num_batched_tokens=64, prefix_len=100, compare_hf=True, repeats=3)
    assert [r.name for r in results] == ["folojax", "hf generate", "hf generate_batch"]
    assert [r.num_output_tokens for r in results] == [30, 30, 30]
    # transformers runs in a process of its own.
    assert results[0].process_id == os.getpid() != results[1].process_id
    assert results[0].num_compiles > 0
    for result in results:  # three interleaved rounds; each engine reports its median one
        assert len(result.run_seconds) == 3
        assert result.seconds == sorted(result.run_seconds)[1]
    assert prefix.num_cached_tokens == 96  # 6 full blocks of the 100-token prefix
    assert len(prefix.ttfts_cached) == len(prefix.ttfts_uncached) == 5
    assert prefix.ttft_cached == sorted(prefix.ttfts_cached)[2]
    assert main(["bench", "--throughput", "--model", tiny_qwen3.path, "--num-requests", "3",
                 "--min-prompt-len", "4", "--max-prompt-len", "8", "--max-tokens", "3",
                 "--prefix-len", "0", "--dtype", "float32", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "requests=3" in out and "rounds=2" in out and "output tok/s" in out
    with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
        run_throughput_bench(tiny_qwen3.path, "float32", repeats=0)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "hi", "--temperature", "-1"], "SamplingParams.temperature"),
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "SamplingParams.max_tokens"),
    (["generate", "--prompt", "hi", "--max-model-len", "0"], "--max-model-len must be positive"),
    (["generate", "--prompt", "hi", "--dtype", "int4"], "--dtype 'int4' is not supported"),
    (["serve", "--port", "0"], "--port must be in [1, 65535], got 0"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs must be positive"),
    (["serve", "--num-scheduler-steps", "0"], "--num-scheduler-steps must be positive"),
    (["bench", "--num-scheduler-steps", "-1"], "--num-scheduler-steps must be positive"),
    (["serve", "--api-key", ""], "the API key is empty: give --api-key a value"),
    (["serve", "--dtype", "int4"], "--dtype 'int4' is not supported"),
    (["generate", "--prompt", "hi", "--quantization", "int4"],
     "--quantization 'int4' is not supported; use auto, none, int8"),
    (["generate", "--prompt", "hi", "--quantization", "none,int8"],
     "--quantization takes one choice here"),
    (["serve", "--quantization", "gptq"], "--quantization 'gptq' is not supported"),
    (["bench", "--quantization", "none,fp8"], "--quantization 'fp8' is not supported"),
    (["bench", "--first-call", "--model", "m", "--quantization", "int8"],
     "--first-call times LLM's defaults"),
    (["generate", "--prompt", "hi", "--attention-backend", "flash"],
     "--attention-backend 'flash' is not one of: auto, reference, xla, cpu, pallas"),
    (["serve", "--attention-backend", "xla,cpu"], "--attention-backend takes one choice here"),
    (["bench", "--attention-backend", "cpu,flash"], "--attention-backend 'flash' is not one of"),
    (["bench", "--throughput", "--max-num-seqs", "1,x"],
     "--max-num-seqs takes positive ints, comma-separated; got 'x'"),
    (["bench", "--throughput", "--max-num-seqs", "0"], "got '0'"),
    (["bench", "--first-call", "--model", "m", "--attention-backend", "xla"],
     "it takes no --attention-backend"),
    (["bench", "serve", "--base-url", "http://127.0.0.1:9/v1"],
     "cannot list the models at http://127.0.0.1:9/v1"),
])
def test_bad_arguments_are_rejected_before_the_model_loads(argv, message, capsys, monkeypatch):
    import folojax.weights.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_every_option_says_what_it_does_and_its_default():
    import argparse

    from folojax.cli import build_parser

    [subparsers] = [a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)]
    for name, command in subparsers.choices.items():
        options = [a for a in command._actions if a.option_strings and a.dest != "help"]
        assert options, name
        for option in options:
            assert option.help, f"{name} {option.option_strings[0]} has no help"
        text = command.format_help()
        assert text.count("(default:") >= len(options), text


def test_the_command_tunes_malloc_and_importing_folojax_does_not(monkeypatch):
    import folojax.host_malloc as host_malloc

    calls = []
    monkeypatch.setattr(host_malloc, "tune_host_malloc", lambda: calls.append(1) or True)
    main(["generate", "--prompt", ""])
    assert calls == [1]


def test_bench_first_call_runs_each_engine_in_a_fresh_process(tiny_qwen3, capsys):
    assert main(["bench", "--first-call", "--model", tiny_qwen3.path, "--num-requests", "2",
                 "--min-prompt-len", "4", "--max-prompt-len", "8", "--max-tokens", "3",
                 "--dtype", "float32", "--compare-hf"]) == 0
    out = capsys.readouterr().out
    for name in ("folojax, cold caches", "folojax, warm caches", "transformers"):
        assert name in out
    assert "folojax, warm caches / transformers, load + first call: x" in out


def test_serve_takes_its_key_from_the_option_else_the_environment(monkeypatch):
    from folojax.cli import _check_serve, build_parser

    def key(*argv):
        return _check_serve(build_parser().parse_args(["serve", *argv]))

    monkeypatch.setenv("FOLOJAX_API_KEY", "from-env")
    assert key() == "from-env" and key("--api-key", "given") == "given"
    monkeypatch.setenv("FOLOJAX_API_KEY", "")
    assert key() is None
    monkeypatch.delenv("FOLOJAX_API_KEY")
    assert key() is None


def test_serve_warms_up_when_told_to(monkeypatch):
    import folojax.engine.llm
    import folojax.entrypoints.openai.api_server as api_server

    made = []
    monkeypatch.setattr(folojax.engine.llm, "LLM", lambda **kwargs: made.append(kwargs))
    monkeypatch.setattr(api_server, "run_server", lambda *args, **kwargs: None)
    monkeypatch.delenv("FOLOJAX_API_KEY", raising=False)
    assert main(["serve"]) == 0 and main(["serve", "--warmup"]) == 0
    assert [kwargs["warmup"] for kwargs in made] == [False, True]
    assert all(kwargs["padded_steps_before_compile"] == 1 for kwargs in made)


def test_quantize_and_bench_throughput_default_to_the_embedded_model(tmp_path, monkeypatch,
                                                                     capsys):
    import folojax.bench_throughput as bench_throughput
    import folojax.quantize as quantize
    from folojax.weights.loader import embedded_model_path

    sources = []
    monkeypatch.setattr(quantize, "quantize_checkpoint",
                        lambda model, out_dir, *args, **kwargs: sources.append(model) or out_dir)
    assert main(["quantize", str(tmp_path / "out"), "--bits", "8"]) == 0
    assert main(["quantize", "some/model", str(tmp_path / "out")]) == 0
    assert main(["quantize", "other/model", "--bits", "8", str(tmp_path / "out")]) == 0
    assert main(["quantize", "--asym", str(tmp_path / "out"), "--bits", "8"]) == 0
    assert sources == [None, "some/model", "other/model", None]  # None: the embedded model
    assert "of the embedded SmolLM2-135M-Instruct to" in capsys.readouterr().out

    monkeypatch.setattr(bench_throughput, "run_throughput_bench",
                        lambda model, *args: sources.append(model) or ([], None))
    monkeypatch.setattr(bench_throughput, "format_throughput", lambda *args: "")
    assert main(["bench", "--throughput"]) == 0
    assert sources[-1] == embedded_model_path()
    assert "model=embedded SmolLM2-135M-Instruct" in capsys.readouterr().out


def test_bench_throughput_runs_each_max_num_seqs_in_turn(tiny_qwen3):
    from folojax.bench_throughput import format_throughput, run_throughput_bench

    results, _ = run_throughput_bench(tiny_qwen3.path, "float32", num_requests=3, min_prompt=4,
                                      max_prompt=20, max_tokens=3, max_num_seqs=(1, 3),
                                      prefix_len=0)
    assert [r.name for r in results] == ["folojax [max_num_seqs=1]", "folojax [max_num_seqs=3]"]
    assert [r.num_output_tokens for r in results] == [9, 9]
    assert "folojax [max_num_seqs=3] / folojax [max_num_seqs=1]: output tok/s x" in (
        format_throughput(results, None))
    with pytest.raises(ValueError, match="max_num_seqs must be positive ints"):
        run_throughput_bench(tiny_qwen3.path, "float32", max_num_seqs=(4, 0))
