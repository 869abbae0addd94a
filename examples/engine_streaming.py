"""The LLMEngine step loop: add requests, print each one's text as it grows, abort one midway."""

import folojax
from folojax.tokenizer import apply_chat_template

llm = folojax.LLM(max_model_len=2048)  # the embedded SmolLM2-135M-Instruct
engine = llm.llm_engine
tokenizer = llm.get_tokenizer()
questions = ["What is the capital of France?", "Name three primary colors.",
             "Write a very long story about a dragon."]
for number, question in enumerate(questions):
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": question}])
    engine.add_request(f"q{number}", ids, folojax.SamplingParams(temperature=0, max_tokens=64))

printed = {f"q{number}": 0 for number in range(len(questions))}  # characters shown so far
steps = 0
while engine.has_unfinished_requests():
    for output in engine.step():  # each output is cumulative: print what is new
        text = output.outputs[0].text
        if len(text) > printed[output.request_id]:
            print(f"[{output.request_id}] +{text[printed[output.request_id]:]!r}")
            printed[output.request_id] = len(text)
        if output.finished:
            print(f"[{output.request_id}] done: {text!r} (TTFT {output.metrics.ttft * 1e3:.0f} ms)")
    steps += 1
    if steps == 10:
        engine.abort_request("q2")  # its blocks go back to the pool at once
        print("[q2] aborted")
