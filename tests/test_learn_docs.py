"""docs/learn cannot rot silently: every `path:symbol` reference names a file and a symbol that
exist, every excerpt is in the code it cites, line by line and in order, and every "try it"
command runs, in a fast mode on a tiny model (FAST_VALUES, tiny_model)."""

import ast
import dataclasses
import json
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEARN = ROOT / "docs" / "learn"
DOCS = sorted(LEARN.glob("*.md"))
MILESTONES = [path for path in DOCS if re.match(r"m\d-", path.name)]

# `folojax/engine/scheduler.py` or `folojax/engine/scheduler.py:Scheduler.schedule`
REFERENCE = re.compile(
    r"`((?:folojax|examples|tests|configs)/[\w/.-]+\.\w+)(?::([A-Za-z_][\w.]*))?`")
FENCE = re.compile(r"^[ \t]*```([\w+-]*)\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
# An excerpt's first line names what it is cut from: `# path:symbol` (or `// path:symbol`).
EXCERPT_SOURCE = re.compile(r"^(?:#|//) ((?:folojax|examples)/\S+?)(?::([A-Za-z_][\w.]*))?$")
ELISION = "..."


@dataclasses.dataclass(frozen=True)
class Reference:
    doc: str
    path: str
    symbol: str | None


def references(doc: Path) -> list[Reference]:
    """Every inline reference, then every excerpt's source."""
    found = [Reference(doc.name, m[1], m[2])
             for m in REFERENCE.finditer(doc.read_text(encoding="utf-8"))]
    return found + [reference for reference, _ in excerpts(doc)]


def _defined_names(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def find_symbol(path: Path, symbol: str) -> str | None:
    """The source text of `symbol` (dotted: Class.method) in a .py file, or, in another file,
    the whole file if the name occurs in it as a word; None if it is not there."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return text if re.search(rf"\b{re.escape(symbol.split('.')[-1])}\b", text) else None
    body, node = ast.parse(text).body, None
    for part in symbol.split("."):
        node = next((n for n in body if part in _defined_names(n)), None)
        if node is None:
            return None
        body = getattr(node, "body", [])
    return ast.get_source_segment(text, node, padded=True)


def excerpts(doc: Path) -> list[tuple[Reference, list[str]]]:
    found = []
    for _, body in FENCE.findall(doc.read_text(encoding="utf-8")):
        first, _, rest = body.partition("\n")
        match = EXCERPT_SOURCE.match(first.strip())
        if match:
            found.append((Reference(doc.name, match[1], match[2]), rest.splitlines()))
    return found


def test_the_docs_exist_and_the_readme_links_the_index():
    assert [path.name for path in MILESTONES] == [
        "m0-configs-requests-loading.md", "m1-offline-inference.md", "m2-continuous-batching.md",
        "m3-paged-kv.md", "m4-fast-attention.md", "m5-chunked-prefill.md",
        "m6-prefix-caching.md", "m7-gptq.md"]
    index = (LEARN / "README.md").read_text(encoding="utf-8")
    for path in MILESTONES:
        assert f"]({path.name})" in index, f"the index does not link {path.name}"
    assert "](docs/learn/README.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_milestone_has_its_four_parts_and_five_to_ten_questions():
    for path in MILESTONES:
        text = path.read_text(encoding="utf-8")
        headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
        assert headings == ["The concept", "The walkthrough", "Questions and answers",
                            "Try it"], f"{path.name}: {headings}"
        questions = re.findall(r"^\*\*Q\d+\.", text, re.MULTILINE)
        assert 5 <= len(questions) <= 10, f"{path.name} has {len(questions)} questions"
        assert "lscpu" in text.split("## Try it")[1], f"{path.name}: figures without a CPU model"


@pytest.mark.parametrize("reference", [r for doc in DOCS for r in references(doc)],
                         ids=lambda r: f"{r.doc}:{r.path}:{r.symbol}")
def test_every_reference_names_a_file_and_symbol_that_exist(reference):
    path = ROOT / reference.path
    assert path.is_file(), f"{reference.doc} cites {reference.path}, which does not exist"
    if reference.symbol:
        assert find_symbol(path, reference.symbol) is not None, (
            f"{reference.doc} cites {reference.symbol}, which {reference.path} does not define")


@pytest.mark.parametrize("reference, lines", [e for doc in DOCS for e in excerpts(doc)],
                         ids=lambda value: (f"{value.doc}:{value.path}:{value.symbol}"
                                            if isinstance(value, Reference) else ""))
def test_every_excerpt_is_in_the_code_it_cites(reference, lines):
    path = ROOT / reference.path
    source = (find_symbol(path, reference.symbol) if reference.symbol
              else path.read_text(encoding="utf-8"))
    assert source is not None, f"{reference.path}:{reference.symbol} does not exist"
    source_lines = [line.strip() for line in source.splitlines()]
    position = 0
    for line in lines:
        wanted = line.strip()
        if not wanted or wanted == ELISION:
            continue
        try:
            position = source_lines.index(wanted, position) + 1
        except ValueError:
            pytest.fail(f"{reference.doc}: {wanted!r} is not in {reference.path}:"
                        f"{reference.symbol} (after the excerpt's earlier lines)")


def test_the_reference_checker_catches_a_missing_symbol_and_a_changed_line(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("class A:\n    def f(self):\n        return 1\n\nX = 2\n")
    assert find_symbol(module, "A.f") is not None and find_symbol(module, "X") is not None
    assert find_symbol(module, "A.g") is None and find_symbol(module, "B") is None
    assert "return 1" in find_symbol(module, "A.f")


# --- "try it": every ```bash block of a milestone, run in a fast mode ---------------------------

# Each option's value in the fast mode (an option a command does not take is left alone).
FAST_VALUES = {
    "--num-requests": "3", "--max-tokens": "3", "--prompt-len": "12", "--repeats": "1",
    "--prefix-len": "40", "--min-prompt-len": "4", "--max-prompt-len": "20",
    "--context-len": "48", "--chars": "1500", "--tokens": "64", "--calibration-samples": "2",
    "--calibration-length": "16", "--num-decodes": "2", "--long-prompt-len": "80",
    "--chunk": "32", "--batch": "3", "--tight-requests": "2",
}
TINY_CONFIG_FILE = "tiny-config.json"  # stands in for every --config


def commands(doc: Path) -> list[str]:
    found = []
    for language, body in FENCE.findall(doc.read_text(encoding="utf-8")):
        if language != "bash":
            continue
        for command in body.replace("\\\n", " ").splitlines():
            command = command.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


def fast_argv(argv: list[str], tiny_model: str) -> list[str]:
    """The command's arguments with FAST_VALUES and the tiny model (where it takes a model and
    names none)."""
    argv = list(argv)
    for index, argument in enumerate(argv[:-1]):
        if argument in FAST_VALUES:
            argv[index + 1] = FAST_VALUES[argument]
        elif argument == "--config":
            argv[index + 1] = TINY_CONFIG_FILE
    if argv[0] == "quantize" and "--calibration-length" not in argv:
        argv += ["--calibration-length", "16"]  # GPTQ's calibration, cut short
    if argv[0].endswith(".py"):  # an examples/learn script
        takes_model = '"--model"' in Path(argv[0]).read_text(encoding="utf-8")
        names_model = "--model" in argv
    else:
        from folojax.cli import parse_command_line

        parsed = parse_command_line(argv)
        takes_model, names_model = hasattr(parsed, "model"), getattr(parsed, "model", None)
    if takes_model and not names_model:
        if argv[0] == "quantize":  # its source is positional
            argv.insert(1, tiny_model)
        else:
            argv += ["--model", tiny_model]
    return argv


def run_command(command: str, tiny_model: str, monkeypatch) -> None:
    from folojax.cli import main

    words = shlex.split(command)
    if words[0] == "folojax":
        assert main(fast_argv(words[1:], tiny_model)) == 0, command
    elif words[0] == "python" and words[1].startswith("examples/learn/"):
        argv = fast_argv(words[1:], tiny_model)
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(argv[0], run_name="__main__")
    else:
        pytest.fail(f"a try-it command the fast mode cannot run: {command}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer random Llama with the embedded SmolLM2's tokenizer (and chat template)."""
    import torch
    import transformers

    from folojax.tokenizer import load_gguf_tokenizer
    from folojax.weights.loader import embedded_model_path

    directory = tmp_path_factory.mktemp("tiny-smollm2")
    tokenizer = load_gguf_tokenizer(embedded_model_path())
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.real_model
@pytest.mark.parametrize("doc", MILESTONES, ids=lambda path: path.stem)
def test_every_try_it_command_runs_in_the_fast_mode(doc, tiny_model, tmp_path, monkeypatch):
    tiny_config = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 256,
                   "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                   "max_position_embeddings": 512, "tie_word_embeddings": True,
                   "eos_token_id": 1, "rope_theta": 10000.0}
    (tmp_path / TINY_CONFIG_FILE).write_text(json.dumps(tiny_config))
    for name in ("configs", "examples"):  # the commands' relative paths, from a scratch dir
        os.symlink(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    found = commands(doc)
    assert found, f"{doc.name} has no try-it command"
    for command in found:
        run_command(command, tiny_model, monkeypatch)


def test_the_fast_mode_shrinks_the_sizes_and_names_the_tiny_model_where_none_is_named(
        monkeypatch):
    monkeypatch.chdir(ROOT)  # the scripts' paths are relative, as in the docs
    assert fast_argv(["quantize", "--method", "gptq", "--bits", "4", "out"], "TINY") == [
        "quantize", "TINY", "--method", "gptq", "--bits", "4", "out",
        "--calibration-length", "16"]
    assert fast_argv(["bench", "--max-tokens", "64"], "TINY") == [
        "bench", "--max-tokens", "3", "--model", "TINY"]
    assert fast_argv(["perplexity", "--model", "ckpt", "--text", "t"], "TINY") == [
        "perplexity", "--model", "ckpt", "--text", "t"]
    assert fast_argv(["init-random", "--config", "c.json", "--out", "o"], "TINY") == [
        "init-random", "--config", TINY_CONFIG_FILE, "--out", "o"]
    assert fast_argv(["examples/learn/kv_cache_size.py", "--tokens", "32768"], "TINY") == [
        "examples/learn/kv_cache_size.py", "--tokens", "64"]
