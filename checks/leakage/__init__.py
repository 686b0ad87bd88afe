"""The leakage check: is the eval split really unseen, and does the label hide in the metadata?

The numbers come from plain functions in :mod:`.identity` (identifiers in both splits),
:mod:`.hashing` (pixel digests, the perceptual hash, the Hamming-space search),
:mod:`.fingerprint` (acquisition fingerprints: registration, ranks, detail, the study's own
calibration), :mod:`.duplicates` (exact and near duplicate pairs) and :mod:`.shortcut` (the cross-validated
AUROC of one column, or its R^2 for a continuous target), all testable without the engine;
:class:`LeakageCheck` applies them to the decoded splits, the shared pass's embeddings and the
DICOM headers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, field_validator

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs, Resources, Skip, SplitRows
from auditkit.checks.leakage.duplicates import (
    DigestGroup,
    NearSearch,
    cosine_rows,
    exact_groups_across,
    exact_groups_within,
    near_duplicate_search,
    near_pairs_across,
    near_pairs_within,
)
from auditkit.checks.leakage.fingerprint import DEFAULT_BAND, slice_depths
from auditkit.checks.leakage.hashing import (
    hamming_distance,
    hamming_pairs,
    hamming_pairs_within,
    pack_bits,
    perceptual_hash,
    pixel_digests,
    unpack_bits,
    volume_hash,
)
from auditkit.checks.leakage.identity import HeaderTexts, header_text, overlap, series_surrogates
from auditkit.checks.leakage.shortcut import (
    AucResult,
    R2Result,
    encode_levels,
    fold_plan,
    group_fold_plan,
    metadata_auroc,
    metadata_r2,
)
from auditkit.context import serial_blas
from auditkit.pixels import concat_pixels
from auditkit.stats import stable_seed

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = [
    "DEFAULT_HEADER_COLUMNS",
    "IMAGE_SIZE",
    "LeakageCheck",
    "cosine_rows",
    "encode_levels",
    "exact_groups_across",
    "exact_groups_within",
    "hamming_distance",
    "hamming_pairs",
    "hamming_pairs_within",
    "metadata_auroc",
    "metadata_r2",
    "near_pairs_across",
    "near_pairs_within",
    "overlap",
    "pack_bits",
    "perceptual_hash",
    "pixel_digests",
    "unpack_bits",
]

IMAGE_SIZE = "image_size"
"""Pseudo-column of the shortcut search: ``Rows x Columns`` from the DICOM header."""

DEFAULT_HEADER_COLUMNS: tuple[str, ...] = (
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "PhotometricInterpretation",
    "PixelSpacing",
    IMAGE_SIZE,
)
"""DICOM fields searched for shortcuts besides the spec's group columns."""

NO_TRAIN = "no train split (set data.splits.train in the spec)"
ROLES = ("train", "eval")
GPU_SEARCH_IMAGES = 100_000
"""Pooled images from which the check asks Ray for a GPU (for the fingerprint search's products).
Measured on two cores (``bench_leakage``): fingerprinting runs at 424-585 images/s, linear; the
search took 44-64 s for 100,000 pooled images and grew 9-14x per 4x, so from about here on it
is a fifth or more of the check's time and a GPU shortens the check; below, a GPU is hardly used."""


class LeakageParams(CheckParams):
    """Parameters of :class:`LeakageCheck`.

    Attributes:
        near_z: robust standard deviations above the median similarity of the study's image
            pairs that a near duplicate's fingerprint similarity must reach (the study's own
            pairs are almost all different acquisitions; see ``docs/leakage.md`` for how 8
            was chosen).
        near_z_per_decade: added to ``near_z`` per tenfold more image pairs compared than
            40,000 (about 280 images), so the expected number of look-alike pairs above the
            bound does not grow with the study (the far tail of look-alike similarities
            falls by about tenfold per 1.75 robust standard deviations).
        near_min_similarity: smallest fingerprint similarity of a near duplicate, whatever
            the study (a correlation; different patients of a homogeneous study score about
            0.0 +- 0.06, copies 0.5-1.0).
        near_components: most principal axes of the study's detail images projected out of
            the fingerprints (at most one per ten images is used).
        hash_bits: perceptual hash length, 64, 128 or 256.
        near_max_distance: largest Hamming radius of the perceptual-hash search, as a fraction
            of ``hash_bits`` (0.195 of 256 = 49 bits).
        near_hash_z: the radius used stays this many robust standard deviations below the
            median Hamming distance of the study's image pairs, so in a homogeneous study
            (where different patients' hashes are close) the hash search is off.
        near_hash_index: how the perceptual-hash search runs: ``exhaustive`` (every pair, exact),
            ``index`` (bit-sampling tables, :mod:`.hash_index`: sub-quadratic, each pair within the
            radius found with probability at least ``near_hash_recall``) or ``auto`` (the index
            from 50 million pairs on - about 10,000 images - where it is estimated cheaper).
        near_hash_recall: the index's probability of finding a pair at the radius (nearer pairs
            are found more often).
        near_min_cosine: smallest cosine similarity of the pair's embeddings (from the shared
            pass) confirming a near duplicate. The default only rejects pairs the model sees as
            clearly different. Each near-duplicate finding gives its cosine.
        near_volume_slices: axial slices of each 3-D volume whose fingerprints and hashes stand
            for it in the near-duplicate search (at the centres of equal slabs of the model's
            input depth); a volume pair's similarity is the mean of its slices' similarities.
        shortcut_columns: columns searched for shortcuts; ``None`` = the spec's group
            columns and ``header_columns``. Each name is a group column, a DICOM keyword or
            ``image_size``.
        header_columns: DICOM fields searched besides the group columns when
            ``shortcut_columns`` is ``None``.
        cv_folds: folds of the shortcut AUROC.
        n_boot: bootstrap resamples of each AUROC interval; 0 disables intervals.
        max_findings: findings listed per kind (and scope); the rest are counted in a
            ``findings_truncated`` finding.
    """

    near_z: float = Field(default=8.0, gt=0.0, le=100.0)
    near_z_per_decade: float = Field(default=1.75, ge=0.0, le=10.0)
    near_min_similarity: float = Field(default=0.25, ge=0.0, le=1.0)
    near_components: int = Field(default=64, ge=0, le=512)
    hash_bits: Literal[64, 128, 256] = 256
    near_max_distance: float = Field(default=0.195, ge=0.0, le=0.5)
    near_hash_z: float = Field(default=5.0, ge=0.0, le=100.0)
    near_hash_index: Literal["auto", "exhaustive", "index"] = "auto"
    near_hash_recall: float = Field(default=0.995, ge=0.5, le=0.9999)
    near_min_cosine: float = Field(default=0.5, ge=-1.0, le=1.0)
    near_volume_slices: int = Field(default=8, ge=1, le=64)
    shortcut_columns: tuple[str, ...] | None = None
    header_columns: tuple[str, ...] = DEFAULT_HEADER_COLUMNS
    cv_folds: int = Field(default=5, ge=2, le=20)
    n_boot: int = Field(default=200, ge=0, le=100_000)
    max_findings: int = Field(default=100, ge=0)

    @field_validator("shortcut_columns", "header_columns")
    @classmethod
    def _unique(cls, values: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if values is not None and len(set(values)) != len(values):
            raise ValueError(f"expected each column once, got {list(values)}")
        return values


class LeakageCheck(Check[LeakageParams]):
    """Data leakage: shared patients, studies and series, duplicate images, metadata shortcuts.

    Method (identity overlap): patients and studies present in both the train and the eval
    split, from the manifest's ``patient_id``/``study_id`` or, where absent, the DICOM PatientID
    and StudyInstanceUID, compared as the run's surrogates (``P0001``, ``S0001``); series from
    the headers' SeriesInstanceUID, given surrogates (``SE0001``) in manifest row order.

    Method (duplicates): exact duplicates are images whose decoded model-input pixels have equal
    BLAKE2b digests. A near duplicate is a pair that is not an exact duplicate, whose embeddings
    from the shared pass have a cosine similarity of at least ``near_min_cosine``, and which one
    of two searches over every split pooled finds (:mod:`.duplicates`):

    * **acquisition fingerprints** (:mod:`.fingerprint`), which tell a *copy* of an acquisition
      (re-noised, re-windowed, re-cropped, rescaled, re-compressed) from another patient's
      look-alike image in a homogeneous study: each image is registered to the study's template
      (affine, efficient second-order minimisation; Benhimane and Malis 2004), its pixels replaced
      by their ranks (no monotone change of tone alters them), band-passed to the scale of fine
      anatomy, texture and noise (difference of Gaussians, sigma 0.7-1.5 pixels at 64 x 64), and
      the study's mean and its leading principal axes (what different patients share; fitted
      with each image weighted by 1 / its near-identical images, so a group of copies cannot
      project itself away) are projected out. The fingerprint similarity (a correlation) must
      reach a bound calibrated on the study itself: the median similarity of its image pairs
      (almost all different acquisitions) plus ``near_z`` robust standard deviations, raised by
      ``near_z_per_decade`` per tenfold more pairs than 40,000 (a multiple-comparison
      correction), and at least ``near_min_similarity``. Exhaustive blocked matrix products;
      above 8,192 images on a random sketch whose candidates are measured exactly;
    * **perceptual hashes** (256-bit DCT pHash; Zauner 2010, "Implementation and Benchmarking of
      Perceptual Image Hash Functions") within a Hamming radius: ``near_max_distance`` of the
      bits at most, and at least ``near_hash_z`` robust standard deviations below the median
      distance of the study's image pairs, so the search runs in a heterogeneous study (as it
      always did) and is off in a homogeneous one, where different patients' hashes are close.
      Exhaustive up to 50 million pairs; beyond, on bit-sampling tables with one-bit multi-probe
      lookups (:mod:`.hash_index`), which find each pair within the radius with probability at
      least ``near_hash_recall`` (0.995) and grow as ``n^1.23`` instead of ``n^2`` (the
      ``duplicate_search`` finding says which search ran).

    3-D volumes are searched the same way on ``near_volume_slices`` axial slices of each volume
    at fixed depths of the model's input: the slices at one depth are fingerprinted as a 2-D
    study, a volume's fingerprint is its slices' concatenated (the similarity of two volumes is
    the mean of their slices' similarities) and its hash their hashes one after another (the
    radius scaled by the number of slices).

    Measured (``docs/leakage.md``, ``scripts/near_duplicate_figures.py``): on look-alike studies
    of one anatomy at one protocol with ten kinds of planted copies (``fixtures/lookalike.py``),
    precision 1.000 and recall 0.975-1.000 on the studies tuned on and on three held out (another
    scanner profile, a scanner without a window, a PNG export), no pair flagged on any clean
    twin; the demo study's train-eval near duplicates fall from 1,974 to 0.

    Method (shortcut signals): for each of the spec's group columns and each DICOM field of
    ``header_columns`` (Manufacturer, ManufacturerModelName, StationName,
    PhotometricInterpretation, PixelSpacing, ``image_size`` = Rows x Columns), the
    cross-validated AUROC of predicting the label from that column alone, by out-of-fold target
    encoding with folds grouped by patient, on train and eval pooled (DeGrave et al. 2021, "AI
    for radiographic COVID-19 detection selects shortcuts over signal", Nature Machine
    Intelligence; Zech et al. 2018, PLOS Medicine). Per task:

    * ``classification``: the AUROC of the class label (macro one-vs-rest for more than two
      classes);
    * ``multilabel``: per label, the AUROC of its known entries (1 against 0; unknown entries are
      left out of that label and counted), on folds stratified by that label; per column, the
      largest of its labels' AUROCs, so the column-level rule judges the label the column gives
      away most (a site that holds nearly every effusion is a shortcut however many other labels
      it says nothing about; "any finding" would dilute it);
    * ``segmentation``: as ``multilabel``, each foreground class a label that is 1 when the
      image's reference holds it (a site whose images nearly all hold a lesion gives it away);
    * ``regression``: per output, the cross-validated R^2 of the column's out-of-fold level means
      (each level's smoothed mean target in the other folds; scikit-learn's ``r2_score`` of the
      pooled out-of-fold predictions), folds grouped by patient and not stratified.

    The identity and duplicate analyses read no label and are the same for every task.

    Inputs: the decoded eval split and, when the spec has one, the train split
    (``Needs(train_optional=True)``: without it the cross-split metrics are undefined, with the
    reason, and the rest uses eval alone); embeddings from the shared pass; header-only DICOM
    reads; the context's device for the fingerprint search's matrix products (a GPU where the
    audit has one; the pairs are measured again on the CPU, so they do not depend on it).

    Metrics (all ``lower_is_better``):
        ``leakage.patient_overlap``, ``leakage.study_overlap``, ``leakage.series_overlap``:
        distinct patients, studies, series present in both train and eval (``n`` = distinct
        identifiers in eval). ``leakage.exact_duplicates`` and ``leakage.near_duplicates``:
        train-eval image pairs (near excludes exact; ``n`` = eval images); the same names with
        labels ``{scope: within_split, split: train|eval}`` count pairs inside one split.
        ``leakage.metadata_auc`` ``{column}``: the cross-validated AUROC (0.5 = no
        information), with a bootstrap ``ci`` when two classes are present (classification and
        multilabel; for multilabel the largest per-label value, with that label's ``ci`` and
        ``n``). Multilabel adds ``leakage.metadata_auc`` ``{column, label}`` per label (``n`` =
        images whose entry is known). Regression: ``leakage.metadata_r2`` ``{column, output}``
        (0 or below = no information; 1 = the column alone gives the target), with a bootstrap
        ``ci`` over images, instead of ``leakage.metadata_auc``.

    Findings: (rows and surrogates only, never a header value) ``patient_overlap``,
    ``study_overlap``, ``series_overlap`` (identifier, train and eval rows); ``exact_duplicate``
    (a group of rows and its pair count); ``near_duplicate`` (a row pair, its fingerprint
    similarity, Hamming distance, embedding cosine and which search found it, strongest first);
    ``duplicate_search`` (both bounds and the study statistics they came from, matches the
    embeddings rejected); ``metadata_signal`` per column (AUROC - multilabel: per label and the
    largest with its label; regression: R^2 per output - number of levels, missing values: never
    the levels); ``strongest_metadata_signal`` (with its label or output);
    ``unknown_label_entries`` (multilabel: entries left out per label); ``missing_identifiers``;
    ``findings_truncated``.

    Limitations:
        - The fingerprints assume one anatomy per study: each image is registered to the
          study's mean image. In a study mixing body parts or views, an image unlike the template
          may be registered arbitrarily and a re-cropped copy of it missed (the hash search, on in
          such a study, still finds copies shifted or cropped by 1-2% of the width). Rotations
          and flips of more than a few degrees escape both searches.
        - Copies re-sampled below the 64 x 64 analysis size lose the fine detail the fingerprint
          compares; copies re-noised far beyond the acquisition's own noise lose it too. The
          weakest copies planted (a shift or crop, a tone change and re-noising together) lie
          near the bound: 11 of 12 were found in the held-out studies.
        - Two images of one patient taken minutes apart with the same positioning are, to the
          fingerprint, copies: the demo study's same-patient follow-ups (rendered with the same
          pixel-level texture and 1-2% repositioning) are flagged inside their split. Findings
          give both patients' surrogates.
        - The bound grows with the number of pairs compared (z 8 up to ~280 images, ~11 at
          2,000 images), so the weakest copies of a very large homogeneous study may be missed.
        - Exact duplicates are judged on the decoded model-input pixels: two originals that
          differ only in detail lost by resizing count as exact duplicates.
        - The embedding confirmation is only as discriminative as the audited model's
          embeddings; a model whose embeddings barely vary confirms every match.
        - Identity overlap trusts the identifiers: a patient re-registered under a new ID is
          found only through duplicate images.
        - A shortcut AUROC is a property of the data set; whether the model uses the shortcut
          needs an intervention test.
        - Multilabel: the column-level value is the largest of the per-label AUROCs, so with
          many labels, or a rare label (few positives: a wide ``ci``), it is biased upwards on a
          column that carries no information; the per-label values and intervals say which.
        - Regression: the encoder predicts a level's mean target, so a column related to the
          target other than through its level means (a variance shift) scores 0.

    NIST AI RMF 1.0: MAP 2.3 (scientific integrity and TEVV considerations, here the
    independence of the test data, are identified and documented), MEASURE 2.1 (test sets,
    metrics and details about the tools used during TEVV are documented).
    """

    id: ClassVar[str] = "leakage"
    family: ClassVar[str] = "leakage"

    Params = LeakageParams

    needs: ClassVar[Needs] = Needs(features=True, train_optional=True, headers=True, images=True)
    emits: ClassVar[tuple[str, ...]] = (
        "leakage.patient_overlap",
        "leakage.study_overlap",
        "leakage.series_overlap",
        "leakage.exact_duplicates",
        "leakage.near_duplicates",
        "leakage.metadata_auc",
        "leakage.metadata_r2",
    )
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multilabel", "regression", "segmentation")
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)

    @classmethod
    def resources_for(cls, images: Mapping[str, int]) -> Resources:
        """On Ray, a GPU (where the cluster has one) from :data:`GPU_SEARCH_IMAGES` pooled eval and
        train images on; below, one CPU, so the task does not queue behind the attacks for a GPU
        it would hardly use."""
        pooled = sum(images.get(role, 0) for role in ROLES)
        return Resources(cpus=1.0, gpus=1.0) if pooled >= GPU_SEARCH_IMAGES else cls.resources

    @serial_blas
    def run(self, ctx: CheckContext, params: LeakageParams) -> CheckResult:
        """Measure identity overlap, duplicates and shortcut signals."""
        p = params
        columns = _columns(ctx, p)  # configuration errors before any work
        splits = {role: ctx.split(role) for role in ROLES if ctx.has_split(role)}
        if splits["eval"].n == 0:
            raise Skip("no eval images (every eval image was quarantined)")
        report = _Report(p.max_findings)
        searched = [c for c, source in columns if source == "header" and c != IMAGE_SIZE]
        keywords = ["SeriesInstanceUID", "Rows", "Columns", *searched]
        headers = {role: ctx.header_texts(role, keywords) for role in splits}
        _identity_overlap(report, splits, headers)
        _duplicates(report, ctx, splits, p)
        _shortcuts(report, ctx, splits, headers, columns, p)
        return report.result()


# --------------------------------------------------------------------------------------------
# Collecting metrics and (capped) findings


class _Report:
    def __init__(self, max_findings: int) -> None:
        self.metrics: list[Metric] = []
        self.findings: list[dict[str, Any]] = []
        self.max_findings = max_findings
        self.dropped: dict[str, int] = {}
        self._listed: dict[str, int] = {}

    def metric(
        self,
        name: str,
        value: float | None,
        *,
        labels: dict[str, str] | None = None,
        n: int | None = None,
        ci: tuple[float, float] | None = None,
        reason: str | None = None,
    ) -> None:
        self.metrics.append(Metric(name, value, "lower_is_better", labels or {}, ci=ci, n=n, reason=reason))

    def listed(self, group: str, finding: dict[str, Any]) -> None:
        """A finding of a kind whose list is capped at ``max_findings``."""
        if self._listed.get(group, 0) < self.max_findings:
            self._listed[group] = self._listed.get(group, 0) + 1
            self.findings.append(finding)
        else:
            self.dropped[group] = self.dropped.get(group, 0) + 1

    def result(self) -> CheckResult:
        if self.dropped:
            self.findings.append(
                {"kind": "findings_truncated", "listed": self.max_findings, "not_listed": self.dropped}
            )
        return CheckResult(metrics=self.metrics, findings=self.findings)


def _rows(split: SplitRows, positions: Sequence[int]) -> list[int]:
    return [int(split.rows[i]) for i in positions]


def _surrogates(split: SplitRows, attribute: str, positions: Sequence[int]) -> list[str | None]:
    values: list[str | None] = getattr(split, attribute)
    return sorted({values[i] for i in positions}, key=lambda v: (v is None, v or ""))


# --------------------------------------------------------------------------------------------
# Identity overlap


def _identity_overlap(
    report: _Report,
    splits: dict[str, SplitRows],
    headers: dict[str, list[HeaderTexts]],
) -> None:
    series = series_surrogates(splits, headers)
    identifiers = {
        "patient": {role: s.patients for role, s in splits.items()},
        "study": {role: s.studies for role, s in splits.items()},
        "series": series,
    }
    sources = {
        "patient": "the manifest's patient_id or the DICOM PatientID",
        "study": "the manifest's study_id or the DICOM StudyInstanceUID",
        "series": "the DICOM SeriesInstanceUID",
    }
    for what, by_role in identifiers.items():
        for role, values in by_role.items():
            missing = sum(1 for v in values if v is None)
            if missing:
                report.findings.append(
                    {
                        "kind": "missing_identifiers",
                        "identifier": what,
                        "split": role,
                        "images": missing,
                        "of": len(values),
                    }
                )
        name = f"leakage.{what}_overlap"
        n_eval = len({v for v in by_role["eval"] if v is not None})
        if "train" not in splits:
            report.metric(name, None, n=n_eval, reason=NO_TRAIN)
            continue
        if not any(v is not None for values in by_role.values() for v in values):
            report.metric(name, None, n=0, reason=f"no {what} identifiers ({sources[what]})")
            continue
        shared = overlap(by_role["train"], by_role["eval"])
        report.metric(name, float(len(shared)), n=n_eval)
        for identifier, (in_train, in_eval) in shared.items():
            finding: dict[str, Any] = {"kind": f"{what}_overlap", what: identifier}
            if what != "patient":
                finding["patients"] = _surrogates(splits["eval"], "patients", in_eval)
            finding["train_rows"] = _rows(splits["train"], in_train)
            finding["eval_rows"] = _rows(splits["eval"], in_eval)
            report.listed(f"{what}_overlap", finding)


# --------------------------------------------------------------------------------------------
# Duplicates


def _embeddings(ctx: CheckContext, roles: Sequence[str]) -> dict[str, NDArray[np.float32]] | None:
    try:
        return {role: ctx.features(role).numpy() for role in roles}
    except Skip:
        return None


def _duplicates(report: _Report, ctx: CheckContext, splits: dict[str, SplitRows], p: LeakageParams) -> None:
    roles = list(splits)
    # As stored (float16, unread: a split on disk is read in batches): equal digests are
    # bit-identical decoded images.
    stored = {role: ctx.pixels(role) for role in roles}
    digests = {role: pixel_digests(stored[role]) for role in roles}
    features = _embeddings(ctx, roles)
    n_eval = splits["eval"].n

    if "train" in splits:
        train, test = splits["train"], splits["eval"]
        groups = exact_groups_across(digests["train"], digests["eval"])
        report.metric("leakage.exact_duplicates", float(sum(g.pairs for g in groups)), n=n_eval)
        for group in sorted(groups, key=lambda g: (g.first[0], g.second[0])):
            report.listed("exact_duplicate:train_eval", _exact_across(train, test, group))
    else:
        report.metric("leakage.exact_duplicates", None, n=n_eval, reason=NO_TRAIN)
    for role, split in splits.items():
        labels = {"scope": "within_split", "split": role}
        groups = exact_groups_within(digests[role])
        report.metric("leakage.exact_duplicates", float(sum(g.pairs for g in groups)), labels=labels, n=split.n)
        for group in sorted(groups, key=lambda g: g.first[0]):
            report.listed(f"exact_duplicate:{role}", _exact_within(split, role, group))

    # One search over every split pooled: the fingerprints' template and principal axes and the
    # calibration of both bounds describe the study, not one split.
    images = concat_pixels([stored[role] for role in roles])
    del stored
    depths = slice_depths(images.shape[2], p.near_volume_slices) if images.ndim == 5 else []
    hashes = volume_hash(images, depths, bits=p.hash_bits) if depths else perceptual_hash(images, bits=p.hash_bits)
    # A volume's hash is its slices' hashes one after another: the radius grows with them.
    max_radius = int(np.floor(p.near_max_distance * p.hash_bits * max(1, len(depths)) + 1e-9))
    split_of = np.concatenate([np.full(splits[role].n, k) for k, role in enumerate(roles)])
    starts = np.cumsum([0] + [splits[r].n for r in roles])[:-1]
    offsets = {role: int(start) for role, start in zip(roles, starts, strict=True)}
    pooled_features = np.concatenate([features[role] for role in roles]) if features is not None else None
    seed = stable_seed(int(ctx.rng().integers(0, 2**63 - 1)), "near-duplicates")
    search = near_duplicate_search(
        images,
        hashes,
        [d for role in roles for d in digests[role]],
        features=pooled_features,
        z=p.near_z,
        z_per_decade=p.near_z_per_decade,
        floor=p.near_min_similarity,
        components=p.near_components,
        max_radius=max_radius,
        hash_z=p.near_hash_z,
        min_cosine=p.near_min_cosine,
        rng=np.random.default_rng(seed),
        volume_slices=p.near_volume_slices,
        hash_index=p.near_hash_index,
        hash_recall=p.near_hash_recall,
        # The quadratic fingerprint search runs on the audit's GPU where there is one.
        device=None if ctx.device.type == "cpu" else ctx.device,
    )
    first, second = split_of[search.i], split_of[search.j]
    scopes = np.where(first == second, np.array(roles, dtype=object)[first], "train_eval")
    rejected: dict[str, int] = {}
    for scope in (["train_eval"] if "train" in splits else []) + roles:
        in_scope = scopes == scope
        rejected[scope] = int(np.count_nonzero(in_scope & ~search.confirmed))
        chosen = np.flatnonzero(in_scope & search.confirmed)
        # Strongest first: the fingerprint similarity, then the positions.
        chosen = chosen[np.lexsort((search.j[chosen], search.i[chosen], -search.similarity[chosen]))]
        if scope == "train_eval":
            report.metric("leakage.near_duplicates", float(chosen.size), n=n_eval)
            for k in chosen.tolist():
                report.listed("near_duplicate:train_eval", _near_across(splits, offsets, search, k))
        else:
            labels = {"scope": "within_split", "split": scope}
            report.metric("leakage.near_duplicates", float(chosen.size), labels=labels, n=splits[scope].n)
            for k in chosen.tolist():
                report.listed(f"near_duplicate:{scope}", _near_within(splits[scope], scope, offsets[scope], search, k))
    if "train" not in splits:
        report.metric("leakage.near_duplicates", None, n=n_eval, reason=NO_TRAIN)

    calibration = search.calibration
    report.findings.append(
        {
            "kind": "duplicate_search",
            "exact": "BLAKE2b-128 of the decoded model-input pixels",
            "fingerprint": (
                "registered, rank-normalised 64x64 image; difference-of-Gaussians detail"
                f" (sigma {DEFAULT_BAND[0]}-{DEFAULT_BAND[1]} px) less the study's mean and"
                f" {search.components} principal axes"
                + (
                    f"; of each volume's axial slices {depths} of {images.shape[2]}, fingerprinted"
                    " depth by depth and concatenated (similarity: the mean of the slices')"
                    if depths
                    else ""
                )
            ),
            "similarity_threshold": _rounded(calibration.threshold),
            "pair_similarity_median": _rounded(calibration.median),
            "pair_similarity_scale": _rounded(calibration.scale),
            "pairs_measured": calibration.pairs,
            "z": _rounded(calibration.z),
            **{("slices_registered" if depths else "images_registered"): search.moved},
            "hash": f"pHash-{p.hash_bits} (low-frequency DCT block of the 32x32 standardised image)"
            + (f", one per slice of {depths}, concatenated" if depths else ""),
            "radius_bits": search.radius if search.radius >= 0 else None,
            "hash_search": (
                "off (the radius fell below zero)"
                if search.radius < 0
                else search.hash_plan.describe()
                if search.hash_plan is not None
                else "exhaustive (every pair)"
            ),
            "pair_hamming_median": _rounded(search.hash_median),
            "pair_hamming_scale": _rounded(search.hash_scale),
            "embedding_confirmation": features is not None,
            "min_cosine": p.near_min_cosine if features is not None else None,
            "matches_rejected_by_embedding": rejected if features is not None else None,
        }
    )


def _rounded(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def _exact_across(train: SplitRows, test: SplitRows, group: DigestGroup) -> dict[str, Any]:
    return {
        "kind": "exact_duplicate",
        "scope": "train_eval",
        "pairs": group.pairs,
        "train_rows": _rows(train, group.first),
        "eval_rows": _rows(test, group.second),
        "train_patients": _surrogates(train, "patients", group.first),
        "eval_patients": _surrogates(test, "patients", group.second),
    }


def _exact_within(split: SplitRows, role: str, group: DigestGroup) -> dict[str, Any]:
    return {
        "kind": "exact_duplicate",
        "scope": "within_split",
        "split": role,
        "pairs": group.pairs,
        "rows": _rows(split, group.first),
        "patients": _surrogates(split, "patients", group.first),
    }


def _evidence(search: NearSearch, k: int) -> dict[str, Any]:
    cosine = float(search.cosine[k])
    found_by = [name for name, hit in (("fingerprint", search.by_fingerprint[k]), ("hash", search.by_hash[k])) if hit]
    return {
        "similarity": round(float(search.similarity[k]), 6),
        "hamming": int(search.hamming[k]),
        "cosine": round(cosine, 6) if np.isfinite(cosine) else None,
        "found_by": found_by,
    }


def _near_across(splits: dict[str, SplitRows], offsets: dict[str, int], search: NearSearch, k: int) -> dict[str, Any]:
    a, b = int(search.i[k]), int(search.j[k])
    train, test = splits["train"], splits["eval"]
    if not offsets["train"] <= a < offsets["train"] + train.n:  # the pooled order may put eval first
        a, b = b, a
    i, j = a - offsets["train"], b - offsets["eval"]
    return {
        "kind": "near_duplicate",
        "scope": "train_eval",
        "train_row": int(train.rows[i]),
        "eval_row": int(test.rows[j]),
        **_evidence(search, k),
        "train_patient": train.patients[i],
        "eval_patient": test.patients[j],
    }


def _near_within(split: SplitRows, role: str, offset: int, search: NearSearch, k: int) -> dict[str, Any]:
    i, j = int(search.i[k]) - offset, int(search.j[k]) - offset
    return {
        "kind": "near_duplicate",
        "scope": "within_split",
        "split": role,
        "rows": [int(split.rows[i]), int(split.rows[j])],
        **_evidence(search, k),
        "patients": [split.patients[i], split.patients[j]],
    }


# --------------------------------------------------------------------------------------------
# Shortcut signals


def _image_size(header: HeaderTexts) -> str | None:
    rows, columns = header_text(header, "Rows"), header_text(header, "Columns")
    return f"{rows}x{columns}" if rows and columns else None


def _columns(ctx: CheckContext, p: LeakageParams) -> list[tuple[str, Literal["group", "header"]]]:
    """The columns to search, each with its source; unknown names are configuration errors."""
    from pydicom.datadict import keyword_dict

    groups = ctx.group_columns
    if p.shortcut_columns is None:
        wanted = groups + [c for c in p.header_columns if c not in groups]
    else:
        wanted = list(p.shortcut_columns)
    columns: list[tuple[str, Literal["group", "header"]]] = []
    for name in wanted:
        if name in groups:
            columns.append((name, "group"))
        elif name == IMAGE_SIZE or name in keyword_dict:
            columns.append((name, "header"))
        else:
            raise ValueError(
                f"checks.leakage.shortcut_columns: {name!r} is neither a data.groups column"
                f" {groups}, a DICOM keyword nor {IMAGE_SIZE!r}"
            )
    return columns


def _column_values(
    ctx: CheckContext,
    roles: Sequence[str],
    pooled_headers: Sequence[HeaderTexts],
    column: str,
    source: Literal["group", "header"],
) -> list[str | None]:
    """One column's value per image of ``roles`` pooled (kept in memory; never reported)."""
    if source == "group":
        return [str(v) for r in roles for v in ctx.group_labels(r)[column].tolist()]
    if column == IMAGE_SIZE:
        return [_image_size(h) for h in pooled_headers]
    return [header_text(h, column) for h in pooled_headers]


def _shortcuts(
    report: _Report,
    ctx: CheckContext,
    splits: dict[str, SplitRows],
    headers: dict[str, list[HeaderTexts]],
    columns: list[tuple[str, Literal["group", "header"]]],
    p: LeakageParams,
) -> None:
    roles = list(splits)
    labels = np.concatenate([splits[r].labels for r in roles])
    patients = [patient for r in roles for patient in splits[r].patients]
    pooled_headers = [h for r in roles for h in headers[r]]
    seed_root = int(ctx.rng().integers(0, 2**63 - 1))
    if ctx.task == "segmentation":  # whether an image holds each foreground class: a label per class
        n = labels.shape[0]
        labels = np.stack([(labels == k).reshape(n, -1).any(axis=1) for k in range(1, len(ctx.classes))], axis=1)
        names = list(ctx.classes)[1:]
        _multilabel_shortcuts(
            report, ctx, roles, labels.astype(np.int64), patients, pooled_headers, columns, seed_root, p, names
        )
        return
    if ctx.task == "multilabel":
        _multilabel_shortcuts(report, ctx, roles, labels, patients, pooled_headers, columns, seed_root, p)
        return
    if ctx.task == "regression":
        _regression_shortcuts(report, ctx, roles, labels, patients, pooled_headers, columns, seed_root, p)
        return
    # One fold assignment for every column: comparable AUROCs, and the grouped split (the slow
    # part) is made once.
    plan = fold_plan(
        labels,
        groups=patients,
        folds=p.cv_folds,
        rng=np.random.default_rng(stable_seed(seed_root, "shortcut-folds")),
    )
    results: list[tuple[str, AucResult]] = []
    for column, source in columns:
        values = _column_values(ctx, roles, pooled_headers, column, source)
        auc = metadata_auroc(
            values,
            labels,
            n_classes=len(ctx.classes),
            positive_class=ctx.positive_index,
            groups=patients,
            folds=p.cv_folds,
            n_boot=p.n_boot,
            rng=np.random.default_rng(stable_seed(seed_root, "shortcut", column)),
            plan=plan,
        )
        del values  # header values stay inside this loop
        report.metric(
            "leakage.metadata_auc",
            auc.value,
            labels={"column": column},
            n=auc.n,
            ci=auc.ci,
            reason=auc.reason,
        )
        report.findings.append(
            {
                "kind": "metadata_signal",
                "column": column,
                "source": source,
                "auroc": auc.value,
                "levels": auc.n_levels,
                "missing": auc.n_missing,
                "folds": auc.folds,
                "splits": roles,
                **({"reason": auc.reason} if auc.reason else {}),
            }
        )
        results.append((column, auc))
    defined = [(c, a.value) for c, a in results if a.value is not None]
    if defined:
        column, value = max(defined, key=lambda item: item[1])
        report.findings.append({"kind": "strongest_metadata_signal", "column": column, "auroc": value})


def _multilabel_shortcuts(
    report: _Report,
    ctx: CheckContext,
    roles: list[str],
    labels: NDArray[Any],
    patients: list[str | None],
    pooled_headers: list[HeaderTexts],
    columns: list[tuple[str, Literal["group", "header"]]],
    seed_root: int,
    p: LeakageParams,
    names: list[str] | None = None,
) -> None:
    """Per label, the AUROC of predicting its known 1/0 entries from each column; per column, the
    largest of its labels' AUROCs (the label the column gives away most)."""
    names = list(ctx.classes) if names is None else names
    known = [np.flatnonzero(labels[:, k] >= 0) for k in range(len(names))]
    unknown = {name: int(labels.shape[0] - rows.size) for name, rows in zip(names, known, strict=True)}
    if any(unknown.values()):
        report.findings.append({"kind": "unknown_label_entries", "left_out": unknown, "splits": roles})
    # One fold assignment per label (stratified by that label), shared by every column.
    plans = [
        fold_plan(
            labels[rows, k],
            groups=[patients[i] for i in rows],
            folds=p.cv_folds,
            rng=np.random.default_rng(stable_seed(seed_root, "shortcut-folds", name)),
        )
        for k, (name, rows) in enumerate(zip(names, known, strict=True))
    ]
    strongest: tuple[float, str, str] | None = None
    for column, source in columns:
        values = _column_values(ctx, roles, pooled_headers, column, source)
        per_label: dict[str, AucResult] = {}
        for k, name in enumerate(names):
            rows = known[k]
            if rows.size == 0:
                auc = AucResult(None, None, 0, 0, 0, 0, "every entry of this label is unknown")
            else:
                auc = metadata_auroc(
                    [values[i] for i in rows.tolist()],
                    labels[rows, k],
                    n_classes=2,
                    positive_class=1,
                    groups=[patients[i] for i in rows.tolist()],
                    folds=p.cv_folds,
                    n_boot=p.n_boot,
                    rng=np.random.default_rng(stable_seed(seed_root, "shortcut", column, name)),
                    plan=plans[k],
                )
            per_label[name] = auc
            report.metric(
                "leakage.metadata_auc",
                auc.value,
                labels={"column": column, "label": name},
                n=auc.n,
                ci=auc.ci,
                reason=auc.reason,
            )
        n_levels = int(encode_levels(values).max()) + 1 if values else 0
        n_missing = sum(1 for v in values if v is None or not str(v).strip())
        del values  # header values stay inside this loop
        defined = [name for name in names if per_label[name].value is not None]
        finding: dict[str, Any] = {
            "kind": "metadata_signal",
            "column": column,
            "source": source,
            "auroc": None,
            "label": None,
            "labels": {name: per_label[name].value for name in names},
            "levels": n_levels,
            "missing": n_missing,
            "folds": {name: per_label[name].folds for name in names},
            "splits": roles,
        }
        if defined:
            # The largest per-label AUROC (the first label among equals): the number the
            # column-level rule judges.
            best = max(defined, key=lambda name: (per_label[name].value, -names.index(name)))
            auc = per_label[best]
            assert auc.value is not None
            report.metric("leakage.metadata_auc", auc.value, labels={"column": column}, n=auc.n, ci=auc.ci)
            finding.update(auroc=auc.value, label=best)
            if strongest is None or auc.value > strongest[0]:
                strongest = (auc.value, column, best)
        else:
            reason = "no label's AUROC is defined: " + "; ".join(f"{n}: {per_label[n].reason}" for n in names)
            report.metric("leakage.metadata_auc", None, labels={"column": column}, n=0, reason=reason)
            finding["reason"] = reason
        report.findings.append(finding)
    if strongest is not None:
        value, column, name = strongest
        report.findings.append({"kind": "strongest_metadata_signal", "column": column, "label": name, "auroc": value})


def _regression_shortcuts(
    report: _Report,
    ctx: CheckContext,
    roles: list[str],
    targets: NDArray[Any],
    patients: list[str | None],
    pooled_headers: list[HeaderTexts],
    columns: list[tuple[str, Literal["group", "header"]]],
    seed_root: int,
    p: LeakageParams,
) -> None:
    """Per output, the cross-validated R^2 of predicting the target from each column."""
    names = list(ctx.classes)
    targets = np.asarray(targets, dtype=np.float64).reshape(targets.shape[0], -1)
    finite = [np.flatnonzero(np.isfinite(targets[:, t])) for t in range(len(names))]
    # The folds keep patients together and do not depend on the target: one plan per set of
    # scored images (every output's, unless a target is missing somewhere).
    plans = [
        group_fold_plan(
            int(rows.size),
            groups=[patients[i] for i in rows.tolist()],
            folds=p.cv_folds,
            rng=np.random.default_rng(stable_seed(seed_root, "shortcut-folds")),
        )
        for rows in finite
    ]
    strongest: tuple[float, str, str] | None = None
    for column, source in columns:
        values = _column_values(ctx, roles, pooled_headers, column, source)
        per_output: dict[str, R2Result] = {}
        for t, name in enumerate(names):
            rows = finite[t]
            r2 = metadata_r2(
                [values[i] for i in rows.tolist()],
                targets[rows, t],
                groups=[patients[i] for i in rows.tolist()],
                folds=p.cv_folds,
                n_boot=p.n_boot,
                rng=np.random.default_rng(stable_seed(seed_root, "shortcut", column, name)),
                plan=plans[t],
            )
            per_output[name] = r2
            report.metric(
                "leakage.metadata_r2",
                r2.value,
                labels={"column": column, "output": name},
                n=r2.n,
                ci=r2.ci,
                reason=r2.reason,
            )
            if r2.value is not None and (strongest is None or r2.value > strongest[0]):
                strongest = (r2.value, column, name)
        n_levels = int(encode_levels(values).max()) + 1 if values else 0
        n_missing = sum(1 for v in values if v is None or not str(v).strip())
        del values  # header values stay inside this loop
        reasons = {name: r.reason for name, r in per_output.items() if r.reason}
        report.findings.append(
            {
                "kind": "metadata_signal",
                "column": column,
                "source": source,
                "r2": {name: r.value for name, r in per_output.items()},
                "levels": n_levels,
                "missing": n_missing,
                "folds": {name: r.folds for name, r in per_output.items()},
                "splits": roles,
                **({"reason": reasons} if reasons else {}),
            }
        )
    if strongest is not None:
        value, column, name = strongest
        report.findings.append({"kind": "strongest_metadata_signal", "column": column, "output": name, "r2": value})
