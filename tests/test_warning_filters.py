"""pytest's warning filters (pyproject.toml): a DeprecationWarning from the project's own code fails."""

from __future__ import annotations

import warnings

import pytest


@pytest.mark.parametrize(
    "module", ["src.cli", "src.data.hub", "benchmarks.speed", "tests.helpers.cli", "test_cli"]
)
def test_a_deprecation_warning_attributed_to_the_project_is_an_error(module: str) -> None:
    with pytest.raises(DeprecationWarning, match="old API"):
        warnings.warn_explicit("old API", DeprecationWarning, f"{module}.py", 1, module=module)


def test_a_deprecation_warning_in_the_test_itself_is_an_error() -> None:
    with pytest.raises(DeprecationWarning):
        warnings.warn("old API", DeprecationWarning, stacklevel=1)


@pytest.mark.parametrize("module", ["torch.jit._serialization", "srcery", "lightning.pytorch.cli"])
def test_a_third_party_deprecation_warning_is_not_an_error(module: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("old API", DeprecationWarning, f"{module}.py", 1, module=module)
    assert len(caught) <= 1  # shown (or ignored by name), never raised
