"""``auditkit demo``: the packaged synthetic study, model and spec, written to a folder.

``--task classification`` (the default) is the nodule study and tiny CNN of :func:`prepare_demo`;
``--task multilabel``, ``--task regression``, ``--task segmentation`` and ``--task volumes`` are the
planted fixtures of :mod:`auditkit.fixtures.multilabel` (a model trained on labels that
under-report women's findings), :mod:`auditkit.fixtures.regression` (a cardiothoracic-ratio
regressor that never saw site C), :mod:`auditkit.fixtures.segmentation` (a U-Net that never saw
site C's contrast-enhanced lesions) and :mod:`auditkit.fixtures.volumes` (a 3-D CNN on CT volumes,
DICOM series, NIfTI and ``.npy``, that never saw site C), written by :func:`prepare_task_demo`.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import yaml

DEMO_TASKS: tuple[str, ...] = ("classification", "multilabel", "regression", "segmentation", "volumes")
"""The tasks ``auditkit demo --task`` accepts."""

DEMO_SPEC = {
    "model": {
        "factory": "auditkit.fixtures.models:tiny_cnn",
        "factory_kwargs": {"num_classes": 2, "in_channels": 1},
        "weights": "model/tiny_cnn.safetensors",
        "classes": ["normal", "nodule"],
        "positive_class": "nodule",
        "input": {"channels": 1, "height": 64, "width": 64},
        "normalize": {"mean": [0.5], "std": [0.25]},
    },
    "data": {
        "root": ".",
        "manifest": "manifest.csv",
        "splits": {"eval": "test", "train": "train"},
        "groups": {"sex": {}, "age": {"bins": [0, 40, 65, 120]}, "site": {}},
        "dicom": {"window": "auto"},
    },
    # Every installed check runs with its defaults; the checks scale their budgets with the data
    # set and the device (the attacks' on a CPU: AdversarialCheck.Params.for_device).
    "checks": {
        "calibration": {},
        "ood": {},
        "bias": {},
        "corruption": {},
        "adversarial": {},
        "leakage": {},
        "phi": {},
        "backdoor": {},
    },
    "policy": "medical-imaging-default",
    "device": "auto",
    "seed": 0,
    "output": "../audit",
}


def packaged_weights() -> Path:
    """The committed weights of the tiny demo CNN (trained by ``auditkit.fixtures.train``)."""
    ref = resources.files("auditkit.fixtures") / "weights" / "tiny_cnn.safetensors"
    with resources.as_file(ref) as path:
        return Path(path)


def prepare_demo(out: Path, *, n_patients: int = 240, fmt: str = "dicom", seed: int = 0, image_size: int = 256) -> Path:
    """Write the synthetic study, the model weights and ``audit.yaml`` under ``out/study``.

    Returns the spec's path. Paths in the spec are relative, so the folder can be moved.
    ``image_size`` is the stored images' side (the spec decodes them to 64x64 either way).
    """
    from auditkit.fixtures.synthetic import generate_study

    study = out / "study"
    if study.exists():
        shutil.rmtree(study)
    generate_study(study, n_patients=n_patients, seed=seed, fmt=fmt, image_size=image_size)
    if fmt == "dicom":  # the demo data declare the de-identification profile they meet
        from auditkit.fixtures.phi import deidentify_study

        deidentify_study(study)
    (study / "model").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(packaged_weights(), study / "model" / "tiny_cnn.safetensors")
    spec_path = study / "audit.yaml"
    spec_path.write_text(
        "# auditkit demo spec: a synthetic chest-radiograph study and a tiny CNN.\n"
        + yaml.safe_dump(DEMO_SPEC, sort_keys=False),
        encoding="utf-8",
    )
    return spec_path


def prepare_task_demo(out: Path, task: str) -> Path:
    """Write the planted study of ``task``, its packaged model and spec under ``out/study``.

    ``multilabel``: the multi-label chest study and the model trained on under-reported labels of
    women (:func:`auditkit.fixtures.multilabel.write_multilabel_spec`, variant ``underlabelled``);
    ``regression``: the cardiothoracic-ratio study and the model that never saw site C
    (:func:`auditkit.fixtures.regression.write_regression_spec`, variant ``biased``);
    ``segmentation``: the organ and lesion study and the U-Net that never saw site C
    (:func:`auditkit.fixtures.segmentation.write_segmentation_spec`, variant ``biased``);
    ``volumes``: the CT study (216 patients) and the 3-D CNN that never saw site C
    (:func:`auditkit.fixtures.volumes.write_volume_spec`, variant ``biased``);
    ``classification``: :func:`prepare_demo` with its defaults. Every installed check runs.

    Returns:
        The spec's path (paths inside it are relative, so the folder can be moved).

    Raises:
        ValueError: ``task`` is not one of :data:`DEMO_TASKS`.
    """
    if task not in DEMO_TASKS:
        raise ValueError(f"task must be one of {list(DEMO_TASKS)}, got {task!r}")
    if task == "classification":
        return prepare_demo(out)
    study = out / "study"
    if study.exists():
        shutil.rmtree(study)
    if task == "multilabel":
        from auditkit.fixtures.multilabel import generate_multilabel_study, write_multilabel_spec

        generate_multilabel_study(study)
        spec: Path = write_multilabel_spec(study, "underlabelled", device="auto")
        return spec
    if task == "segmentation":
        from auditkit.fixtures.segmentation import generate_segmentation_study, write_segmentation_spec

        generate_segmentation_study(study)
        spec = write_segmentation_spec(study, "biased", device="auto")
        return spec
    if task == "volumes":
        from auditkit.fixtures.volumes import generate_volume_study, write_volume_spec

        # 216 patients with a seed the packaged model was not trained on: about 32 test volumes per
        # site, so the bias check can judge the sites at its default minimum group size.
        generate_volume_study(study, n_patients=216, seed=5)
        spec = write_volume_spec(study, "biased", device="auto")
        return spec
    from auditkit.fixtures.regression import generate_regression_study, write_regression_spec

    generate_regression_study(study)
    spec = write_regression_spec(study, "biased", device="auto")
    return spec
