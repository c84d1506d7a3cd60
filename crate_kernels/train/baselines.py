"""Classical classifiers on a run's own split, to read a trained model's held-out accuracy against.

Each baseline fits the flattened training images (pixels in [0, 1], as the model reads them before normalisation)
and is scored on the same held-out images the run evaluates. ``BASELINES`` is the table: one more row is one more
entry (a name and a function that returns an unfitted scikit-learn estimator). The report prints the rows beside the
trained model's and writes them to ``baselines.json`` in the run folder (docs/design.md, "Training").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crate_kernels import files
from crate_kernels.train.data import ImageSet


def _logistic() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000)


def _svm() -> Any:
    from sklearn.svm import SVC

    return SVC(kernel="rbf")  # C = 1, gamma = "scale": scikit-learn's defaults


def _knn() -> Any:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=3)


# Pixel values in a training split past which the baselines are not fitted: an RBF SVM grows with samples² × pixels
# (digits: 1,437 × 64 = 92 k, fitted in 0.1–0.3 s; shapes: 3,200 × 12,288 = 39 M, minutes).
MAX_PIXEL_VALUES = 2_000_000

BASELINES: dict[str, Callable[[], Any]] = {
    "logistic regression": _logistic,
    "RBF SVM": _svm,
    "3-nearest neighbours": _knn,
}


def fits_quickly(train: ImageSet) -> bool:
    return train.images.numel() <= MAX_PIXEL_VALUES


def score_baselines(train: ImageSet, val: ImageSet) -> list[dict[str, Any]]:
    """Each baseline fitted on ``train`` and scored on ``val``: rows ``{"model", "accuracy", "fit_s"}``.

    On one BLAS thread: these fits are small, and a second thread that waits on a busy core made the logistic
    regression 80 times slower (8 s against 0.1 s on 2 shared cores).
    """
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    x_train, x_val = train.images.flatten(1).numpy(), val.images.flatten(1).numpy()
    y_train, y_val = train.labels.numpy(), val.labels.numpy()
    rows = []
    with threadpool_limits(limits=1):
        for name, make in BASELINES.items():
            estimator = make()
            start = time.perf_counter()
            estimator.fit(x_train, y_train)
            fit_s = time.perf_counter() - start
            accuracy = float((estimator.predict(x_val) == y_val).mean())
            rows.append({"model": name, "accuracy": accuracy, "fit_s": fit_s})
    return rows


def rival_scores(run_dir: Path) -> list[dict[str, Any]]:
    """The ``--task.compare`` runs' own rows (``compare/<model>/baselines.json``, written by their reports)."""
    rows = []
    for path in sorted(run_dir.glob("compare/*/baselines.json")):
        try:
            row = json.loads(path.read_text())[0]
        except (OSError, ValueError, IndexError, KeyError):
            continue  # an unfinished or damaged comparison: its run says so when resumed
        rows.append(row | {"model": f"{path.parent.name} (same recipe)"})
    return rows


def write_scores(rows: list[dict[str, Any]], run_dir: Path) -> Path:
    return files.write_text(run_dir / "baselines.json", json.dumps(rows, indent=2) + "\n")
