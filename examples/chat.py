"""Chat through the model's chat template."""

import folojax

llm = folojax.LLM()
messages = [{"role": "user", "content": "What is the capital of France?"}]
output = llm.chat(messages, folojax.SamplingParams(temperature=0, max_tokens=48))[0]
print(output.outputs[0].text)
print(f"TTFT {output.metrics.ttft * 1e3:.0f} ms, TPOT {output.metrics.tpot * 1e3:.1f} ms")
