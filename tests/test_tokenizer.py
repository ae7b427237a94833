"""The shipped SentencePiece tokenizer and streaming detokenization."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.tokenizer import SHIPPED_TOKENIZER, IncrementalDetokenizer, Tokenizer, tokenizer_path

TEXTS = [
    "The scheduler preempts the newest sequence when the KV cache is full.",
    "  leading spaces,\ttabs and\nnew lines\n\n",
    "naïve café — 语言模型每一步生成一个词元 🚀✅ Ωμέγα 42 €",
    "zqxj vwkp unseen-wordish 1234567890",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_shipped_vocab_and_specials(tok):
    assert tok.vocab_size == 8000
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("hi")[0] == tok.bos_id
    assert tok.bos_id not in tok.encode("hi", add_bos=False)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_multi_piece_characters_use_byte_fallback(tok):
    ids = tok.encode("𝔘", add_bos=False)  # not in the corpus: 4 UTF-8 byte pieces after the space marker
    assert sum(tok.id_to_piece(i).startswith("<0x") for i in ids) == 4
    assert tok.decode(ids) == "𝔘"


@pytest.mark.parametrize("text", TEXTS + ["𝔘𝔫𝔦 and 🧪 between words"])
def test_incremental_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # partial characters are held back, never streamed


def test_incremental_in_uneven_chunks(tok):
    ids = tok.encode(TEXTS[2] + " " + TEXTS[0])
    detok = IncrementalDetokenizer(tok)
    out, i = [], 0
    for n in [1, 3, 2, 5, 1, 8, 100]:
        out.append(detok.add(ids[i : i + n]))
        i += n
    assert "".join(out) == tok.decode(ids)


def test_prompt_context_keeps_the_leading_space(tok):
    prompt = tok.encode("Requests arrive over the")
    out = tok.encode("network and wait", add_bos=False)  # the dummy prefix gives "▁network"
    detok = IncrementalDetokenizer(tok, context_ids=prompt)
    text = "".join(detok.add([i]) for i in out)
    assert text == " network and wait"


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model"):
        Tokenizer(tmp_path / "nope.model")


def test_build_script_reproduces_the_shipped_model(tmp_path):
    out = tmp_path / "tok.model"
    subprocess.run(
        [sys.executable, "scripts/build_tokenizer.py", "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=SHIPPED_TOKENIZER.parents[2],
    )
    assert out.read_bytes() == SHIPPED_TOKENIZER.read_bytes()


def test_checkpoint_tokenizer_preferred_over_the_shipped_one(tmp_path):
    from engine.config import ModelConfig

    assert tokenizer_path(ModelConfig(preset="tiny")) == SHIPPED_TOKENIZER
    assert tokenizer_path(ModelConfig(path=str(tmp_path))) == SHIPPED_TOKENIZER
    (tmp_path / "tokenizer.model").write_bytes(SHIPPED_TOKENIZER.read_bytes())
    assert tokenizer_path(ModelConfig(path=str(tmp_path))) == tmp_path / "tokenizer.model"
