"""The batched sampler: exact masks, the sampled distribution, per-request seeds, penalties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import folojax
from folojax.ops.sampling import (
    SamplerState,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    argmax,
    sample,
)
from folojax.runner.sampling_inputs import (
    sampler_flags,
    sampling_tensors,
    seed_key_data,
    stop_token_ids,
)

LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))  # probabilities, unsorted


def kept(masked) -> list[int]:
    return np.flatnonzero(np.isfinite(np.asarray(masked)[0])).tolist()


@pytest.mark.parametrize("top_k, expected", [(1, [1]), (2, [1, 3]), (4, [1, 2, 3, 4]),
                                             (0, [0, 1, 2, 3, 4]), (99, [0, 1, 2, 3, 4])])
def test_top_k_mask(top_k, expected):
    masked = apply_top_k_top_p(LOGITS, jnp.array([top_k]), jnp.array([1.0]))
    assert kept(masked) == expected


# Sorted probabilities 0.4 (id 1), 0.3 (3), 0.15 (4), 0.1 (2), 0.05 (0); the mass of the more
# likely tokens before each is 0, 0.4, 0.7, 0.85, 0.95. A token is kept while that is below top_p.
@pytest.mark.parametrize("top_p, expected", [(0.3, [1]), (0.5, [1, 3]), (0.75, [1, 3, 4]),
                                             (0.9, [1, 2, 3, 4]), (0.99, [0, 1, 2, 3, 4]),
                                             (1.0, [0, 1, 2, 3, 4])])
def test_top_p_mask(top_p, expected):
    masked = apply_top_k_top_p(LOGITS, jnp.array([0]), jnp.array([top_p], jnp.float32))
    assert kept(masked) == expected


def test_top_p_one_keeps_the_far_tail():
    """float32 cumulative sums reach 1.0 before the tail ends; top_p=1 must still keep it."""
    logits = jnp.concatenate([jnp.array([[30.0]]), jnp.zeros((1, 1000))], axis=-1)
    masked = apply_top_k_top_p(logits, jnp.array([0]), jnp.array([1.0]))
    assert len(kept(masked)) == 1001


def test_top_k_then_top_p_renormalizes_within_top_k():
    # Within the top 2 (0.4, 0.3), token 1 holds 0.4/0.7 = 0.57 of the mass: top_p=0.5 keeps it.
    masked = apply_top_k_top_p(LOGITS, jnp.array([2]), jnp.array([0.5]))
    assert kept(masked) == [1]


@pytest.mark.parametrize("min_p, expected", [(0.0, [0, 1, 2, 3, 4]), (0.3, [1, 3, 4]),
                                             (0.5, [1, 3]), (0.8, [1])])
def test_min_p_mask(min_p, expected):
    assert kept(apply_min_p(LOGITS, jnp.array([min_p]))) == expected


def _sampler_inputs(samplings, batch, vocab, prompts=None, eos=()):
    """(tensors, state, flags) of `samplings`, with vocab-sized masks (as the step builds)."""
    prompts = prompts or [[0]] * len(samplings)
    keys = np.stack([seed_key_data(s.seed or 0) for s in samplings])
    tensors = sampling_tensors(samplings, jax.random.wrap_key_data(jnp.asarray(keys)))
    prompt_mask = np.zeros((batch, vocab), bool)
    stop_mask = np.zeros((batch, vocab), bool)
    for row, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        prompt_mask[row, prompt] = True
        stop_mask[row, stop_token_ids(sampling, eos)] = True
    state = SamplerState(num_generated=jnp.zeros(batch, jnp.int32),
                         output_counts=jnp.zeros((batch, vocab), jnp.int32),
                         prompt_mask=jnp.asarray(prompt_mask),
                         stop_token_mask=jnp.asarray(stop_mask))
    return tensors, state, sampler_flags(samplings)


def test_sampled_distribution_matches_softmax_chi_square():
    """20,000 draws (distinct seeds) at T=0.7 against softmax(logits / 0.7)."""
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32))
    num_draws, temperature = 20_000, 0.7
    samplings = [folojax.SamplingParams(temperature=temperature, seed=i) for i in range(num_draws)]
    tensors, state, flags = _sampler_inputs(samplings, num_draws, 5)
    tokens, _, _ = jax.jit(sample, static_argnames="flags")(
        jnp.tile(logits, (num_draws, 1)), tensors, state, flags=flags)
    observed = np.bincount(np.asarray(tokens), minlength=5)
    expected_p = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    chi_square = ((observed - num_draws * expected_p) ** 2 / (num_draws * expected_p)).sum()
    assert chi_square < 18.47, (observed, num_draws * expected_p)  # df=4, p=0.001


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    samplings = [folojax.SamplingParams(temperature=0), folojax.SamplingParams(temperature=5.0)]
    tensors, state, flags = _sampler_inputs(samplings, 2, 3)
    assert not flags.all_greedy
    tokens, _, new_state = sample(logits, tensors, state, flags)
    assert int(tokens[0]) == 1
    assert np.asarray(new_state.num_generated).tolist() == [1, 1]


@pytest.mark.parametrize("vocab", [151936, 320, 4100, 1000, 4097])
def test_argmax_is_jnp_argmax_first_index_of_ties_included(vocab):
    # 151936 and 320 go by 128- and 64-wide slices; 4100 by 4 (plain argmax), as 1000 and 4097.
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((7, vocab)).astype(np.float32)
    logits[1, [0, vocab - 1]] = 9.0  # a tie across slices: the first wins
    logits[2, [vocab // 2, vocab // 2 + 1]] = 9.0  # a tie inside a slice
    logits[3, -1] = 9.0  # the very last token
    logits[4] = -np.inf  # nothing finite: index 0, as jnp.argmax
    logits[5] = 1.0  # all equal
    logits[6, :vocab // 2] = -np.inf
    got = np.asarray(jax.jit(argmax)(jnp.asarray(logits)))
    assert got.dtype == np.int32
    assert got.tolist() == np.asarray(jnp.argmax(logits, axis=-1)).tolist()
    assert got[1:4].tolist() == [0, vocab // 2, vocab - 1]


def test_penalties_follow_vllm_rules():
    logits = jnp.array([[2.0, -2.0, 1.0, 0.5]])
    sampling = folojax.SamplingParams(temperature=0, repetition_penalty=2.0,
                                      frequency_penalty=0.5, presence_penalty=0.25)
    tensors, state, _ = _sampler_inputs([sampling], 1, 4, prompts=[[0]])
    state.output_counts = jnp.array([[0, 2, 0, 0]], jnp.int32)
    penalized = np.asarray(apply_penalties(logits, state, tensors))[0]
    # token 0: in prompt, positive -> /2; token 1: output twice, negative -> *2, -0.5*2, -0.25.
    np.testing.assert_allclose(penalized, [1.0, -4.0 - 1.0 - 0.25, 1.0, 0.5])


def test_min_tokens_bans_stop_tokens_until_reached():
    logits = jnp.array([[0.0, 5.0, 1.0]])  # token 1 (EOS) is the argmax
    sampling = folojax.SamplingParams(temperature=0, min_tokens=2)
    tensors, state, flags = _sampler_inputs([sampling], 1, 3, eos=(1,))
    first, _, state = sample(logits, tensors, state, flags)
    second, _, state = sample(logits, tensors, state, flags)
    third, _, _ = sample(logits, tensors, state, flags)
    assert [int(first[0]), int(second[0]), int(third[0])] == [2, 2, 1]


def test_logprobs_are_raw_model_logprobs():
    logits = jnp.array([[1.0, 2.0, 3.0, 0.0]])
    sampling = folojax.SamplingParams(temperature=0, logprobs=2)
    tensors, state, flags = _sampler_inputs([sampling], 1, 4)
    tokens, (chosen, top_ids, top_values), _ = sample(logits, tensors, state, flags)
    expected = np.asarray(jax.nn.log_softmax(logits))[0]
    assert int(tokens[0]) == 2
    np.testing.assert_allclose(float(chosen[0]), expected[2], rtol=1e-6)
    assert np.asarray(top_ids)[0].tolist() == [2, 1]
    np.testing.assert_allclose(np.asarray(top_values)[0], expected[[2, 1]], rtol=1e-6)


def test_seeded_request_gives_same_tokens_alone_and_in_a_mixed_batch(tiny_qwen3):
    model = tiny_qwen3.model
    prompt = [5, 6, 7, 8]
    seeded = folojax.SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234,
                                    max_tokens=15, ignore_eos=True)

    def run(prompts, samplings, batch, key):
        cache = folojax.init_cache(model.config, batch_size=batch, max_seq_len=64)
        return folojax.generate(model.params, cache, jax.random.key(key), prompts,
                                config=model.config, sampling=samplings).token_ids

    alone = run([prompt], [seeded], 1, 0)[0]
    others = [folojax.SamplingParams(temperature=0, max_tokens=5),
              folojax.SamplingParams(temperature=1.3, max_tokens=20, ignore_eos=True)]
    mixed = run([[9, 10], prompt, [11, 12, 13, 14, 15, 16]], [others[0], seeded, others[1]], 4, 99)
    assert mixed[1] == alone
    different_seed = run([prompt], [folojax.SamplingParams(
        temperature=0.9, top_p=0.95, top_k=40, seed=4321, max_tokens=15, ignore_eos=True)], 1, 0)
    assert different_seed[0] != alone


def test_host_derived_seed_keys_equal_jax_random_key():
    for seed in (0, 1, 12345, 2**32 - 1):
        np.testing.assert_array_equal(seed_key_data(seed),
                                      np.asarray(jax.random.key_data(jax.random.key(seed))))
    assert seed_key_data(2**40 + 7).tolist() == [2**8, 7]  # high, then low 32 bits
