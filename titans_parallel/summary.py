"""Print parameter counts of model configs (built on the meta device: no memory, no time).

    python -m titans_parallel.summary configs/model/*.yaml [key=value ...]

A file named like `340m.yaml` is checked against its name: the count must lie within 10% of it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .config import ModelConfig
from .model import TitansLM
from .typed_config import run_cli

PROG = "python -m titans_parallel.summary"


def count_parameters(config: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters outside the token embedding) of TitansLM(config)."""
    with torch.device("meta"):
        model = TitansLM(config)
    return model.num_parameters(), model.num_parameters(exclude_embeddings=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[-1].strip(),
    )
    p.add_argument("items", nargs="+", metavar="CONFIG|key=value", help="model YAML files and overrides for all")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    paths = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if not paths:
        p.error("give at least one model config file")
    failed = False
    for path in paths:
        config = ModelConfig.from_yaml(path, overrides)
        total, body = count_parameters(config)
        line = (f"{path}: {config.variant} dim={config.dim} layers={config.n_layers} heads={config.n_heads} "
                f"params={total / 1e6:.1f}M (non-embedding {body / 1e6:.1f}M)")
        named = re.fullmatch(r"(\d+)m", Path(path).stem)
        if named and not overrides:
            ratio = total / (int(named.group(1)) * 1e6)
            ok = abs(ratio - 1) <= 0.10
            failed |= not ok
            line += f"  [{ratio:.2f}x of the name: {'ok' if ok else 'OFF BY MORE THAN 10%'}]"
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
