"""Train the byte-level BPE tokenizer `shakespeare-bpe` on the TRAIN split of the built-in corpus.

    .venv/bin/python experiments/small_lm/train_tokenizer.py [--vocab-size 4096] [--out DIR]

Writes a folder that `transformers.AutoTokenizer.from_pretrained` reads (tokenizer.json +
tokenizer_config.json); by default the one shipped at e2e_sae/assets/tokenizers/shakespeare-bpe.
Only the train split is seen, so validation CE is measured on text the tokenizer never saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from e2e_sae.data.corpora import shakespeare_documents

EOS = "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "e2e_sae/assets/tokenizers/shakespeare-bpe"


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-splitting, no prefix space); EOS is the one special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main() -> None:
    p = argparse.ArgumentParser(description="Train the shakespeare-bpe tokenizer")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    tok = train_bpe(shakespeare_documents("train"), args.vocab_size)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    args.out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(args.out))
    # transformers 5 writes its own class name; the generic one loads in transformers 4.x too.
    cfg_file = args.out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"vocab {tok.get_vocab_size()} -> {args.out}")


if __name__ == "__main__":
    main()
