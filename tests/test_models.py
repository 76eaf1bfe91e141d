import pytest
import torch

from fedmodel.errors import ConfigError
from fedmodel.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_opacus_compatible(name: str) -> None:
    from opacus.validators import ModuleValidator

    model = build_model(name, num_features=9)
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.zeros(5, 9)).shape == (5, 1)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="logreg, mlp"):
        build_model("resnet", 9)
