"""Every channel test model builds, passes the full checker and runs in onnxruntime."""

import onnx
import pytest

from channel_models import BUILDERS, feeds_for, run


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builders_are_valid(name):
    model = BUILDERS[name]()
    if name != "unknown_op":
        onnx.checker.check_model(model, full_check=True)
        run(model, feeds_for(model))
