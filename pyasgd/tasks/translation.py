"""Machine translation as a Task: a parallel corpus in joint subwords, token-count batches, a
Transformer or RNN, label-smoothed loss summed over target tokens, BLEU and chrF with sacrebleu."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pyasgd.data import corpus as corpus_mod
from pyasgd.data.batching import collate, epoch_batches, worker_batches
from pyasgd.data.subword import PAD, train_or_load
from pyasgd.models import build, model_config_from
from pyasgd.models.search import beam_search, greedy
from pyasgd.tasks.base import Cursor, Task

LOG = logging.getLogger("pyasgd")
SUBWORD_MODEL = "spm.model"     # the run directory's copy of the subword model
SACREBLEU = "sacrebleu.txt"     # the BLEU and chrF signatures of the final test


@torch.no_grad()
def translate(model: nn.Module, subwords, sentences: list[str], beam: int = 1, alpha: float = 0.6,
              batch_size: int = 64, progress: Callable[[int], None] | None = None) -> list[str]:
    """Detokenized translations of `sentences`, decoding length-sorted batches; `progress` is
    told how many sentences are done after each batch."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        ids = subwords.encode(sentences)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[list[int]] = [[] for _ in ids]
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            S = max(1, max(len(ids[i]) for i in chunk))
            src = torch.full((len(chunk), S), PAD, dtype=torch.long)
            for r, i in enumerate(chunk):
                src[r, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            src = src.to(device)
            limit = int(1.5 * S) + 10
            hyps = greedy(model, src, limit) if beam == 1 else beam_search(model, src, beam, limit, alpha)
            for r, i in enumerate(chunk):
                out[i] = hyps[r]
            if progress is not None:
                progress(min(b + batch_size, len(order)))
        return subwords.decode(out)
    finally:
        model.train(was)


class TranslationTask(Task):
    primary = "bleu"
    higher_is_better = True

    def __init__(self, config) -> None:
        super().__init__(config)
        c = config
        corpus = corpus_mod.load(c)
        self.corpus = corpus
        self.subwords = train_or_load(corpus.train, c.vocab_size)
        src = self.subwords.encode([s for s, _ in corpus.train])
        tgt = self.subwords.encode([t for _, t in corpus.train])
        keep = [i for i in range(len(src)) if 0 < len(src[i]) <= c.max_len and 0 < len(tgt[i]) <= c.max_len]
        self.skipped_long = len(src) - len(keep)
        if not keep:
            raise corpus_mod.CorpusError(f"no training pair fits --max-len {c.max_len} subwords; raise --max-len")
        self.train_src = [src[i] for i in keep]
        self.train_tgt = [tgt[i] for i in keep]
        self.model_cfg = model_config_from(c)
        self._shard_batches: dict[tuple[int, int, int], int] = {}

    def describe(self) -> str:
        c = self.corpus
        return (f"corpus {c.name}: {len(self.train_src)} training pairs ({self.skipped_long} longer than "
                f"--max-len {self.config.max_len} and {c.skipped_empty} with an empty side skipped), "
                f"dev {len(c.dev)}, test {len(c.test)}; vocabulary {self.subwords.vocab_size}; "
                f"model {self.config.preset}")

    def artifacts(self) -> dict[str, str]:
        return {SUBWORD_MODEL: self.subwords.path}

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.config.seed)
        return build(self.model_cfg, self.subwords.vocab_size)

    def batches(self, worker: int, workers: int, cursor: Cursor) -> Iterator[tuple[Any, Cursor]]:
        c = self.config
        for batch, epoch, index in worker_batches(self.train_src, self.train_tgt, c.batch_tokens, c.seed,
                                                  worker, workers, cursor.epoch, cursor.index):
            yield batch, Cursor(epoch, index)

    def shard_batches(self, worker: int, workers: int, epoch: int) -> int:
        key = (worker, workers, epoch)
        if key not in self._shard_batches:  # asked after every batch of the last pass: cache
            c = self.config
            lens = ([len(s) for s in self.train_src], [len(t) for t in self.train_tgt])
            self._shard_batches[key] = len(epoch_batches(*lens, c.batch_tokens, c.seed, epoch)[worker::workers])
        return self._shard_batches[key]

    def epoch_tokens(self) -> int:
        return sum(len(t) + 1 for t in self.train_tgt)  # with EOS, as SentenceBatch.tokens

    @torch.no_grad()
    def dev_loss(self, model: nn.Module, batch_tokens: int = 4000) -> float:
        """Cross-entropy per target token on the whole dev set (teacher-forced, no label
        smoothing): the paper's stopping criterion."""
        if getattr(self, "_dev_ids", None) is None:
            dev = self.corpus.dev
            src = self.subwords.encode([s for s, _ in dev])
            tgt = self.subwords.encode([t for _, t in dev])
            keep = sorted((i for i in range(len(dev)) if src[i] and tgt[i]), key=lambda i: (len(tgt[i]), len(src[i])))
            self._dev_ids = ([src[i][:256] for i in keep], [tgt[i][:255] for i in keep])
        src, tgt = self._dev_ids
        device = next(model.parameters()).device
        total, tokens, start = 0.0, 0, 0
        while start < len(src):
            end = start + 1
            while end < len(src) and max(len(src[end]), len(tgt[end]) + 1) * (end + 1 - start) <= batch_tokens:
                end += 1
            b = collate(src[start:end], tgt[start:end]).to(device)
            logits = model(b.src, b.tgt_in)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), b.tgt_out.flatten(), ignore_index=PAD,
                                           reduction="sum"))
            tokens += b.tokens
            start = end
        return total / max(1, tokens)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        logits = model(batch.src, batch.tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD,
                               reduction="sum", label_smoothing=self.config.label_smoothing)
        return loss, batch.tokens

    def translate(self, model: nn.Module, sentences: list[str], progress: Callable[[int], None] | None = None
                  ) -> list[str]:
        return translate(model, self.subwords, sentences, self.config.beam, self.config.length_penalty,
                         progress=progress)

    def _score(self, model, pairs, signatures: bool = False, progress: Callable[[int], None] | None = None
               ) -> dict[str, Any]:
        from sacrebleu.metrics import BLEU, CHRF

        hyps = self.translate(model, [s for s, _ in pairs], progress)
        refs = [[t for _, t in pairs]]
        bleu, chrf = BLEU(), CHRF()  # corpus-level, on detokenized text, sacrebleu's defaults
        out: dict[str, Any] = {"bleu": round(bleu.corpus_score(hyps, refs).score, 3),
                               "chrf": round(chrf.corpus_score(hyps, refs).score, 3)}
        if signatures:
            out.update(bleu_signature=str(bleu.get_signature()), chrf_signature=str(chrf.get_signature()))
        return out

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        dev = self.corpus.dev
        if self.config.valid_sentences:
            dev = dev[:self.config.valid_sentences]
        return {**self._score(model, dev), "loss": round(self.dev_loss(model), 5)}

    def final_test(self, model: nn.Module, run_dir: str) -> dict[str, Any]:
        from pyasgd.trainer.console import Progress

        pairs = self.corpus.test or self.corpus.dev  # the signature needs a scored corpus
        if self.config.test_sentences:
            pairs = pairs[:self.config.test_sentences]
        c = self.config
        what = "test" if self.corpus.test else "dev (no test set)"
        LOG.info(f"testing: decoding {len(pairs):,} {what} sentences, "
                 + ("greedy" if c.beam == 1 else f"beam {c.beam}"))
        bar = Progress("testing", len(pairs), unit="sent",
                       line=lambda n: f"testing: {n:,}/{len(pairs):,} sentences decoded")
        try:
            scores = self._score(model, pairs, signatures=True, progress=bar.update)
        finally:
            bar.close()
        out = {k: scores[k] for k in ("bleu_signature", "chrf_signature")}
        with open(os.path.join(run_dir, SACREBLEU), "w", encoding="utf-8") as f:
            f.write(f"{out['bleu_signature']}\n{out['chrf_signature']}\n")
        if self.corpus.test:
            out.update(test_bleu=scores["bleu"], test_chrf=scores["chrf"], test_sentences=len(pairs))
        return out

    def summary_fields(self, best: float | None, time_to_target: dict[str, Any]) -> dict[str, Any]:
        return {"best_valid_bleu": best, "time_to_bleu": time_to_target}
