"""S-NIAH sweeps: an induction "oracle" that copies what followed the question's words scores 1 everywhere, one
that sees only `reach` tokens back scores exactly where the hand-placed needle lies within reach, the scorer
agrees with greedy generation token by token, and the heatmap puts each cell where the layout says."""

import pytest
import torch

from pretrain.eval.heatmap import accuracy_colour, cell_box, write_heatmap
from pretrain.eval.niah import answer_score, format_niah, niah_sweep
from pretrain.eval.tasks import TEXT_NEEDLES, TaskBatch, text_needle_batch
from titans_parallel import ModelConfig, TitansLM
from titans_parallel.config import MemoryConfig

VOCAB = 256


def encode(text: str) -> list[int]:
    """One id per character (ASCII), so every length below is a hand count."""
    return [ord(c) for c in text]


CORPUS = torch.randint(ord("a"), ord("z") + 1, (3000,), generator=torch.Generator().manual_seed(0))


class InductionOracle(torch.nn.Module):
    """Predicts, at position p, the token after the latest earlier j whose last n tokens equal p's last n (j - n + 1
    >= p - reach: only tokens within `reach` back are seen); uniform logits when there is none. The cache is the
    history, so pieces of any size give the same logits."""

    def __init__(self, n: int = 12, reach: int | None = None):
        super().__init__()
        self.n, self.reach = n, reach
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # device of the "model"

    def decode(self, ids: torch.Tensor, cache):
        history = ids if cache is None else torch.cat([cache, ids], dim=1)
        B, T, n = history.shape[0], history.shape[1], self.n
        windows = history.unfold(1, n, 1)  # [B, T - n + 1, n], window w ends at w + n - 1
        first = max(0, T - ids.shape[1] - n + 1)  # the windows ending at the new positions
        same = (windows[:, first:, None] == windows[:, None, :]).all(-1)  # [B, query w, key w']
        q_end = torch.arange(first, T - n + 1)[:, None] + n - 1
        k_end = torch.arange(T - n + 1)[None, :] + n - 1
        ok = same & (k_end < q_end) & (k_end + 1 < T)
        if self.reach is not None:
            ok &= k_end - n + 1 >= q_end - self.reach
        latest = torch.where(ok, k_end, -1).amax(-1)  # [B, queries]
        logits = torch.zeros(B, T, VOCAB)
        b, w = (latest >= 0).nonzero(as_tuple=True)
        logits[b, first + w + n - 1, history[b, latest[b, w] + 1]] = 1.0
        return logits[:, T - ids.shape[1] :], history


DEPTHS = [0, 25, 50, 75, 100]


def test_oracle_scores_every_cell_with_streaming():
    cells = niah_sweep(InductionOracle(), encode, CORPUS, ["passkey", "number", "uuid"], [200, 400], DEPTHS,
                       samples=3, batch_size=2, chunk=37, memory_off=True, bos_id=1)
    assert len(cells) == 3 * 2 * 5 * 2
    assert all(c["accuracy"] == 1.0 and c["token_accuracy"] == 1.0 for c in cells), cells
    table = format_niah(cells)
    assert "S-NIAH uuid, test-time learning off" in table and "  100%" in table


@pytest.mark.parametrize("task", ["passkey", "uuid"])
def test_reach_limited_oracle_scores_where_the_needle_is_within_reach(task):
    """Accuracy 1 exactly when the needle, placed at haystack offset round(depth * slots) by hand, is within reach
    of the first answer position; 0 otherwise (so the depth placement and the scored positions are right)."""
    reach, length, n = 200, 600, 12
    needle = TEXT_NEEDLES[task]
    depths = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    cells = niah_sweep(InductionOracle(n, reach), encode, CORPUS, [task], [length], depths, samples=2,
                       batch_size=2, bos_id=None)
    k = len(needle.answer_prefix) + (5 if task == "passkey" else 36)
    n_marker, n_question = len(needle.marker), len(needle.question)
    slots = length + 1 - (n_marker + k) - (n_question + k)
    expected = {}
    for d in depths:
        start = round(d / 100 * slots)  # the marker's first token; its last n tokens end at start + n_marker - 1
        first_answer = length - k  # the last question token
        expected[d] = float(start + n_marker - n >= first_answer - reach)
    assert {c["depth"]: c["accuracy"] for c in cells} == expected
    assert 0 < sum(expected.values()) < len(depths)  # both kinds of cell occur


def test_scorer_agrees_with_greedy_generation():
    """Rows whose answer is the model's own greedy continuation (TitansLM.generate, a token loop) are exact under
    the streamed scorer; changing the last answer token costs exactly that token."""
    torch.manual_seed(0)
    model = TitansLM(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, variant="mac", window=8,
                                 n_persistent=2, memory=MemoryConfig(chunk_size=4))).eval()
    batch, _, _ = text_needle_batch(TEXT_NEEDLES["passkey"], encode, CORPUS, 3, 120, 0.5,
                                    torch.Generator().manual_seed(3))
    k = int(batch.mask[0].sum())
    prompt = batch.inputs[:, : 120 - k + 1]  # up to the last question token
    greedy = model.generate(prompt, k, temperature=0)
    sequence = greedy.clone()
    sequence[2, -1] = (sequence[2, -1] + 1) % VOCAB
    mask = torch.zeros(3, 120, dtype=torch.bool)
    mask[:, 120 - k :] = True
    own = TaskBatch(sequence[:, :-1], sequence[:, 1:], mask)
    for chunk in (None, 7):
        s = answer_score(model, own, chunk)
        assert s.exact.tolist() == [True, True, False]
        assert s.token_correct.tolist() == [k, k, k - 1] and s.token_count.tolist() == [k] * 3


def test_heatmap_layout(tmp_path):
    accuracy = {(d, n): (1.0 if d == 0 else 0.0) if n == 256 else 0.5 for d in (0, 50, 100) for n in (128, 256)}
    path = write_heatmap(tmp_path / "h.png", accuracy, "passkey, learning on")
    from PIL import Image

    image = Image.open(path).convert("RGB")
    for (r, depth) in enumerate((0, 50, 100)):
        for c, length in enumerate((128, 256)):
            x0, y0, x1, y1 = cell_box(r, c)
            assert image.getpixel((x0 + 3, y0 + 3)) == accuracy_colour(accuracy[depth, length])
    assert accuracy_colour(0.0) == (214, 48, 39) and accuracy_colour(1.0) == (26, 152, 80)
