"""Encoders built here rather than downloaded: a random-weight DistilBERT for speed figures
(its speed is real DistilBERT speed, its accuracy is not) and tiny ones for tests.

Both are saved as ordinary Hugging Face folders and loaded back through `from_pretrained`,
the same path that real models take.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(sentences: Iterable[str], vocab_size: int = 2000):
    """An uncased BERT-style WordPiece tokenizer trained on `sentences`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return tok


def save_random_distilbert(folder: Path, sentences: Iterable[str] | None = None, vocab_file: Path | None = None,
                           tiny: bool = False, max_length: int = 512, seed: int = 0) -> Path:
    """A DistilBERT with random weights: full size (the real architecture) or tiny (tests).

    The tokenizer is the uncased vocabulary in `vocab_file` when given, else WordPiece trained on `sentences`.
    """
    import torch
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    if vocab_file is not None:  # from a folder: transformers 5 ignores `vocab_file=` (5 special tokens only)
        shutil.copyfile(vocab_file, folder / "vocab.txt")
        tokenizer = DistilBertTokenizerFast.from_pretrained(folder, do_lower_case=True, model_max_length=max_length)
    else:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=train_wordpiece(sentences or [], 1000 if tiny else 30522),
            unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
            model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    shape = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64) if tiny else {}
    config = DistilBertConfig(vocab_size=len(tokenizer), max_position_embeddings=max(512, max_length),
                              pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    DistilBertModel(config).save_pretrained(folder)
    return folder
