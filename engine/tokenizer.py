"""SentencePiece tokenizer and streaming detokenization.

Loads a `.model` file with `sentencepiece` directly (transformers 5.x `LlamaTokenizer`
misloads a bare vocab file). The engine ships one (assets/tokenizer.model, built by
scripts/build_tokenizer.py) for random-weight presets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SHIPPED_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer.model"

_REPLACEMENT = "\ufffd"  # what a partial UTF-8 sequence (byte-fallback pieces) decodes to
_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token (leading-space handling)


def tokenizer_path(model_cfg) -> Path:
    """A ModelConfig's tokenizer: its checkpoint's tokenizer.model when present, else the shipped one."""
    own = Path(model_cfg.path) / "tokenizer.model" if model_cfg.path else None
    return own if own is not None and own.exists() else SHIPPED_TOKENIZER


class Tokenizer:
    def __init__(self, model_file: str | Path = SHIPPED_TOKENIZER):
        import sentencepiece as spm

        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found")
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._sp.encode(text, out_type=int)
        return [self.bos_id, *ids] if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; control tokens (bos/eos) decode to nothing. Ids past the tokenizer's
        vocabulary (a preset model with a larger one, e.g. llama2-7b's 32000) decode as unk."""
        n = self.vocab_size
        return self._sp.decode([i if i < n else self._sp.unk_id() for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


class IncrementalDetokenizer:
    """Text deltas of a growing token sequence, for streaming.

    Each call decodes a short window (the tokens already emitted since the last flush point
    plus the new ones) and returns only the new suffix. A window that ends inside a
    multi-byte character (it decodes to U+FFFD) is held back until the character completes.
    Without context the deltas concatenate to `decode(ids)`; with `context_ids` (the prompt)
    they continue the prompt's text, so a first output piece "▁Hello" streams as " Hello".
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self.ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # window start
        self._read = len(self.ids)  # text of ids[_prefix:_read] has been emitted already

    def add(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the end of the stream)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        done = self._tok.decode(self.ids[self._prefix : self._read])
        text = self._tok.decode(self.ids[self._prefix :])
        if len(text) <= len(done) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done) :]
