"""Incremental detokenization: the pieces join to the whole answer's decode, for
multi-byte characters split over byte tokens and for Metaspace leading spaces; and the
work per token stays constant (the window decoded does not grow with the answer)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from service.chat.detokenize import Detokenizer
from tests.llava_fixtures import tiny_tokenizer

TEXTS = ["café naïve 日本語 🙂 ok", "the cat sat on the mat", "  two  spaces, ünïcödé 🙂🙂 end"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with a small vocabulary: most non-ASCII characters span several tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["the cat sat on the mat", "a photo of a dog"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


@pytest.fixture(params=["byte-level", "metaspace"])
def tokenizer(request):
    return byte_level_tokenizer() if request.param == "byte-level" else tiny_tokenizer()


def incremental(tokenizer, tokens: list[int]) -> list[str]:
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in tokens]
    return pieces + [detok.flush()]


def test_pieces_join_to_the_whole_decode(tokenizer):
    rng = random.Random(0)
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    for tokens in sequences:
        whole = tokenizer.decode(tokens, skip_special_tokens=True)
        pieces = incremental(tokenizer, tokens)
        assert "".join(pieces) == whole, tokens


def test_a_split_character_waits_for_its_last_byte():
    tokenizer = byte_level_tokenizer()
    tokens = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(tokens) > 1, "the fixture must split the character"
    pieces = incremental(tokenizer, tokens)
    assert pieces[:-2] == [""] * (len(tokens) - 1) and pieces[-2] == "🙂"


def test_leading_spaces_survive():
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    assert "".join(incremental(tokenizer, tokens)) == tokenizer.decode(tokens)
    assert " cat" in "".join(incremental(tokenizer, tokens))


def test_work_per_token_is_constant():
    tokenizer = tiny_tokenizer()
    longest: list[int] = []

    class Counting:
        def decode(self, tokens, **kw):
            longest.append(len(tokens))
            return tokenizer.decode(tokens, **kw)

    detok = Detokenizer(Counting())
    for token in tokenizer.encode(" ".join(["the cat sat on the mat"] * 40), add_special_tokens=False):
        detok.add(token)
    assert len(longest) > 200 and max(longest) <= 4
