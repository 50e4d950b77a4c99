"""Sample a continuation of a prompt from a checkpoint, printed token by token as it is generated.

    python -m pretrain.generate --checkpoint runs/tiny_cpu/checkpoints --prompt "Alice was beginning" \
        [--max-new-tokens 200] [--temperature 1.0] [--top-k K] [--top-p P] [--seed S] [--device cpu]

--checkpoint is a DeepSpeed checkpoint (folder or tag, any ZeRO stage / TP degree) or a safetensors export
(`pretrain.convert --format safetensors`). The tokenizer is the export's `tokenizer.model`, else the one of the
checkpoint's training dataset (the embedded default dataset when `data.path` is null), or --tokenizer. The prompt
is read as the start of a document (after an EOS, as in pretraining); generation stops at --max-new-tokens or at
the EOS that ends the document. Temperature 0 is greedy; --top-k and --top-p restrict the sampling (nucleus
sampling, `titans_parallel.model.next_token_probs`). Bad settings are one line naming them, exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

import sentencepiece as spm
import torch

from pretrain.denormals import flush_denormals
from titans_parallel.model import check_sampling

REPLACEMENT = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 byte sequence to
MAX_CHAR_TOKENS = 4  # a UTF-8 character is at most 4 byte-fallback tokens


class TextStream:
    """Incremental detokenization. `push(token)` returns the text that token completes: "" while the bytes of a
    multi-byte character are incomplete (at most MAX_CHAR_TOKENS tokens are held back). Each piece is decoded after
    the tokens of the previous piece (the prompt at first), so sentencepiece keeps a word's leading space."""

    def __init__(self, sp: spm.SentencePieceProcessor, context: list[int]):
        self.sp, self.anchor, self.pending = sp, context, []

    def push(self, token: int) -> str:
        self.pending.append(token)
        head, text = self.sp.decode(self.anchor), self.sp.decode(self.anchor + self.pending)
        if text.endswith(REPLACEMENT) and len(self.pending) < MAX_CHAR_TOKENS:
            return ""
        self.anchor, self.pending = self.pending, []
        return text[len(head):]

    def flush(self) -> str:
        """The text of tokens still held back (an incomplete character at the end)."""
        head, text = self.sp.decode(self.anchor), self.sp.decode(self.anchor + self.pending)
        self.anchor, self.pending = self.pending or self.anchor, []
        return text[len(head):]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder / tag, or a safetensors export")
    parser.add_argument("--prompt", required=True, help="text to continue (not empty)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample within the nucleus of mass p, (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="default: a different draw every run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the checkpoint's)")
    return parser.parse_args(argv)


def load(checkpoint: str | Path, tokenizer: str | Path | None) -> tuple[torch.nn.Module, spm.SentencePieceProcessor]:
    """(TitansLM on the CPU in eval mode, its sentencepiece tokenizer) of a checkpoint or safetensors export."""
    from pretrain.checkpoint import read_job, resolve_checkpoint
    from pretrain.convert import TOKENIZER, tokenizer_path
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.eval.memory_contribution import load_model_and_seq_len

    path = Path(checkpoint)
    model, _ = load_model_and_seq_len(path)
    if tokenizer is None:
        if (path / TOKENIZER).is_file():
            tokenizer = path / TOKENIZER
        elif (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} has no {TOKENIZER}; pass --tokenizer PATH")
        else:
            job = read_job(resolve_checkpoint(path))["config"]
            tokenizer = tokenizer_path(job, None, model.config.vocab_size, required=True)
    sp = load_tokenizer(tokenizer)
    if sp.vocab_size() != model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {sp.vocab_size()} pieces, the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return model, sp


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.prompt:
        raise ValueError("--prompt is empty: give text to continue")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    flush_denormals()
    model, sp = load(args.checkpoint, args.tokenizer)
    device = torch.device(args.device)
    model.to(device)
    generator = torch.Generator(device=device)
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    prompt = [sp.eos_id()] + sp.encode(args.prompt)
    text = TextStream(sp, prompt)
    print(args.prompt, end="", flush=True)
    ids = torch.tensor([prompt], device=device)
    for token in model.stream(ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator):
        if token.item() == sp.eos_id():
            break
        print(text.push(token.item()), end="", flush=True)
    print(text.flush(), flush=True)


def cli(argv: list[str] | None = None) -> NoReturn:
    """`main` with its errors as one line `generate: error: ...` and exit status 2 (argparse's own errors alike)."""
    from pretrain.checkpoint import CheckpointError
    from titans_parallel.typed_config import ConfigError, run_cli

    run_cli(lambda: main(argv), errors=(CheckpointError, ConfigError, FileNotFoundError, ValueError), prog="generate")


if __name__ == "__main__":
    cli()
