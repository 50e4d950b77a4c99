"""`TitansTokenizer`: the project's sentencepiece model (`tokenizer.model`) under transformers' tokenizer API, lossless
both ways (`decode(encode(text)) == text`: byte fallback and whitespace restored by sentencepiece itself)."""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class TitansTokenizer(SentencePieceBackend):
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """sentencepiece's decoding, with the special tokens it would drop (EOS, unk) written as their text, as
        `decode(ids, skip_special_tokens=False)` promises (lm-eval stops generation at the EOS text)."""
        special, parts, run = set(self.all_special_tokens), [], []
        for token in tokens:
            if token in special:
                parts += [self.sp_model.decode_pieces(run), token]
                run = []
            else:
                run.append(token)
        return "".join(parts + [self.sp_model.decode_pieces(run)])
