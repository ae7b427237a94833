"""Train the shipped 8k-piece SentencePiece BPE tokenizer from engine/assets/tokenizer_corpus.txt.

    python scripts/build_tokenizer.py [--vocab-size 8000] [--out engine/assets/tokenizer.model]

Deterministic (one thread, no sampling of the input), so rerunning reproduces the
committed engine/assets/tokenizer.model byte for byte. Llama-style settings: byte
fallback (any text round-trips), digits split, no normalisation, bos=1, eos=2, unk=0.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "engine" / "assets"


def train(corpus: Path, out: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    # Lines are fed from memory and the model is written to memory, so no path ends up in the model.
    model = io.BytesIO()
    with corpus.open(encoding="utf-8") as lines:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line.rstrip("\n") for line in lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            max_sentencepiece_length=16,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    out.write_bytes(model.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ASSETS / "tokenizer_corpus.txt")
    ap.add_argument("--out", type=Path, default=ASSETS / "tokenizer.model")
    ap.add_argument("--vocab-size", type=int, default=8000)
    args = ap.parse_args()
    train(args.corpus, args.out, args.vocab_size)
    print(f"wrote {args.out} ({args.vocab_size} pieces)")


if __name__ == "__main__":
    main()
