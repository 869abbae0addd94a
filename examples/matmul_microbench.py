"""Decode's and prefill's matmuls on CPU: XLA's dot over Hugging Face's [out, in] weights against
the C++ kernels over the same weights repacked into panels: float32
(folojax/ops/csrc/panel_matmul.cc) and quantized: int8 per output channel against int8
activations (folojax/ops/csrc/int8_matmul.cc, `quantization="int8"`), and 4 bits with an offset
per block of 32, GGUF's Q4_1 (folojax/ops/csrc/quant_matmul.cc), for 1 to 1,024 rows,
over SmolLM2-135M's weight shapes (30 layers of fused q/k/v, o, fused gate/up and down, then the
49,152-row head): the rate each streams its weights at.

    python examples/matmul_microbench.py [--chained] [ROWS ...]

With --chained each matmul's input is cut from the previous one's output, as in a decode step,
so XLA cannot run independent matmuls at once and each call's fixed cost counts.
"""

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from folojax.ops import cpu_kernels, cpu_matmul, int8_matmul, quant_matmul
from folojax.weights.params import int8_linear
from folojax.weights.quantized import QuantizedTensor

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def independent(matmul, weights, a, b):
    return [matmul(a if inner == 576 else b, w, out)
            for w, (out, inner) in zip(weights, SHAPES, strict=True)]


def chained(matmul, weights, a, b):
    del b
    for w, (out, inner) in zip(weights, SHAPES, strict=True):
        # scaled by 1 / sqrt(inner) so that 121 products of random weights stay finite
        a = matmul(jnp.tile(a, (1, -(-inner // a.shape[1])))[:, :inner] * inner ** -0.5, w, out)
    return a


def best_seconds(matmul, weights, rows: int, repeats: int = 5, chain: bool = False) -> float:
    inputs = {576: jnp.ones((rows, 576)), 1536: jnp.ones((rows, 1536))}
    step = jax.jit(functools.partial(chained if chain else independent, matmul))
    jax.block_until_ready(step(weights, inputs[576], inputs[1536]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(weights, inputs[576], inputs[1536]))
        times.append(time.perf_counter() - start)
    return min(times)


def four_bits_with_offsets(weight: np.ndarray, block: int = 32) -> QuantizedTensor:
    """Round-to-nearest 4 bits per block of 32 inputs with a scale and a minimum (Q4_1's form)."""
    out, inner = weight.shape
    blocks = weight.reshape(out, inner // block, block)
    low, high = blocks.min(-1), blocks.max(-1)
    scales = ((high - low) / 15).astype(np.float16)
    offsets = low.astype(np.float16)
    steps = np.where(scales == 0, 1, scales).astype(np.float32)[..., None]
    codes = np.clip(np.rint((blocks - offsets.astype(np.float32)[..., None]) / steps), 0, 15)
    return QuantizedTensor(codes.astype(np.int8).reshape(out, inner), scales, offsets, 4)


def packed(weight: QuantizedTensor) -> tuple:
    return tuple(map(jnp.asarray, quant_matmul.pack_quantized(
        weight.codes, weight.scales, weight.offsets, weight.bits)))


def main() -> None:
    if not cpu_kernels.load():
        raise SystemExit("the C++ kernels did not build here")
    rng = np.random.default_rng(0)
    dense = [rng.standard_normal(shape, dtype=np.float32) for shape in SHAPES]
    weights = [jnp.asarray(w) for w in dense]
    panels = [jnp.asarray(cpu_matmul.pack_panels(w)) for w in dense]
    int8 = [int8_linear(w) for w in dense]
    formats = {"int8": ([(w.codes, w.scales) for w in int8], int8_matmul.int8_matmul),
               "4-bit": ([packed(four_bits_with_offsets(w)) for w in dense],
                         quant_matmul.quant_matmul)}
    total = sum(w.nbytes for w in dense)

    arguments = sys.argv[1:]
    chain = "--chained" in arguments
    rows_asked = [int(r) for r in arguments if r != "--chained"]
    for rows in rows_asked or (1, 2, 4, 8, 16, 32, 48, 64, 256, 1024):
        xla = best_seconds(lambda x, w, out: x @ w.T, weights, rows, chain=chain)
        kernel = best_seconds(cpu_matmul.panel_matmul, panels, rows, chain=chain)
        flops = 2 * rows * total / 4
        line = (f"rows={rows:>4}: XLA {total / xla / 1e9:5.1f} GB/s {flops / xla / 1e9:4.0f} GF/s "
                f"({xla * 1e3:6.1f} ms), kernel {total / kernel / 1e9:5.1f} GB/s "
                f"{flops / kernel / 1e9:4.0f} GF/s ({kernel * 1e3:6.1f} ms)")
        for name, (quantized_weights, matmul) in formats.items():
            seconds = best_seconds(lambda x, weight, out, matmul=matmul: matmul(x, *weight, out),
                                   quantized_weights, rows, chain=chain)
            size = sum(a.nbytes for weight in quantized_weights for a in weight)
            line += (f", {name} {size / seconds / 1e9:5.1f} GB/s ({seconds * 1e3:6.1f} ms, "
                     f"x{kernel / seconds:.2f} float32's)")
        print(line, flush=True)


if __name__ == "__main__":
    main()
