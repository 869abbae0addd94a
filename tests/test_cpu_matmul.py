"""The C++ matmul over panels (folojax/ops/csrc/panel_matmul.cc) against numpy, the panel layout
itself, and where load_model uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import folojax
from folojax.model.layers import embedding_rows, linear
from folojax.model.weights import Linear, PanelLinear
from folojax.ops import cpu_kernels, cpu_matmul

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ kernels here")


def panel_linear(weight: np.ndarray, bias: np.ndarray | None = None) -> PanelLinear:
    return PanelLinear(jnp.asarray(cpu_matmul.pack_panels(weight)), weight.shape[0],
                       None if bias is None else jnp.asarray(bias))


@pytest.mark.parametrize("out, inner", [(1, 3), (63, 5), (64, 7), (65, 2), (200, 33)])
def test_panels_hold_the_weight_and_give_it_back(out, inner):
    weight = np.random.default_rng(out).standard_normal((out, inner), dtype=np.float32)
    panels = cpu_matmul.pack_panels(weight)
    assert panels.shape == (-(-out // 64), inner, 64)
    assert panels[0, 2 % inner, 0] == weight[0, 2 % inner]
    assert panels[(out - 1) // 64, inner - 1, (out - 1) % 64] == weight[out - 1, inner - 1]
    assert not panels.reshape(-1, inner, 64).transpose(0, 2, 1).reshape(-1, inner)[out:].any()
    np.testing.assert_array_equal(np.asarray(panel_linear(weight).dense_weight()), weight)


# Rows: a tile of 6, every remainder 1-5, several tiles, and prefill-sized, on both sides of
# the 12 rows below which AVX2 takes rows one at a time; outputs inside one panel, exactly one,
# a partial last panel, many panels (tasks of several panels); inner sizes odd and long;
# and no rows at all.
@needs_kernels
@pytest.mark.parametrize("rows, inner, out", [
    (1, 576, 960), (2, 577, 1027), (3, 64, 7), (4, 20, 3), (5, 1536, 130), (6, 15, 65),
    (7, 577, 64), (11, 65, 130), (12, 1, 200), (13, 300, 197), (48, 1536, 130), (49, 64, 4097),
    (100, 33, 63), (1030, 96, 321), (0, 8, 70)])
def test_panel_matmul_equals_numpy(rows, inner, out):
    rng = np.random.default_rng(rows * inner + out)
    x = rng.standard_normal((rows, inner), dtype=np.float32)
    weight = rng.standard_normal((out, inner), dtype=np.float32)
    panels = jnp.asarray(cpu_matmul.pack_panels(weight))
    ours = np.asarray(jax.jit(cpu_matmul.panel_matmul, static_argnums=2)(
        jnp.asarray(x), panels, out))
    reference = x.astype(np.float64) @ weight.T.astype(np.float64)
    # float32 rounding: each output sums along `inner` in one chain (up to ~1e-6 of the largest
    # output at inner 1536); a misplaced row or column is off by O(1).
    assert ours.shape == (rows, out)
    assert np.abs(ours - reference).max(initial=0) <= 1e-5 * np.abs(reference).max(initial=0)


def test_without_the_kernels_xla_computes_it_from_the_panels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda backend=None: False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 40), dtype=np.float32)
    weight = rng.standard_normal((70, 40), dtype=np.float32)
    bias = rng.standard_normal(70, dtype=np.float32)
    ours = np.asarray(linear(jnp.asarray(x), panel_linear(weight, bias)))
    assert ours.shape == (2, 3, 70)
    np.testing.assert_allclose(ours, x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    assert not cpu_matmul.packs_weights("float32")


@needs_kernels
def test_a_panel_linear_adds_its_bias_and_keeps_leading_dims():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 40), dtype=np.float32)
    weight = rng.standard_normal((70, 40), dtype=np.float32)
    bias = rng.standard_normal(70, dtype=np.float32)
    ours = np.asarray(jax.jit(linear)(jnp.asarray(x), panel_linear(weight, bias)))
    np.testing.assert_allclose(ours, x @ weight.T + bias, rtol=1e-5, atol=1e-5)


def test_embedding_rows_are_gathered_from_a_tied_heads_panels():
    table = np.random.default_rng(2).standard_normal((130, 24), dtype=np.float32)
    ids = jnp.asarray([[0, 63, 64], [129, 5, 64]])
    np.testing.assert_array_equal(
        np.asarray(embedding_rows(panel_linear(table), ids, jnp.float32)), table[np.asarray(ids)])
    np.testing.assert_array_equal(
        np.asarray(embedding_rows(jnp.asarray(table), ids, jnp.float32)), table[np.asarray(ids)])


@needs_kernels
def test_load_model_packs_float32_weights_only(tiny_qwen3, tiny):
    params = tiny_qwen3.model.params  # float32, tied: the embedding is the head's panels
    assert isinstance(params.embed, PanelLinear) and params.lm_head is None
    assert isinstance(params.layers[0].mlp.down, PanelLinear)
    untied = tiny.model.params
    if untied.lm_head is not None:  # an untied head is panels; the embedding stays a table
        assert isinstance(untied.lm_head, PanelLinear)
        assert isinstance(untied.embed, jax.Array)
    bf16 = folojax.load_model(tiny_qwen3.path, dtype="bfloat16", load_tokenizer=False).params
    assert isinstance(bf16.layers[0].mlp.down, Linear) and isinstance(bf16.embed, jax.Array)


@needs_kernels
def test_panels_and_dense_weights_give_the_same_logits(tiny, monkeypatch):
    token_ids = jnp.asarray([[1, 7, 300, 12, 5, 64, 63, 2]])
    packed = np.asarray(folojax.forward(tiny.model.params, tiny.model.config, token_ids))
    monkeypatch.setattr(cpu_kernels, "available", lambda backend=None: False)
    dense = folojax.load_model(tiny.path, dtype="float32", load_tokenizer=False)
    assert isinstance(dense.params.layers[0].attention.qkv, Linear)
    reference = np.asarray(folojax.forward(dense.params, dense.config, token_ids))
    np.testing.assert_allclose(packed, reference, rtol=1e-5, atol=1e-5)


def test_kernels_are_expected_before_their_build_finishes(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})  # as if no load had been asked for yet
    monkeypatch.setenv("FOLOJAX_NATIVE_KERNELS", "1")
    monkeypatch.setattr(cpu_kernels, "compiler", lambda: "/usr/bin/c++")
    assert cpu_kernels.expected("cpu") and not cpu_kernels.expected("gpu")
    assert "loaded" not in cpu_kernels._state  # nothing was built or waited for

    def no_compiler():
        raise cpu_kernels.KernelBuildError("no C++ compiler found")

    monkeypatch.setattr(cpu_kernels, "compiler", no_compiler)
    assert not cpu_kernels.expected("cpu")
    monkeypatch.setattr(cpu_kernels, "compiler", lambda: "/usr/bin/c++")
    monkeypatch.setenv("FOLOJAX_NATIVE_KERNELS", "0")
    assert not cpu_kernels.expected("cpu") and not cpu_matmul.packs_weights("float32")
