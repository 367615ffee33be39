"""Joint source+target subwords with sentencepiece, trained once on the training text and cached
by a hash of that text and the settings (PYASGD_CACHE, default ~/.cache/pyasgd)."""
from __future__ import annotations

import hashlib
import io
import os

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def cache_dir() -> str:
    return os.environ.get("PYASGD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pyasgd"))


class Subwords:
    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.sp.decode([[i for i in seq if i > EOS] for seq in ids])


def train_or_load(pairs: list[tuple[str, str]], vocab_size: int) -> Subwords:
    from pyasgd.errors import CorpusError

    h = hashlib.sha256(f"spm1|{vocab_size}|".encode())
    for s, t in pairs:
        h.update(s.encode())
        h.update(b"\t")
        h.update(t.encode())
        h.update(b"\n")
    path = os.path.join(cache_dir(), f"spm-{h.hexdigest()[:16]}.model")
    if not os.path.exists(path):
        import sentencepiece as spm

        os.makedirs(cache_dir(), exist_ok=True)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter([s for s, _ in pairs] + [t for _, t in pairs]), model_writer=model,
                vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
                pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, input_sentence_size=200_000,
                shuffle_input_sentence=True, num_threads=2, minloglevel=2)
        except RuntimeError as e:
            if "Vocabulary size is too high" in str(e) or "vocab_size" in str(e):
                raise CorpusError(f"--vocab-size {vocab_size} is larger than this training text supports "
                                  f"({str(e).strip().splitlines()[-1]}); choose a smaller one") from None
            raise
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, path)
    return Subwords(path)
