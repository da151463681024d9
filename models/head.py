"""The logistic-regression head: trained with scikit-learn, stored as plain weights, applied on the device.

The worker never passes features through scikit-learn per record: `TorchHead` computes
sigmoid(w·x + b) for a whole batch where the pooled vectors already are. The weights travel
in a safetensors file (two arrays, no code), so loading a head can never run code, as
unpickling a scikit-learn estimator can.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load, save
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from contract.cli import UserError

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


@dataclass(frozen=True)
class HeadWeights:
    """w and b of P(positive) = sigmoid(w·x + b): all that `head.safetensors` holds."""

    weight: np.ndarray  # (hidden,), float64 as scikit-learn fitted it
    bias: float

    @classmethod
    def of(cls, estimator: LogisticRegression) -> HeadWeights:
        if list(estimator.classes_) != [0, 1]:
            raise ValueError(f"head classes must be [0, 1], got {list(estimator.classes_)}")
        return cls(np.asarray(estimator.coef_[0], dtype=np.float64), float(estimator.intercept_[0]))

    def to_bytes(self) -> bytes:
        """The safetensors file."""
        return save({"weight": self.weight, "bias": np.asarray([self.bias], dtype=np.float64)},
                    metadata={"format": "logistic-head", "score": "sigmoid(weight . x + bias) = P(positive)"})

    @classmethod
    def from_bytes(cls, data: bytes, path: str) -> HeadWeights:
        """Parse and validate the two arrays (the bytes whose sha256 was checked); anything else is refused."""
        try:
            arrays = load(data)
        except (SafetensorError, ValueError) as err:
            raise UserError(f"refusing {path}: not a readable safetensors file ({err})") from None
        weight, bias = arrays.get("weight"), arrays.get("bias")
        if set(arrays) != {"weight", "bias"} or weight.ndim != 1 or bias.shape != (1,) \
                or not np.isfinite(weight).all() or not np.isfinite(bias).all():
            raise UserError(f"refusing {path}: expected finite arrays weight (hidden,) and bias (1,), "
                            f"found {sorted(arrays)}")
        return cls(weight.astype(np.float64), float(bias[0]))

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[0])


class TorchHead:
    """P(positive) = sigmoid(w·x + b), computed in float32 on the encoder's device."""

    def __init__(self, weights: HeadWeights, device: torch.device) -> None:
        self.weight = torch.as_tensor(weights.weight, dtype=torch.float32, device=device)
        self.bias = weights.bias
        self.hidden_size = weights.hidden_size

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(pooled.float() @ self.weight + self.bias)
