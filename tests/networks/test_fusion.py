"""Clinical and fusion networks: the normaliser's imputation and statistics, both fusions over every family, features
that matter, one case's features broadcast over a batch, ensembles, and statistics that travel in the state dict."""

from __future__ import annotations

import math

import pytest
import torch

from volcnn.networks import (
    ClinicalClassifier,
    FeatureNormalizer,
    FusionClassifier,
    create_multimodal_network,
    load_branch_weights,
)
from volcnn.networks.ensemble import EnsembleClassifier

DECL = {
    "age": {"type": "numeric"},
    "sex": {"type": "categorical", "values": ["F", "M", "X"]},
    "smoker": {"type": "binary"},
}
STATS = {"mean": [60.0, 0.4, 0.5, 0.1, 0.3], "std": [10.0, 1.0, 1.0, 1.0, 1.0]}
NAN = math.nan


def test_normalizer_imputes_standardises_and_flags_missing():
    norm = FeatureNormalizer(DECL, STATS)
    raw = torch.tensor([[70.0, 0.0, 1.0, 0.0, 1.0], [NAN, NAN, NAN, NAN, 0.0]])
    out = norm(raw)
    assert out.shape == (2, 5 + 3)
    assert torch.allclose(out[0], torch.tensor([1.0, -0.4, 0.5, -0.1, 0.7, 0, 0, 0]))
    # a missing value sits at its training mean (0 after centring) and raises its feature's indicator once
    assert torch.allclose(out[1], torch.tensor([0.0, 0.0, 0.0, 0.0, -0.3, 1, 1, 0]))
    assert not torch.isnan(out).any()


def test_normalizer_refuses_bad_statistics_and_shapes():
    with pytest.raises(ValueError, match="shapes"):
        FeatureNormalizer(DECL, {"mean": [0.0] * 4, "std": [1.0] * 5})
    with pytest.raises(ValueError, match="std > 0"):
        FeatureNormalizer(DECL, {"mean": [0.0] * 5, "std": [1.0, 0.0, 1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        FeatureNormalizer(DECL, STATS)(torch.zeros(2, 4))


def _precision(cov: list[list[float]]) -> list[list[float]]:
    return torch.linalg.inv(torch.tensor(cov, dtype=torch.float64)).tolist()


def test_normalizer_imputes_a_missing_value_from_the_correlated_present_ones():
    decl = {"a": {"type": "numeric"}, "b": {"type": "numeric"}, "c": {"type": "binary"}}
    cov = [[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 0.25]]  # a, b correlated; c independent
    norm = FeatureNormalizer(decl, {"mean": [10.0, 0.0, 0.5], "std": [2.0, 1.0, 1.0], "precision": _precision(cov)})
    out = norm(torch.tensor([[NAN, 1.0, 1.0], [12.0, NAN, NAN], [NAN, NAN, 0.0]]))
    # b one std above its mean -> a expected 0.8 std above; a at +1 std -> b at 0.8; c learns nothing from a or b
    torch.testing.assert_close(out[:, :3], torch.tensor([[0.8, 1.0, 0.5], [1.0, 0.8, 0.0], [0.0, 0.0, -0.5]]))
    torch.testing.assert_close(out[:, 3:], torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 1, 0]]))  # still flagged


def test_normalizer_conditional_means_equal_the_closed_form_for_any_pattern():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    cov = w @ w.T + 0.5 * torch.eye(5, dtype=torch.float64)
    norm = FeatureNormalizer(DECL, {**STATS, "precision": torch.linalg.inv(cov).tolist()})
    z = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    hidden = torch.rand(64, 5, generator=gen) < 0.4
    hidden[:, 2] = hidden[:, 1]  # a categorical's columns are missing together
    raw = torch.where(hidden, torch.nan, z * torch.tensor(STATS["std"]) + torch.tensor(STATS["mean"]))
    got = norm(raw.float())[:, :5].double()
    for i in range(64):
        h, o = hidden[i], ~hidden[i]
        want = z[i].clone()
        want[h] = cov[h][:, o] @ torch.linalg.solve(cov[o][:, o], z[i, o]) if o.any() else 0.0
        torch.testing.assert_close(got[i], want, atol=2e-4, rtol=1e-4)


def test_normalizer_without_precision_imputes_training_means_and_loads_old_checkpoints():
    correlated = {**STATS, "precision": _precision([[1.0 if i == j else 0.5 for j in range(5)] for i in range(5)])}
    raw = torch.tensor([[NAN, 1.0, 0.0, 1.0, 1.0]])
    assert FeatureNormalizer(DECL, correlated)(raw)[0, 0] != 0  # imputed from the others
    assert FeatureNormalizer(DECL, STATS)(raw)[0, 0] == 0  # no precision: the training mean
    old = FeatureNormalizer(DECL, STATS).state_dict()
    del old["precision"]  # a checkpoint of volcnn 0.6
    norm = FeatureNormalizer(DECL, correlated)
    norm.load_state_dict(old)
    assert torch.equal(norm.precision, torch.eye(5)) and norm(raw)[0, 0] == 0
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        FeatureNormalizer(DECL, {**STATS, "precision": [[1.0]]})
    with pytest.raises(ValueError, match="positive diagonal"):
        FeatureNormalizer(DECL, {**STATS, "precision": torch.zeros(5, 5).tolist()})


@pytest.mark.parametrize(("network_def", "size"), [("seed_cnn3d", 16), ("valid_cnn3d", 32), ("resnet18", 16),
                                                   ("densenet121", 32)])  # fmt: skip
@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_fusion_over_every_family_uses_the_features(network_def, size, fusion):
    torch.manual_seed(0)
    net = create_multimodal_network(
        "fusion", network_def, features=DECL, feature_stats=STATS, fusion=fusion, spatial_size=(size,) * 3
    ).eval()
    if fusion == "film":  # zero-initialised (identity) conditioning: give it weights to show it acts
        torch.nn.init.normal_(net.film.weight, std=0.5)
    x = torch.randn(2, 1, size, size, size)
    a = torch.tensor([[40.0, 1, 0, 0, 0]] * 2)
    b = torch.tensor([[80.0, 0, 1, 0, 1]] * 2)
    with torch.no_grad():
        out_a, out_b = net(x, features=a), net(x, features=b)
    assert out_a.shape == (2, 2)
    assert not torch.allclose(out_a, out_b)


def test_film_starts_as_the_image_path():
    """Zero-initialised FiLM: before training, the features do not move the output (training starts from the image
    model's behaviour)."""
    net = create_multimodal_network("fusion", "seed_cnn3d", features=DECL, fusion="film", spatial_size=(16, 16, 16))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        a = net.eval()(x, features=torch.tensor([[40.0, 1, 0, 0, 0]] * 2))
        b = net(x, features=torch.tensor([[NAN, NAN, NAN, NAN, 1]] * 2))
    assert torch.equal(a, b)


def test_one_case_features_broadcast_over_a_batch_of_windows():
    torch.manual_seed(1)
    net = FusionClassifier(
        create_multimodal_network("image", "seed_cnn3d", spatial_size=(16, 16, 16)),
        DECL, stats=STATS, spatial_size=(16, 16, 16),
    ).eval()  # fmt: skip
    x = torch.randn(3, 1, 16, 16, 16)
    one = torch.tensor([[55.0, NAN, NAN, NAN, 1]])
    with torch.no_grad():
        assert torch.allclose(net(x, features=one), net(x, features=one.expand(3, -1)))
    with pytest.raises(ValueError, match="features for 2 samples, images for 3"):
        net(x, features=one.expand(2, -1))


def test_clinical_classifier_reads_features_only():
    torch.manual_seed(2)
    net = ClinicalClassifier(DECL, 2, STATS).eval()
    f = torch.tensor([[70.0, 0, 1, 0, 1], [50.0, 1, 0, 0, NAN]])
    with torch.no_grad():
        assert torch.equal(net(torch.zeros(2, 1, 8, 8, 8), features=f), net(torch.randn(2, 1, 4, 4, 4), features=f))


def test_statistics_travel_in_the_state_dict():
    torch.manual_seed(3)
    trained = create_multimodal_network("fusion", "seed_cnn3d", features=DECL, feature_stats=STATS,
                                        spatial_size=(16, 16, 16)).eval()  # fmt: skip
    fresh = create_multimodal_network("fusion", "seed_cnn3d", features=DECL, spatial_size=(16, 16, 16)).eval()
    assert "tabular.normalize.mean" in trained.state_dict()
    fresh.load_state_dict(trained.state_dict())
    x, f = torch.randn(2, 1, 16, 16, 16), torch.tensor([[70.0, NAN, NAN, NAN, 1]] * 2)
    with torch.no_grad():
        assert torch.equal(trained(x, features=f), fresh(x, features=f))


def test_multimodal_ensemble_is_the_mean_of_its_members():
    torch.manual_seed(4)
    ens = create_multimodal_network("clinical", "seed_cnn3d", features=DECL, feature_stats=STATS, ensemble=3).eval()
    assert isinstance(ens, EnsembleClassifier)
    x, f = torch.zeros(2, 1, 8, 8, 8), torch.tensor([[70.0, 0, 1, 0, 1], [45.0, NAN, NAN, NAN, 0]])
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(x, features=f), 1) for m in ens.members]).mean(0)
        assert torch.allclose(torch.softmax(ens(x, features=f), 1), mean, atol=1e-6)


def test_modality_and_fusion_are_checked():
    with pytest.raises(ValueError, match="modality must be one of"):
        create_multimodal_network("tabular", "seed_cnn3d", features=DECL)
    with pytest.raises(ValueError, match="declares none"):
        create_multimodal_network("fusion", "seed_cnn3d", features=None)
    with pytest.raises(ValueError, match="fusion must be one of"):
        create_multimodal_network("fusion", "seed_cnn3d", features=DECL, fusion="sum", spatial_size=(16, 16, 16))


def test_branches_start_from_single_modality_runs(tmp_path):
    torch.manual_seed(5)
    image = create_multimodal_network("image", "seed_cnn3d", spatial_size=(16, 16, 16))
    clinical = create_multimodal_network("clinical", "seed_cnn3d", features=DECL, feature_stats=STATS)
    torch.save(image.state_dict(), tmp_path / "image.pt")
    torch.save(clinical.state_dict(), tmp_path / "clinical.pt")
    fusion = create_multimodal_network("fusion", "seed_cnn3d", features=DECL, spatial_size=(16, 16, 16))
    head = fusion.head.weight.detach().clone()
    load_branch_weights(fusion, tmp_path / "image.pt", str(tmp_path / "clinical.pt"), network_def="seed_cnn3d",
                        spatial_size=(16, 16, 16))  # fmt: skip
    assert torch.equal(fusion.trunk[0].weight, image.features[0].weight)
    assert torch.equal(fusion.tabular.mlp[0].weight, clinical.tabular.mlp[0].weight)
    assert torch.equal(fusion.tabular.normalize.mean, torch.tensor(STATS["mean"]))  # the statistics come along
    assert torch.equal(fusion.head.weight, head)  # the fusion head is left as initialised
    with pytest.raises(ValueError, match="image.pt: not resnet18 weights"):
        load_branch_weights(fusion, tmp_path / "image.pt", None, network_def="resnet18", spatial_size=(16, 16, 16))
    with pytest.raises(ValueError, match="branch weights are for a fusion network"):
        load_branch_weights(image, tmp_path / "image.pt", None, network_def="seed_cnn3d")
    assert load_branch_weights(image, None, "none") is image  # nothing to load: nothing checked


def test_concat_fusion_from_both_runs_starts_as_the_sum_of_their_logits(tmp_path):
    torch.manual_seed(6)
    image = create_multimodal_network("image", "valid_cnn3d", spatial_size=(32, 32, 32)).eval()
    clinical = create_multimodal_network("clinical", "valid_cnn3d", features=DECL, feature_stats=STATS).eval()
    torch.save(image.state_dict(), tmp_path / "image.pt")
    torch.save(clinical.state_dict(), tmp_path / "clinical.pt")
    fusion = create_multimodal_network("fusion", "valid_cnn3d", features=DECL, spatial_size=(32, 32, 32)).eval()
    x, f = torch.randn(2, 1, 32, 32, 32), torch.tensor([[70.0, 0, 1, 0, 1], [50.0, NAN, NAN, NAN, 0]])
    with torch.no_grad():
        before = fusion(x, features=f)
        load_branch_weights(fusion, tmp_path / "image.pt", tmp_path / "clinical.pt", network_def="valid_cnn3d",
                            spatial_size=(32, 32, 32))  # fmt: skip
        expected = image(x) + clinical(x, features=f)
        assert not torch.allclose(before, expected, atol=1e-3)
        assert torch.allclose(fusion(x, features=f), expected, atol=1e-5)
