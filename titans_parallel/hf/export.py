"""Write a self-contained transformers export of a TitansLM state dict: `config.json` (TitansConfig with auto_map),
`generation_config.json`, `model.safetensors` (keys `model.<TitansLM key>`, fp32, a tied alias stored once),
optionally `tokenizer.model` + `tokenizer_config.json` (TitansTokenizer; special tokens in `save_hf_tokenizer`,
the reasons in docs/export.md), and the remote code:
`modeling_titans.py`, `configuration_titans.py`, `tokenization_titans.py` and every titans_parallel module they
import at module level, copied from this package at export time as flat modules (transformers' remote-code loader
only follows `from .x import` between files of one folder), so the export loads without titans_parallel installed
and keeps working whatever this repository later becomes. A function-level import is a path single-rank
inference never takes (the megatron-backed TP layers, process-group set-up): its module is not shipped, and the
import becomes a `raise ImportError` (transformers requires every `from .x import` in a file to name a file).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import TitansLM
from ..parallel.metadata import tied_parameters
from ..typed_config import to_mapping

PACKAGE = "titans_parallel"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
ENTRY_MODULES = (
    "titans_parallel.hf.configuration_titans",
    "titans_parallel.hf.modeling_titans",
    "titans_parallel.hf.tokenization_titans",
)
AUTO_MAP = {
    "AutoConfig": "configuration_titans.TitansConfig",
    "AutoModelForCausalLM": "modeling_titans.TitansForCausalLM",
}
TOKENIZER_CLASS = "tokenization_titans.TitansTokenizer"
_FROM = re.compile(r"from\s+([.\w]+)\s+import")


def save_hf_export(
    state_dict: dict[str, torch.Tensor],
    model_config: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer: Path | None = None,
    seq_len: int | None = None,
) -> None:
    """Write the export of a full TitansLM state dict into the existing folder `out_dir`, with the sentencepiece
    model `tokenizer` (see `save_hf_tokenizer`; `seq_len`, the training length, as its model_max_length) when
    given."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from .configuration_titans import TitansConfig

    out_dir = Path(out_dir)
    bundle_source(out_dir)
    special = save_hf_tokenizer(tokenizer, out_dir, seq_len) if tokenizer is not None else {}
    config = TitansConfig(titans=to_mapping(model_config), architectures=["TitansForCausalLM"], **special)
    config.auto_map = AUTO_MAP
    config.save_pretrained(out_dir)
    GenerationConfig(**special).save_pretrained(out_dir)
    with torch.device("meta"):
        tied = tied_parameters(TitansLM(model_config))
    weights = {f"model.{k}": v.contiguous() for k, v in state_dict.items() if k not in tied}
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})


def save_hf_tokenizer(tokenizer: Path, out_dir: Path, seq_len: int | None = None) -> dict[str, int]:
    """Copy the sentencepiece model as `tokenizer.model` with a `tokenizer_config.json` for `TitansTokenizer`
    (encodes exactly as sentencepiece does, nothing added, special-token text not parsed; model_max_length =
    seq_len when given). Pretraining starts every document after an EOS and never sees sentencepiece's BOS, so EOS
    is declared as bos, eos and pad token alike (what lm-eval prefixes, what `generate` starts from and pads
    with). Returns those ids for the model and generation configs."""
    import sentencepiece as spm

    shutil.copyfile(tokenizer, out_dir / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    if sp.eos_id() < 0:
        raise ValueError(f"tokenizer {tokenizer} has no EOS piece; pretraining separates documents with it")
    eos = sp.id_to_piece(sp.eos_id())
    config = {"bos_token": eos, "eos_token": eos, "pad_token": eos, "add_bos_token": False, "add_eos_token": False}
    if sp.unk_id() >= 0:
        config["unk_token"] = sp.id_to_piece(sp.unk_id())
    if seq_len is not None:
        config["model_max_length"] = seq_len
    config.update(tokenizer_class="TitansTokenizer", auto_map={"AutoTokenizer": [TOKENIZER_CLASS, None]},
                  split_special_tokens=True, clean_up_tokenization_spaces=False)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return {f"{name}_token_id": sp.eos_id() for name in ("bos", "eos", "pad")}


def bundle_source(out_dir: str | Path) -> list[str]:
    """Copy the remote-code modules (ENTRY_MODULES and every titans_parallel module they import at module level)
    into `out_dir` as flat modules `<last name>.py`, their package imports rewritten to `from .<last name> import`
    (an import of a module not shipped: to `raise ImportError`). Returns the module names written."""
    sources = _closure(ENTRY_MODULES)
    flat = {module: _flat_name(module) for module in sources}
    clashes = sorted(name for name in set(flat.values()) if list(flat.values()).count(name) > 1)
    if clashes:
        raise RuntimeError(f"modules {clashes} would share a file name in the flat export; rename one")
    for module, path in sources.items():
        (Path(out_dir) / f"{flat[module]}.py").write_text(_rewrite(path.read_text(), module, path, set(sources)))
    return sorted(flat.values())


def _flat_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _module_path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    package = PACKAGE_DIR / rel / "__init__.py"
    return package if package.is_file() else (PACKAGE_DIR / rel).with_suffix(".py")


def _module_level(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes under `node` outside function bodies: what runs when the module is imported."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from _module_level(child)


def _package_imports(path: Path, module: str, module_level: bool = False) -> list[tuple[ast.ImportFrom, str]]:
    """(node, absolute module) for each `from ... import` of a titans_parallel module in the file at `path`
    (outside function bodies only, if `module_level`)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    found = []
    for node in _module_level(tree) if module_level else ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise RuntimeError(f"{path}:{node.lineno}: `import {PACKAGE}...` cannot be flattened; use from-imports")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        if target.split(".")[0] != PACKAGE:
            continue
        if node.module is None:
            raise RuntimeError(f"{path}:{node.lineno}: `from . import x` cannot be flattened; import from the module")
        found.append((node, target))
    return found


def _closure(entries: tuple[str, ...]) -> dict[str, Path]:
    sources: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module not in sources:
            sources[module] = _module_path(module)
            todo += [target for _, target in _package_imports(sources[module], module, module_level=True)]
    return sources


def _rewrite(text: str, module: str, path: Path, shipped: set[str]) -> str:
    lines = text.splitlines(keepends=True)
    imports = sorted(_package_imports(path, module), key=lambda i: (i[0].lineno, i[0].col_offset), reverse=True)
    for node, target in imports:
        line = lines[node.lineno - 1]
        head, tail = line[: node.col_offset], line[node.col_offset :]
        if target in shipped:
            lines[node.lineno - 1] = head + _FROM.sub(f"from .{_flat_name(target)} import", tail, count=1)
        else:
            message = f"{target} is not part of the single-rank export"
            lines[node.lineno - 1 : node.end_lineno] = [f"{head}raise ImportError({message!r})\n"]
    return "".join(lines)
