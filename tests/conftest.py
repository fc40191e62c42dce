"""Shared fixtures."""

import pytest

from charlm.train import Trainer, TrainOptions


@pytest.fixture(scope="session")
def train_tiny(tmp_path_factory):
    """A function that trains a small model quietly on `text` and returns
    (directory, checkpoint path, the finished Trainer)."""
    def train(text, **options):
        root = tmp_path_factory.mktemp("tiny")
        corpus = root / "corpus.txt"
        corpus.write_text(text, encoding="utf-8")
        out = root / "m.safetensors"
        settings = dict(hidden=24, batch_size=4, seq_length=16, sample_every=0, lr=1e-2)
        settings.update(options)
        trainer = Trainer(corpus, out, TrainOptions(**settings), echo=lambda *a: None,
                          progress_bar=False)
        trainer.run()
        return root, out, trainer
    return train
