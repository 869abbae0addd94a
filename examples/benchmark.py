"""folojax against transformers+torch on the embedded model (as `folojax bench --compare-hf`)."""

from folojax.bench import format_results, run_bench

print(format_results(run_bench(None, dtype="float32", prompt_len=128, max_tokens=32,
                               compare_hf=True)))
