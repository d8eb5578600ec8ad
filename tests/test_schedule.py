"""The learning-rate schedule never silently spans one step."""

from __future__ import annotations

import pytest

from cirlab.errors import CirlabError
from cirlab.train.clip_task import CLIPTask
from cirlab.train.config import BackboneConfig, SchedulerConfig


def test_a_decaying_schedule_of_unknown_length_is_an_error_naming_the_fix():
    # before: `total = 1` on any error, so the cosine ended after the first step
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), scheduler=SchedulerConfig("cosine", warmup_steps=5))
    with pytest.raises(CirlabError, match="needs its length") as err:
        task.configure_optimizers()
    assert "scheduler.total_steps" in str(err.value) and "trainer.max_steps" in str(err.value)


def test_a_given_length_or_a_constant_schedule_needs_no_estimate():
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"),
                    scheduler=SchedulerConfig("cosine", warmup_steps=2, total_steps=12))
    sched = task.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    base = task.optimizer_cfg.lr
    # warm-up 1/2, 2/2, then cosine from the top down to 0 at step 12 (by hand: 0.5*(1+cos(pi*k/10)))
    assert lrs[0] == pytest.approx(base / 2) and lrs[1] == pytest.approx(base)
    assert lrs[7] == pytest.approx(base * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 5 / 10)))
    const = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), scheduler=SchedulerConfig("constant"))
    assert const.configure_optimizers()["lr_scheduler"]["scheduler"].get_last_lr()[0] == pytest.approx(const.optimizer_cfg.lr)


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_loop_does():
    """optimizer.fused: null fuses Adam/AdamW when every parameter is on the CPU (the per-tensor loop is
    7x slower there); the fused step is the same update as the loop's, within float rounding."""
    import torch

    from cirlab.train.config import OptimizerConfig
    from cirlab.train.optim import build_optimizer

    def run(fused):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
        cfg = OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.1, no_decay_on_bias_and_norm=True, fused=fused)
        opt = build_optimizer(net.named_parameters(), cfg)
        start = torch.cat([p.detach().flatten() for p in net.parameters()])
        for _ in range(5):
            opt.zero_grad()
            net(torch.randn(32, 8)).pow(2).mean().backward()
            opt.step()
        end = torch.cat([p.detach().flatten() for p in net.parameters()])
        assert (end - start).abs().max() > 1e-3  # the parameters moved
        return opt, end

    auto, a = run(None)
    loop, b = run(False)
    assert auto.defaults["fused"] is True and not loop.defaults.get("fused")
    assert auto.param_groups[1]["weight_decay"] == 0.0  # the decay split survives
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
