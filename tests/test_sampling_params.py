import pytest

from folojax import SamplingParams


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("min_p", 1.5), ("max_tokens", 0), ("min_tokens", -1), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("logprobs", -1), ("seed", 1.5),
    ("stop", [""]), ("stop_token_ids", [-3]), ("temperature", float("nan")), ("n", True),
    ("temperature", float("inf")), ("seed", -1), ("seed", 2**64), ("seed", True),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens .* must not exceed max_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_normalizes_stop_and_top_k():
    params = SamplingParams(stop="###", top_k=-1)
    assert params.stop == ["###"] and params.top_k == 0 and params.stop_token_ids == []
    assert SamplingParams(temperature=0).greedy
