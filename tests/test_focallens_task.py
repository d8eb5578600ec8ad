"""FocalLensTask: the loss against a hand computation with repeated answers, gradients, 2-process DDP."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cirlab.train.config import BackboneConfig, LoraConfig
from cirlab.train.focallens_task import FocalLensTask

INSTRUCTIONS = ["what colour is the circle?", "how many objects are there?", "what shape is the red object?",
                "what colour is the square?", "how many objects are there?", "what size is the circle?"]
ANSWERS = ["red", "two", "circle", "red", "two", "large"]  # rows 0/3 and 1/4 share their answer


def _task(seed=0):
    torch.manual_seed(seed)
    task = FocalLensTask(backbone=BackboneConfig("cirlab-tiny", freeze_text=True))
    with torch.no_grad():  # open the gate so the instruction matters (it is zero at init)
        task.focallens.gate.copy_(torch.randn(task.focallens.gate.shape, generator=torch.Generator().manual_seed(7)) * 0.2)
    return task


def _images(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _hand_loss(c, a, scale, answers):
    """Written out per row: the softmax of row i runs over j = i and every j with another answer."""
    n = len(answers)
    total = 0.0
    for left, right in ((c, a), (a, c)):
        for i in range(n):
            keep = [j for j in range(n) if j == i or answers[j] != answers[i]]
            logits = [scale * float(left[i] @ right[j]) for j in keep]
            m = max(logits)
            lse = m + math.log(sum(math.exp(v - m) for v in logits))
            total += lse - scale * float(left[i] @ right[i])
    return total / (2 * n)


def test_loss_with_repeated_answers_matches_hand_computation():
    task = _task().eval()
    img = _images(6)
    with torch.no_grad():
        got = task.loss(img, INSTRUCTIONS, ANSWERS).item()
        c = F.normalize(task.focallens(task.backbone, img, INSTRUCTIONS), dim=-1)
        a = F.normalize(task.backbone.encode_text(task.backbone.tokenize(ANSWERS)), dim=-1)
        scale = task.backbone.model.logit_scale.exp().clamp(max=100).item()
    assert got == pytest.approx(_hand_loss(c, a, scale, ANSWERS), abs=1e-5)
    # the duplicates matter: treating them as negatives gives another number
    assert got != pytest.approx(_hand_loss(c, a, scale, [f"{x}{i}" for i, x in enumerate(ANSWERS)]), abs=1e-3)


def test_gradients_reach_gate_projection_vision_not_frozen_text():
    task = _task().train()
    task.loss(_images(6), INSTRUCTIONS, ANSWERS).backward()
    fl, bb = task.focallens, task.backbone
    assert fl.gate.grad.abs().sum() > 0 and fl.instruction_proj.weight.grad.abs().sum() > 0
    assert bb.model.visual.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.text_parameters())
    assert all(not p.requires_grad for p in bb.text_parameters())


def test_export_modules_and_lora_variant(tmp_path):
    torch.manual_seed(0)
    task = FocalLensTask(backbone=BackboneConfig("cirlab-tiny", freeze_text=True,
                                                 lora=LoraConfig(r=2, towers=["image"])))
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and "focallens.gate" in trainable
    assert not any(n.startswith("backbone.model.visual.") and "lora_" not in n for n in trainable)
    written = task.export(tmp_path)
    from safetensors.torch import load_file
    keys = set(load_file(str(written["focallens"])))
    assert {"gate", "instruction_proj.weight", "instruction_proj.bias"} <= keys
    assert {k for k in keys if not k.startswith("cross.")} == {"gate", "instruction_proj.weight", "instruction_proj.bias"}
    assert {"cross.0.q.weight", "cross.1.kv.weight", "cross.1.out.bias", "cross.0.ln_q.weight"} <= keys


# ----------------------------------------------------------------------------- 2 gloo processes
WORLD = 2


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        task = _task().train()
        n = len(ANSWERS) // WORLD
        sl = slice(rank * n, (rank + 1) * n)
        loss = task.loss(_images(6)[sl], INSTRUCTIONS[sl], ANSWERS[sl])
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        grads = {}
        for name, p in (("gate", task.focallens.gate), ("proj", task.focallens.instruction_proj.weight),
                        ("conv1", task.backbone.model.visual.conv1.weight)):
            g = p.grad.detach().clone()
            dist.all_reduce(g)  # what DDP does: the mean over ranks
            grads[name] = g / WORLD
        torch.save({"loss": mean.item() / WORLD, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # as tests/test_losses_ddp.py: skip gloo's flaky at-exit teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_loss_and_gradients_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    task = _task().train()
    loss = task.loss(_images(6), INSTRUCTIONS, ANSWERS)  # rows 0/3 and 1/4: duplicates across the ranks
    loss.backward()
    ref = {"gate": task.focallens.gate.grad, "proj": task.focallens.instruction_proj.weight.grad,
           "conv1": task.backbone.model.visual.conv1.weight.grad}
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["loss"] == pytest.approx(loss.item(), abs=1e-5)
        for name, g in ref.items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_adapter_lr_scale_puts_gate_and_projection_in_their_own_groups():
    from cirlab.train.config import OptimizerConfig, SchedulerConfig

    torch.manual_seed(0)
    task = FocalLensTask(adapter_lr_scale=20.0, backbone=BackboneConfig("cirlab-tiny", freeze_text=True),
                         optimizer=OptimizerConfig("adamw", lr=1e-4, weight_decay=0.1, no_decay_on_bias_and_norm=True),
                         scheduler=SchedulerConfig("cosine", warmup_steps=0, total_steps=10))
    opt = task.configure_optimizers()["optimizer"]
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    fl = task.focallens
    assert lr_of[id(fl.gate)] == (pytest.approx(2e-3), 0.0)  # 1-d: no decay, 20 x the rate
    assert lr_of[id(fl.instruction_proj.weight)] == (pytest.approx(2e-3), 0.1)
    assert lr_of[id(fl.cross[0].q.weight)] == (pytest.approx(2e-3), 0.1)  # the cross-attention: adapter rate
    assert lr_of[id(fl.cross[1].ln_kv.weight)] == (pytest.approx(2e-3), 0.0)
    assert lr_of[id(task.backbone.model.visual.conv1.weight)] == (pytest.approx(1e-4), 0.1)
    trainable = [p for p in task.parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable)  # every trainable parameter once, nothing frozen
    with pytest.raises(ValueError, match="adapter_lr_scale"):
        FocalLensTask(adapter_lr_scale=0)
