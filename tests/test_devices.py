"""The one device check: usable devices pass, the rest is one InputError naming --device."""

from __future__ import annotations

import pytest
import torch

from dora_analysis.devices import parse_device, resolve_device
from dora_analysis.errors import InputError


def test_cpu_passes_and_comes_back_as_a_torch_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu"), ("cpu", "cuda")) == torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "types", "message"),
    [
        ("no-such-device", None, "not a torch device"),
        (f"cuda:{torch.cuda.device_count()}", None, "CUDA GPU"),  # one past the last GPU (cuda:0 without)
        ("meta", ("cpu", "cuda"), "supports cpu, cuda"),
    ],
)
def test_unusable_devices_are_one_line_naming_the_option(device, types, message):
    with pytest.raises(InputError, match=message) as error:
        resolve_device(device, types, "training")
    assert str(error.value).startswith("--device") and "\n" not in str(error.value)


def test_parse_device_checks_the_name_only():
    count = torch.cuda.device_count()
    assert parse_device(f"cuda:{count}") == torch.device("cuda", count)  # a GPU this machine lacks
    with pytest.raises(InputError, match="not a torch device") as error:
        parse_device("no-such-device")
    assert str(error.value).startswith("--device")
