"""The server's Prometheus metrics (folojax/entrypoints/openai/metrics.py), without a server."""

import types

from folojax.entrypoints.async_engine import EngineStats
from folojax.entrypoints.openai.metrics import ServerMetrics
from folojax.outputs import CompletionOutput, RequestOutput


def _count(metrics: ServerMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("folojax:request_success_total",
                                              {"finished_reason": reason})
    return value or 0.0


def test_a_finished_request_counts_its_reasons_and_an_aborted_one_counts_abort_once():
    metrics = ServerMetrics(types.SimpleNamespace(stats=EngineStats()))  # an idle engine
    finished = metrics.track([1, 2, 3], n=2)
    finished.update(RequestOutput("a", None, [1, 2, 3], [
        CompletionOutput(0, "x", [7], finish_reason="stop"),
        CompletionOutput(1, "y", [8, 9], finish_reason="length")], finished=True))
    finished.aborted()  # after it finished: nothing more
    aborted = metrics.track([1], n=2)
    aborted.aborted()
    aborted.aborted()
    assert (_count(metrics, "stop"), _count(metrics, "length"), _count(metrics, "abort")) == (
        1, 1, 2)
    assert metrics.registry.get_sample_value("folojax:prompt_tokens_total") == 3
