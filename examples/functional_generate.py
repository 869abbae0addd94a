"""The functional core: params + an explicit KV cache + a key in, tokens and the new cache out."""

import jax

import folojax

model = folojax.load_model(None, dtype="float32")  # None: the embedded SmolLM2-135M-Instruct
prompt = model.tokenizer("The three primary colors are").input_ids

logits = folojax.forward(model.params, model.config, [prompt])  # [1, len(prompt), vocab]
print("next token:", repr(model.tokenizer.decode(int(logits[0, -1].argmax()))))

cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=256)
result = folojax.generate(model.params, cache, jax.random.key(0), prompt, config=model.config,
                          sampling=folojax.SamplingParams(temperature=0.7, max_tokens=32, seed=1),
                          tokenizer=model.tokenizer)
print(result.texts[0])
print(result.finish_reasons[0], f"TPOT {result.metrics[0].tpot * 1e3:.1f} ms")
