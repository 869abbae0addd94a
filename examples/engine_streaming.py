"""The LLMEngine step loop: add requests, stream their text as it grows, abort one midway."""

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

steps = 0
while engine.has_unfinished_requests():
    for output in engine.step():
        if output.finished:
            print(f"[{output.request_id}] {output.outputs[0].text!r} "
                  f"(TTFT {output.metrics.ttft * 1e3:.0f} ms)")
    steps += 1
    if steps == 10:
        engine.abort_request("q2")  # its blocks go back to the pool at once
        print("[q2] aborted")
