"""The own AutoAttack engine on a GPU: run by ``eval/benchmarks/gpu_check.sh`` on a CUDA machine.

Skipped (with the reason) where torch sees no CUDA device, which is every CI run of this project;
the same properties are checked on the CPU in test_engine_autoattack.py.
"""

from __future__ import annotations

import pytest
import torch

from robustkit.attacks import create_attack
from robustkit.eval import evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHORT = {"n_iter": 10, "fab_iter": 10, "n_queries": 100, "n_target_classes": 3}


@pytest.mark.parametrize("name", ["autoattack-rk", "autoattack-fast"])
def test_cuda_flags_do_not_depend_on_the_batch_and_match_the_cpu(name, tiny_model, synthetic_test):
    x, y = synthetic_test[0][:48], synthetic_test[1][:48]
    attack = create_attack(name, eps=4 / 255, **({**SHORT} if name == "autoattack-rk" else {"n_iter": 10}))
    cuda = {bs: evaluate(tiny_model, attack, x, y, batch_size=bs, seed=1, device="cuda", progress=False)
            for bs in (1, 7, 64)}
    assert len({r.robust_flags for r in cuda.values()}) == 1
    cpu = evaluate(tiny_model, attack, x, y, batch_size=64, seed=1, device="cpu", progress=False)
    # Another device rounds differently: a borderline example may flip, no more than that.
    differ = sum(a != b for a, b in zip(cpu.robust_flags, cuda[64].robust_flags, strict=True))
    assert differ <= 1, (cpu.robust_flags, cuda[64].robust_flags)
    assert cuda[64].provenance["device"].startswith("cuda")


def test_cuda_engine_leaves_no_parameter_gradients(tiny_model, synthetic_test):
    model = tiny_model.to("cuda")
    try:
        x, y = synthetic_test[0][:16].cuda(), synthetic_test[1][:16].cuda()
        attack = create_attack("autoattack-rk", eps=4 / 255, **SHORT)
        for stage in attack.stages():
            assert attack.perturb(model, x, y, stage=stage, seed=0).device.type == "cuda"
        assert all(p.grad is None for p in model.parameters())
    finally:
        tiny_model.to("cpu")
