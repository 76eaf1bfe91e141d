import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedmodel.data import TabularData, make_loader
from fedmodel.evaluation import auroc, evaluate
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.training import select_device, train_plain

LOSS = ClassifierLoss(reduction="none")


def test_auroc_matches_sklearn_including_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=500).astype(float)
    scores = np.round(labels + rng.normal(size=500), 1)  # rounding creates ties
    assert auroc(labels, scores) == roc_auc_score(labels, scores)


def test_auroc_is_undefined_for_one_class() -> None:
    assert np.isnan(auroc(np.ones(4), np.arange(4.0)))


def test_plain_training_on_flchain_beats_chance(flchain: tuple[TabularData, TabularData]) -> None:
    torch.manual_seed(0)
    train, test = flchain
    model = build_model("logreg", train.num_features)
    before = evaluate(model, test.dataset(), LOSS, "binary")
    train_plain(model, LOSS, make_loader(train.dataset(), 64, seed=0), 2, 0.1, select_device("cpu"))
    after = evaluate(model, test.dataset(), LOSS, "binary")
    assert after["loss"] < before["loss"]
    assert after["auroc"] > 0.82  # central non-private logistic regression reaches ~0.84


def test_auto_device_is_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
