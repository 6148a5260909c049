"""One opened window → verdict (label, score, top-k) → alerts under the agreed rules.

The evaluation enclave and the daemon's local, insecure, labelled evaluator
(`stages.enclave_client.LocalEnclave`) both run this, so the two cannot drift apart: same input
transform, same soft-max and top-k, same rule engine, same alert fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from enclave_bridge.measured.alerts import build_alert
from enclave_bridge.measured.batcher import WindowBatcher
from enclave_bridge.measured.model_inputs import apply_input_transform
from enclave_bridge.shared.rules import AlertRules, RuleEngine
from enclave_bridge.shared.windows import OpenedWindow


class LogitsEvaluator(Protocol):
    """What computes logits: `SecureEvaluator` in any mode, or the in-enclave torch fallback."""

    def evaluate(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.floating[Any]]: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """The model's answer to one window (never leaves the enclave unencrypted)."""

    label: str
    score: float
    topk: list[list[str | float]]  # [[label, probability], ...], best first
    track_id: int


class TorchEvaluator:
    """The float model in torch, nothing delegated: the local evaluator's, and the enclave's
    fallback for mode "enclave" when secure evaluation cannot be imported."""

    def __init__(self, model: Any) -> None:
        import torch

        self._torch = torch
        self._model = model.eval()

    def evaluate(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        with self._torch.no_grad():
            logits: npt.NDArray[np.float64] = (
                self._model(self._torch.from_numpy(np.ascontiguousarray(x))).double().numpy()
            )
        return logits

    def close(self) -> None:
        return None


def softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    z = logits - logits.max()
    e = np.exp(z)
    probs: npt.NDArray[np.float64] = e / e.sum()
    return probs


class WindowEvaluator:
    """A model's logits evaluator plus what turns its logits into alerts."""

    def __init__(
        self,
        evaluator: LogitsEvaluator,
        labels: Sequence[str],
        input_transform: str = "reference",
        topk: int = 5,
        batch_max: int = 1,
    ) -> None:
        self.evaluator = evaluator
        # windows of several cameras that queue up are evaluated in one pass (enclave service)
        self.batcher = WindowBatcher(evaluator.evaluate, batch_max) if batch_max > 1 else None
        self.labels = list(labels)
        self.input_transform = input_transform
        self.topk = max(1, min(int(topk), len(self.labels)))
        self.engine = RuleEngine()

    def classify(self, w: OpenedWindow) -> Verdict:
        """Evaluate one window (errors from the evaluator propagate: the caller counts them)."""
        x = apply_input_transform(w.data[None], self.input_transform)
        if self.batcher is not None:
            return self.verdict(w, self.batcher.evaluate_one(x[0]))
        logits = np.asarray(self.evaluator.evaluate(x), dtype=np.float64)[0]
        return self.verdict(w, logits)

    def verdict(self, w: OpenedWindow, logits: npt.NDArray[np.floating[Any]]) -> Verdict:
        probs = softmax(np.asarray(logits, dtype=np.float64))
        order = np.argsort(-probs, kind="stable")[: self.topk]
        topk: list[list[str | float]] = [[self.labels[int(i)], float(probs[int(i)])] for i in order]
        track_id = int(w.track_ids[0]) if w.track_ids else -1
        return Verdict(str(topk[0][0]), float(topk[0][1]), topk, track_id)

    def alerts(
        self,
        w: OpenedWindow,
        v: Verdict,
        rules: AlertRules | None,
        next_seq: Callable[[str], int],
        recipients: Sequence[Any],
        sign: Callable[[bytes], bytes],
        kid: str,
    ) -> list[bytes]:
        """The alert for this window if the rules fire (0 or 1); `next_seq` numbers it."""
        if rules is None or not self.engine.decide(w.device, rules, v.track_id, v.label, v.score, w.t1):
            return []
        fields = {
            "window_seq": w.seq,
            "t0": w.t0,
            "t1": w.t1,
            "track_id": v.track_id,
            "label": v.label,
            "score": v.score,
            "topk": v.topk,
        }
        return [build_alert(w.device, next_seq(w.device), time.time(), fields, recipients, sign, kid)]

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        close = getattr(self.evaluator, "close", None)
        if close is not None:
            close()


__all__ = ["LogitsEvaluator", "TorchEvaluator", "Verdict", "WindowEvaluator", "softmax"]
