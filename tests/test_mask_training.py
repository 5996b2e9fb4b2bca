"""Training with the clinical mask: the RRR explanation penalty and the background intervention (issue 14)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from segx_helpers.studies.mask_training import (BackgroundIntervention, DoubleBackwardError, FixComparison, MaskFix,
                                        NewClassifier, RRRLoss, agreement_gap, check_double_backward,
                                        rrr_penalty, swap_background, target_check,
                                        train_with_mask)
from segx_helpers.models.networks import build_classifier
from segx_helpers.models.training import TrainConfig, classification_loss, fit


class RegionReader(nn.Module):
    """Logits from the pixels of a fixed region only: its input gradient is exactly 0 everywhere else."""

    def __init__(self, region: torch.Tensor, classes: int = 3, size: int = 16) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.linear = nn.Linear(size * size, classes)

    def forward(self, x):
        return self.linear(torch.tanh(x * self.region).mean(dim=1).flatten(1))


def _square(size: int = 16, lo: int = 4, hi: int = 12) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[lo:hi, lo:hi] = 1
    return mask


def test_penalty_is_zero_when_input_gradients_vanish_outside_the_mask_and_positive_otherwise():
    torch.manual_seed(0)
    model = RegionReader(_square())
    images = torch.randn(4, 3, 16, 16)
    inside = _square().expand(4, 1, 16, 16)
    penalty, logits = rrr_penalty(model, images, inside, "multiclass")
    assert logits.shape == (4, 3) and penalty.item() == 0.0
    smaller = _square(lo=6, hi=10).expand(4, 1, 16, 16)       # part of what the model reads is now outside
    penalty, _ = rrr_penalty(model, images, smaller, "multiclass")
    assert penalty.item() > 1e-6
    # images without a mask are not penalised
    penalty, _ = rrr_penalty(model, images, smaller, "multiclass", has_mask=np.zeros(4, bool))
    assert penalty.item() == 0.0
    # multilabel (log-sigmoid per finding) too
    assert rrr_penalty(model, images, smaller, "multilabel")[0].item() > 1e-6


def test_penalty_gradient_reaches_the_parameters():
    torch.manual_seed(0)
    model = RegionReader(_square())
    penalty, _ = rrr_penalty(model, torch.randn(4, 3, 16, 16), _square(lo=6, hi=10).expand(4, 1, 16, 16), "multiclass")
    penalty.backward()
    assert model.linear.weight.grad is not None and model.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_penalty_double_backward_works_on_the_torchvision_classifiers(arch):
    torch.manual_seed(0)
    model = build_classifier(arch, num_classes=3).train()
    images, masks = torch.randn(2, 3, 32, 32), _square(32, 8, 24).expand(2, 1, 32, 32)
    check_double_backward(model, images, masks, "multiclass")
    penalty, _ = rrr_penalty(model, images, masks, "multiclass")
    penalty.backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert penalty.item() > 0 and first_conv.weight.grad.abs().sum() > 0


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class NoDoubleBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 16 * 16, 3)

    def forward(self, x):
        return self.linear(_OnceDifferentiable.apply(x).flatten(1))


def test_a_model_without_double_backward_fails_with_a_clear_message():
    with pytest.raises(DoubleBackwardError, match="double backward.*background"):
        check_double_backward(NoDoubleBackward(), torch.randn(2, 3, 16, 16), _square().expand(2, 1, 16, 16),
                              "multiclass")


def _items(n: int = 6, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        mask = torch.zeros(1, size, size)
        lo = int(rng.integers(2, 6))
        mask[:, lo:lo + 6, lo:lo + 6] = 1
        items.append({"image": torch.randn(3, size, size), "mask": mask, "target": torch.tensor(i % 3),
                      "has_mask": i != n - 1, "image_id": f"img_{i}"})
    return items


def test_background_intervention_changes_only_pixels_outside_the_mask_and_never_masks_or_labels():
    items = _items()
    collate = BackgroundIntervention(q=1.0, fill="shuffle", seed=0)
    batch = collate(items)
    original = torch.stack([x["image"] for x in items])
    masks = torch.stack([x["mask"] for x in items])
    assert torch.equal(batch["mask"], masks)
    assert torch.equal(batch["target"], torch.stack([x["target"] for x in items]))
    assert list(batch["image_id"]) == [x["image_id"] for x in items]
    changed = batch["image"] != original                                   # (N, C, H, W)
    inside = masks.expand_as(original) > 0.5
    assert not changed[inside].any(), "a pixel inside the clinical mask changed"
    assert not changed[-1].any(), "an image without a mask changed"
    with_mask = slice(0, len(items) - 1)
    assert changed[with_mask][~inside[with_mask]].all(), "q=1 must replace every outside pixel"
    # another image's background, never the image's own
    for i in range(len(items) - 1):
        outside = ~inside[i]
        donors = [j for j in range(len(items)) if torch.equal(batch["image"][i][outside], original[j][outside])]
        assert donors and i not in donors
    assert collate.swapped == len(items) - 1


@pytest.mark.parametrize("fill", ["shuffle", "noise"])
def test_background_intervention_probability(fill):
    items = _items(n=40)
    images = torch.stack([x["image"] for x in items])
    masks = torch.stack([x["mask"] for x in items])
    assert torch.equal(swap_background(images, masks, 0.0, torch.Generator().manual_seed(0), fill), images)
    out = swap_background(images, masks, 0.5, torch.Generator().manual_seed(0), fill)
    changed = (out != images).flatten(1).any(dim=1).float().mean().item()
    assert 0.2 < changed < 0.8
    inside = masks.expand_as(images) > 0.5
    assert torch.equal(out[inside], images[inside])
    with pytest.raises(ValueError, match="fill"):
        swap_background(images, masks, 0.5, fill="blur")


class ShortcutSet(torch.utils.data.Dataset):
    """Label = brightness of the centre (inside the mask); a corner patch (outside) copies the label exactly."""

    def __init__(self, n: int, seed: int, size: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 2, (n,), generator=g)
        self.images = torch.randn(n, 1, size, size, generator=g) * 0.3
        sign = self.targets.float() * 2 - 1
        self.images[:, :, 5:11, 5:11] += sign[:, None, None, None] * 0.6
        self.images[:, :, 0:4, 0:4] += sign[:, None, None, None] * 1.5       # the shortcut: louder, outside
        self.mask = _square(size, 5, 11)[None]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.mask, "target": self.targets[i], "has_mask": True,
                "image_id": str(i)}


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 2))


def test_a_tiny_training_run_with_the_penalty_lowers_the_gradient_mass_outside_the_mask():
    train, held_out = ShortcutSet(256, 0), ShortcutSet(64, 1)
    masks = held_out.mask.expand(len(held_out), 1, 16, 16)
    flipped = held_out.images.clone()                                  # the shortcut reversed: a decorrelated test
    flipped[:, :, 0:4, 0:4] -= (held_out.targets.float() * 2 - 1)[:, None, None, None] * 3.0
    config = TrainConfig(epochs=5, lr=3e-3, monitor="val", seed=0, amp=False, device="cpu", patience=10)
    measured = {}
    for name, lam in (("plain", None), ("rrr", 10.0)):
        torch.manual_seed(0)
        model = _mlp()
        loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
        loss = RRRLoss(classification_loss("multiclass"), "multiclass", lam) if lam else None
        fit(model, classification_loss("multiclass"), loader, lambda m: {"val": 0.0}, config, batch_loss=loss)
        measured[name] = {"mass": rrr_penalty(model, held_out.images, masks, "multiclass")[0].item()}
        with torch.no_grad():
            measured[name]["accuracy"] = (model(held_out.images).argmax(1) == held_out.targets).float().mean().item()
            measured[name]["reversed"] = (model(flipped).argmax(1) == held_out.targets).float().mean().item()
    plain, rrr = measured["plain"], measured["rrr"]
    assert rrr["mass"] < 0.5 * plain["mass"], measured                  # squared input gradient outside the mask
    assert rrr["accuracy"] > 0.9 and rrr["reversed"] > plain["reversed"] + 0.2, measured   # from the centre now


def test_agreement_gap_and_target_check():
    rows = pd.DataFrame({"correct": [1, 1, 1, 0, 0, 1], "agrees": [True, True, True, False, False, False]})
    assert agreement_gap(rows) == pytest.approx(1 - 1 / 3)
    metrics = pd.DataFrame([
        ("baseline", "shortcut-driven rate", 0.20, 0.15, 0.25), ("rrr", "shortcut-driven rate", 0.05, 0.02, 0.08),
        ("baseline", "agree − disagree gap", 0.40, 0.30, 0.50), ("rrr", "agree − disagree gap", 0.25, 0.15, 0.35),
    ], columns=["model", "metric", "value", "ci_low", "ci_high"])
    comparison = FixComparison(metrics, {"baseline": None, "rrr": None}, {}, pd.DataFrame(), {})
    check = target_check(comparison, "baseline", "rrr").set_index("metric")
    assert check.loc["shortcut-driven rate", "met"]
    assert not check.loc["agree − disagree gap", "at most half"] and not check.loc["agree − disagree gap", "met"]
    assert "[" in comparison.wide().loc["rrr", "shortcut-driven rate"]


def test_train_with_mask_trains_reuses_and_refuses_another_fix(make_tiny_dataset, tmp_path):
    from segx_helpers.data.format import load_dataset
    from segx_helpers.models.checkpoints import CheckpointError

    data = load_dataset(make_tiny_dataset(n=30))
    config = TrainConfig(epochs=1, lr=1e-3, monitor="val_auroc", seed=0, max_batches_per_epoch=2)
    path = tmp_path / "rrr.pt"
    small = NewClassifier(image_size=32)
    trained = train_with_mask(data, path, MaskFix("rrr", 1.0, penalty_images=4), config=config, batch_size=8,
                              classifier=small)
    assert trained.meta["fix"]["method"] == "rrr" and trained.meta["metrics"]["last_epoch_penalty"] >= 0
    again = train_with_mask(data, path, MaskFix("rrr", 1.0, penalty_images=4), config=config, batch_size=8,
                            classifier=small)
    assert all(torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(), again.model.state_dict().values()))
    with pytest.raises(CheckpointError, match="fix"):
        train_with_mask(data, path, MaskFix("rrr", 5.0, penalty_images=4), config=config, batch_size=8, classifier=small)
    background = train_with_mask(data, tmp_path / "bg.pt", MaskFix("background", 1.0), config=config, batch_size=8,
                                 init=trained)
    assert background.meta["metrics"]["images_swapped"] > 0 and background.meta["fix"]["init"]
    with pytest.raises(ValueError, match="probability"):
        train_with_mask(data, tmp_path / "x.pt", MaskFix("background", 2.0), config=config, classifier=small)


class SaturatedReader(nn.Module):
    """Class 1 when pixel (0, 0) of channel 0 is bright, through a saturating tanh: locally flat around a drawn
    artefact, yet removing it flips the prediction (what RRR's penalty cannot see, issue 34)."""

    def forward(self, x):
        evidence = 10 * torch.tanh(20 * (x[:, 0, 0, 0] - 1.0))
        return torch.stack([torch.zeros_like(evidence), evidence], dim=1)


def test_input_gradient_energy_is_rrrs_penalty_and_misses_a_saturated_artefact():
    from segx_helpers.studies.mask_training import input_gradient_energy

    torch.manual_seed(0)
    model = RegionReader(_square())
    images = torch.randn(3, 3, 16, 16)
    square = _square().bool().numpy()[None].repeat(3, axis=0)
    energy = input_gradient_energy(model, images, square, "multiclass")
    penalty, _ = rrr_penalty(model.eval(), images, torch.as_tensor(square).float()[:, None], "multiclass")
    assert energy["outside"].max() < 1e-12 and (energy["inside"] > 0).all()
    assert energy["outside"].mean() == pytest.approx(float(penalty.detach()), abs=1e-9)
    whole = input_gradient_energy(model, images, np.zeros_like(square), "multiclass")
    assert whole["outside"].to_numpy() == pytest.approx(energy["inside"].to_numpy(), rel=1e-5)  # nothing inside now
    drawn = torch.zeros(1, 3, 16, 16)
    drawn[0, 0, 0, 0] = 3.0  # the artefact drawn, far into the tanh's flat part
    artefact = np.zeros((1, 16, 16), bool)
    artefact[0, 0, 0] = True
    flat = input_gradient_energy(SaturatedReader(), drawn, np.zeros((1, 16, 16), bool), "multiclass", artefact)
    assert flat.loc[0, "on artefact"] < 1e-12  # the penalty is met on the artefact ...
    twin = drawn.clone()
    twin[0, 0, 0, 0] = 0.0
    assert SaturatedReader()(drawn).argmax(1).item() == 1 and SaturatedReader()(twin).argmax(1).item() == 0  # ... yet it flips
    assert np.isnan(input_gradient_energy(SaturatedReader(), twin, np.zeros((1, 16, 16), bool), "multiclass",
                                          np.zeros((1, 16, 16), bool)).loc[0, "on artefact"])


def test_the_fix_comparison_on_a_multilabel_grayscale_set(tmp_path):
    """Notebook 07's chest X-ray section (full mode, or ``CXR = True``) on a tiny synthetic-cxr: multi-label,
    one channel, a token per finding with counterfactual twins; quick mode skips that section, so this is where
    make test reaches its path (training both fixes, then :func:`compare_fixes`, :func:`fix_summary` and
    :func:`target_check`)."""
    from segx_helpers.data import SyntheticConfig, generate_synthetic_cxr, load_dataset
    from segx_helpers.models.checkpoints import split_tensors
    from segx_helpers.studies.mask_training import compare_fixes, fix_summary

    data = load_dataset(generate_synthetic_cxr(tmp_path / "cxr", SyntheticConfig(n_images=60, image_size=32, seed=0),
                                               progress=False))
    assert data.info.task == "multilabel" and data.info.channels == 1
    config = TrainConfig(epochs=1, lr=1e-3, monitor="val_auroc", seed=0, max_batches_per_epoch=2)
    base = train_with_mask(data, tmp_path / "base.pt", MaskFix("none", 0.0), config=config, batch_size=8,
                           classifier=NewClassifier(image_size=32))
    models = {"baseline": base,
              "RRR": train_with_mask(data, tmp_path / "rrr.pt", MaskFix("rrr", 10.0, penalty_images=4), config=config,
                                     batch_size=8, init=base),
              "background": train_with_mask(data, tmp_path / "bg.pt", MaskFix("background", 1.0), config=config,
                                            batch_size=8, init=base)}
    lungs = split_tensors(data, "test", base.meta)["mask"][:, 0].numpy() > 0.5
    comparison = compare_fixes(models, data, lungs, n_resamples=20)
    test_ids = set(data.table.loc[data.table["split"] == "test", "image_id"])
    for name, table in comparison.predictions.items():  # one row per (test image, finding decided present)
        assert len(table) and set(table["image_id"]) <= test_ids, name
        assert table["shortcut_driven"].isin([0, 1]).all(), name
    summary = fix_summary(comparison, {"baseline": "baseline", "RRR": "rrr", "background": "background"})
    for name in ("baseline", "rrr", "background"):
        for key in ("accuracy", "auroc", "shortcut_driven_rate", "artefact_mass", "segu_c_iou_mean"):
            low, high = summary[name][f"{key}_ci"]
            assert 0 <= low <= summary[name][key] <= high <= 1, (name, key)
    assert models["background"].meta["metrics"]["images_swapped"] > 0  # the fix trained on this set
    check = target_check(comparison, "baseline", "background").set_index("metric")
    assert {"shortcut-driven rate", "agree − disagree gap"} <= set(check.index)
