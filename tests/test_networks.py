import pytest
import torch

import medfusionnet
from medfusionnet.networks.baselines import DenseNet121Tabular


@pytest.mark.parametrize("batch, size, classes", [(1, 32, 14), (3, 64, 7), (2, 96, 5)])
def test_output_shape(batch, size, classes):
    net = DenseNet121Tabular(num_classes=classes).eval()
    with torch.no_grad():
        out = net(torch.rand(batch, 1, size, size), torch.rand(batch, medfusionnet.NUM_TABULAR_FEATURES))
    assert out.shape == (batch, classes)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = DenseNet121Tabular(num_classes=7)
    net(torch.rand(2, 1, 64, 64), torch.rand(2, medfusionnet.NUM_TABULAR_FEATURES)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_tabular_changes_the_output_only_when_used():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 64, 64)
    tab = torch.randn(2, medfusionnet.NUM_TABULAR_FEATURES)
    net = DenseNet121Tabular(num_classes=5).eval()
    assert not torch.allclose(net(image, tab), net(image, tab * 2))
    blind = DenseNet121Tabular(num_classes=5, use_tabular=False).eval()
    torch.testing.assert_close(blind(image, tab), blind(image, None))


def test_no_tabular_equals_all_missing_tabular():
    from medfusionnet.data.tabular import TabularEncoder, missing_tabular_vector

    net = DenseNet121Tabular(num_classes=5).eval()
    image = torch.rand(3, 1, 64, 64)
    encoded = TabularEncoder().fit([{"age": 30}, {"age": 50}]).encode({})
    assert (encoded == missing_tabular_vector()).all()
    torch.testing.assert_close(net(image), net(image, torch.from_numpy(encoded).expand(3, -1)))


def test_torchscript_parity():
    net = DenseNet121Tabular(num_classes=14).eval()
    scripted = torch.jit.script(net)
    image, tab = torch.rand(2, 1, 64, 64), torch.rand(2, medfusionnet.NUM_TABULAR_FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image, tab), net(image, tab), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scripted(image), net(image), atol=1e-5, rtol=1e-5)


def test_registry():
    assert isinstance(medfusionnet.create_network("densenet121", num_classes=3), DenseNet121Tabular)
    with pytest.raises(ValueError, match="network_name='resnet'"):
        medfusionnet.create_network("resnet")


def test_timm_baseline_without_timm_names_the_extra():
    import importlib.util

    import pytest

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here; tests/test_timm_baselines.py covers the networks")
    import medfusionnet

    with pytest.raises(ImportError, match=r"medfusionnet\[baselines\]"):
        medfusionnet.create_network("resnet50")
