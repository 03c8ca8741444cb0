"""Training variants, gradient checkpointing and the FLOP counting behind scripts/benchmark.py."""

import pytest
import torch

import medfusionnet
from medfusionnet.engine.benchmarking import Variant, forward_flops, matmul_peak_flops
from medfusionnet.engine.training import amp_dtype, training_network


def test_variant_parsing():
    v = Variant.parse("bf16+channels_last")
    assert (v.dtype, v.channels_last, v.checkpoint, v.compile) == (torch.bfloat16, True, False, False)
    assert Variant.parse("fp32").dtype is None and Variant.parse("checkpoint+compile").compile
    with pytest.raises(ValueError, match="fp8"):
        Variant.parse("fp32+fp8")
    with pytest.raises(ValueError, match="2 precisions"):
        Variant.parse("bf16+fp16")


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)

    def forward(self, image, tabular=None):
        return self.conv(image)


def test_forward_flops_by_hand():
    # 4 output maps of 32 x 32, each value 9 multiply-adds of the 1-channel 3 x 3 kernel: 2 FLOPs per multiply-add
    assert forward_flops(_Conv(), 32) == 2 * 4 * 32 * 32 * 9


def test_matmul_peak_is_a_plausible_rate():
    rate = matmul_peak_flops(torch.device("cpu"), n=256, repeats=3)
    assert 1e8 < rate < 1e14  # between a slow core and far beyond any CPU


def _loss_and_grads(net, image, tabular, target):
    torch.manual_seed(1)  # the same drop-path draws on both runs
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(image, tabular), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    net = medfusionnet.create_network(
        "medfusionnet", network_size="tiny", image_size=64, drop_path_rate=0.3, dropout_rate=0.2
    ).train()
    image, tabular = torch.rand(2, 1, 64, 64), torch.rand(2, medfusionnet.NUM_TABULAR_FEATURES)
    target = torch.tensor([[1.0] * 7 + [0.0] * 7, [0.0] * 7 + [1.0] * 7])
    loss, grads = _loss_and_grads(net, image, tabular, target)
    net.zero_grad()
    net.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in net.stages)
    loss_ckpt, grads_ckpt = _loss_and_grads(net, image, tabular, target)
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys() and len(grads) > 50
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # scripting skips the checkpointed path, so export keeps working with the option on
    scripted = torch.jit.script(net.eval())
    torch.testing.assert_close(scripted(image, tabular), net(image, tabular))


def test_training_network_options():
    net = training_network(
        medfusionnet.create_network("medfusionnet", network_size="tiny", image_size=64),
        "cpu",
        grad_checkpointing=True,
        channels_last=True,
    )
    assert net.stages[0].grad_checkpointing
    assert net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="DenseNet121Tabular does not support"):
        training_network(medfusionnet.create_network("densenet121"), "cpu", grad_checkpointing=True)


def test_amp_dtype_names():
    assert amp_dtype("bfloat16") is torch.bfloat16 and amp_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="amp_dtype='fp8'"):
        amp_dtype("fp8")
