import pytest
import torch

from fedmodel.errors import ConfigError
from fedmodel.models import MODELS, build_model

SHAPES = {"cnn": (784, 10)}  # (features, outputs) of models that are not 9 -> 1 tabular


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_opacus_compatible(name: str) -> None:
    from opacus.validators import ModuleValidator

    features, outputs = SHAPES.get(name, (9, 1))
    model = build_model(name, num_features=features)
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.zeros(5, features)).shape == (5, outputs)


def test_cnn_refuses_tables() -> None:
    with pytest.raises(ConfigError, match="needs 28x28 images"):
        build_model("cnn", 9)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="logreg, mlp"):
        build_model("resnet", 9)
