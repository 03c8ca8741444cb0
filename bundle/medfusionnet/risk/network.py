"""The tabular-only MedFusionNet as a scikit-learn classifier, so the risk comparison cross-validates it in the same
folds as the two-stage and reference models (``medfusionnet`` in ``scripts/build_risk_model.py``).

Everything it learns comes from the rows given to ``fit``: the `two_stage.RiskPreprocessor` (the two-stage model's
own imputation and missing-value indicators), the standardisation, the early-stopping hold-out and the weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.utils.validation import check_is_fitted

from ..networks.tabular_only import TabularMedFusionNet
from .two_stage import RiskPreprocessor, _as_frame, _check_two_classes

# Standardised values beyond this many standard deviations are clipped: count features (pregnancies, years of
# smoking) have long tails that would otherwise dominate a token's projection.
CLIP = 5.0


class TabularMedFusionNetClassifier(ClassifierMixin, BaseEstimator):
    """Binary classifier (``y`` 0/1) built on `networks.tabular_only.TabularMedFusionNet`.

    ``y`` may also be ``(N, labels)``: its first column is the outcome, the others auxiliary outcomes learned beside
    it, one label query each (the paper's multilabel design: related outcomes share what they learn through the
    relational self-attention); `predict_proba` gives the first. `two_stage.cross_validate` passes the other outcomes
    of the training rows this way in setting (a) when ``auxiliary_outcomes`` is true.

    Preprocessing is `RiskPreprocessor` (median imputation, one indicator per missing pattern); every kept column is
    one field whose token is its standardised value, or the field's learned missing embedding when the column's
    indicator is set; an indicator whose columns were all dropped is a field of its own. Training minimises
    class-weighted binary cross-entropy (positive weight = negatives / positives) with AdamW for ``max_epochs``.
    With ``validation_fraction`` > 0 that share of the training rows (stratified) is held out to keep the epoch with
    the best hold-out AUC, stopping after ``patience`` epochs without improvement; by default every training row
    trains (on the cervical data a 20 % hold-out holds about 9 Biopsy positives, too few to pick an epoch: see
    docs/README.md). Probabilities undo the loss weighting's logit shift.

    Fitted attributes: ``preprocessor_``, ``columns_`` (encoded columns), ``fields_``, ``means_``, ``scales_``,
    ``network_`` (in eval mode), ``best_epoch_``, ``validation_auc_``, ``logit_offset_``, ``prevalence_``,
    ``classes_``.
    """

    def __init__(
        self,
        dim=32,
        num_heads=4,
        depth=0,
        decoder_depth=1,
        dropout_rate=0.1,
        max_epochs=30,
        patience=10,
        batch_size=128,
        lr=3e-3,
        weight_decay=1e-2,
        validation_fraction=0.0,
        auxiliary_outcomes=False,
        random_state=0,
    ):
        self.dim = dim
        self.num_heads = num_heads
        self.depth = depth
        self.decoder_depth = decoder_depth
        self.dropout_rate = dropout_rate
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.auxiliary_outcomes = auxiliary_outcomes
        self.random_state = random_state

    # ---- encoding -------------------------------------------------------------------------------------------
    def _layout(self) -> None:
        """``columns_`` and ``fields_`` from the fitted preprocessor: value columns first, then the indicators."""
        pre = self.preprocessor_
        indicator_of = {c: name for name, cols in pre.indicators_.items() for c in cols}
        self.columns_ = pre.output_columns()
        index = {c: i for i, c in enumerate(self.columns_)}
        self.fields_ = [
            (index[c], index[c] + 1, index[indicator_of[c]] if c in indicator_of else -1) for c in pre.columns_
        ]
        flags = {f for _, _, f in self.fields_ if f >= 0}
        self.fields_ += [(index[n], index[n] + 1, -1) for n in pre.indicators_ if index[n] not in flags]

    def _encode(self, x) -> np.ndarray:
        values = self.preprocessor_.transform(_as_frame(x, self.preprocessor_.feature_names_in_))[self.columns_]
        scaled = (values.to_numpy(np.float64) - self.means_) / self.scales_
        return np.clip(scaled, -CLIP, CLIP).astype(np.float32)

    # ---- fit / predict --------------------------------------------------------------------------------------
    def fit(self, x, y):
        """Fit the preprocessing, the scaling and the network on ``(x, y)`` only; returns self."""
        x = _as_frame(x)
        targets = np.asarray(y).astype(np.int64)
        targets = targets.reshape(len(targets), -1)  # (N, labels): the outcome, then any auxiliary outcomes
        y = targets[:, 0]
        _check_two_classes(pd.Series(y), "the training outcome")
        self.classes_ = np.array([0, 1])
        self.prevalence_ = float(y.mean())
        self.preprocessor_ = RiskPreprocessor().fit(x)
        self._layout()
        self.means_ = np.zeros(len(self.columns_))
        self.scales_ = np.ones(len(self.columns_))
        raw = self.preprocessor_.transform(x)[self.columns_].to_numpy(np.float64)
        indicator = np.array([c in self.preprocessor_.indicators_ for c in self.columns_])
        # indicators stay 0/1: the tokenizer reads them as flags (> 0.5)
        self.means_[~indicator] = raw[:, ~indicator].mean(0)
        std = raw[:, ~indicator].std(0)
        self.scales_[~indicator] = np.where(std > 0, std, 1.0)
        features = self._encode(x)

        torch.manual_seed(self.random_state)
        train, hold = np.arange(len(y)), np.zeros(0, dtype=np.int64)
        if self.validation_fraction and min(np.bincount(y, minlength=2)) >= 4:
            splitter = StratifiedShuffleSplit(1, test_size=self.validation_fraction, random_state=self.random_state)
            train, hold = next(splitter.split(features, y))
        self.network_ = TabularMedFusionNet(
            self.fields_,
            targets.shape[1],
            self.dim,
            self.num_heads,
            self.depth,
            self.decoder_depth,
            self.dropout_rate,
            label_counts=targets[train].sum(0).astype(float).tolist(),
        )
        positives = np.maximum(targets[train].sum(0).astype(np.float64), 1.0)
        pos_weight = (len(train) - positives) / positives
        # the weighted loss shifts every logit by log(pos_weight); predictions subtract it (prior correction), so
        # probabilities stay on the training prevalence's scale that the comparison's threshold assumes
        self.logit_offset_ = float(np.log(pos_weight[0]))
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32))
        optimizer = torch.optim.AdamW(
            self.network_.parameters(), lr=self.lr, weight_decay=self.weight_decay, foreach=True
        )
        x_train, y_train = torch.from_numpy(features[train]), torch.from_numpy(targets[train].astype(np.float32))
        generator = torch.Generator().manual_seed(self.random_state)
        best, best_state, since_best = -np.inf, None, 0
        self.best_epoch_, self.validation_auc_ = self.max_epochs, None
        for epoch in range(1, self.max_epochs + 1):
            self.network_.train()
            for batch in torch.randperm(len(train), generator=generator).split(self.batch_size):
                optimizer.zero_grad()
                loss_fn(self.network_(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
            if not len(hold) or len(np.unique(y[hold])) < 2:
                continue
            auc = roc_auc_score(y[hold], self._logits(features[hold]))
            if auc > best:
                best, best_state, since_best, self.best_epoch_ = (
                    auc,
                    copy.deepcopy(self.network_.state_dict()),
                    0,
                    epoch,
                )
            else:
                since_best += 1
                if since_best >= self.patience:
                    break
        if best_state is not None:
            self.network_.load_state_dict(best_state)
            self.validation_auc_ = float(best)
        self.network_.eval()
        return self

    def _logits(self, features: np.ndarray) -> np.ndarray:
        self.network_.eval()
        with torch.no_grad():
            return self.network_(torch.from_numpy(features))[:, 0].numpy().astype(np.float64)

    def predict_proba(self, x) -> np.ndarray:
        """``(N, 2)`` probabilities; column 1 is the network's sigmoid output."""
        check_is_fitted(self, "network_")
        prob = 1.0 / (1.0 + np.exp(-(self._logits(self._encode(x)) - self.logit_offset_)))
        return np.stack([1.0 - prob, prob], axis=1)

    def predict(self, x) -> np.ndarray:
        """0/1: positive when the probability is at least the training prevalence (the comparison's rule)."""
        return (self.predict_proba(x)[:, 1] >= self.prevalence_).astype(np.int64)
