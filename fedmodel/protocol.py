"""What the coordinator, the nodes and the harness agree on over the wire, beyond Flower's own.

Both roles import these; neither imports the other. A key typed out on one side and read
on the other is a protocol change waiting to go unnoticed, so each lives here once.
"""

# A node's owner policy forbids what the run asks (client/policy.py). Flower's own
# error codes are 0-8; the budget refusal is 4001 (fedmodel.privacy.budget).
POLICY_REFUSED_CODE = 4002
# The ServerApp's log line for a node's refusal; `fedmodel run` shows these lines
REFUSAL_MARKER = "refused by node"
# Deployed train replies also score the global model they received on the node's
# held-out rows (one message per round instead of two); those metrics carry this prefix
EVALUATION_PREFIX = "eval-"

# Records of a message's RecordDict
ARRAYS_KEY = "arrays"  # ArrayRecord: the global model out, the trained model back
METRICS_KEY = "metrics"  # MetricRecord of a reply
CONFIG_KEY = "config"  # ConfigRecord of an instruction
STATISTICS_RECORD_KEY = "statistics"  # ConfigRecord of a node's answer to the query round

# Keys of the instruction's ConfigRecord
SERVER_ROUND_KEY = "server-round"
QUESTION_KEY = "ask"  # what the query round asks for (STATISTICS_KEY)
STATISTICS_KEY = "feature-statistics"  # FeatureStatistics.to_json(): query answer, then shared
CLIENT_INDEX_KEY = "client-index"  # JSON {node id: client index}, from the coordinator

# Keys of a train reply's MetricRecord (server/reply_schema.py checks them)
NUM_EXAMPLES_KEY = "num-examples"  # what Flower's rules weigh replies by
TRAIN_LOSS_KEY = "train-loss"  # deployed owners may withhold it
EPSILON_KEY = "epsilon"
DELTA_KEY = "delta"
# The DP mechanism's segments (noise multiplier, sample rate, steps), one list each
HISTORY_KEYS = ("history-noise-multiplier", "history-sample-rate", "history-steps")
# The owner's budget as its node releases it (epsilon, delta, what is left): shown to
# the operator, never enforced by the coordinator (the node enforces it)
BUDGET_KEYS = ("budget-epsilon", "budget-delta", "budget-left")

# Node config: the simulation engine sets the partition (Flower's own key, as in
# flwr.common.constant, which is slow to import; also echoed in train metrics);
# `fedmodel client join` sets the others on a deployed node
PARTITION_ID_KEY = "partition-id"
DATA_PATH_KEY = "data-path"
LABEL_KEY = "label"
NODE_NAME_KEY = "node-name"
LEDGER_PATH_KEY = "ledger-path"  # the owner's privacy ledger
# the node's executor sets these from the owner's policy, for each message
NOISE_SHARES_KEY = "distributed-noise-shares"  # what a distributed round is charged at
