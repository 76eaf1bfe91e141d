"""Synthetic federations: per-site determinism, base rates, heavy tails, shift, bursts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedmodel.datasets.synthetic import (
    EHR_BASE_RATE,
    EHR_FEATURES,
    EHR_SIZES,
    FRAUD_RATE_RANGE,
    FRAUD_SPLIT_DAY,
    MERCHANT_CATEGORIES,
    EhrGenerator,
    FraudGenerator,
)


@pytest.mark.parametrize("generator", [EhrGenerator, FraudGenerator])
def test_a_site_depends_only_on_its_seed_and_index(generator: type) -> None:
    fresh = generator(3).train_site(7)
    after_others = generator(3)
    for site in range(7):
        after_others.train_site(site)
    again = after_others.train_site(7)
    np.testing.assert_array_equal(fresh.features, again.features)
    np.testing.assert_array_equal(fresh.labels, again.labels)
    other_site, other_seed = generator(3).train_site(8), generator(4).train_site(7)
    assert not np.array_equal(fresh.labels[:40], other_site.labels[:40]) or len(fresh) != len(
        other_site
    )
    assert len(fresh) != len(other_seed) or not np.array_equal(fresh.features, other_seed.features)


def test_ehr_base_rate_is_the_requested_ten_percent() -> None:
    generator = EhrGenerator(0)
    labels = np.concatenate([generator.train_site(i).labels for i in range(400)])
    assert len(labels) > 50_000
    assert abs(labels.mean() - EHR_BASE_RATE) < 0.01


def test_hospital_sizes_are_heavy_tailed_with_a_floor() -> None:
    sizes = np.array([EhrGenerator(0).site_size(i) for i in range(1000)])
    assert sizes.min() >= EHR_SIZES.floor
    assert sizes.max() > 8 * np.median(sizes)
    assert sizes.mean() > 1.3 * np.median(sizes)  # right-skewed
    top_decile = np.sort(sizes)[-100:].sum() / sizes.sum()
    assert top_decile > 0.3  # the largest 10% of hospitals hold over 30% of patients


def test_hospitals_differ_in_case_mix_label_rate_and_missingness() -> None:
    generator = EhrGenerator(0)
    sites = [generator.train_site(i) for i in range(300)]
    large = [s for s in sites if len(s) >= 300]
    age = EHR_FEATURES.index("age")
    site_mean_age = np.array([s.features[:, age].mean() for s in large])
    assert 0.2 < site_mean_age.std() < 0.5  # case-mix shift (sd 0.35) plus sampling noise
    rates = np.array([s.labels.mean() for s in large])
    binomial_sd = np.sqrt(EHR_BASE_RATE * (1 - EHR_BASE_RATE) / np.mean([len(s) for s in large]))
    assert rates.std() > 2 * binomial_sd  # label-rate skew beyond chance
    creatinine = EHR_FEATURES.index("creatinine")
    missing = np.array([np.mean(s.features[:, creatinine] == 0.0) for s in sites])
    assert missing.min() == 0.0 and missing.max() > 0.2


def test_achievable_auroc_is_known_and_a_central_model_reaches_but_does_not_beat_it() -> None:
    generator = EhrGenerator(0)
    assert 0.88 < generator.achievable_auroc < 0.95
    train = [generator.train_site(i) for i in range(200)]
    features = np.concatenate([s.features for s in train])
    labels = np.concatenate([s.labels for s in train])
    model = LogisticRegression(max_iter=1000).fit(features, labels)
    test = generator.test_set()
    central = roc_auc_score(test.labels, model.predict_proba(test.features)[:, 1])
    assert generator.achievable_auroc - 0.01 < central < generator.achievable_auroc + 0.005


def test_fraud_rate_per_bank_is_between_point_one_and_half_a_percent() -> None:
    generator = FraudGenerator(0)
    banks = [generator.bank(i) for i in range(400)]
    labels = np.concatenate([bank[1] for bank in banks])
    assert len(labels) > 100_000
    assert FRAUD_RATE_RANGE[0] < labels.mean() < FRAUD_RATE_RANGE[1]
    assert abs(labels.mean() - np.mean(FRAUD_RATE_RANGE)) < 0.001


def test_fraud_comes_in_bursts_drifts_online_and_is_split_by_time() -> None:
    generator = FraudGenerator(0)
    close, total, early_online, late_online = 0, 0, [], []
    online = len(generator.feature_names) - 2  # channel=online column
    assert generator.feature_names[online] == "channel=online"
    for site in range(300):
        features, labels, days = generator.bank(site)
        assert np.all(np.diff(days) >= 0)  # time order
        fraud_days = days[labels == 1]
        gaps = np.diff(fraud_days)
        close += int(np.sum(gaps < 0.5)) * 2
        total += len(fraud_days)
        fraud_online = features[labels == 1, online]
        early_online += list(fraud_online[fraud_days < 40])
        late_online += list(fraud_online[fraud_days > 80])
        train = generator.train_site(site)
        assert len(train) == int(np.sum(days < FRAUD_SPLIT_DAY))
    assert close / total > 0.6  # most frauds have another within 12 hours: episodes
    assert np.mean(late_online) > np.mean(early_online) + 0.3  # drift towards card-not-present
    assert len(MERCHANT_CATEGORIES) + 9 == len(generator.feature_names)


def test_fraud_test_set_is_the_future_of_the_federations_banks() -> None:
    generator = FraudGenerator(0)
    test = generator.test_set(300)
    late_rows = sum(int(np.sum(generator.bank(i)[2] >= FRAUD_SPLIT_DAY)) for i in range(300))
    assert len(test) == late_rows
    assert test.labels.sum() > 0 and test.labels.mean() < 0.01
