"""Parallel corpora: the bundled Bible corpus, user text files, subwords and token batches."""
