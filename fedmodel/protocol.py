"""What the coordinator and the nodes agree on over the wire, beyond Flower's own.

Both roles import these; neither imports the other.
"""

# A node's owner policy forbids what the run asks (client/policy.py). Flower's own
# error codes are 0-8; the budget refusal is 4001 (fedmodel.privacy.budget).
POLICY_REFUSED_CODE = 4002
# The ServerApp's log line for a node's refusal; `fedmodel run` shows these lines
REFUSAL_MARKER = "refused by node"
# Deployed train replies also score the global model they received on the node's
# held-out rows (one message per round instead of two); those metrics carry this prefix
EVALUATION_PREFIX = "eval-"
