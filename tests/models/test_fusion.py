"""The fusion network: patients' data before the affine layer, and frozen blocks that stay put."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from models.backbone import imagenet_mobilenet_v2
from models.fusion import ClinicalStats, OsteoNet, clinical_matrix, encode_sex

STATS = ClinicalStats(age_mean=65.0, age_std=10.0, bmi_mean=25.0, bmi_std=4.0)


def probability(net: OsteoNet, images: torch.Tensor, age: float, sex: str, bmi: float) -> float:
    clinical = torch.from_numpy(clinical_matrix([age], [sex], [bmi]))
    with torch.inference_mode():
        return float(net.probabilities(images, clinical)[0, 1])


def test_probability_changes_with_age_sex_and_bmi() -> None:
    torch.manual_seed(0)
    net = OsteoNet(STATS, dropout=0.2).eval()
    image = torch.rand(1, 1, 64, 64)

    base = probability(net, image, 70, "F", 22.0)

    assert 0.0 < base < 1.0
    assert probability(net, image, 70, "F", 22.0) == base
    assert probability(net, image, 45, "F", 22.0) != base
    assert probability(net, image, 70, "M", 22.0) != base
    assert probability(net, image, 70, "F", 31.0) != base


def test_softmax_gives_two_probabilities_summing_to_one() -> None:
    net = OsteoNet(STATS).eval()
    clinical = torch.from_numpy(clinical_matrix([60, 80, 50], ["F", "M", "F"], [20, 30, 25]))

    with torch.inference_mode():
        output = net.probabilities(torch.rand(3, 64, 64), clinical)

    assert output.shape == (3, 2)
    assert torch.allclose(output.sum(dim=1), torch.ones(3))


def test_clinical_statistics_standardise_age_and_bmi() -> None:
    records = pd.DataFrame({"age": [50.0, 70.0], "bmi": [20.0, 20.0]})

    stats = ClinicalStats.from_frame(records)

    assert (stats.age_mean, stats.age_std) == (60.0, 10.0)
    assert (stats.bmi_mean, stats.bmi_std) == (20.0, 1.0)  # a constant column is not divided by 0


def test_sex_is_one_column_female_one_male_zero() -> None:
    assert encode_sex(["F", "M"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="sex must be F or M, got X"):
        encode_sex(["F", "X"])


def test_frozen_blocks_keep_weights_and_batch_norm_statistics_while_training() -> None:
    torch.manual_seed(0)
    net = OsteoNet(STATS, backbone=imagenet_mobilenet_v2())
    net.set_trainable_from(15)
    net.train()
    before = {name: value.clone() for name, value in net.state_dict().items()}
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-2)
    clinical = torch.from_numpy(clinical_matrix([60, 70, 80, 50], ["F", "M", "F", "M"],
                                                [22, 26, 30, 24]))

    for _ in range(2):
        loss = net(torch.rand(4, 1, 64, 64), clinical).logsumexp(dim=1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    after = net.state_dict()
    frozen_prefixes = tuple(f"features.{block}." for block in range(15))
    frozen = [name for name in before if name.startswith(frozen_prefixes)]
    learning = [name for name in before if name.startswith(("features.15.", "features.18."))]
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert any(not torch.equal(before[name], after[name]) for name in learning)
    assert not net.features[3].training and net.features[16].training


def test_all_blocks_frozen_until_an_index_is_given() -> None:
    net = OsteoNet(STATS)

    net.set_trainable_from(None)

    assert not any(parameter.requires_grad for parameter in net.features.parameters())
    assert all(parameter.requires_grad for parameter in net.head.parameters())
    with pytest.raises(ValueError, match="0..19"):
        net.set_trainable_from(20)
