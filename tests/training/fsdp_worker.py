"""Run under ``torchrun --nproc-per-node 2`` (gloo, CPU) by ``test_distributed.py``.

1. A DoRA model sharded with FSDP2 (``fully_shard`` on every DoRA Linear, then the root) against the
   same model unsharded, every rank on its half of one global batch: outputs, gradients (gathered)
   and the parameters after one SGD step; the magnitude gets a gradient and moves.
2. ``train --fsdp`` with the script's arguments: its checkpoints are compared by the test.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from dora_analysis.adapters.dora import DoRALinear
from dora_analysis.adapters.inject import adapter_modules, inject_adapters
from dora_analysis.commands.main import main


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def check_layers() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4))
    inject_adapters(model, "dora", targets=r"\d", r=2, alpha=4)
    with torch.no_grad():
        for module in adapter_modules(model).values():
            module.lora_B.normal_(std=0.3)
    reference = copy.deepcopy(model)
    for module in adapter_modules(model).values():
        fully_shard(module)
    fully_shard(model)
    assert any(hasattr(p, "full_tensor") for p in model.parameters())  # DTensor parameters

    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))  # the global batch
    mine = x[rank * 8 // world : (rank + 1) * 8 // world]
    out = model(mine)
    torch.testing.assert_close(out, reference(mine), atol=1e-6, rtol=1e-6)
    out.square().mean().backward()  # FSDP averages the ranks' gradients: the global-batch mean
    reference(x).square().mean().backward()
    named_ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(full(p.grad), named_ref[name].grad, atol=1e-6, rtol=1e-5, msg=name)
    start = {n: full(p).detach().clone() for n, p in model.named_parameters() if n.endswith("magnitude")}
    for params, net in (([p for p in model.parameters() if p.requires_grad], model), (None, reference)):
        params = params or [p for p in net.parameters() if p.requires_grad]
        torch.optim.SGD(params, lr=0.5).step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(full(p).detach(), named_ref[name].detach(), atol=1e-6, rtol=1e-5, msg=name)
    for name, before in start.items():
        grad = full(dict(model.named_parameters())[name].grad)
        assert grad.abs().sum() > 0 and (full(dict(model.named_parameters())[name]) - before).abs().min() > 0
    assert all(isinstance(m, DoRALinear) for m in adapter_modules(model).values())


if __name__ == "__main__":
    dist.init_process_group("gloo")
    check_layers()
    arguments = sys.argv[1:]
    code = main(["train", *arguments, "--fsdp"])  # ends the process group
    sys.exit(code)
