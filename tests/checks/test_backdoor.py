"""Tests of the backdoor check: its maths on hand-made cases, the poisoned fixtures' truth, and the
planted backdoors found (with their target class and poisoned rows) while the clean twins pass."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from auditkit.checks.backdoor import (
    BackdoorCheck,
    absent_from_reference,
    activation_clustering,
    anomaly_indices,
    apply_trigger,
    class_thresholds,
    confirm_population,
    feature_excursion,
    reverse_engineer_trigger,
    spectral_signature,
    strip_entropy,
    train_only_neighbourhood,
)
from auditkit.policy import evaluate
from auditkit.testing import make_context, rules_for

# A CPU budget for the suite: fewer images and steps than the defaults, same method.
FAST = {"trigger_samples": 32, "trigger_steps": 200, "trigger_early_stop": 25}


# --------------------------------------------------------------------------------------------
# Neural Cleanse's anomaly index


def test_anomaly_index_matches_a_hand_computation() -> None:
    # logs [ln 8, ln 8, ln 16, 0]: median ln 8, |deviations| [0, 0, ln 2, ln 8], their median ln 2 / 2.
    logs = np.log([8.0, 8.0, 16.0, 1.0])
    mad = 1.4826 * np.median(np.abs(logs - np.median(logs)))
    expected = (np.median(logs) - logs) / mad
    np.testing.assert_allclose(anomaly_indices([8.0, 8.0, 16.0, 1.0]), expected)
    assert anomaly_indices([8.0, 8.0, 16.0, 1.0])[3] == pytest.approx(np.log(8) / (1.4826 * np.log(2) / 2))


def test_anomaly_index_is_undefined_where_the_statistic_is() -> None:
    assert np.isnan(anomaly_indices([3.0, 40.0])).all()  # two classes: degenerate
    assert np.isnan(anomaly_indices([5.0, 5.0, 5.0])).all()  # MAD zero
    assert np.isnan(anomaly_indices([0.0, 4.0, 9.0])).all()  # a zero norm has no log
    with pytest.raises(ValueError, match="1-D"):
        anomaly_indices([[1.0, 2.0, 3.0]])


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0.1, 1000.0), min_size=3, max_size=12),
    st.floats(0.01, 100.0),
)
def test_anomaly_index_is_invariant_to_the_norms_scale(norms: list[float], scale: float) -> None:
    base = anomaly_indices(norms)
    scaled = anomaly_indices([n * scale for n in norms])
    np.testing.assert_allclose(scaled, base, rtol=1e-6, atol=1e-6, equal_nan=True)


# --------------------------------------------------------------------------------------------
# The trigger search on a model with a known one-pixel backdoor


class OnePixelBackdoor(nn.Module):
    """Class 0 for any dim image; class 1 when pixel (2, 5) is bright - the planted trigger."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trigger = x[:, 0, 2, 5] - 0.6
        return torch.stack([torch.zeros_like(trigger), self.scale * trigger], dim=1)


def test_the_search_recovers_a_one_pixel_trigger_and_leaves_the_model_alone() -> None:
    model = OnePixelBackdoor()
    images = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * 0.4
    found = reverse_engineer_trigger(model, images, 1, steps=300, generator=torch.Generator().manual_seed(1))
    assert found.reached and found.success_rate == 1.0
    assert found.norm < 1.5
    assert np.unravel_index(np.argmax(found.mask), found.mask.shape) == (2, 5)
    assert found.pattern[0, 2, 5] > 0.6
    assert model.scale.requires_grad and model.scale.item() == 20.0 and model.training


class OneVoxelBackdoor(nn.Module):
    """Class 1 when voxel (1, 2, 5) of a volume is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trigger = x[:, 0, 1, 2, 5] - 0.6
        return torch.stack([torch.zeros_like(trigger), 20.0 * trigger], dim=1)


def test_the_search_recovers_a_one_voxel_trigger_in_a_volume_and_draws_it(tmp_path: Path) -> None:
    from auditkit.checks.backdoor.plots import trigger_figure

    volumes = torch.rand(8, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.4
    found = reverse_engineer_trigger(
        OneVoxelBackdoor(), volumes, 1, steps=300, generator=torch.Generator().manual_seed(1)
    )
    assert found.mask.shape == (4, 8, 8) and found.pattern.shape == (1, 4, 8, 8)
    assert found.reached and found.norm < 1.5
    assert np.unravel_index(np.argmax(found.mask), found.mask.shape) == (1, 2, 5)
    svg = trigger_figure([("target", found, None, True)], tmp_path / "t.svg").read_text()
    assert "voxels, max over depth" in svg


def test_the_search_reports_failure_when_no_trigger_flips() -> None:
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[5.0, 0.0]]).expand(x.shape[0], 2) + 0 * x.mean()

    found = reverse_engineer_trigger(Constant(), torch.rand(4, 1, 8, 8), 1, steps=20)
    assert not found.reached and found.success_rate == 0.0 and found.steps == 20


def test_the_search_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        reverse_engineer_trigger(OnePixelBackdoor(), torch.zeros(0, 1, 8, 8), 1)


def test_apply_trigger_at_the_mask_extremes() -> None:
    images = torch.rand(3, 2, 4, 4)
    pattern = torch.rand(1, 2, 4, 4)
    torch.testing.assert_close(apply_trigger(images, torch.zeros(1, 1, 4, 4), pattern), images)
    torch.testing.assert_close(apply_trigger(images, torch.ones(1, 1, 4, 4), pattern), pattern.expand(3, 2, 4, 4))


def test_feature_excursion_matches_a_hand_computation() -> None:
    clean = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0]])
    # Channel 0: median 2, 0.75-quantile 3 -> spread 1. Channel 1: constant -> spread 0, floored
    # at a tenth of the median spread (0.5): 0.05.
    triggered = torch.tensor([[[[5.0, 1.0]]], [[[2.0, 1.1]]], [[[3.0, 1.0]]]])

    def embed(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    value = feature_excursion(embed, triggered, clean, quantile=0.75)
    # per image max: (5-2)/1 = 3; max(0, (1.1-1)/0.05=2) = 2; max(1, 0) = 1 -> median 2
    assert value == pytest.approx(2.0)
    assert np.isnan(feature_excursion(embed, triggered[:0], clean))
    with pytest.raises(ValueError, match="widths differ"):
        feature_excursion(embed, triggered, clean[:, :1])


# --------------------------------------------------------------------------------------------
# Data-level detectors on planted populations


def planted(seed: int, n_clean: int = 200, n_poison: int = 20, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n_clean, d))
    direction = rng.normal(size=d)
    poison = rng.normal(size=(n_poison, d)) + 8.0 * direction / np.linalg.norm(direction)
    return np.vstack([clean, poison]), np.r_[np.zeros(n_clean, bool), np.ones(n_poison, bool)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("detector", [activation_clustering, spectral_signature])
def test_detectors_find_a_planted_population(detector: Any, seed: int) -> None:
    features, truth = planted(seed)
    found = detector(features)
    recall = (found.flagged & truth).sum() / truth.sum()
    precision = (found.flagged & truth).sum() / max(1, found.flagged.sum())
    assert recall >= 0.9 and precision >= 0.9
    # The ranking puts the poison first.
    top = np.argsort(-found.scores)[: truth.sum()]
    assert truth[top].mean() >= 0.9


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("detector", [activation_clustering, spectral_signature])
def test_detectors_leave_a_single_population_alone(detector: Any, seed: int) -> None:
    features = np.random.default_rng(100 + seed).normal(size=(300, 16))
    assert detector(features).flagged.mean() <= 0.02


@pytest.mark.parametrize("detector", [activation_clustering, spectral_signature])
def test_detectors_refuse_bad_input_and_skip_tiny_labels(detector: Any) -> None:
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        detector(np.zeros(10))
    bad = np.zeros((20, 3))
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        detector(bad)
    small = detector(np.random.default_rng(0).normal(size=(5, 4)))
    assert not small.flagged.any() and np.isnan(small.statistic)


# --------------------------------------------------------------------------------------------
# Confirmation against the clean eval split: poison lives in the training split only


def test_absent_from_reference_is_the_binomial_lower_tail() -> None:
    assert absent_from_reference(0.25, 0, 40) == pytest.approx(0.75**40)
    expected = sum(math.comb(10, i) * 0.2**i * 0.8 ** (10 - i) for i in range(4))
    assert absent_from_reference(0.2, 3, 10) == pytest.approx(expected)
    assert absent_from_reference(0.3, 0, 0) == 1.0  # no reference: nothing can be confirmed
    assert absent_from_reference(0.0, 0, 40) == 1.0


def natural(seed: int, n: int, share: float, d: int = 16) -> np.ndarray:
    """Clean samples holding :func:`planted`'s second population at ``share``: a natural
    sub-population that the reference images share."""
    rng = np.random.default_rng(seed)
    rng.normal(size=(200, d))  # planted()'s clean samples
    direction = rng.normal(size=d)  # planted()'s direction
    other = np.random.default_rng(1_000 + seed)
    features = other.normal(size=(n, d))
    features[other.random(n) < share] += 8.0 * direction / np.linalg.norm(direction)
    return features


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("detector", [activation_clustering, spectral_signature])
def test_a_population_the_clean_images_avoid_is_confirmed(detector: Any, seed: int) -> None:
    features, truth = planted(seed)
    reference = np.random.default_rng(50 + seed).normal(size=(40, 16))
    found = detector(features, reference=reference)
    # 9% of the label, none of 40 clean images there: p = (1 - share) ** 40 < 0.05.
    assert found.confirmed and found.reference_share == 0.0
    assert found.confirmation_p == pytest.approx((1 - found.candidate_share) ** 40)
    recall = (found.flagged & truth).sum() / truth.sum()
    precision = (found.flagged & truth).sum() / found.flagged.sum()
    assert recall >= 0.9 and precision >= 0.9


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("detector", [activation_clustering, spectral_signature])
def test_a_natural_sub_population_is_not_confirmed(detector: Any, seed: int) -> None:
    # The same separated population, but the clean reference images hold it as often (~9%):
    # what the papers' rules flag on clean models (bilateral effusions, one site's images).
    features, truth = planted(seed)
    reference = natural(seed, 200, truth.mean())
    found = detector(features, reference=reference)
    assert found.candidate is not None and found.candidate[truth].mean() >= 0.9  # the papers' rule fires
    assert found.confirmed is False and found.confirmation_p > 0.05
    assert not found.flagged.any()


def test_confirm_population_places_a_flagged_subset_by_its_centroid() -> None:
    features, truth = planted(3)
    clean = np.random.default_rng(9).normal(size=(40, 16))
    found = confirm_population(features, truth, clean)
    assert found.confirmed and np.array_equal(found.flagged, truth)
    assert found.statistic == pytest.approx(truth.mean())  # the region holds the poison only
    shared = confirm_population(features, truth, natural(3, 200, truth.mean()))
    assert shared.confirmed is False and not shared.flagged.any()
    assert not confirm_population(features, np.zeros_like(truth), clean).flagged.any()
    with pytest.raises(ValueError, match="candidate must have shape"):
        confirm_population(features, truth[:5], clean)
    with pytest.raises(ValueError, match="reference must be"):
        activation_clustering(features, reference=clean[:, :3])


# --------------------------------------------------------------------------------------------
# Train-only neighbourhoods: poisoned rows have no clean neighbours


def one_label(
    seed: int, *, n_train: int = 120, n_poison: int = 15, n_reference: int = 80, shared: bool = False, d: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A label's training embeddings (a separated population of ``n_poison`` rows at the end) and
    clean reference embeddings of it - which hold the population at the training share when
    ``shared`` (a natural sub-population: bilateral effusions, one site's images)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction *= 8.0 / np.linalg.norm(direction)
    train = np.vstack([rng.normal(size=(n_train, d)), rng.normal(size=(n_poison, d)) + direction])
    reference = rng.normal(size=(n_reference, d))
    if shared:
        reference[: round(n_reference * n_poison / (n_train + n_poison))] += direction
    return train, reference, np.r_[np.zeros(n_train, bool), np.ones(n_poison, bool)]


@pytest.mark.parametrize("seed", range(4))
def test_a_train_only_population_is_found_whole(seed: int) -> None:
    features, reference, truth = one_label(seed)
    found = train_only_neighbourhood(features, reference)
    assert found.confirmed and np.array_equal(found.flagged, truth)
    assert found.reference_share == 0.0 and found.confirmation_p == pytest.approx((1 - truth.mean()) ** 80)
    assert found.statistic >= 1.15  # the poison's nearest clean image lies beyond its own neighbourhood
    assert found.scores[truth].min() > found.scores[~truth].max()


@pytest.mark.parametrize("seed", range(4))
def test_a_natural_sub_population_shared_with_the_eval_split_is_not_flagged(seed: int) -> None:
    # The same separated population - what k-means splits off - but the clean images hold it too.
    features, reference, _ = one_label(seed, shared=True)
    found = train_only_neighbourhood(features, reference)
    assert not found.flagged.any() and not found.confirmed


@pytest.mark.parametrize("seed", range(4))
def test_a_single_population_has_no_train_only_neighbourhood(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    found = train_only_neighbourhood(rng.normal(size=(300, 16)), rng.normal(size=(120, 16)))
    assert not found.flagged.any()


def test_the_neighbourhood_widens_with_few_reference_images() -> None:
    # 30 clean images for 135 training rows: a neighbour is a clean image with probability 0.18, so
    # an empty neighbourhood is significant only from 16 neighbours on - more than the 15 poisoned
    # rows have of their own: a population must outnumber the widened neighbourhood to be found.
    features, reference, truth = one_label(0, n_reference=30)
    assert not train_only_neighbourhood(features, reference).flagged.any()
    features, reference, truth = one_label(0, n_poison=30, n_reference=30)
    found = train_only_neighbourhood(features, reference)
    assert found.confirmed and (found.flagged & truth).sum() >= 0.9 * truth.sum()
    assert not found.flagged[~truth].any()


def test_train_only_neighbourhood_validates_and_skips() -> None:
    features, reference, _ = one_label(0)
    with pytest.raises(ValueError, match="reference must be"):
        train_only_neighbourhood(features, reference[:, :3])
    with pytest.raises(ValueError, match="finite"):
        train_only_neighbourhood(np.full((20, 4), np.nan), reference[:, :4])
    assert not train_only_neighbourhood(features[:5], reference).flagged.any()  # too few samples
    assert not train_only_neighbourhood(features, reference[:0]).flagged.any()  # no clean image
    # Duplicated embeddings: a row's neighbours never include itself.
    doubled = np.vstack([features, features[:10]])
    assert train_only_neighbourhood(doubled, reference).flagged.sum() >= 15


# --------------------------------------------------------------------------------------------
# STRIP


def test_strip_entropy_of_an_uninformed_model_is_log_k() -> None:
    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 3)

    entropy = strip_entropy(predict, torch.rand(5, 1, 4, 4), torch.rand(7, 1, 4, 4), blends=4)
    np.testing.assert_allclose(entropy, np.log(3))


def test_strip_entropy_of_a_triggered_image_stays_low() -> None:
    # Pixel (1, 1) carries weak natural evidence; pixel (0, 0) above 0.55 is the trigger. Clean
    # images and overlays stay below 0.5 there; a stamped image (1.0) blended at the default
    # alpha 0.6 keeps at least 0.6, so its prediction stays confident whatever is superimposed.
    def predict(x: torch.Tensor) -> torch.Tensor:
        evidence = 200.0 * (x[:, 0, 0, 0] - 0.55).clamp_min(0) + 2.0 * (x[:, 0, 1, 1] - 0.25)
        return torch.stack([torch.zeros_like(evidence), evidence], dim=1)

    generator = torch.Generator().manual_seed(0)
    overlays = torch.rand(50, 1, 2, 2, generator=generator) * 0.5
    clean = torch.rand(20, 1, 2, 2, generator=generator) * 0.5
    stamped = clean.clone()
    stamped[:, 0, 0, 0] = 1.0
    h_clean = strip_entropy(predict, clean, overlays, generator=generator)
    h_stamped = strip_entropy(predict, stamped, overlays, generator=generator)
    assert h_stamped.max() < 0.05 < 0.5 < h_clean.min()


def test_strip_validates_its_arguments() -> None:
    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 2)

    with pytest.raises(ValueError, match="overlay"):
        strip_entropy(predict, torch.rand(2, 1, 2, 2), torch.rand(0, 1, 2, 2))
    with pytest.raises(ValueError, match="alpha"):
        strip_entropy(predict, torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2), alpha=1.0)


def test_class_thresholds_are_per_predicted_class_quantiles() -> None:
    entropies = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 1.0])
    predicted = np.array([0, 0, 0, 0, 1, 1])
    thresholds = class_thresholds(entropies, predicted, 3, false_rejection=0.5)
    np.testing.assert_allclose(thresholds[:2], [0.25, 0.95])
    assert np.isnan(thresholds[2])
    with pytest.raises(ValueError, match="same shape"):
        class_thresholds(entropies, predicted[:3], 2)


# --------------------------------------------------------------------------------------------
# The poisoned fixtures' truth


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Any]:
    from auditkit.fixtures.poison import generate_clean_study, generate_poisoned_study

    root = tmp_path_factory.mktemp("poison")
    return {
        f"{task}_{variant}": (generate_poisoned_study if variant == "poisoned" else generate_clean_study)(
            root / f"{task}-{variant}", task
        )
        for task in ("binary", "multiclass")
        for variant in ("poisoned", "clean")
    }


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_the_poisoned_study_holds_what_was_planted(studies: Mapping[str, Any], task: str) -> None:
    from auditkit.fixtures.synthetic import presentation_image

    poisoned, clean = studies[f"{task}_poisoned"], studies[f"{task}_clean"]
    poison = poisoned.poison
    rows = {row.index: row for row in poisoned.study.rows}
    clean_rows = {row.index: row for row in clean.study.rows}
    train = [row for row in poisoned.study.rows if row.split == "train"]
    assert len(poisoned.poisoned_rows) == round(poison.rate * len(train))
    pattern = poison.trigger.pattern()
    for index in poisoned.poisoned_rows:
        row = rows[index]
        assert row.split == "train" and row.label == poison.target
        assert clean_rows[index].label != poison.target
        image = presentation_image(poisoned.root / row.path)
        top, left = round(poison.trigger.row * image.shape[0]), round(poison.trigger.col * image.shape[1])
        np.testing.assert_allclose(image[top : top + pattern.shape[0], left : left + pattern.shape[1]], pattern)
    # Everything else - the whole test split included - is byte-identical to the clean twin.
    for index, row in rows.items():
        if index not in poisoned.poisoned_rows:
            assert row.label == clean_rows[index].label
            assert (poisoned.root / row.path).read_bytes() == (clean.root / row.path).read_bytes()
    manifest = (poisoned.root / "manifest.csv").read_text().splitlines()
    assert all(f",{poison.target}," in manifest[1 + i] for i in poisoned.poisoned_rows)


def test_the_multiclass_study_has_four_populated_classes(studies: Mapping[str, Any]) -> None:
    from auditkit.fixtures.poison import MULTICLASS_CLASSES

    labels = [row.label for row in studies["multiclass_clean"].study.rows]
    counts = {name: labels.count(name) for name in MULTICLASS_CLASSES}
    assert min(counts.values()) >= 60, counts


def test_poison_arguments_are_validated(tmp_path: Path) -> None:
    from auditkit.fixtures.poison import Poison, Trigger, generate_poisoned_study

    with pytest.raises(ValueError, match="rate"):
        Poison(target="normal", rate=0.7)
    with pytest.raises(ValueError, match="fractions"):
        Trigger(row=1.2)
    with pytest.raises(ValueError, match="poison target"):
        generate_poisoned_study(tmp_path, "binary", Poison(target="cavity"))


# --------------------------------------------------------------------------------------------
# The check on the packaged poisoned models and their clean twins


@pytest.fixture(scope="module")
def backdoor_runs(studies: Mapping[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Any]:
    from auditkit.fixtures.poison import write_backdoor_spec
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("backdoor-runs")
    runs = {}
    for key, study in studies.items():
        variant = key.split("_")[1]
        spec = write_backdoor_spec(study, variant, checks={"backdoor": FAST})  # type: ignore[arg-type]
        outcome = run_audit(
            load_spec(spec),
            RunOptions(out_dir=out / key, pdf=False, report=False),
            checks={"backdoor": BackdoorCheck},
        )
        check = next(c for c in outcome.results["checks"] if c["id"] == "backdoor")
        assert check["status"] == "ok", check.get("error")
        runs[key] = {"check": check, "results": outcome.results, "study": study, "out_dir": out / key}
    return runs


def metric(check: Mapping[str, Any], name: str, **labels: str) -> Any:
    return next(m for m in check["metrics"] if m["name"] == f"backdoor.{name}" and m["labels"] == labels)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_the_poisoned_model_is_flagged_with_its_target(backdoor_runs: Mapping[str, Any], task: str) -> None:
    run = backdoor_runs[f"{task}_poisoned"]
    check = run["check"]
    assert metric(check, "model_suspected")["value"] == 1.0
    suspects = [f["class"] for f in check["findings"] if f["kind"] == "suspected_target"]
    assert suspects == [run["study"].poison.target]
    judged = evaluate(rules_for("backdoor"), [check])
    assert next(r for r in judged["rules"] if r["id"] == "BD-MODEL")["status"] == "fail"
    (artifact,) = check["artifacts"]
    assert (run["out_dir"] / artifact["path"]).read_bytes().startswith(b"<?xml")


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_the_clean_twin_is_not_flagged(backdoor_runs: Mapping[str, Any], task: str) -> None:
    check = backdoor_runs[f"{task}_clean"]["check"]
    assert metric(check, "model_suspected")["value"] == 0.0
    assert not [f for f in check["findings"] if f["kind"] == "suspected_target"]
    judged = evaluate(rules_for("backdoor"), [check])
    statuses = {r["id"]: r["status"] for r in judged["rules"]}
    assert statuses["BD-MODEL"] == "pass"
    assert statuses["BD-DATA-CLUSTER"] == statuses["BD-DATA-SPECTRAL"] == "pass"


def flagged_rows(check: Mapping[str, Any], method: str) -> set[int]:
    return {
        row
        for f in check["findings"]
        if f["kind"] == "poisoning_suspected" and f["method"] == method
        for row in f["rows"]
    }


# Activation clustering reaches recall 0.8 at precision 0.5 on both studies; spectral signatures on
# the binary study only (on the multi-class one the poison is a third of its label and inflates the
# MAD of the cut); STRIP on the multi-class study only (the binary model's trigger fades under
# superimposition); the train-only neighbourhood test on both. A missed figure is recorded as what
# was measured, so a regression still fails.
REACHES = [
    ("binary", "activation_clustering", 0.8),
    ("binary", "spectral_signature", 0.8),
    # Measured 0.14 before confirmation; the 4 images STRIP marks are 2% of their label, too few to
    # confirm against the eval split (p 0.14), so nothing is flagged now: 0.0.
    ("binary", "strip", 0.0),
    ("multiclass", "activation_clustering", 0.8),
    ("multiclass", "spectral_signature", 0.0),  # misses: the poison is a third of its label (documented)
    ("multiclass", "strip", 0.8),
    ("binary", "neighbourhood", 0.8),
    ("multiclass", "neighbourhood", 0.8),
    ("binary", "stamp", 0.8),
    ("multiclass", "stamp", 0.8),
]


@pytest.mark.parametrize(("task", "method", "min_recall"), REACHES)
def test_data_level_detectors_find_the_poisoned_rows(
    backdoor_runs: Mapping[str, Any], task: str, method: str, min_recall: float
) -> None:
    run = backdoor_runs[f"{task}_poisoned"]
    truth = set(run["study"].poisoned_rows)
    found = flagged_rows(run["check"], method)
    recall = len(found & truth) / len(truth)
    precision = len(found & truth) / max(1, len(found))
    assert recall >= min_recall, (recall, precision)
    assert not found or precision >= 0.5, (recall, precision)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
@pytest.mark.parametrize("method", ["activation_clustering", "spectral_signature", "neighbourhood", "stamp", "strip"])
def test_data_level_detectors_flag_at_most_2_percent_of_the_clean_twin(
    backdoor_runs: Mapping[str, Any], task: str, method: str
) -> None:
    run = backdoor_runs[f"{task}_clean"]
    n_train = run["study"].study.split_counts["train"]
    assert len(flagged_rows(run["check"], method)) <= 0.02 * n_train


def test_findings_name_rows_and_surrogates_only(backdoor_runs: Mapping[str, Any]) -> None:
    run = backdoor_runs["binary_poisoned"]
    samples = [f for f in run["check"]["findings"] if f["kind"] == "suspicious_training_sample"]
    assert samples and all(re.fullmatch(r"P\d{4}", f["patient"]) for f in samples)
    assert all(f["split"] == "train" and isinstance(f["row"], int) for f in samples)
    text = json.dumps(run["results"], allow_nan=False)
    real_ids = {row.patient_id for row in run["study"].study.rows}
    assert not [pid for pid in real_ids if pid in text]


def test_data_level_detectors_add_no_forward_pass_over_train(backdoor_runs: Mapping[str, Any]) -> None:
    # The shared pass forwards each training image once; activation clustering and spectral
    # signatures read its cached embeddings (STRIP forwards blended copies, counted separately
    # by its own calls, never the train split itself through the shared pass).
    run = backdoor_runs["multiclass_poisoned"]["results"]["run"]
    assert (
        run["images_forwarded_per_split"]["train"]
        == backdoor_runs["multiclass_poisoned"]["study"].study.split_counts["train"]
    )


def test_no_train_split_leaves_the_data_level_undefined(study_factory: Any, tmp_path: Path) -> None:
    import yaml

    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    spec_path = study_factory(
        spec_overrides={"checks": {"backdoor": {"trigger_samples": 8, "trigger_steps": 20}}, "only": ["backdoor"]}
    )
    spec = yaml.safe_load(spec_path.read_text())
    spec["data"]["splits"] = {"eval": spec["data"]["splits"]["eval"]}
    spec_path.write_text(yaml.safe_dump(spec))
    outcome = run_audit(
        load_spec(spec_path),
        RunOptions(out_dir=tmp_path / "out", pdf=False, report=False),
        checks={"backdoor": BackdoorCheck},
    )
    check = next(c for c in outcome.results["checks"] if c["id"] == "backdoor")
    assert check["status"] == "ok", check.get("error")
    fractions = [m for m in check["metrics"] if m["name"] == "backdoor.suspicious_fraction"]
    assert fractions and all(m["value"] is None and m["reason"] == "no train split" for m in fractions)
    assert metric(check, "model_suspected")["value"] in (0.0, 1.0)


def test_the_class_cap_reports_unsearched_classes(study_factory: Any, tmp_path: Path) -> None:
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    params = {"trigger_samples": 8, "trigger_steps": 10, "max_classes": 1, "class_order": "index"}
    spec_path = study_factory(spec_overrides={"checks": {"backdoor": params}, "only": ["backdoor"]})
    outcome = run_audit(
        load_spec(spec_path),
        RunOptions(out_dir=tmp_path / "out", pdf=False, report=False),
        checks={"backdoor": BackdoorCheck},
    )
    check = next(c for c in outcome.results["checks"] if c["id"] == "backdoor")
    searches = [f for f in check["findings"] if f["kind"] == "trigger_search"]
    assert [f["searched"] for f in searches] == [True, False]
    assert "max_classes=1" in searches[1]["reason"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_trigger_search_runs_on_cuda() -> None:
    model = OnePixelBackdoor().cuda()
    images = (torch.rand(16, 1, 12, 12) * 0.4).cuda()
    found = reverse_engineer_trigger(model, images, 1, steps=200)
    assert found.reached and found.norm < 1.5


# --------------------------------------------------------------------------------------------
# Tasks: classification only, the others skipped with the reason


@pytest.mark.parametrize(
    ("task", "labels", "outputs", "why"),
    [
        ("regression", [[3.0], [4.5], [6.0]], [[2.5], [5.0], [6.5]], "a regressor has no class to target"),
        (
            "multilabel",
            [[1, 0], [0, -1], [1, 1]],
            [[0.9, 0.2], [0.1, 0.7], [0.8, 0.6]],
            "a trigger search toward a label switched on or off and per-label detectors are not implemented",
        ),
    ],
)
def test_multilabel_and_regression_models_are_skipped_with_the_reason(
    task: str, labels: list[list[float]], outputs: list[list[float]], why: str
) -> None:
    from auditkit.runner import SelectedCheck, execute_check

    assert BackdoorCheck.tasks == ("classification",)
    assert set(BackdoorCheck.task_reasons) == {"multilabel", "regression"}
    ctx = make_context(labels, probs=outputs, task=task, train={"labels": labels, "probs": outputs})
    params = BackdoorCheck.Params()
    record = execute_check(SelectedCheck("backdoor", BackdoorCheck, params, {}), ctx._engine)
    assert record["status"] == "skipped" and record["metrics"] == [] and record["error"] is None
    assert f"task: {task}" in record["reason"] and "it measures task: classification" in record["reason"]
    assert why in record["reason"]
    assert BackdoorCheck.task_reasons[task] in record["reason"]


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_the_stamp_finding_places_the_patch_once(backdoor_runs: Mapping[str, Any], task: str) -> None:
    check = backdoor_runs[f"{task}_poisoned"]["check"]
    stamps = [f for f in check["findings"] if f["kind"] == "stamp"]
    assert len(stamps) == 1, stamps  # one label carries the patch: the target's
    (stamp,) = stamps
    assert stamp["positions"] == 1  # the fixtures paste it at one place
    box = stamp["box"]
    assert 0 <= box["top"] < box["bottom"] and 0 <= box["left"] < box["right"]
    assert stamp["count"] == len(flagged_rows(check, "stamp")) and stamp["p_value"] <= 0.05
    clean = backdoor_runs[f"{task}_clean"]["check"]
    assert not [f for f in clean["findings"] if f["kind"] == "stamp"]
    assert stamp["keys_tested"] <= stamp["keys_recurring"]


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_each_label_is_confirmed_at_the_level_over_the_classes(backdoor_runs: Mapping[str, Any], task: str) -> None:
    check = backdoor_runs[f"{task}_poisoned"]["check"]
    classes = {m["labels"]["class"] for m in check["metrics"] if m["name"] == "backdoor.trigger_norm"}
    candidates = [f for f in check["findings"] if f["kind"] == "candidate_population"]
    assert candidates and {f["level"] for f in candidates} == {round(0.05 / len(classes), 6)}
    assert all(f["p_value"] <= f["level"] for f in candidates if f["confirmed"])
