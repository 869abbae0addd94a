"""Warm-up (engine/warm_up.py) and background compiles (runner/model_runner.py): after
warm-up no step waits for a compile that a warm shape covers, and nothing changes the tokens."""

import folojax
from folojax.config import EngineConfig, SchedulerConfig
from folojax.engine.warm_up import warm_up_steps
from folojax.ops.paged_attention import CPU_KERNEL_CHUNKS
from folojax.runner.prepare import StepSizes


def test_warm_up_shapes_are_a_ladder_of_decode_rows_and_of_prefill_tokens(tiny_qwen3):
    config = EngineConfig(model=folojax.load_model(tiny_qwen3.path, "float32",
                                                   load_tokenizer=False).config,
                          scheduler=SchedulerConfig(max_num_seqs=256,
                                                    max_num_batched_tokens=1024),
                          max_model_len=512, dtype="float32")
    steps = warm_up_steps(config, block_size=16, max_request_len=512,
                          chunks=CPU_KERNEL_CHUNKS)
    sizes = [floor for _, _, floor in steps]
    decodes = [s for s in sizes if s.prefill_tokens == 0]
    prefills = [s for s in sizes if s.prefill_tokens > 0]
    assert [s.rows for s in decodes] == [1, 4, 16, 64, 256]
    assert [s.prefill_tokens for s in prefills] == [32, 64, 128, 256, 512, 1024]
    # Prefills beside the most decode rows; room for every row's (tile's) 512-token context.
    assert {s.rows for s in prefills} == {256}
    assert decodes[-1].decode_items >= 256 * 512 // 64
    assert all(s.prefill_items >= s.tiles * 512 // 64 and s.tiles >= s.prefill_tokens // 64
               for s in prefills)
    # Each dummy step is scheduled as it says: one prefill, or `rows` decodes of a 2nd token.
    for (output, tables, floor) in steps:
        assert set(tables) == {s.request.request_id for s in output.scheduled}
        if floor.prefill_tokens:
            [item] = output.scheduled
            assert item.num_new_tokens == floor.prefill_tokens and item.samples
        else:
            assert len(output.scheduled) == floor.rows
            assert all(s.num_new_tokens == 1 and s.start == 1 for s in output.scheduled)
    assert isinstance(sizes[0], StepSizes)


def test_after_warm_up_no_step_waits_for_a_compile_and_the_tokens_are_the_same(tiny_qwen3):
    engine_args = dict(skip_tokenizer_init=True, dtype="float32", max_num_seqs=8,
                       max_model_len=256, max_num_batched_tokens=128)
    prompts = [{"prompt_token_ids": [3 + i] * (5 + 23 * i)} for i in range(6)]
    samplings = [folojax.SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i,
                                        max_tokens=4 + 3 * i, ignore_eos=True)
                 for i in range(6)]
    reference = folojax.LLM(tiny_qwen3.path, background_compile=False, **engine_args)
    expected = [o.outputs[0].token_ids
                for o in reference.generate(prompts, samplings, use_tqdm=False)]

    warm = folojax.LLM(tiny_qwen3.path, warmup=True, **engine_args)
    runner = warm.llm_engine.runner
    assert folojax.num_compiles("paged_step") > 0 and runner.num_dispatch_compiles == 0
    # A mixed batch (greedy and random rows, prefills of 5-120 tokens, chunked beside decodes),
    # then one greedy request alone: every step runs at a compiled shape at once.
    outputs = warm.generate(prompts, samplings, use_tqdm=False)
    [alone] = warm.generate(prompts[1], samplings[1], use_tqdm=False)
    assert runner.num_dispatch_compiles == 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert alone.outputs[0].token_ids == expected[1]
    runner.wait_for_compiles()
    assert [o.outputs[0].token_ids for o in warm.generate(prompts, samplings, use_tqdm=False)
            ] == expected
