"""What loading a model produces: its ModelConfig, and the params pytree's linears by type and
bytes.

    python examples/learn/inspect_model.py [--model PATH] [--quantization auto|none|int8]

Loads the model as folojax.load_model does (the embedded SmolLM2 by default), then prints the
config's fields, the load time, and for each weight type (Linear, PanelLinear, QuantLinear,
Int8Linear, plain arrays) how many tensors and bytes the pytree holds, with the bytes per weight
of the linears. docs/learn/m0-configs-requests-loading.md walks through the loader.
"""

import argparse
import collections
import dataclasses
import time

import jax

import folojax
from folojax.model.weights import Int8Linear, Linear, PanelLinear, QuantLinear

LINEAR_TYPES = (Linear, PanelLinear, QuantLinear, Int8Linear)


def tally(params) -> dict[str, list[int]]:
    """weight type -> [tensors, bytes, weights] over the pytree (norms and other arrays under
    'array')."""
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])

    def visit(node):
        if isinstance(node, LINEAR_TYPES):
            leaves = jax.tree_util.tree_leaves(node)
            entry = totals[type(node).__name__]
            entry[0] += 1
            entry[1] += sum(leaf.nbytes for leaf in leaves)
            entry[2] += jax.eval_shape(node.dense_weight).size  # [out, in], not computed
        elif dataclasses.is_dataclass(node):
            for field in dataclasses.fields(node):
                visit(getattr(node, field.name))
        elif isinstance(node, (list, tuple)):
            for item in node:
                visit(item)
        elif node is not None:
            entry = totals["array"]
            entry[0] += 1
            entry[1] += node.nbytes
            entry[2] += node.size

    visit(params)
    return dict(totals)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="none: the embedded SmolLM2")
    parser.add_argument("--quantization", default="auto", help="auto, none or int8")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = folojax.load_model(args.model, quantization=args.quantization, load_tokenizer=False)
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - start
    dtype = jax.numpy.dtype(model.dtype).name
    print(f"loaded {args.model or 'the embedded SmolLM2-135M-Instruct'} "
          f"(quantization={args.quantization}, dtype={dtype}) in {seconds:.2f} s")
    for field in dataclasses.fields(model.config):
        print(f"  {field.name} = {getattr(model.config, field.name)!r}")
    for name, (tensors, nbytes, weights) in sorted(tally(model.params).items()):
        print(f"{name:>12}: {tensors:4d} tensors, {nbytes / 2**20:8.1f} MiB, "
              f"{weights / 1e6:7.1f} M weights, {nbytes / weights:.3f} bytes per weight")


if __name__ == "__main__":
    main()
