"""The logistic-regression head: trained with scikit-learn, applied as one vector op on the device.

The worker never passes features through scikit-learn per record: `TorchHead` computes
sigmoid(w·x + b) for a whole batch where the [CLS] vectors already are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

C_GRID = (0.01, 0.1, 1.0, 10.0)


@dataclass(frozen=True)
class FitResult:
    estimator: LogisticRegression
    best_c: float
    cv_accuracy: float


def fit_head(features: np.ndarray, labels: np.ndarray, seed: int = 42, grid: tuple[float, ...] = C_GRID) -> FitResult:
    """The tutorial's recipe: LogisticRegression with a small cross-validated search over C."""
    search = GridSearchCV(LogisticRegression(max_iter=2000, random_state=seed), {"C": list(grid)}, cv=5, n_jobs=1)
    search.fit(features, labels)
    return FitResult(search.best_estimator_, float(search.best_params_["C"]), float(search.best_score_))


class TorchHead:
    """P(positive) = sigmoid(w·x + b), computed in float32 on the encoder's device."""

    def __init__(self, estimator: LogisticRegression, device: torch.device) -> None:
        if list(estimator.classes_) != [0, 1]:
            raise ValueError(f"head classes must be [0, 1], got {list(estimator.classes_)}")
        self.weight = torch.as_tensor(estimator.coef_[0], dtype=torch.float32, device=device)
        self.bias = float(estimator.intercept_[0])
        self.hidden_size = int(self.weight.shape[0])

    def __call__(self, cls_vectors: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(cls_vectors.float() @ self.weight + self.bias)
