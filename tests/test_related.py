"""The related systems of the comparison (CTransCNN, the probability ensemble, CONVFCMAE's head parts) and the
BCE + focal loss; the timm-backed parts are in tests/test_timm_baselines.py."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import medfusionnet
from medfusionnet.networks.related import (
    AttentivePooling,
    BatchNormMlp,
    CTransCNN,
    MultiBranchResidual,
    MultilabelSemanticSimilarity,
    ProbabilityEnsemble,
)

TAB = medfusionnet.NUM_TABULAR_FEATURES


def test_ctranscnn_logits_with_and_without_tabular_and_every_parameter_learns():
    torch.manual_seed(0)
    net = medfusionnet.create_network("ctranscnn", network_size="tiny", image_size=64, num_classes=5)
    assert isinstance(net, CTransCNN)
    image, tab = torch.rand(2, 1, 64, 64), torch.randn(2, TAB)
    net.eval()
    with torch.no_grad():
        out = net(image)
        assert out.shape == (2, 5)
        torch.testing.assert_close(net(image, net.missing_tabular.expand(2, -1)), out)
        assert not torch.allclose(net(image, tab), out)
    net.train()
    # one patient with every field present (missing flags below 0.5), one with every field missing
    mixed = torch.stack([torch.rand(TAB) * 0.4, net.missing_tabular])
    net(image, mixed).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_ctranscnn_scores_are_the_weighted_sum_of_the_two_branches():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 64, 64)
    nets = {
        w: CTransCNN(num_classes=4, network_size="tiny", image_size=64, branch_weight=w).eval() for w in (0.0, 0.9, 1.0)
    }
    for net in list(nets.values())[1:]:
        net.load_state_dict(nets[0.0].state_dict())
    with torch.no_grad():
        cnn, mixed, transformer = (nets[w](image) for w in (0.0, 0.9, 1.0))
        torch.testing.assert_close(mixed, 0.9 * transformer + 0.1 * cnn)
        # the CNN-only score does not depend on the label-query decoder
        nets[0.0].decoder[0].mlp.fc2.weight.add_(1.0)
        torch.testing.assert_close(nets[0.0](image), cnn)
    with pytest.raises(ValueError, match="branch_weight"):
        CTransCNN(network_size="tiny", branch_weight=1.5)


def test_mss_block_matches_the_formula_by_hand():
    torch.manual_seed(0)
    mss = MultilabelSemanticSimilarity(dim=4, num_heads=2)
    x = torch.randn(1, 3, 4)
    q, k, v = mss.qkv(x)[0].detach().split(4, dim=-1)  # (K, D) each
    heads = []
    for h in range(2):
        cols = slice(2 * h, 2 * h + 2)
        rows = []
        for i in range(3):
            scores = [1 / (1 + math.exp(-float(q[i, cols] @ k[j, cols]) / math.sqrt(2))) for j in range(3)]
            weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
            rows.append(sum(w * v[j, cols] for j, w in enumerate(weights)))
        heads.append(torch.stack(rows))
    with torch.no_grad():
        torch.testing.assert_close(mss(x)[0], mss.out(torch.cat(heads, dim=-1)))


def test_multibranch_residual_shapes_and_the_two_shortcuts():
    block = MultiBranchResidual(8, 4, 16, stride=2)
    assert block(torch.rand(2, 8, 16, 16)).shape == (2, 16, 8, 8)
    same = MultiBranchResidual(8, 4, 8).eval()
    with torch.no_grad():
        same.up[1].weight.zero_()  # the bottleneck path adds nothing: the outer shortcut is the identity
        x = torch.randn(2, 8, 6, 6)
        torch.testing.assert_close(same(x), F.relu(x))


def test_attentive_pooling_with_flat_weights_is_average_pooling():
    pool = AttentivePooling(3)
    with torch.no_grad():
        pool.score.weight.zero_()
        pool.score.bias.zero_()
    x = torch.randn(2, 3, 5, 4)
    tokens = pool(x)
    assert tokens.shape == (2, 3, 3)
    torch.testing.assert_close(tokens[:, 0], x.mean((-2, -1)))
    torch.testing.assert_close(tokens[:, 1], x.amax((-2, -1)))
    torch.testing.assert_close(tokens[:, 2], x.mean((-2, -1)))


def test_batchnorm_mlp_takes_a_batch_of_one_in_training():
    mlp = BatchNormMlp(6, 8, 3, dropout_rate=0.0).train()
    x = torch.randn(1, 6)
    expected = mlp.fc2((F.relu(mlp.fc1(x)) - 0.0) / math.sqrt(1.0 + mlp.norm.eps))  # fresh running statistics
    torch.testing.assert_close(mlp(x), expected)
    assert mlp(torch.randn(4, 6)).shape == (4, 3)


def _small_ensemble(**kwargs):
    return ProbabilityEnsemble(
        num_classes=3,
        image_size=64,
        members=["densenet121", "medfusionnet"],
        member_args=[{}, {"network_size": "tiny"}],
        **kwargs,
    )


def test_ensemble_mean_and_vote_of_member_probabilities():
    torch.manual_seed(0)
    net = _small_ensemble().eval()
    image, tab = torch.rand(4, 1, 64, 64), torch.randn(4, TAB)
    with torch.no_grad():
        probs = torch.stack([torch.sigmoid(m(image, tab)) for m in net.members])
        torch.testing.assert_close(torch.sigmoid(net(image, tab)), probs.mean(0))
        net.combine = "vote"
        votes = torch.sigmoid(net(image, tab))
        expected = (probs >= 0.5).float().mean(0).clamp(1e-6, 1 - 1e-6)
        torch.testing.assert_close(votes, expected, atol=1e-6, rtol=1e-5)
    # training uses the differentiable mean even when voting is chosen
    net.train()
    net(image, tab).sum().backward()
    assert all(p.grad is not None for m in net.members for p in m.parameters())
    with pytest.raises(ValueError, match="combine='max'"):
        _small_ensemble(combine="max")
    with pytest.raises(ValueError, match="member_args"):
        ProbabilityEnsemble(members=["densenet121"], member_args=[{}, {}])


def test_ensemble_loads_separately_trained_members(tmp_path):
    torch.manual_seed(0)
    donor = _small_ensemble().eval()
    paths = []
    for i, member in enumerate(donor.members):
        paths.append(str(tmp_path / f"member{i}.pt"))
        torch.save({"model": member.state_dict()} if i else member.state_dict(), paths[-1])
    loaded = _small_ensemble(member_checkpoints=paths).eval()
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), donor(image))
    with pytest.raises(ValueError, match="ensemble member 'densenet121'.*member1.pt"):
        _small_ensemble(member_checkpoints=paths[::-1])
    with pytest.raises(ValueError, match="2 members"):
        _small_ensemble(member_checkpoints=paths[:1])


def test_bce_focal_loss_is_the_sum_of_its_parts():
    from monai.losses import FocalLoss

    from medfusionnet.data.label_weights import inverse_frequency_weights
    from medfusionnet.engine.losses import create_loss

    torch.manual_seed(0)
    logits, target = torch.randn(6, 4), (torch.rand(6, 4) > 0.5).float()
    counts = [3, 1, 2, 5]
    loss = create_loss("bce_focal", label_counts=counts)
    weight = inverse_frequency_weights(counts)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    focal = FocalLoss(gamma=2.0, weight=weight, use_softmax=False)(logits, target)
    torch.testing.assert_close(loss(logits, target), bce + focal)
    assert isinstance(loss, nn.Module)
