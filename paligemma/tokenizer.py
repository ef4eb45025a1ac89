"""Gemma's SentencePiece tokenizer, with PaliGemma's special ids looked up rather than assumed.

The released `tokenizer.model` has 257,152 pieces (Gemma's 256k plus <loc####> and <seg###>); the
`<image>` placeholder is not one of them: like transformers, we give it the next id (257,152), and
check that against the config's `image_token_index`.
"""
from pathlib import Path

import sentencepiece as spm

IMAGE = "<image>"
# PaliGemma's extra vocabulary (big_vision pp/tokenizer.py, `tokensets.loc` and `tokensets.seg`): 1024
# image coordinates for boxes and 128 codewords of the segmentation VQ-VAE
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]


class Tokenizer:
    def __init__(self, model_file: str | Path):
        self.path = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a readable SentencePiece model: {e}") from e
        self.pad_id, self.eos_id, self.bos_id = (self._special(p) for p in ("<pad>", "<eos>", "<bos>"))
        self.newline_id = self._special("\n")
        image = self.sp.piece_to_id(IMAGE)
        self.image_id = image if self.sp.id_to_piece(image) == IMAGE else self.sp.get_piece_size()
        self.special_ids = {self.pad_id, self.eos_id, self.bos_id, self.image_id}

    def _special(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise ValueError(f"{self.path}: tokenizer has no {piece!r} piece (PaliGemma needs it)")
        return i

    def __len__(self) -> int:
        return self.sp.get_piece_size() + (self.image_id == self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Text of `ids` up to the first <eos>, without special tokens."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in self.special_ids and i < self.sp.get_piece_size():
                out.append(i)
        return self.sp.decode(out)


def train_tokenizer(texts: list[str], prefix: str | Path, vocab_size: int = 1000, task_tokens: bool = False) -> Path:
    """A small SentencePiece model laid out like Gemma's: <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4, `\\n` a
    piece of its own; no dummy prefix, no whitespace folding, byte fallback. As in PaliGemma's
    tokenizer, `<image>` is not a piece: it takes the id after the last one.

    task_tokens: also PaliGemma's 1024 `<locNNNN>` and 128 `<segNNN>` tokens, each a single piece
    (detection and segmentation answers), on top of `vocab_size` learned ones. SentencePiece puts
    user-defined pieces right after `\\n` (ids 6 ... 1157), not at the end as PaliGemma's file does:
    find them by their text, never by id."""
    extra = LOC_TOKENS + SEG_TOKENS if task_tokens else []
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab_size + len(extra), model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<mask>", "\n"] + extra, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", byte_fallback=True,
        split_digits=True, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return prefix.with_suffix(".model")
