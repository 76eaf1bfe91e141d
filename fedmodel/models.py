"""Model registry: one name per architecture, each compatible with Opacus DP-SGD.

Every model maps a float feature tensor to one logit per row (binary tasks) and uses
only layers Opacus has per-sample gradient samplers for (Linear, ReLU; no BatchNorm).
"""

from collections.abc import Callable

from torch import nn

from fedmodel.errors import ConfigError


def tabular_mlp(num_features: int) -> nn.Module:
    """Two hidden layers: enough for tabular risk scores, small enough for DP noise."""
    return nn.Sequential(
        nn.Linear(num_features, 32),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 1),
    )


def logistic_regression(num_features: int) -> nn.Module:
    """The classical clinical baseline: a single linear layer on standardised features."""
    return nn.Sequential(nn.Linear(num_features, 1))


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "mlp": tabular_mlp,
    "logreg": logistic_regression,
}


def build_model(name: str, num_features: int) -> nn.Module:
    """Instantiate a registered model for `num_features` inputs."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model '{name}'; choose one of: {', '.join(sorted(MODELS))}"
        ) from None
    return factory(num_features)
