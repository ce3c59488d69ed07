"""Incremental detokenisation with the real models' tokenizers: the streamed
pieces add up to the text the whole sequence decodes to, and stop strings cut
exactly where they appear."""
import pytest
import transformers

from checkpoints import corpus, real_model_dir
from m2cache.worker.detokenize import Detokenizer


@pytest.fixture(scope="module", params=["tinystories-656k", "stories260k"])
def tokenizer(request):
    return transformers.AutoTokenizer.from_pretrained(real_model_dir(request.param))


def sample_ids(tokenizer) -> list[int]:
    text = corpus("tinystories/valid_000-499_calib.txt").read_text()[:1500]
    return tokenizer.encode(text)


def stream(tokenizer, prompt, rest, stop=()):
    d = Detokenizer(tokenizer, prompt, tuple(stop))
    pieces, stopped = [], False
    for t in rest:
        piece, stopped = d.push(t)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(d.flush())
    return "".join(pieces), stopped


def test_pieces_add_up_to_the_whole_text(tokenizer):
    ids = sample_ids(tokenizer)
    prompt, rest = ids[:6], ids[6:]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    text, stopped = stream(tokenizer, prompt, rest)
    assert not stopped and head + text == whole


def test_stop_string_cuts_before_it(tokenizer):
    ids = sample_ids(tokenizer)
    prompt, rest = ids[:6], ids[6:]
    full, _ = stream(tokenizer, prompt, rest)
    stop = full[200:210]  # a stop string that spans tokens somewhere in the middle
    text, stopped = stream(tokenizer, prompt, rest, stop=[stop, "never appears \u2603"])
    assert stopped and text == full[: full.index(stop)]
