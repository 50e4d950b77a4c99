"""Recall tasks, generated locally (no downloads): MQAR and passkey on synthetic vocabularies, RULER-style S-NIAH
in text (`TEXT_NEEDLES`: passkey in repeated noise, a number or a UUID in real text), plus their scorer.

One definition of each task, shared by the recall benchmark (`bench/recall.py`, trained from scratch on the synthetic
vocabulary), the evaluation (`pretrain.evaluate`, `text_needle_batch` with the dataset's tokenizer) and the
training job's `train.eval_tasks`. Every generator takes a seeded
`torch.Generator` (no global RNG) and returns a `TaskBatch`:

- `inputs`  [B, T] int64: what the model reads;
- `targets` [B, T] int64: the next token at every position (`inputs` shifted by one, with the sequence's last token);
- `mask`    [B, T] bool: the positions whose next-token prediction is scored (the answer is `targets[mask]`).

So a model's logits [B, T, V] are scored with `score(logits, batch.targets, batch.mask)`, and the training loss of
the recall benchmark is the cross-entropy at `mask` only.

Reach of sliding-window attention (`titans_parallel.attention`: a query at p sees keys j with p - j < W): one
layer sees W tokens back, L stacked layers relay information up to L * (W - 1) tokens back. A fact is out of an
SWA-only model's reach when it lies more than L * (W - 1) tokens before the position that needs it; the helpers
`mqar_min_gap` and `passkey_depth_range` give the settings that guarantee it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class TaskBatch:
    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64, next tokens
    mask: torch.Tensor  # [B, T] bool, scored positions

    def to(self, device) -> "TaskBatch":
        return TaskBatch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))


def _split(sequence: torch.Tensor, scored_inputs: torch.Tensor) -> TaskBatch:
    """A full sequence [B, T + 1] and a bool [B, T + 1] of the positions (of the sequence) whose next token is
    scored -> TaskBatch of length T."""
    return TaskBatch(sequence[:, :-1].contiguous(), sequence[:, 1:].contiguous(), scored_inputs[:, :-1].contiguous())


# --------------------------------------------------------------------------------------------------------------- MQAR


@dataclass(frozen=True)
class MQARVocab:
    """Token layout of MQAR (Zoology, Arora et al. 2023), in disjoint ranges:

    - 0: BOS, the first token of every sequence;
    - 1: BLANK, the placeholder after a query key when the answers are hidden (`show_answers=False`);
    - [2, 2 + n_keys): keys;
    - [2 + n_keys, 2 + n_keys + n_values): values;
    - [2 + n_keys + n_values, ... + n_filler): filler.

    `size` is the vocabulary a model needs (`ModelConfig.vocab_size >= size`).
    """

    n_keys: int = 32
    n_values: int = 32
    n_filler: int = 16

    BOS = 0
    BLANK = 1

    @property
    def key_start(self) -> int:
        return 2

    @property
    def value_start(self) -> int:
        return 2 + self.n_keys

    @property
    def filler_start(self) -> int:
        return 2 + self.n_keys + self.n_values

    @property
    def size(self) -> int:
        return 2 + self.n_keys + self.n_values + self.n_filler


def mqar_vocab_size(n_keys: int = 32, n_values: int = 32, n_filler: int = 16) -> int:
    """Vocabulary size a model needs for `mqar_batch` with these ranges."""
    return MQARVocab(n_keys, n_values, n_filler).size


def mqar_length(n_pairs: int, gap: int, n_queries: int | None = None) -> int:
    """T of an MQAR batch: BOS, n_pairs (key, value), gap filler tokens, n_queries (default n_pairs) (query key,
    answer), minus the last token (it is only a target)."""
    n_queries = n_pairs if n_queries is None else n_queries
    return 1 + 2 * n_pairs + gap + 2 * n_queries - 1


def mqar_min_gap(window: int, n_layers: int = 1) -> int:
    """Smallest gap that puts every pair out of reach of n_layers of sliding-window attention of size window for
    every query: the first query key sits gap + 1 tokens after the last pair's value, and L layers reach
    L * (window - 1) tokens back."""
    return n_layers * (window - 1)


def mqar_batch(
    batch_size: int,
    n_pairs: int,
    gap: int,
    generator: torch.Generator,
    vocab: MQARVocab = MQARVocab(),
    show_answers: bool = False,
    n_queries: int | None = None,
) -> TaskBatch:
    """Multi-query associative recall with the pairs far from the queries.

    Each sequence (length T + 1 = 2 * n_pairs + gap + 2 * n_queries + 1; the model reads the first T tokens):

        BOS  k_1 v_1 ... k_n v_n  f_1 ... f_gap  k_p(1) a_1 ... k_p(m) a_m

    keys distinct within a sequence (drawn without replacement from the key range), values drawn with replacement
    from the value range, filler random from the filler range, queries the same keys in a random order p (m =
    n_queries, default n_pairs: each key once; a larger m continues with further independent permutations, so
    every key is asked at least once and the sequence carries more scored positions). Scored:
    the query-key positions, whose target is the value v_p(j). With show_answers the input after each query key is
    its value (a_j = v_p(j), teacher forcing: targets are the inputs shifted by one everywhere); without (the
    default, as in Zoology, where the answers are labels only) it is BLANK and the scored targets are the values.
    Shown answers let a model score 1/(n - j) on query j by excluding the values already answered, a local optimum
    (held-out 0.37 with 8 pairs, loss ln(8!)/8 = 1.33) in which small transformers stayed for thousands of steps;
    with shown answers and n_queries > n_pairs a repeated key's earlier answer may also lie within the window.
    Pair i's key is at input position 1 + 2i and its value at 2 + 2i; query j's key at 1 + 2n + gap + 2j. The
    first query is gap + 1 tokens after the last pair's value, so for gap >= window no pair is visible to any query
    within one window (see `mqar_min_gap` for stacked layers). Chance is 1 / n_values per query.
    """
    if n_pairs < 1 or n_pairs > vocab.n_keys:
        raise ValueError(f"n_pairs must be in [1, n_keys={vocab.n_keys}], got {n_pairs}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    if gap > 0 and vocab.n_filler < 1:
        raise ValueError("gap > 0 needs n_filler >= 1")
    B, n = batch_size, n_pairs
    keys = torch.rand(B, vocab.n_keys, generator=generator).argsort(dim=1)[:, :n] + vocab.key_start
    values = torch.randint(0, vocab.n_values, (B, n), generator=generator) + vocab.value_start
    filler = torch.randint(0, max(vocab.n_filler, 1), (B, gap), generator=generator) + vocab.filler_start
    m = n if n_queries is None else n_queries
    if m < 1:
        raise ValueError(f"n_queries must be >= 1, got {m}")
    order = torch.cat([torch.rand(B, n, generator=generator).argsort(dim=1) for _ in range(-(-m // n))], 1)[:, :m]
    q_keys, q_values = keys.gather(1, order), values.gather(1, order)

    bos = torch.full((B, 1), vocab.BOS, dtype=torch.long)
    pairs = torch.stack([keys, values], dim=2).reshape(B, 2 * n)
    queries = torch.stack([q_keys, q_values], dim=2).reshape(B, 2 * m)
    sequence = torch.cat([bos, pairs, filler, queries], dim=1)

    scored = torch.zeros_like(sequence, dtype=torch.bool)
    first_query = 1 + 2 * n + gap
    scored[:, first_query::2] = True
    batch = _split(sequence, scored)
    if not show_answers:  # the answers stay targets; the inputs after the query keys become BLANK
        batch.inputs[:, first_query + 1 :: 2] = vocab.BLANK
    return batch


# ------------------------------------------------------------------------------------------------------------ passkey


@dataclass(frozen=True)
class PasskeyVocab:
    """Token layout of the synthetic passkey task:

    - 0: BOS; 1: needle marker ("the pass key is"); 2: question marker ("what is the pass key?");
    - [3, 13): the digits 0-9;
    - [13, 13 + n_filler): filler tokens; the haystack repeats the fixed phrase `filler_phrase` (offsets into the
      filler range).

    `size` is the vocabulary a model needs.
    """

    n_filler: int = 8
    filler_phrase: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)

    BOS = 0
    MARKER = 1
    QUESTION = 2
    DIGIT_START = 3
    FILLER_START = 13

    def __post_init__(self):
        if not self.filler_phrase or min(self.filler_phrase) < 0 or max(self.filler_phrase) >= self.n_filler:
            raise ValueError(f"filler_phrase entries must lie in [0, n_filler={self.n_filler})")

    @property
    def digit_ids(self) -> torch.Tensor:
        return torch.arange(self.DIGIT_START, self.DIGIT_START + 10)

    @property
    def phrase_ids(self) -> torch.Tensor:
        return torch.tensor(self.filler_phrase, dtype=torch.long) + self.FILLER_START

    @property
    def size(self) -> int:
        return self.FILLER_START + self.n_filler


def passkey_vocab_size(vocab: PasskeyVocab = PasskeyVocab()) -> int:
    """Vocabulary size a model needs for `passkey_batch`."""
    return vocab.size


def passkey_haystack_slots(length: int, n_digits: int, n_marker: int = 1, n_question: int = 1) -> int:
    """Number of haystack (filler) tokens in a passkey sequence whose model input has `length` tokens: the full
    sequence (length + 1 tokens) is BOS, haystack with the needle (marker + digits) inside, question + digits."""
    slots = length + 1 - 1 - (n_marker + n_digits) - (n_question + n_digits)
    if slots < 0:
        raise ValueError(f"length {length} is too short for a {n_digits}-digit passkey")
    return slots


def passkey_depth_range(
    length: int, n_digits: int, window: int, n_layers: int = 1, n_marker: int = 1, n_question: int = 1
) -> tuple[float, float]:
    """(0, max_depth): the needle depths at which every digit of the needle is out of reach of n_layers of
    sliding-window attention of size window from every answer position (more than n_layers * (window - 1) tokens
    back). Raises if no depth qualifies."""
    slots = passkey_haystack_slots(length, n_digits, n_marker, n_question)
    # needle at haystack offset s: its last digit is at sequence position 1 + s + n_marker + n_digits - 1; the first
    # answer position (the last question token) at 1 + slots + n_marker + n_digits + n_question - 1.
    reach = n_layers * (window - 1)
    max_offset = slots + n_question - 1 - reach  # distance first answer - last digit = slots + n_question - offset
    if max_offset < 0:
        raise ValueError(f"no needle depth is out of reach of {n_layers} x window {window} at length {length}")
    return 0.0, min(1.0, max_offset / slots) if slots else 0.0


def _needle_offsets(batch_size: int, slots: int, depth, generator: torch.Generator) -> torch.Tensor:
    """Haystack offsets [B] of the needle for depth: a float in [0, 1], a (lo, hi) range sampled uniformly, or a
    tensor [B] of depths. Offset = round(depth * slots): depth 0 = right after BOS, 1 = right before the question."""
    if isinstance(depth, tuple):
        lo, hi = depth
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"depth range must satisfy 0 <= lo <= hi <= 1, got {depth}")
        d = lo + (hi - lo) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
    else:
        d = torch.as_tensor(depth, dtype=torch.float64).expand(batch_size)
        if (d < 0).any() or (d > 1).any():
            raise ValueError(f"depth must lie in [0, 1], got {depth}")
    return torch.round(d * slots).long()


def insert_needle(
    haystack: torch.Tensor,
    value_tokens: torch.Tensor,
    offsets: torch.Tensor,
    marker_ids: torch.Tensor,
    question_ids: torch.Tensor,
    bos_id: int | None,
) -> TaskBatch:
    """A needle in a given haystack [B, S] (any token ids): each row b becomes

        [bos]  haystack[:o]  marker  v_1 ... v_k  haystack[o:]  question  v_1 ... v_k

    with o = offsets[b] (in [0, S]) and value_tokens [B, k]. marker and question are 1-D id tensors (one or more
    tokens each). Scored: the last question token and the first k - 1 answer tokens (the positions whose next token
    is an answer token), so greedy decoding after the question reproduces the value iff every scored position is
    right. The marker's first token sits at input position head + o (head = 1 with a BOS, else 0)."""
    B, S = haystack.shape
    marker_ids, question_ids = marker_ids.long().reshape(-1), question_ids.long().reshape(-1)
    k = value_tokens.shape[1]
    if k < 1:
        raise ValueError("the needle's value must hold at least one token")
    needle = torch.cat([marker_ids.expand(B, -1), value_tokens.long()], dim=1)
    answer = torch.cat([question_ids.expand(B, -1), value_tokens.long()], dim=1)
    head = 0 if bos_id is None else 1
    n_needle = needle.shape[1]
    total = head + S + n_needle + answer.shape[1]

    # Scatter: haystack token i goes to head + i (+ n_needle if i >= offset), the needle to head + offset.
    sequence = torch.empty(B, total, dtype=torch.long)
    if bos_id is not None:
        sequence[:, 0] = bos_id
    hay_pos = head + torch.arange(S)[None, :] + n_needle * (torch.arange(S)[None, :] >= offsets[:, None])
    sequence.scatter_(1, hay_pos, haystack.long())
    needle_pos = head + offsets[:, None] + torch.arange(n_needle)[None, :]
    sequence.scatter_(1, needle_pos, needle)
    sequence[:, head + S + n_needle :] = answer

    scored = torch.zeros_like(sequence, dtype=torch.bool)
    scored[:, total - k - 1 : total - 1] = True  # the last question token predicts v_1
    return _split(sequence, scored)


def insert_passkey(
    haystack: torch.Tensor,
    n_digits: int,
    depth,
    generator: torch.Generator,
    digit_ids: torch.Tensor,
    marker_ids: torch.Tensor,
    question_ids: torch.Tensor,
    bos_id: int | None,
) -> tuple[TaskBatch, torch.Tensor, torch.Tensor]:
    """`insert_needle` with k = n_digits random digits (tokens digit_ids[0..9]) at o = round(depth * S) per row.
    Returns (batch, digits [B, k] as 0-9, needle start positions [B] in the inputs: the marker's first token)."""
    digit_ids = digit_ids.long().reshape(-1)
    if digit_ids.numel() != 10:
        raise ValueError(f"digit_ids must hold 10 token ids, got {digit_ids.numel()}")
    if n_digits < 1:
        raise ValueError(f"n_digits must be >= 1, got {n_digits}")
    offsets = _needle_offsets(haystack.shape[0], haystack.shape[1], depth, generator)
    digits = torch.randint(0, 10, (haystack.shape[0], n_digits), generator=generator)
    batch = insert_needle(haystack, digit_ids[digits], offsets, marker_ids, question_ids, bos_id)
    return batch, digits, (bos_id is not None) + offsets


def passkey_batch(
    batch_size: int,
    length: int,
    n_digits: int,
    generator: torch.Generator,
    depth=(0.0, 1.0),
    vocab: PasskeyVocab = PasskeyVocab(),
) -> TaskBatch:
    """Synthetic passkey: a k-digit number hidden in a repeated filler phrase, asked for at the end.

    Inputs of `length` tokens: BOS, the phrase repeated (starting at a random phase per row) with MARKER d_1..d_k
    inserted at `depth` (a float in [0, 1], a (lo, hi) range sampled per row, or a tensor [B]), then QUESTION
    d_1..d_k (the last digit is only a target). Scored: the QUESTION position and the first k - 1 answer digits;
    chance is 1/10 per digit. Token layout in `PasskeyVocab`; `passkey_depth_range` gives the depths that put the
    needle out of a sliding window's reach."""
    slots = passkey_haystack_slots(length, n_digits)
    phrase = vocab.phrase_ids
    phase = torch.randint(0, phrase.numel(), (batch_size, 1), generator=generator)
    haystack = phrase[(phase + torch.arange(slots)[None, :]) % phrase.numel()]
    batch, _, _ = insert_passkey(
        haystack, n_digits, depth, generator, vocab.digit_ids,
        torch.tensor([vocab.MARKER]), torch.tensor([vocab.QUESTION]), vocab.BOS,
    )
    return batch


def passkey_in_text(
    filler_tokens: torch.Tensor,
    batch_size: int,
    length: int,
    n_digits: int,
    generator: torch.Generator,
    digit_ids: torch.Tensor,
    marker_ids: torch.Tensor,
    question_ids: torch.Tensor,
    depth=(0.0, 1.0),
    bos_id: int | None = None,
) -> TaskBatch:
    """Passkey hidden in real text: the haystack of each row is a contiguous slice (random start) of filler_tokens
    (1-D token ids of a corpus, e.g. a prepared dataset's val split, at least as long as the haystack), tokenizer
    ids supplied by the caller: digit_ids (10 ids, "0".."9"), marker_ids (e.g. the tokens of " The pass key is")
    and question_ids (e.g. " What is the pass key? The pass key is"). Inputs have `length` tokens; scored as in
    `insert_passkey`."""
    filler_tokens = filler_tokens.long().reshape(-1)
    marker_ids, question_ids = torch.as_tensor(marker_ids).reshape(-1), torch.as_tensor(question_ids).reshape(-1)
    slots = passkey_haystack_slots(length + (bos_id is None), n_digits, marker_ids.numel(), question_ids.numel())
    if filler_tokens.numel() < slots:
        raise ValueError(f"filler_tokens has {filler_tokens.numel()} tokens; the haystack needs {slots}")
    starts = torch.randint(0, filler_tokens.numel() - slots + 1, (batch_size, 1), generator=generator)
    haystack = filler_tokens[starts + torch.arange(slots)[None, :]]
    batch, _, _ = insert_passkey(
        haystack, n_digits, depth, generator, torch.as_tensor(digit_ids), marker_ids, question_ids, bos_id
    )
    return batch


# ------------------------------------------------------------------------------------- S-NIAH in text (RULER-style)


@dataclass(frozen=True)
class TextNeedle:
    """A single-needle-in-a-haystack task in words, for a model with a real tokenizer (RULER's S-NIAH, generated
    locally): the haystack is `noise` repeated ("noise") or a slice of a corpus ("corpus"); the needle is `marker`
    followed by the answer, the prompt ends with `question` (which ends with the marker's words) followed by the
    answer (scored). The answer is
    `answer_prefix` + a random value: `value_chars` digits ("number") or an 8-4-4-4-12 lowercase hex UUID ("uuid")."""

    haystack: str  # "noise" | "corpus"
    value: str  # "number" | "uuid"
    marker: str
    question: str
    answer_prefix: str = " "
    value_chars: int = 7
    noise: str = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


TEXT_NEEDLES = {
    "passkey": TextNeedle("noise", "number", " The pass key is", " What is the pass key? The pass key is",
                          value_chars=5),
    "number": TextNeedle("corpus", "number", " The special magic number is:",
                         " What is the special magic number mentioned in the text? The special magic number is:"),
    "uuid": TextNeedle("corpus", "uuid", " The special magic uuid is:",
                       " What is the special magic uuid mentioned in the text? The special magic uuid is:"),
}


def random_value(kind: str, chars: int, generator: torch.Generator) -> str:
    """A random needle value: `chars` decimal digits (the first non-zero) for "number", a UUID-shaped hex string
    (8-4-4-4-12) for "uuid"."""
    if kind == "number":
        digits = torch.randint(0, 10, (chars,), generator=generator).tolist()
        digits[0] = 1 + torch.randint(0, 9, (1,), generator=generator).item()
        return "".join(map(str, digits))
    if kind == "uuid":
        hex_digits = "".join("0123456789abcdef"[i] for i in torch.randint(0, 16, (32,), generator=generator).tolist())
        return "-".join(hex_digits[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))
    raise ValueError(f"unknown needle value kind {kind!r}")


def text_needle_batch(
    task: TextNeedle,
    encode: Callable[[str], list[int]],
    corpus: torch.Tensor,
    batch_size: int,
    length: int,
    depth,
    generator: torch.Generator,
    bos_id: int | None = None,
) -> tuple[TaskBatch, list[str], list[int]]:
    """`batch_size` rows of `task`, each `length` input tokens: encode(str) -> list[int] is the tokenizer; corpus
    [N] holds token ids of real text (a "corpus" haystack is the slice from a random start, wrapping around the end
    when the corpus is shorter than the haystack). Every row draws its own value; its answer's token count k may
    differ between rows, the haystack fills the rest: S = length + 1 - [bos] - (marker + k) - (question + k)
    tokens, the needle at haystack offset round(depth * S) (depth a float in [0, 1] or a (lo, hi) range).
    Returns (batch, values, needle start positions in the inputs). ValueError when `length` cannot hold the needle."""
    marker, question = torch.tensor(encode(task.marker)), torch.tensor(encode(task.question))
    corpus, noise = corpus.long().reshape(-1), torch.tensor(encode(task.noise))
    rows, values, starts = [], [], []
    for _ in range(batch_size):
        value = random_value(task.value, task.value_chars, generator)
        answer = torch.tensor(encode(task.answer_prefix + value))[None, :]
        k, head = answer.shape[1], int(bos_id is not None)
        slots = length + 1 - head - (marker.numel() + k) - (question.numel() + k)
        if slots < 0:
            raise ValueError(f"length {length} is too short to hold the needle and question "
                             f"({length - slots} tokens)")
        if task.haystack == "noise":
            haystack = noise[torch.arange(slots) % noise.numel()]
        else:
            start = torch.randint(0, corpus.numel(), (1,), generator=generator).item()
            haystack = corpus[(start + torch.arange(slots)) % corpus.numel()]
        offsets = _needle_offsets(1, slots, depth, generator)
        rows.append(insert_needle(haystack[None, :], answer, offsets, marker, question, bos_id))
        values.append(value)
        starts.append(head + offsets.item())
    batch = TaskBatch(*(torch.cat([getattr(r, f) for r in rows]) for f in ("inputs", "targets", "mask")))
    return batch, values, starts


# ------------------------------------------------------------------------------------------------------------- scorer


@dataclass
class Score:
    exact: torch.Tensor  # [B] bool: every scored position of the sequence right
    token_correct: torch.Tensor  # [B] int: scored positions right
    token_count: torch.Tensor  # [B] int: scored positions

    @property
    def exact_accuracy(self) -> float:
        return self.exact.float().mean().item()

    @property
    def token_accuracy(self) -> float:
        return (self.token_correct.sum() / self.token_count.sum().clamp(min=1)).item()


def score(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> Score:
    """Greedy (argmax) accuracy of logits [B, T, V] against targets [B, T] at mask [B, T]: per sequence exact match
    (all scored positions right; a sequence with none scored counts as exact) and per-token counts."""
    right = (logits.argmax(dim=-1) == targets) & mask
    correct, count = right.sum(dim=1), mask.sum(dim=1)
    return Score(exact=correct == count, token_correct=correct, token_count=count)


def merge_scores(scores: list[Score]) -> Score:
    """Concatenate the scores of several batches."""
    return Score(
        exact=torch.cat([s.exact for s in scores]),
        token_correct=torch.cat([s.token_correct for s in scores]),
        token_count=torch.cat([s.token_count for s in scores]),
    )
