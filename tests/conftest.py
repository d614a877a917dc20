"""Shared fixtures: where the committed fixture models and the cached corpus of real models live.

``models/`` holds small models committed with the repo (made by ``tools/make_fixtures.py`` and
``tools/train_digits.py``). The corpus (ImageNet-class architectures, PP-OCR) is too big to commit; it is built
on demand by ``python tools/fetch_corpus.py`` into ``$ONNXPRUNE_CORPUS`` or ``~/.cache/onnxprune/corpus``,
and tests that need one of its models skip when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FETCH_HINT = "run python tools/fetch_corpus.py"


def _corpus_root() -> Path:
    # Same rule as tools/fetch_corpus.py:default_corpus_dir (tests do not import tools/).
    env = os.environ.get("ONNXPRUNE_CORPUS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxprune" / "corpus"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The repo's ``models/`` folder of small committed fixture models and their data (.npz)."""
    return REPO_ROOT / "models"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The corpus cache folder; it may not exist (use ``corpus_model`` to get a model or skip)."""
    return _corpus_root()


@pytest.fixture(scope="session")
def corpus_model(corpus_dir: Path) -> Callable[[str], Path]:
    """Factory: ``corpus_model("light/light_resnet50")`` -> path of the cached model, or skip the calling test.

    Accepts ``collection/name`` with or without ``.onnx`` (``"ppocr/ch_PP-OCRv4_det_infer.onnx"``), or a bare
    name found in exactly one collection (``"light_resnet50"``, ``"ch_PP-OCRv4_rec_infer"``).

        def test_resnet_channels(corpus_model):
            model = onnx.load(corpus_model("light/light_resnet50"))
    """

    def resolve(name: str) -> Path:
        file_name = name if name.endswith(".onnx") else f"{name}.onnx"
        if "/" in name:
            path = corpus_dir / file_name
            if path.is_file():
                return path
        else:
            matches = sorted(corpus_dir.glob(f"*/{file_name}")) if corpus_dir.is_dir() else []
            if len(matches) > 1:
                raise ValueError(f"corpus model name {name!r} is ambiguous: {[str(m) for m in matches]}")
            if matches:
                return matches[0]
        pytest.skip(f"corpus model {name} not cached; {FETCH_HINT}")

    return resolve
