"""The training recipe's parts: parameter groups with their learning-rate scales, the warm-up + cosine schedule,
and deep supervision switched on for training."""

import math

import pytest
import torch

import medfusionnet
from medfusionnet.engine.training import parameter_groups, training_network, warmup_cosine_schedule


def test_parameter_groups_split_medfusionnet_into_baseline_fusion_and_gates():
    net = medfusionnet.create_network("medfusionnet", network_size="tiny")
    groups = parameter_groups(net, fusion_lr_scale=3.0, gate_lr_scale=30.0)
    assert [g["lr_scale"] for g in groups] == [1.0, 3.0, 30.0]
    names = {id(p): n for n, p in net.named_parameters()}
    base, fusion, gates = ({names[id(p)] for p in g["params"]} for g in groups)
    assert len(base) + len(fusion) + len(gates) == len(names)  # each parameter in exactly one group
    assert "stem.0.weight" in base and "baseline.head.weight" in base and "stages.3.cnn.0.conv.weight" in base
    assert gates == {"gate", "stages.1.t2c.scale", "stages.2.t2c.scale"}
    assert "label_queries" in fusion and "stages.2.t2c.proj.0.weight" in fusion and "patch_embed.proj.weight" in fusion
    # a network without the split: one group; a multi-GPU wrapper is looked through
    dense = medfusionnet.create_network("densenet121")
    assert len(parameter_groups(dense, 3.0, 30.0)) == 1
    wrapped = torch.nn.Module()
    wrapped.module = net
    assert [len(g["params"]) for g in parameter_groups(wrapped, 3.0, 30.0)] == [len(g["params"]) for g in groups]


def test_warmup_cosine_schedule_by_hand():
    w = torch.nn.Parameter(torch.zeros(1))
    v = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [w], "lr_scale": 1.0}, {"params": [v], "lr_scale": 10.0}], lr=1e-3)
    schedule = warmup_cosine_schedule(opt, max_epochs=6, warmup_epochs=2)
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    # warm-up 1/3, 2/3 of the peak, then cosine over the 4 remaining epochs: 1, (1 + cos(pi/4)) / 2, 1/2, ...
    expected = [1 / 3, 2 / 3, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    for (a, b), e in zip(lrs, expected):
        assert a == pytest.approx(1e-3 * e) and b == pytest.approx(1e-2 * e)


def test_without_warmup_the_schedule_is_cosine_annealing():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt_a, opt_b = torch.optim.SGD([a], lr=0.1), torch.optim.SGD([b], lr=0.1)
    ours = warmup_cosine_schedule(opt_a, max_epochs=7)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=7)
    for _ in range(7):
        assert opt_a.param_groups[0]["lr"] == pytest.approx(opt_b.param_groups[0]["lr"], abs=1e-12)
        for stepper in (opt_a, opt_b, ours, reference):
            stepper.step()


def test_deep_supervision_is_switched_on_for_training_and_refused_without_branches():
    net = training_network(
        medfusionnet.create_network("medfusionnet", network_size="tiny"), "cpu", deep_supervision=True
    )
    assert net.train()(torch.rand(2, 1, 64, 64)).shape == (2, 3, 14)
    assert net.eval()(torch.rand(2, 1, 64, 64)).shape == (2, 14)
    with pytest.raises(ValueError, match="aux_loss_weight > 0 needs .* not DenseNet121Tabular"):
        training_network(medfusionnet.create_network("densenet121"), "cpu", deep_supervision=True)
    without = medfusionnet.create_network("medfusionnet", network_size="tiny", baseline_path=False)
    with pytest.raises(ValueError, match="aux_loss_weight > 0 needs"):
        training_network(without, "cpu", deep_supervision=True)
