"""The MLflow pyfunc wrapper of a transferkit model.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(pd.DataFrame({"text": [...]}))``
returns one row per text: ``label`` (the display name), ``score`` (its probability) and one
``p_<label>`` probability column per class. An image model takes a uint8 array of images
[N, H, W, C] (or [N, H, W] greyscale) instead and returns the same columns. A multi-label
model (``task: multi_label``) returns ``labels``, each row's list of labels (possibly empty),
and the same ``p_<label>`` columns, each label's own probability.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


def predictions_frame(
    proba: Any, labels: list[str], decision: Any = None, regression: bool = False
) -> pd.DataFrame:
    """Probabilities [rows, labels] → label, score and p_<label> columns; the label by the
    model's ``Decision`` (its card's; unset: the most probable label). A multi-label model's
    (thresholds per label) gives a ``labels`` column instead: each row's list of labels. A
    regression model's outputs [rows, 1] give one column, ``score``, the predicted number."""
    if regression:
        return pd.DataFrame({"score": np.asarray(proba)[:, 0].astype(float)})
    if decision is not None and decision.thresholds is not None:
        chosen = decision.apply(proba)
        frame = pd.DataFrame({"labels": [[labels[j] for j in np.flatnonzero(r)] for r in chosen]})
        for i, name in enumerate(labels):
            frame[f"p_{name}"] = proba[:, i].astype(float)
        return frame
    best = proba.argmax(axis=1) if decision is None else decision.apply(proba)
    frame = pd.DataFrame(
        {
            "label": [labels[i] for i in best],
            "score": proba[range(len(best)), best].astype(float),
        }
    )
    for i, name in enumerate(labels):
        frame[f"p_{name}"] = proba[:, i].astype(float)
    return frame


class ClassifierModel(PythonModel):
    """Serves a transferkit classifier folder, text or image (the ``model`` artifact)."""

    def load_context(self, context: Any) -> None:
        from transferkit.training.model import load_classifier

        self._tokenizer, self._model, self._card = load_classifier(Path(context.artifacts["model"]))

    # The contract is the signature logged with the model (a 'text' column in, label/score/
    # p_<label> out), enforced by MLflow's pyfunc loader. MLflow's alternative, schemas derived
    # from type hints, cannot express it and only warns on every import; opt out of it.
    _skip_type_hint_validation = True

    def predict(self, context, model_input, params=None):
        from transferkit.training.model import predict_proba

        batch_size = int((params or {}).get("batch_size", 64))
        inputs = self._card.input_modality().served(model_input)
        proba = predict_proba(self._model, self._tokenizer, self._card, inputs, batch_size)
        card = self._card
        return predictions_frame(proba, card.labels, card.decision, card.regression)


# The name models logged before image support point at.
TextClassifierModel = ClassifierModel
