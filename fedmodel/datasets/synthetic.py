"""Synthetic federations of 1,000+ sites, each site generated on demand from its own seed.

Nothing is precomputed or stored: site `i` of a federation with seed `s` is a pure
function of `(s, i)` (a numpy SeedSequence over both), so a simulated client builds only
its own rows and any process rebuilds the same ones. Site sizes are heavy-tailed
(lognormal, with a floor and a cap), as hospital and bank sizes are. The generators follow
the recipe in shared/notes/datasets.md section 10.

- `EhrGenerator` (synthetic-ehr): hospitals with case-mix shift (site offsets on the
  covariates), label-rate skew (site offsets on the intercept), per-site missingness of
  lab values, and a KNOWN logistic ground-truth risk model, so the best AUROC a single
  global model can reach on the test set is known (`achievable_auroc`).
- `FraudGenerator` (synthetic-fraud): card transactions per bank (amount, time, merchant
  category, channel, customer, velocity features), fraud at 0.1-0.5% per bank arriving in
  bursty episodes on compromised cards, with drift over time; split by time (the last
  20% of the period is the test set), never at random, because random splits leak
  a burst into both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import ClassVar, Protocol

import numpy as np

from fedmodel.data import TabularData
from fedmodel.evaluation import auroc


class SiteGenerator(Protocol):
    """What the scenario registry needs from a generated federation."""

    @property
    def feature_names(self) -> tuple[str, ...]: ...

    def site_size(self, site: int) -> int: ...

    def train_site(self, site: int) -> TabularData: ...

    def test_set(self, num_sites: int) -> TabularData: ...


@dataclass(frozen=True)
class SiteSizes:
    """Heavy-tailed site sizes: lognormal(log(median), sigma), clipped to [floor, cap]."""

    median: float
    sigma: float
    floor: int
    cap: int

    def draw(self, rng: np.random.Generator) -> int:
        size = rng.lognormal(np.log(self.median), self.sigma)
        return int(np.clip(round(size), self.floor, self.cap))


def site_rng(seed: int, stream: int, site: int) -> np.random.Generator:
    """The random stream of one site: independent of every other site and of the order."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, site]))


TRAIN_STREAM, TEST_STREAM, CALIBRATION_STREAM = 1, 2, 3


@dataclass(frozen=True)
class SeededSites:
    """A generated federation: site i's size is a pure function of (seed, i)."""

    seed: int
    sizes: ClassVar[SiteSizes]

    def site_size(self, site: int) -> int:
        return self.sizes.draw(site_rng(self.seed, TRAIN_STREAM, site))


# --- synthetic-ehr ---------------------------------------------------------------------

EHR_FEATURES = (
    "age",
    "male",
    "bmi",
    "systolic_bp",
    "creatinine",
    "hba1c",
    "heart_rate",
    "smoker",
    "prior_admissions",
    "comorbidity_index",
)
EHR_BINARY = ("male", "smoker")
EHR_LABS = ("bmi", "creatinine", "hba1c")  # the columns hospitals fail to record
# Ground-truth log-odds per unit of each (standardised) feature: the known risk model.
EHR_WEIGHTS = np.array([0.9, 0.3, 0.25, 0.35, 0.6, 0.45, 0.3, 0.5, 0.55, 0.7])
EHR_BASE_RATE = 0.10
EHR_CORRELATION = 0.2  # equicorrelated latent covariates (sicker patients are sicker overall)
EHR_CASE_MIX_SHIFT = 0.35  # sd of a hospital's offset on each latent covariate
EHR_LABEL_SKEW = 0.4  # sd of a hospital's offset on the log-odds
EHR_SIZES = SiteSizes(median=150, sigma=1.0, floor=40, cap=5_000)
EHR_TEST_SITES, EHR_TEST_ROWS_PER_SITE = 100, 100


@dataclass(frozen=True)
class EhrGenerator(SeededSites):
    """Hospitals whose patients' outcome follows a known logistic model."""

    sizes = EHR_SIZES
    feature_names: tuple[str, ...] = EHR_FEATURES

    def train_site(self, site: int) -> TabularData:
        features, labels, _ = self._hospital(site_rng(self.seed, TRAIN_STREAM, site), None)
        return TabularData(features, labels, self.feature_names)

    def test_set(self, num_sites: int = 0) -> TabularData:
        """Held-out hospitals (not in the federation): generalisation to new sites."""
        return self._test[0]

    @cached_property
    def achievable_auroc(self) -> float:
        """AUROC of the ground-truth risk score (no missing values, no site offset) on the
        test set: what the best single global model could reach."""
        test, shared_logits = self._test
        return auroc(test.labels, shared_logits)

    @cached_property
    def _test(self) -> tuple[TabularData, np.ndarray]:
        parts = [
            self._hospital(site_rng(self.seed, TEST_STREAM, j), EHR_TEST_ROWS_PER_SITE)
            for j in range(EHR_TEST_SITES)
        ]
        features = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        shared = np.concatenate([p[2] for p in parts])
        return TabularData(features, labels, self.feature_names), shared

    def _hospital(
        self, rng: np.random.Generator, rows: int | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = EHR_SIZES.draw(rng) if rows is None else rows
        case_mix = rng.normal(0.0, EHR_CASE_MIX_SHIFT, len(EHR_FEATURES))
        label_offset = rng.normal(0.0, EHR_LABEL_SKEW)
        missing_rates = rng.beta(1.0, 4.0, len(EHR_LABS)) * (rng.random(len(EHR_LABS)) < 0.6)
        features = _ehr_covariates(rng, size, case_mix)
        shared_logits = _ehr_intercept() + features @ EHR_WEIGHTS
        probability = 1.0 / (1.0 + np.exp(-(shared_logits + label_offset)))
        labels = (rng.random(size) < probability).astype(np.float32)
        for column, rate in zip(EHR_LABS, missing_rates, strict=True):
            missing = rng.random(size) < rate
            features[missing, EHR_FEATURES.index(column)] = 0.0  # mean imputation
        return features.astype(np.float32), labels, shared_logits


def _ehr_covariates(rng: np.random.Generator, size: int, case_mix: np.ndarray) -> np.ndarray:
    """Standard-normal latents, equicorrelated, shifted by the hospital's case mix; the
    binary columns are thresholded latents centred to mean zero at population level."""
    common = rng.standard_normal((size, 1))
    own = rng.standard_normal((size, len(EHR_FEATURES)))
    latent = np.sqrt(EHR_CORRELATION) * common + np.sqrt(1 - EHR_CORRELATION) * own + case_mix
    for column in EHR_BINARY:
        index = EHR_FEATURES.index(column)
        latent[:, index] = (latent[:, index] > 0).astype(float) * 2.0 - 1.0
    return latent


@lru_cache(maxsize=1)
def _ehr_intercept() -> float:
    """Intercept giving EHR_BASE_RATE over the population of hospitals (solved once, on a
    fixed calibration sample, by bisection)."""
    rng = site_rng(0, CALIBRATION_STREAM, 0)
    logits, offsets = [], []
    for _ in range(200):
        case_mix = rng.normal(0.0, EHR_CASE_MIX_SHIFT, len(EHR_FEATURES))
        offsets.append(np.full(200, rng.normal(0.0, EHR_LABEL_SKEW)))
        logits.append(_ehr_covariates(rng, 200, case_mix) @ EHR_WEIGHTS)
    score = np.concatenate(logits) + np.concatenate(offsets)
    low, high = -10.0, 10.0
    for _ in range(50):
        middle = (low + high) / 2
        rate = np.mean(1.0 / (1.0 + np.exp(-(score + middle))))
        low, high = (middle, high) if rate < EHR_BASE_RATE else (low, middle)
    return (low + high) / 2


# --- synthetic-fraud -------------------------------------------------------------------

FRAUD_DAYS = 120.0
FRAUD_SPLIT_DAY = 96.0  # train on days [0, 96), test on [96, 120): split by time
FRAUD_SIZES = SiteSizes(median=300, sigma=1.0, floor=80, cap=20_000)
FRAUD_RATE_RANGE = (0.001, 0.005)  # each bank's share of fraudulent transactions
FRAUD_MIN_TEST_BANKS = 200
FRAUD_MEAN_BURST = 4.0  # transactions per fraud episode (bursty)
TRANSACTIONS_PER_CUSTOMER = 25
MERCHANT_CATEGORIES = (
    "grocery",
    "fuel",
    "restaurant",
    "travel",
    "electronics",
    "digital_goods",
    "jewellery",
    "cash",
)
LEGIT_CATEGORY_SHARE = np.array([0.30, 0.15, 0.22, 0.06, 0.07, 0.12, 0.02, 0.06])
CATEGORY_LOG_AMOUNT = np.array([3.6, 3.9, 3.3, 5.5, 5.2, 2.8, 5.8, 4.6])
CHANNELS = ("card_present", "online", "atm")
FRAUD_FEATURES = (
    "log_amount",
    "amount_vs_customer",
    "hour_sin",
    "hour_cos",
    "log_hours_since_last",
    "transactions_24h",
    *(f"category={c}" for c in MERCHANT_CATEGORIES),
    *(f"channel={c}" for c in CHANNELS),
)


@dataclass(frozen=True)
class FraudGenerator(SeededSites):
    """Banks' card transactions with bursty, drifting fraud; train/test split by time."""

    sizes = FRAUD_SIZES
    feature_names: tuple[str, ...] = FRAUD_FEATURES

    def train_site(self, site: int) -> TabularData:
        features, labels, days = self.bank(site)
        early = days < FRAUD_SPLIT_DAY
        return TabularData(features[early], labels[early], self.feature_names)

    def test_set(self, num_sites: int) -> TabularData:
        """The last 20% of the period at every bank of the federation, topped up with more
        banks of the same population to FRAUD_MIN_TEST_BANKS, so that a small federation's
        test set still holds ~100 frauds."""
        parts = [self.bank(site) for site in range(max(num_sites, FRAUD_MIN_TEST_BANKS))]
        late = [p[2] >= FRAUD_SPLIT_DAY for p in parts]
        features = np.concatenate([p[0][m] for p, m in zip(parts, late, strict=True)])
        labels = np.concatenate([p[1][m] for p, m in zip(parts, late, strict=True)])
        return TabularData(features, labels, self.feature_names)

    def bank(self, site: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features, labels, day) of every transaction of one bank, in time order."""
        rng = site_rng(self.seed, TRAIN_STREAM, site)
        size = FRAUD_SIZES.draw(rng)
        customers = max(size // TRANSACTIONS_PER_CUSTOMER, 3)
        fraud_rate = rng.uniform(*FRAUD_RATE_RANGE)
        legit = _legit_transactions(rng, size, customers)
        fraud = _fraud_episodes(rng, size * fraud_rate, customers)
        columns = {key: np.concatenate([legit[key], fraud[key]]) for key in legit}
        order = np.lexsort((columns["day"], columns["customer"]))
        columns = {key: value[order] for key, value in columns.items()}
        features = _transaction_features(columns)
        by_time = np.argsort(columns["day"], kind="stable")
        return features[by_time], columns["fraud"][by_time], columns["day"][by_time]


def _legit_transactions(
    rng: np.random.Generator, size: int, customers: int
) -> dict[str, np.ndarray]:
    customer = rng.integers(0, customers, size)
    spend_level = rng.normal(0.0, 0.5, customers)[customer]
    online_taste = rng.beta(2.0, 5.0, customers)[customer]
    day = rng.uniform(0.0, FRAUD_DAYS, size)
    category = rng.choice(len(MERCHANT_CATEGORIES), size, p=LEGIT_CATEGORY_SHARE)
    inflation = 0.1 * day / FRAUD_DAYS  # drift: prices and online share grow over time
    log_amount = CATEGORY_LOG_AMOUNT[category] + spend_level + inflation + rng.normal(0, 0.6, size)
    online = rng.random(size) < online_taste + 0.15 * day / FRAUD_DAYS
    atm = (category == MERCHANT_CATEGORIES.index("cash")) & ~online
    channel = np.where(online, 1, np.where(atm, 2, 0))
    hour = np.clip(rng.normal(14.0, 4.0, size), 0.0, 23.99)
    return {
        "customer": customer,
        "day": np.floor(day) + hour / 24.0,
        "category": category,
        "channel": channel,
        "log_amount": log_amount,
        "fraud": np.zeros(size, dtype=np.float32),
    }


def _fraud_episodes(
    rng: np.random.Generator, expected_frauds: float, customers: int
) -> dict[str, np.ndarray]:
    """Bursts of fraud on compromised cards. Early in the period fraudsters use skimmed
    cards in shops (electronics, jewellery, cash); later they move online (digital goods,
    travel): the drift a model trained on the past must cope with."""
    episodes = rng.poisson(expected_frauds / FRAUD_MEAN_BURST)
    lengths = 1 + rng.poisson(FRAUD_MEAN_BURST - 1, episodes)
    total = int(lengths.sum())
    episode = np.repeat(np.arange(episodes), lengths)
    start = rng.uniform(0.0, FRAUD_DAYS - 1.0, episodes)[episode]
    day = start + rng.exponential(0.08, total)  # minutes to hours apart
    late = rng.random(total) < start / FRAUD_DAYS
    shop_categories = [MERCHANT_CATEGORIES.index(c) for c in ("electronics", "jewellery", "cash")]
    web_categories = [MERCHANT_CATEGORIES.index(c) for c in ("digital_goods", "travel")]
    category = np.where(late, rng.choice(web_categories, total), rng.choice(shop_categories, total))
    channel = np.where(late, 1, np.where(category == MERCHANT_CATEGORIES.index("cash"), 2, 0))
    return {
        "customer": rng.integers(0, customers, episodes)[episode],
        "day": day,
        "category": category,
        "channel": channel,
        "log_amount": CATEGORY_LOG_AMOUNT[category] + rng.normal(0.5, 0.7, total),
        "fraud": np.ones(total, dtype=np.float32),
    }


def _transaction_features(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Per-transaction features, including velocity features that look only backwards
    in each customer's history (rows are sorted by customer, then time)."""
    customer, day, log_amount = columns["customer"], columns["day"], columns["log_amount"]
    size = len(day)
    first = np.r_[True, customer[1:] != customer[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(size), 0))
    hours_since = np.where(first, 24.0 * 30, np.diff(day, prepend=0.0) * 24.0)
    key = customer * (FRAUD_DAYS * 10) + day  # sorted; one customer never spans keys
    transactions_24h = np.arange(size) - np.searchsorted(key, key - 1.0, side="left")
    running = np.cumsum(log_amount)
    previous_sum = running - log_amount - np.where(group_start > 0, running[group_start - 1], 0)
    previous_count = np.arange(size) - group_start
    customer_mean = np.where(previous_count > 0, previous_sum / np.maximum(previous_count, 1), 4.0)
    hour = (day % 1.0) * 24.0
    blocks = [
        (log_amount - 4.0)[:, None],
        (log_amount - customer_mean)[:, None],
        np.sin(2 * np.pi * hour / 24)[:, None],
        np.cos(2 * np.pi * hour / 24)[:, None],
        (np.log1p(hours_since) - 3.0)[:, None],
        np.log1p(transactions_24h)[:, None],
        np.eye(len(MERCHANT_CATEGORIES))[columns["category"]],
        np.eye(len(CHANNELS))[columns["channel"]],
    ]
    return np.concatenate(blocks, axis=1).astype(np.float32)
