"""vLLM-style offline generation over a batch of prompts."""

import folojax

llm = folojax.LLM()  # the embedded SmolLM2-135M-Instruct
prompts = ["Once upon a time", "The best way to learn a language is"]
outputs = llm.generate(prompts, folojax.SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32,
                                                       seed=0))
for output in outputs:
    print(repr(output.prompt), "->", repr(output.outputs[0].text))
