import pytest
import torch

from fedmodel.errors import ConfigError
from fedmodel.models import MODELS, build_model

FEATURES = {"cnn": 784}  # models that do not take a 9-column table


@pytest.mark.parametrize("num_classes, outputs", [(2, 1), (3, 3), (10, 10)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_opacus_compatible(
    name: str, num_classes: int, outputs: int
) -> None:
    from opacus.validators import ModuleValidator

    features = FEATURES.get(name, 9)
    model = build_model(name, num_features=features, num_classes=num_classes)
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.zeros(5, features)).shape == (5, outputs)


def test_cnn_refuses_tables() -> None:
    with pytest.raises(ConfigError, match="needs 28x28 images"):
        build_model("cnn", 9)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="logreg, mlp"):
        build_model("resnet", 9)
