import itertools

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121

import medfusionnet
from medfusionnet.data.tabular import NUM_TABULAR_FEATURES, TabularEncoder, missing_tabular_vector
from medfusionnet.engine.losses import create_loss
from medfusionnet.networks.baselines import DenseNet121Tabular
from medfusionnet.networks.blocks import TabularTokenizer
from medfusionnet.networks.label_query_fusion import initial_gains
from medfusionnet.networks.medfusionnet import BRANCHES, MedFusionNet, nih_tabular_fields
from medfusionnet.networks.tabular_only import TabularMedFusionNet


def _tabular(batch: int) -> torch.Tensor:
    """Encoded tabular rows, every other one with all fields missing (so the missing embeddings are used too)."""
    enc = TabularEncoder().fit([{"age": 30, "follow_up": 1}, {"age": 70, "follow_up": 5}])
    rows = [
        {"age": 20 + 10 * i, "sex": "MF"[i % 2], "view": ["PA", "AP"][i % 2], "follow_up": i} if i % 2 == 0 else {}
        for i in range(batch)
    ]
    return torch.from_numpy(enc.transform(rows))


def _open_gates(net: MedFusionNet, value: float = 1.0) -> MedFusionNet:
    """Set the zero-initialised gates (fusion gate, T2C layer scales) to ``value``, as training moves them."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "gate" or name.endswith("t2c.scale"):
                p.fill_(value)
    return net


@pytest.mark.parametrize("batch, size, classes", [(1, 64, 7), (3, 96, 14), (2, 128, 5), (2, 224, 7), (1, 512, 3)])
def test_output_shape(batch, size, classes):
    net = MedFusionNet(num_classes=classes, network_size="tiny").eval()
    with torch.no_grad():
        out = net(torch.rand(batch, 1, size, size), _tabular(batch))
    assert out.shape == (batch, classes) and torch.isfinite(out).all()


ABLATIONS = [
    dict(
        branches=branches,
        interaction=interaction,
        fpn=fpn,
        fusion=fusion,
        use_tabular=use_tabular,
        class_reweighting=reweighting,
        baseline_path=baseline_path,
    )
    for r in range(1, 4)
    for branches in itertools.combinations(BRANCHES, r)
    for interaction, fpn, fusion, use_tabular, reweighting, baseline_path in itertools.product(
        (True, False), (True, False), ("attention", "concat"), (True, False), (True, False), (True, False)
    )
    if baseline_path or "cnn" in branches  # without the CNN branch there is no baseline path to switch off
]


@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_every_parameter_gets_a_gradient(options):
    torch.manual_seed(0)
    net = _open_gates(MedFusionNet(num_classes=7, network_size="tiny", **options))
    net(torch.rand(4, 1, 64, 64), _tabular(4)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ablation_switches_change_the_network():
    full = MedFusionNet(network_size="tiny")
    assert full.interaction and full.fpn is None and full.tabular_tokens is not None and full.baseline is not None
    assert MedFusionNet(network_size="tiny", fpn=True).fpn is not None
    assert MedFusionNet(network_size="tiny", baseline_path=False).gate is None
    assert MedFusionNet(network_size="tiny", branches=("transformer", "relational")).baseline is None
    assert not MedFusionNet(network_size="tiny", branches=("cnn", "relational")).interaction
    no_rel = MedFusionNet(network_size="tiny", branches=("cnn", "transformer"))
    assert all(layer.self_attn is None for layer in no_rel.decoder)
    assert MedFusionNet(network_size="tiny", fusion="concat").concat_mlp is not None
    for bad in (dict(branches=()), dict(branches=("cnn", "lstm")), dict(fusion="sum"), dict(network_size="huge")):
        with pytest.raises(ValueError):
            MedFusionNet(**bad)


def test_eval_determinism_and_batch_size_independence():
    torch.manual_seed(0)
    net = MedFusionNet(network_size="tiny").eval()
    image, tab = torch.rand(4, 1, 64, 64), _tabular(4)
    with torch.no_grad():
        whole = net(image, tab)
        torch.testing.assert_close(net(image, tab), whole)
        parts = torch.cat([net(image[i : i + 1], tab[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-4)


def test_no_tabular_equals_all_missing_tabular():
    net = MedFusionNet(network_size="tiny").eval()
    image = torch.rand(2, 1, 64, 64)
    missing = torch.from_numpy(missing_tabular_vector()).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(net(image), net(image, missing))
        assert not torch.allclose(net(image), net(image, _tabular(2)))


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(fusion="concat"),
        dict(branches=("cnn",), fpn=False),
        dict(branches=("transformer", "relational"), use_tabular=False),
    ],
)
def test_torchscript_parity(options):
    torch.manual_seed(0)
    net = _open_gates(MedFusionNet(network_size="tiny", **options), 0.5).eval()
    scripted = torch.jit.script(net)
    image, tab = torch.rand(2, 1, 96, 96), _tabular(2)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image, tab), net(image, tab), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scripted(image), net(image), atol=1e-4, rtol=1e-4)


def test_class_reweighting_starts_at_the_prior():
    counts = [1000, 100, 10, 500, 50, 5, 200]
    net = MedFusionNet(num_classes=7, network_size="tiny", label_counts=counts)
    prior = initial_gains(counts, 7)
    torch.testing.assert_close(net.reweighting.gains(), prior, atol=1e-5, rtol=1e-5)
    expected = (1 / np.sqrt(counts)) / np.mean(1 / np.sqrt(counts))  # inverse sqrt-frequency, mean 1
    np.testing.assert_allclose(prior.numpy(), np.clip(expected, 1 / 3, 3), rtol=1e-5)
    assert prior[5] > prior[0]  # the rarest finding gets the largest gain
    torch.testing.assert_close(MedFusionNet(num_classes=7, network_size="tiny").reweighting.gains(), torch.ones(7))
    with pytest.raises(ValueError, match="num_classes=7"):
        MedFusionNet(num_classes=7, network_size="tiny", label_counts=[1, 2])


def test_cnn_initialisation_from_a_densenet_file(tmp_path):
    reference = DenseNet121(spatial_dims=2, in_channels=1, out_channels=14)
    monai_file = tmp_path / "monai.pt"
    torch.save(reference.state_dict(), monai_file)
    net = MedFusionNet(network_size="base")
    unused = net.load_cnn_weights(str(monai_file))
    assert all(k.startswith("class_layers") for k in unused)
    torch.testing.assert_close(net.stem[0].weight, reference.features.conv0.weight)
    torch.testing.assert_close(
        net.stages[3].cnn[1].denselayer16.layers.conv2.weight,
        reference.features.denseblock4.denselayer16.layers.conv2.weight,
    )
    # torchvision's names and a 3-channel first convolution (ImageNet weights) are accepted too
    torchvision_style = {}
    for key, value in reference.state_dict().items():
        key = key.replace(".layers.", ".")
        if key == "features.conv0.weight":
            value = value.repeat(1, 3, 1, 1)
        torchvision_style[key] = value
    tv_file = tmp_path / "tv.pt"
    torch.save(torchvision_style, tv_file)
    net2 = MedFusionNet(network_size="base")
    net2.load_cnn_weights(str(tv_file))
    # RGB kernels are summed: on a gray image the 1-channel network responds as the RGB one on its 3 copies
    torch.testing.assert_close(net2.stem[0].weight, 3 * reference.features.conv0.weight)
    with pytest.raises(ValueError, match="not a matching DenseNet|expected"):
        MedFusionNet(network_size="tiny").load_cnn_weights(str(monai_file))


def test_registry_refuses_what_a_network_does_not_take():
    mfn = {
        "network_size": "tiny",
        "fusion": "concat",
    }  # MedFusionNet's own group: used for it, left out for the baseline
    net = medfusionnet.create_network("densenet121", num_classes=3, image_size=64, medfusionnet=mfn)
    assert net(torch.rand(1, 1, 64, 64)).shape == (1, 3)
    built = medfusionnet.create_network("medfusionnet", num_classes=3, medfusionnet=mfn)
    assert isinstance(built, MedFusionNet) and built.fusion == "concat"
    with pytest.raises(TypeError, match=r"network 'densenet121' does not take \['fusion'\]"):
        medfusionnet.create_network("densenet121", fusion="concat")  # a misspelt or misplaced key is not dropped
    with pytest.raises(TypeError, match=r"network 'medfusionnet' does not take \['sise'\]"):
        medfusionnet.create_network("medfusionnet", medfusionnet={"sise": "tiny"})
    with pytest.raises(TypeError, match="'medfusionnet' must be a dict"):
        medfusionnet.create_network("densenet121", medfusionnet="tiny")
    with pytest.raises(ValueError, match="network_name='resnet'"):
        medfusionnet.create_network("resnet")


@pytest.mark.slow
def test_tiny_model_overfits_real_images(nih_dir):
    from medfusionnet.data.nih import prepare_datasets
    from medfusionnet.data.transforms import xray_transforms

    data = prepare_datasets(str(nih_dir), str(nih_dir / "labels.csv"), str(nih_dir / "images_256"))
    transform = xray_transforms(data.encoder, 64)
    items = [transform(r) for r in data.train[:32]]
    image = torch.stack([i["image"] for i in items])
    tab = torch.stack([i["tabular"] for i in items])
    label = torch.stack([i["label"] for i in items])
    torch.manual_seed(0)
    net = MedFusionNet(network_size="tiny", drop_path_rate=0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(image, tab), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], (losses[0], losses[-1])
    assert NUM_TABULAR_FEATURES == tab.shape[1]


def test_fpn_channels_override_widens_the_pyramid_only():
    narrow = MedFusionNet(network_size="tiny", image_size=64, fpn=True)
    wide = MedFusionNet(network_size="tiny", image_size=64, fpn=True, fpn_channels=48)
    assert narrow.fpn.layer_blocks[0].out_channels == 32 and wide.fpn.layer_blocks[0].out_channels == 48
    assert [p.in_features for p in wide.cnn_token_proj] == [48, 48, 48]
    assert wide(torch.rand(2, 1, 64, 64)).shape == (2, 14)


def test_untrained_network_computes_the_densenet121_baseline(tmp_path):
    """With the baseline's weights copied in, the untrained MedFusionNet's logits are DenseNet121Tabular's: the gate
    and the T2C layer scales start at 0, so the fusion adds nothing until training opens them."""
    torch.manual_seed(0)
    baseline = DenseNet121Tabular().eval()
    torch.save(baseline.features.state_dict(), tmp_path / "features.pt")
    net = MedFusionNet(image_size=64)
    net.load_cnn_weights(str(tmp_path / "features.pt"))
    net.baseline.load_state_dict(baseline.late_fusion.state_dict())
    net.eval()
    image, tab = torch.rand(3, 1, 64, 64), _tabular(3)
    with torch.no_grad():
        torch.testing.assert_close(net(image, tab), baseline(image, tab), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(net(image), baseline(image), atol=1e-6, rtol=1e-6)
        base, fused = net.branch_logits(image, tab)
        assert fused.abs().sum() > 0  # the fusion computes; the zero gate keeps it out of the logits
        net.gate.fill_(0.5)  # the T2C scales stay 0, so the baseline path's logits are unchanged
        torch.testing.assert_close(net(image, tab), base + 0.5 * fused)


def test_only_the_gates_learn_in_the_first_step_then_everything():
    torch.manual_seed(0)
    net = MedFusionNet(num_classes=5, network_size="tiny")
    image, tab, target = torch.rand(4, 1, 64, 64), _tabular(4), (torch.rand(4, 5) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(image, tab), target)
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert grads["gate"].abs().min() > 0 and all(grads[n].abs().sum() > 0 for n in grads if n.endswith("t2c.scale"))
    assert grads["label_queries"].abs().sum() == 0 and grads["head.weight"].abs().sum() == 0
    assert grads["baseline.head.weight"].abs().sum() > 0 and grads["stem.0.weight"].abs().sum() > 0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(net(image, tab), target).backward()
    assert net.label_queries.grad.abs().sum() > 0 and net.head.weight.grad.abs().sum() > 0


def test_deep_supervision_returns_the_branch_logits_in_training_only():
    torch.manual_seed(0)
    net = _open_gates(MedFusionNet(num_classes=5, network_size="tiny", deep_supervision=True, drop_path_rate=0.0), 0.3)
    net.baseline.dropout.p = 0.0  # training mode: no random masks, so two passes agree
    image, tab, target = torch.rand(2, 1, 64, 64), _tabular(2), (torch.rand(2, 5) > 0.5).float()
    out = net(image, tab)
    assert out.shape == (2, 3, 5)
    base, fused = net.branch_logits(image, tab)
    torch.testing.assert_close(out[:, 1], base)
    torch.testing.assert_close(out[:, 2], fused)
    torch.testing.assert_close(out[:, 0], base + 0.3 * fused)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = create_loss("bce", aux_loss_weight=0.25)
    expected = bce(out[:, 0], target) + 0.25 * (bce(out[:, 1], target) + bce(out[:, 2], target))
    torch.testing.assert_close(loss(out, target), expected)
    torch.testing.assert_close(loss(out[:, 0], target), bce(out[:, 0], target))
    assert net.eval()(image, tab).shape == (2, 5)


def test_tabular_tokenizer_projects_each_field_and_loads_per_field_linear_weights():
    fields = nih_tabular_fields(NUM_TABULAR_FEATURES)  # widths 2, 3, 3, 2
    dim = 8
    torch.manual_seed(0)
    legacy = {f"proj.{i}.weight": torch.randn(dim, end - start) for i, (start, end, _) in enumerate(fields)}
    legacy.update({f"proj.{i}.bias": torch.randn(dim) for i in range(len(fields))})
    legacy.update(missing=torch.randn(len(fields), dim), field_embed=torch.randn(len(fields), dim))
    tokenizer = TabularTokenizer(fields, dim)
    tokenizer.load_state_dict(dict(legacy))  # the 0.8.0 layout: one nn.Linear per field
    x = torch.rand(6, NUM_TABULAR_FEATURES)
    x[:, [1, 4, 7, 9]] = (torch.rand(6, 4) > 0.5).float()  # missing flags set at random
    expected = []
    for i, (start, end, flag) in enumerate(fields):
        token = x[:, start:end] @ legacy[f"proj.{i}.weight"].T + legacy[f"proj.{i}.bias"]
        token = torch.where(x[:, flag : flag + 1] > 0.5, legacy["missing"][i].expand_as(token), token)
        expected.append(token + legacy["field_embed"][i])
    torch.testing.assert_close(tokenizer(x), torch.stack(expected, 1))
    torch.testing.assert_close(torch.jit.script(tokenizer)(x), torch.stack(expected, 1))
    assert set(tokenizer.state_dict()) == {"weight", "bias", "missing", "field_embed"}


def test_tabular_only_network_learns_a_field_and_ignores_a_missing_one():
    torch.manual_seed(0)
    fields = [(0, 1, 2), (1, 2, -1)]  # field 0 has its missing flag at column 2
    net = TabularMedFusionNet(fields, num_classes=2, dim=16, dropout_rate=0.0)
    x = torch.randn(256, 3)
    x[:, 2] = 0.0
    y = torch.stack([(x[:, 0] > 0).float(), (x[:, 1] > 0).float()], 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = ((net(x) > 0).float() == y).float().mean(0)
        assert accuracy.min() > 0.9
        flagged = x.clone()
        flagged[:, 2] = 1.0  # field 0 missing: its value must no longer matter
        flagged_other = flagged.clone()
        flagged_other[:, 0] = -flagged[:, 0]
        torch.testing.assert_close(net(flagged), net(flagged_other))
