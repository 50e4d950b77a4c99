"""`TitansTokenizer`: the project's sentencepiece model (`tokenizer.model`) under transformers' tokenizer API, lossless
both ways (`decode(encode(text)) == text`: byte fallback and whitespace restored by sentencepiece itself)."""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class TitansTokenizer(SentencePieceBackend):
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)
